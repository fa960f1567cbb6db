"""The exactly-once promise under injected faults: a CI-sized run of localdev.chaos.

Each scenario runs the app as separate worker processes with skewed clocks against Azurite and
the strict emulator, and must end with no violation of any kind. The fault mixes are fixed here
so the run stays short (no pause past the deploy lease, which alone takes over two minutes);
`make chaos` and `make chaos-long` draw every fault from the seed.
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


@pytest.mark.parametrize("mix", sorted(MIXES))
def test_promise_holds_under_faults(azurite_connection: str, mix: str) -> None:
    """Rerun one with `localdev.chaos.run_scenario(connection, seed, faults=[...])`."""
    seed = SEED * 100_000 + sorted(MIXES).index(mix)
    result = run_scenario(azurite_connection, seed, faults=MIXES[mix])
    assert result.figures["workers started"] >= 2, result
    assert result.figures["runs"] >= 1, result
    assert result.total == 0, "\n".join(result.details)
