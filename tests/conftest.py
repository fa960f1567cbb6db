"""Shared fixtures: one Azurite for the session (and one OAuth Azurite for the identity
tests), started from node_modules."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from localdev import stack
from localdev.oauth import OAuthAzurite, oauth_azurite


@pytest.fixture(autouse=True)
def _environment_as_found() -> Iterator[None]:
    """Every test leaves the process environment as it found it: stacks apply app settings to
    os.environ as the host would (`localdev.stack.load_app`), and an identity-mode stack's
    `AzureWebJobsStorage__*` settings must not reach a later test's app."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


@pytest.fixture(scope="session")
def azurite_connection() -> Iterator[str]:
    """Azurite's connection string: AZURITE_CONNECTION_STRING if set, else a private Azurite."""
    given = os.environ.get("AZURITE_CONNECTION_STRING")
    if given:
        yield given
        return
    with stack.azurite() as connection:
        yield connection


@pytest.fixture(scope="session")
def oauth_storage(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OAuthAzurite]:
    """A private Azurite 3.37 that takes OAuth tokens over HTTPS (see localdev.oauth)."""
    workdir: Path = tmp_path_factory.mktemp("oauth-azurite")
    with oauth_azurite(workdir) as storage:
        yield storage
