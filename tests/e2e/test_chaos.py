"""The exactly-once promise under injected faults: a CI-sized run of localdev.chaos.

Each scenario runs the app as separate worker processes with skewed clocks against Azurite and
the strict emulator, and must end with no violation of any kind. Every mix runs in both storage
modes: the app on a connection string, and the app (its workers and the CLI) on an identity
connection to the OAuth Azurite, with a token credential and user-delegation SAS. The fault
mixes are fixed here so the run stays short (no pause past the deploy lease, which alone takes
over a minute); `make chaos` and `make chaos-long` draw every fault (and the kind of model) from
the seed. Three mixes run a classic model, two an Azure ML v2 one (`localdev.chaos_v2`).
"""

from __future__ import annotations

import pytest

from localdev.chaos import run_scenario
from localdev.oauth import OAuthAzurite
from tests.stack_support import STORAGE_MODES

pytestmark = [pytest.mark.e2e, pytest.mark.long]

SEED = 7
MIXES = {
    "kills, crashes after side effects, lost responses, overwrites": [
        "kill",
        "crash",
        "lost response",
        "overwrite",
        "lost message",
    ],
    "skewed clocks, the CLI beside the workers, manual approval, late answers": [
        "skew",
        "cli",
        "manual",
        "late answer",
        "5xx",
    ],
    "new target, lost responses, late acts, dropped connections, reordering": [
        "new target",
        "lost response",
        "late act",
        "drop",
        "reorder",
        "kill",
    ],
}


V2_MIXES = {
    "v2: canary steps, kills, crashes after side effects, lost responses, stale traffic": [
        "canary",
        "kill",
        "crash",
        "lost response",
        "stale traffic",
    ],
    "v2: skewed clocks, the CLI, late acts, 5xx, a job not responding, reordering": [
        "skew",
        "cli",
        "late act",
        "5xx",
        "not responding",
        "reorder",
    ],
}


@pytest.fixture(params=STORAGE_MODES)
def storage(request: pytest.FixtureRequest) -> str | OAuthAzurite:
    """What a scenario runs against: Azurite's connection string (key mode) or the OAuth
    Azurite (identity mode)."""
    if request.param == "key":
        connection: str = request.getfixturevalue("azurite_connection")
        return connection
    oauth: OAuthAzurite = request.getfixturevalue("oauth_storage")
    return oauth


@pytest.mark.parametrize("mix", sorted(MIXES))
def test_promise_holds_under_faults(storage: str | OAuthAzurite, mix: str) -> None:
    """Rerun one with `localdev.chaos.run_scenario(storage, seed, faults=[...])`."""
    seed = SEED * 100_000 + sorted(MIXES).index(mix)
    result = run_scenario(storage, seed, faults=MIXES[mix], kind="classic")
    assert result.storage == ("key" if isinstance(storage, str) else "identity")
    assert result.figures["workers started"] >= 2, result
    assert result.figures["runs"] >= 1, result
    assert result.total == 0, "\n".join(result.details)


@pytest.mark.parametrize("mix", sorted(V2_MIXES))
def test_promise_holds_under_faults_on_azure_ml_v2(storage: str | OAuthAzurite, mix: str) -> None:
    """An Azure ML job and an online endpoint: the same checks, plus the endpoint's traffic
    map serves the champion and the v2 emulator refused nothing. Rerun one with
    `run_scenario(storage, seed, faults=[...], kind="v2")`."""
    seed = SEED * 100_000 + 50 + sorted(V2_MIXES).index(mix)
    result = run_scenario(storage, seed, faults=V2_MIXES[mix], kind="v2")
    assert result.kind == "v2"
    assert result.figures["workers started"] >= 2, result
    assert result.figures["runs"] >= 1, result
    assert result.total == 0, "\n".join(result.details)
