"""The scale-out benchmark's arithmetic: per-process figures summed into one burst row, the
growth table's windows, the budgets' verdicts, and what a worker counts on the wire."""

from __future__ import annotations

from typing import Any

import pytest
import requests

from localdev.scalebench import Wire
from localdev.scalefigures import (
    FAIL,
    NOT_RUN,
    PASS,
    WorkerFigures,
    aggregate,
    growth_rows,
    percentile,
    verdicts,
)


def _worker(started: float, ended: float, latencies: list[float], **kw: Any) -> WorkerFigures:
    n = len(latencies)
    return WorkerFigures(
        blobs=n,
        started=started,
        ended=ended,
        latencies=latencies,
        requests=kw.pop("requests", [3] * n),
        written=kw.pop("written", [1000] * n),
        **kw,
    )


def test_a_burst_row_sums_its_processes_over_the_span_from_first_start_to_last_end() -> None:
    a = _worker(10.0, 14.0, [0.01] * 100, cpu_seconds=1.0, conflicts=5, exists=1)
    b = _worker(
        11.0,
        15.0,
        [0.02] * 99 + [0.5],
        cpu_seconds=2.0,
        conflicts=15,
        failures=2,
        first_failure="housing/7.csv: StateConflict: kept changing",
    )
    row = aggregate([a, b], azurite_cpu_seconds=1.0)
    assert row["blobs"] == 200
    assert row["wall s"] == 5.0
    assert row["arrivals/s"] == 40.0
    assert row["requests/arrival"] == 3.0
    assert row["412/arrival"] == 0.1
    assert row["409/arrival"] == 0.005
    assert row["CPU ms/arrival"] == 20.0  # 1 s + 2 s in the workers and 1 s in Azurite, / 200
    assert row["Azurite CPU ms/arrival"] == 5.0
    assert row["bytes written/arrival"] == 1000
    assert row["p50 ms"] == 10.0
    assert row["p99 ms"] == 20.0
    assert row["failed deliveries"] == 2
    assert row["first failure"] == "housing/7.csv: StateConflict: kept changing"


def test_percentile_is_nearest_rank_and_refuses_no_values() -> None:
    assert percentile([5, 1, 4, 2, 3], 0.5) == 3
    assert percentile(list(range(1, 101)), 0.99) == 99
    with pytest.raises(ValueError, match="no values"):
        percentile([], 0.5)


def test_growth_rows_measure_the_arrivals_that_brought_the_batch_to_each_size() -> None:
    written = list(range(1, 1001))  # the n-th arrival writes n bytes
    figures = _worker(0.0, 1.0, [0.001] * 1000, written=written)
    rows = growth_rows(figures, [100, 1000, 5000], not_run="not run: cap reached")
    assert rows[0]["arrivals measured"] == 10
    assert rows[0]["bytes written/arrival"] == round(sum(range(91, 101)) / 10)
    assert rows[1]["arrivals measured"] == 100
    assert rows[1]["bytes written/arrival"] == round(sum(range(901, 1001)) / 100)
    assert rows[2] == {"batch size": 5000, "not run": "not run: cap reached"}


def _burst(procs: int, **figures: Any) -> dict[str, Any]:
    row = {
        "scenario": f"1,000 files, 1 model, K={procs}",
        "kind": "burst",
        "files": 1000,
        "procs": procs,
        "models": 1,
        "requests/arrival": 3.1,
        "412/arrival": 0.0,
        "CPU ms/arrival": 10.0,
        "p99 ms": 50.0,
        "failed deliveries": 0,
        "jobs submitted": 1,
        "runs per model": {"housing": 1},
        "lost blobs": 0,
        "duplicated blobs": 0,
    }
    row.update(figures)
    return row


def _by_budget(bursts: list[dict[str, Any]], growth: list[dict[str, Any]]) -> dict[str, str]:
    return {v.budget: v.verdict for v in verdicts(bursts, growth)}


GROWTH = [
    {"batch size": 100, "bytes written/arrival": 1000},
    {"batch size": 5000, "bytes written/arrival": 1050},
]


def test_figures_within_every_budget_pass_every_budget() -> None:
    found = _by_budget([_burst(1), _burst(8, **{"CPU ms/arrival": 12.0})], GROWTH)
    assert set(found.values()) == {PASS}
    assert len(found) == 8


def test_each_budget_fails_on_its_own_figure() -> None:
    bursts = [
        _burst(1),
        _burst(
            8,
            **{
                "requests/arrival": 4.2,
                "412/arrival": 0.4,
                "CPU ms/arrival": 14.0,  # 1.4x
                "p99 ms": 151.0,  # 3.02x
                "failed deliveries": 1,
                "jobs submitted": 2,
                "lost blobs": 1,
            },
        ),
    ]
    growth = [GROWTH[0], {"batch size": 5000, "bytes written/arrival": 1200}]
    found = _by_budget(bursts, growth)
    assert set(found.values()) == {FAIL}
    assert len(found) == 8


def test_a_ratio_without_both_of_its_figures_is_not_run_rather_than_passed() -> None:
    found = _by_budget([_burst(8)], [{"batch size": 100, "not run": "not run"}])
    assert found["CPU/arrival K=8 <= 1.3x K=1, 1000 files"] == NOT_RUN
    assert found["p99 K=8 <= 3x K=1, 1000 files"] == NOT_RUN
    assert found["bytes written/arrival at 5,000 files <= 1.1x at 100"] == NOT_RUN


def test_a_model_with_two_runs_after_one_burst_fails_one_job_per_burst() -> None:
    found = _by_budget([_burst(1, **{"runs per model": {"housing": 2}})], GROWTH)
    assert found["one training job per burst"] == FAIL


def test_the_wire_counts_requests_statuses_and_bytes_written_by_puts_and_posts() -> None:
    wire = Wire()
    put = requests.Request("PUT", "http://127.0.0.1:1/a/b", data=b"x" * 300).prepare()
    get = requests.Request("GET", "http://127.0.0.1:1/a/b").prepare()
    wire.note(put, 412)
    wire.note(put, 201)
    wire.note(get, 409)
    wire.note(get, None)
    assert (wire.requests, wire.written, wire.conflicts, wire.exists) == (4, 600, 1, 1)
