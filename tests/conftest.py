"""Shared fixtures: one Azurite for the session (and one OAuth Azurite for the identity
tests), started from node_modules."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from localdev import stack
from localdev.oauth import OAuthAzurite, oauth_azurite


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """In N test processes (pytest-xdist), start every process on its share of the `long`
    tests. Work stealing hands each process one contiguous slice of the collection first, and an
    idle process takes tests from the end of another's queue: long tests left where they fall
    start late, one after another, and the run ends waiting on them. Here they head the slices
    (the order of the rest is kept); this changes when a test runs, never what it checks."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0"))
    long = [item for item in items if item.get_closest_marker("long")]
    if workers < 2 or not long:
        return
    rest = iter([item for item in items if not item.get_closest_marker("long")])
    heads: list[list[pytest.Item]] = [[] for _ in range(workers)]
    for n, item in enumerate(long):
        heads[n % workers].append(item)
    ordered: list[pytest.Item] = []
    left = len(items)
    for k, head in enumerate(heads):
        size = left // (workers - k)  # the slice work stealing sends this process first
        left -= size
        ordered += head + [item for _, item in zip(range(size - len(head)), rest, strict=False)]
    items[:] = ordered + list(rest)


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
