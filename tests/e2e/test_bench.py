"""The benchmark command's parts run, and their deterministic figures hold (timings are
reported by `make bench`, not asserted here: this machine's load is not the app's)."""

from __future__ import annotations

from localdev import bench


def test_a_warm_arrival_stays_within_four_storage_requests(azurite_connection: str) -> None:
    figures = bench.arrival_cost(azurite_connection, samples=5)
    assert figures["requests, joins an open batch (median / max)"] == "3 / 3"
    assert figures["requests, opens a batch (median / max)"] == "4 / 4"
    assert figures["met"] is True


def test_a_burst_is_one_bes_job_sequentially_and_concurrently(azurite_connection: str) -> None:
    figures = bench.burst(azurite_connection, count=40, threads=4)
    assert figures["sequential: BES jobs submitted"] == 1
    assert figures["4 threads: BES jobs submitted"] == 1


def test_tracking_hours_long_jobs_takes_no_sleep_and_few_polls(azurite_connection: str) -> None:
    figures = bench.tracking(azurite_connection)
    assert figures["seconds slept"] == 0
    assert figures["12 hours"]["polls"] <= figures["12 hours"]["budget"]
    assert figures["12 hours"]["run"] == "promoted"
