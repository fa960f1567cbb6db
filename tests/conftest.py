"""Shared fixtures: one Azurite for the session, started from node_modules."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from localdev import stack


@pytest.fixture(scope="session")
def azurite_connection() -> Iterator[str]:
    """Azurite's connection string: AZURITE_CONNECTION_STRING if set, else a private Azurite."""
    given = os.environ.get("AZURITE_CONNECTION_STRING")
    if given:
        yield given
        return
    with stack.azurite() as connection:
        yield connection
