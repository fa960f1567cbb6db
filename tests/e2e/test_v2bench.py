"""The v2 tracking benchmark runs, and its deterministic figures hold: an Azure ML v2 job is
polled on the same schedule as a classic BES job, by delayed messages, never by sleeping."""

from __future__ import annotations

import pytest

from localdev import v2bench

pytestmark = pytest.mark.e2e


def test_a_v2_job_costs_the_polls_of_a_bes_job_of_the_same_length(azurite_connection: str) -> None:
    results = v2bench.measure(azurite_connection, (60, 3600))
    assert list(results) == [
        "v2, 1 minute",
        "classic, 1 minute",
        "v2 + events, 1 minute",
        "v2, 1 hour",
        "classic, 1 hour",
        "v2 + events, 1 hour",
    ]
    for name, figures in results.items():
        assert figures["run"] == "promoted", name
        assert figures["seconds slept"] == 0, name
        if "events" not in name:
            # one message submits the job, each later one polls it once
            assert figures["track messages"] == figures["status GETs"] + 1, name
    assert results["v2, 1 minute"]["status GETs"] == 2
    assert results["v2, 1 hour"]["status GETs"] == 10
    for length in ("1 minute", "1 hour"):
        assert (
            results[f"v2, {length}"]["status GETs"] == results[f"classic, {length}"]["status GETs"]
        )
    # With its completion event, a job reaches the gate as it ends, polled less (the polls are
    # only the fallback, growing to an hour).
    events = results["v2 + events, 1 hour"]
    assert events["events delivered"] == 2  # RunCompleted and RunStatusChanged: one move
    assert events["end to gate (s)"] == 0
    assert results["v2, 1 hour"]["end to gate (s)"] > 0
    assert events["status GETs"] < results["v2, 1 hour"]["status GETs"]
    assert v2bench.met(results)
    table = v2bench.table(results)
    assert "| v2, 1 hour | 10 | 11 |" in table
