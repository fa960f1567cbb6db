"""The exactly-once promise under injected faults: a CI-sized run of localdev.chaos.

Each scenario runs the app as separate worker processes with skewed clocks against Azurite and
the strict emulator, and must end with no violation of any kind. The fault mixes are fixed here
so the run stays short (no pause past the deploy lease, which alone takes over two minutes);
`make chaos` and `make chaos-long` draw every fault (and the kind of model) from the seed. Three
mixes run a classic model, two an Azure ML v2 one (`localdev.chaos_v2`).
"""

from __future__ import annotations

import pytest

from localdev.chaos import run_scenario

pytestmark = pytest.mark.e2e

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


@pytest.mark.parametrize("mix", sorted(MIXES))
def test_promise_holds_under_faults(azurite_connection: str, mix: str) -> None:
    """Rerun one with `localdev.chaos.run_scenario(connection, seed, faults=[...])`."""
    seed = SEED * 100_000 + sorted(MIXES).index(mix)
    result = run_scenario(azurite_connection, seed, faults=MIXES[mix], kind="classic")
    assert result.figures["workers started"] >= 2, result
    assert result.figures["runs"] >= 1, result
    assert result.total == 0, "\n".join(result.details)


@pytest.mark.parametrize("mix", sorted(V2_MIXES))
def test_promise_holds_under_faults_on_azure_ml_v2(azurite_connection: str, mix: str) -> None:
    """An Azure ML job and an online endpoint: the same checks, plus the endpoint's traffic
    map serves the champion and the v2 emulator refused nothing. Rerun one with
    `run_scenario(connection, seed, faults=[...], kind="v2")`."""
    seed = SEED * 100_000 + 50 + sorted(V2_MIXES).index(mix)
    result = run_scenario(azurite_connection, seed, faults=V2_MIXES[mix], kind="v2")
    assert result.kind == "v2"
    assert result.figures["workers started"] >= 2, result
    assert result.figures["runs"] >= 1, result
    assert result.total == 0, "\n".join(result.details)
