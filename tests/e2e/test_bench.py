"""The benchmark command's parts run, and their deterministic figures hold (timings are
reported by `make bench`, not asserted here: this machine's load is not the app's)."""

from __future__ import annotations

from localdev import bench, scalebench


def test_a_warm_arrival_stays_within_three_storage_requests(azurite_connection: str) -> None:
    figures = bench.arrival_cost(azurite_connection, samples=5)
    assert figures["requests, joins an open batch (median / max)"] == "3 / 3"
    assert figures["requests, opens a batch (median / max)"] == "7 / 7"
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


def test_a_burst_from_two_processes_puts_every_blob_in_one_run_with_one_job_per_model() -> None:
    """The scale-out harness end to end, small: two spawned workers, two models, a dedicated
    Azurite; the batches sealed from the check messages the arrivals sent."""
    row = scalebench.run_burst(scalebench.Scenario(files=24, procs=2, models=2))
    assert row["blobs"] == 24
    assert row["failed deliveries"] == 0
    assert (row["lost blobs"], row["duplicated blobs"]) == (0, 0)
    assert row["runs per model"] == {"model0": 1, "model1": 1}
    assert row["jobs submitted"] == 2
    assert row["requests/arrival"] >= 3  # read the head, record the arrival, join the batch
    assert row["bytes written/arrival"] > 0
