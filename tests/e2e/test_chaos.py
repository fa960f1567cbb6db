"""The exactly-once promise under injected faults (the CI-sized run of localdev.chaos)."""

from __future__ import annotations

import pytest

from localdev.chaos import run_scenario

pytestmark = pytest.mark.e2e

SEED = 7


@pytest.mark.parametrize("scenario", range(6))
def test_promise_holds_under_faults(azurite_connection: str, scenario: int) -> None:
    """Seeded: rerun one with `python -m localdev.chaos --seed 7 --scenarios 6`."""
    result = run_scenario(azurite_connection, SEED * 100_000 + scenario)
    assert result.batches >= 1
    assert result.jobs_started_max <= 1, result
    assert result.promotions_max <= 1, result
    assert result.not_terminal == 0, result
    assert result.blobs_missing == 0, result
    assert result.worse_promoted == 0, result
