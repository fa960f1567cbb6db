"""The pipeline end to end: runner + emulator + Azurite, through the real function app, with a
connection string and with an identity connection (see the `storage_mode` fixture)."""

from __future__ import annotations

import logging
import re
from datetime import datetime, timedelta
from urllib.parse import parse_qs

import pytest

from localdev.sample import housing_csv
from localdev.stack import DEV_KEY
from tests.stack_support import STORAGE_MODES, MakeStack

pytestmark = pytest.mark.e2e

ROWS = [[3.0, 20.0, 5.0], [6.0, 40.0, 12.0]]


@pytest.fixture(params=STORAGE_MODES)
def storage_mode(request: pytest.FixtureRequest) -> str:
    """Every test here runs on a connection string and on an identity connection."""
    return str(request.param)


def truth(rooms: float, age: float, distance: float) -> float:
    return 30 * rooms - 0.8 * age - 4 * distance + 50


class TestPromotion:
    def test_better_model_is_promoted_and_served(self, make_stack: MakeStack) -> None:
        """(a) A first model, then a better one: both promoted; the endpoint serves the second."""
        s = make_stack()
        s.upload("housing/2026-11-01.csv", housing_csv(60, seed=1, noise=40))
        s.runner.run_until_idle()
        first = s.predict(ROWS)
        s.upload("housing/2026-11-02.csv", housing_csv(400, seed=2, noise=1))
        s.runner.run_until_idle()

        runs = s.runs()
        assert [r["state"] for r in runs] == ["promoted", "promoted"]
        assert s.model_state()["champion"]["run_id"] == runs[1]["run_id"]
        assert s.model_state()["previous_champion"]["run_id"] == runs[0]["run_id"]
        second = s.predict(ROWS)
        err_first = sum(abs(p - truth(*r)) for p, r in zip(first, ROWS, strict=True))
        err_second = sum(abs(p - truth(*r)) for p, r in zip(second, ROWS, strict=True))
        assert second != first
        assert err_second < err_first
        assert s.emulator.count("PATCH", r"/endpoints/prod$", 200) == 2

    def test_champion_scored_on_same_holdout_is_used(self, make_stack: MakeStack) -> None:
        """With Evaluate Model's second row, the gate compares both models on the same data."""
        s = make_stack(champion_endpoint=True)
        s.upload("housing/a.csv", housing_csv(300, seed=3, noise=1))
        s.runner.run_until_idle()
        s.upload("housing/b.csv", housing_csv(300, seed=4, noise=1))
        s.runner.run_until_idle()
        second = s.runs()[1]
        assert second["decision"]["champion_source"] == "scored on the same hold-out data"
        assert second["metrics"]["champion"] is not None


class TestRejection:
    def test_worse_model_is_rejected_and_champion_kept(self, make_stack: MakeStack) -> None:
        """(b) A worse model is rejected with a reason; the run is not a failure."""
        s = make_stack()
        s.upload("housing/good.csv", housing_csv(400, seed=5, noise=1))
        s.runner.run_until_idle()
        served = s.predict(ROWS)
        s.upload("housing/noisy.csv", housing_csv(60, seed=6, noise=60))
        s.runner.run_until_idle()

        good, noisy = s.runs()
        assert noisy["state"] == "rejected"
        assert noisy["error"] is None
        assert noisy["decision"]["promote"] is False
        assert "not better: Root Mean Squared Error" in noisy["decision"]["reason"]
        assert s.model_state()["champion"]["run_id"] == good["run_id"]
        assert s.model_state()["active_run"] is None
        assert s.predict(ROWS) == served
        assert s.emulator.count("PATCH", r"/endpoints/prod$") == 1


class TestFailures:
    def test_failed_job_is_recorded_with_details(self, make_stack: MakeStack) -> None:
        """(c) A BES job that fails ends its run failed, with the service's Details."""
        s = make_stack()
        s.emulator.faults.fail_jobs = 1
        s.emulator.faults.fail_details = "Error 0085: Script error (injected)"
        s.upload("housing/a.csv", housing_csv(100, seed=7))
        s.runner.run_until_idle()
        (run,) = s.runs()
        assert run["state"] == "failed"
        assert "Error 0085: Script error (injected)" in run["error"]
        assert s.model_state()["active_run"] is None
        assert s.emulator.count("PATCH", r"/endpoints/") == 0

    def test_job_past_deadline_is_cancelled(self, make_stack: MakeStack) -> None:
        """(g) A job that outlives its deadline is DELETEd and the run fails saying so."""
        s = make_stack(job_deadline=2)
        s.emulator.faults.hang_jobs = True
        s.upload("housing/a.csv", housing_csv(100, seed=8))
        s.runner.run_until_idle(timeout=30)
        (run,) = s.runs()
        assert run["state"] == "failed"
        assert "outlived its deadline" in run["error"]
        assert s.emulator.count("DELETE", rf"/jobs/{run['job_id']}$", 200) == 1

    def test_transient_errors_are_retried(self, make_stack: MakeStack) -> None:
        """429 + Retry-After on submit, 503 and a dropped connection on status: promoted."""
        s = make_stack()
        s.emulator.faults.http = [
            {"method": "POST", "path": "/jobs", "status": 429, "retry_after": 1},
            {"method": "GET", "path": "/jobs/", "status": 503},
            {"method": "GET", "path": "/jobs/", "drop": True},
        ]
        s.upload("housing/a.csv", housing_csv(100, seed=9))
        s.runner.run_until_idle()
        (run,) = s.runs()
        assert run["state"] == "promoted"
        assert s.jobs_submitted() == 1
        assert s.emulator.faults.http == []


class TestExactlyOnce:
    def test_burst_of_files_makes_one_job(self, make_stack: MakeStack) -> None:
        """(d) 20 files within the quiet period: one batch, one BES job, newest file trains.
        The quiet period is long enough that no gap between two uploads reaches it on a loaded
        machine (3 s did, once, in CI's three test processes: the batch sealed mid-burst)."""
        s = make_stack(quiet_period=10)
        for i in range(20):
            s.upload(f"housing/part-{i:02d}.csv", housing_csv(50, seed=100 + i))
            s.runner.step()
        s.runner.run_until_idle()
        (run,) = s.runs()
        assert run["state"] == "promoted"
        assert len(s.run_files(run)) == 20
        assert run["training_file"]["name"] == "housing/part-19.csv"
        assert s.jobs_submitted() == 1

    def test_duplicate_blob_event_makes_one_run(self, make_stack: MakeStack) -> None:
        """(e) The same blob event delivered twice: one arrival, one run, one job."""
        s = make_stack()
        s.upload("housing/a.csv", housing_csv(100, seed=10))
        container = s.settings["RETRAIN_DATA_CONTAINER"]
        assert s.runner.deliver_blob("ingest", container, "housing/a.csv")
        assert s.runner.deliver_blob("ingest", container, "housing/a.csv")
        s.runner.run_until_idle()
        assert len(s.runs()) == 1
        assert len(s.arrivals()) == 1
        assert s.jobs_submitted() == 1

    def test_data_during_a_run_goes_to_next_batch(self, make_stack: MakeStack) -> None:
        """A file that lands while a run is active waits, then trains in a second run."""
        s = make_stack()
        s.emulator.faults.job_seconds = 2.5
        s.upload("housing/a.csv", housing_csv(100, seed=11))
        s.step_until_running()
        s.upload("housing/b.csv", housing_csv(100, seed=12))
        s.runner.run_until_idle()
        first, second = s.runs()
        assert [f["name"] for f in s.run_files(first)] == ["housing/a.csv"]
        assert [f["name"] for f in s.run_files(second)] == ["housing/b.csv"]
        assert s.jobs_submitted() == 2


class TestBadInput:
    @pytest.mark.parametrize(
        ("name", "data", "reason"),
        [
            ("housing/empty.csv", b"", "the file is empty"),
            (
                "housing/wrong.csv",
                "rooms,age\n1,2\n",
                "the header lacks columns ['distance', 'price']",
            ),
            ("housing/header-only.csv", "rooms,age,distance,price\n", "header but no data rows"),
            ("housing/data.json", '{"rooms": 1}', "not a CSV or TSV file"),
            ("other/a.csv", "x,y\n1,2\n", "under no model's data prefix"),
        ],
    )
    def test_bad_file_is_rejected_quarantined_and_costs_no_job(
        self, make_stack: MakeStack, name: str, data: str | bytes, reason: str
    ) -> None:
        """(f) A bad file: rejected with its reason, copied to quarantine, original kept, no job."""
        s = make_stack()
        s.upload(name, data)
        s.runner.run_until_idle()
        (arrival,) = s.arrivals()
        assert arrival["status"] == "rejected"
        assert reason in arrival["reason"]
        quarantine = s.blobs.get_container_client(s.settings["RETRAIN_QUARANTINE_CONTAINER"])
        copied = quarantine.get_blob_client(f"{s.settings['RETRAIN_DATA_CONTAINER']}/{name}")
        assert copied.get_blob_properties().metadata["reason"] == arrival["reason"]
        original = s.blobs.get_blob_client(s.settings["RETRAIN_DATA_CONTAINER"], name)
        assert original.exists()
        assert s.runs() == []
        assert s.jobs_submitted() == 0


class TestLeastPrivilege:
    def test_sas_tokens_sent_to_bes_are_blob_scoped_and_expire(self, make_stack: MakeStack) -> None:
        """Input: read-only; outputs: create/write only; all expire after the deadline + 1 h."""
        s = make_stack(job_deadline=600)
        s.upload("housing/a.csv", housing_csv(100, seed=15))
        s.runner.run_until_idle()
        (run,) = s.runs()
        (job,) = s.emulator.jobs.values()
        deadline = datetime.fromisoformat(run["deadline_at"])

        def sas(ref: dict[str, str]) -> dict[str, str]:
            return {k: v[0] for k, v in parse_qs(ref["SasBlobToken"].lstrip("?")).items()}

        (source,) = job.request["Inputs"].values()
        assert source["ConnectionString"] is None
        token = sas(source)
        assert (token["sp"], token["sr"]) == ("r", "b")
        # With an identity, every token is signed with a user delegation key (its signed object
        # and tenant are the identity's); with a connection string, with the account key.
        delegated = s.storage_mode == "identity"
        assert ("skoid" in token, "sktid" in token) == (delegated, delegated)
        if delegated:
            assert source["BaseLocation"].startswith("https://")
        expiry = datetime.fromisoformat(token["se"].replace("Z", "+00:00"))
        assert deadline < expiry <= deadline + timedelta(hours=1, seconds=1)
        for out in job.request["Outputs"].values():
            token = sas(out)
            assert (token["sp"], token["sr"]) == ("cw", "b")
            assert ("skoid" in token) == delegated
            assert out["RelativeLocation"].startswith(s.settings["RETRAIN_ARTIFACTS_CONTAINER"])
        patched = sas(s.emulator.endpoints[("ws1", "housing-predict", "prod")].patches[-1])
        assert (patched["sp"], patched["sr"]) == ("r", "b")
        assert ("skoid" in patched) == delegated


class TestSecrets:
    def test_no_key_or_signature_in_any_log_line(
        self, make_stack: MakeStack, caplog: pytest.LogCaptureFixture
    ) -> None:
        """A full run with a failure and retries logs no API key, account key or SAS signature."""
        caplog.set_level(logging.DEBUG)
        s = make_stack()
        s.emulator.faults.http = [{"method": "GET", "path": "/jobs/", "status": 503}]
        s.upload("housing/a.csv", housing_csv(100, seed=13))
        s.runner.run_until_idle()
        s.emulator.faults.fail_jobs = 1
        s.upload("housing/b.csv", housing_csv(100, seed=14))
        s.upload("housing/bad.csv", "nope\n1\n")
        s.runner.run_until_idle()
        assert [r["state"] for r in s.runs()] == ["promoted", "failed"]
        # The app runs on the runner's thread; the emulator (a separate service in real life)
        # serves and trains on threads of its own, with the SAS URLs it was handed.
        app_records = [r for r in caplog.records if r.threadName == "MainThread"]
        assert any(r.name.startswith("retrain") for r in app_records)
        text = "\n".join(logging.Formatter().format(r) for r in app_records)
        assert "local-bes-key" not in text
        assert "local-endpoint-key" not in text
        assert DEV_KEY not in text
        assert not re.search(r"sig=[A-Za-z0-9%]{10,}", text)


def test_event_grid_ingest_trains_on_the_announced_blob(
    make_stack: MakeStack, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The Event Grid trigger mode: a BlobCreated event for a final commit starts a run."""
    import azure.functions as func

    monkeypatch.setenv("RETRAIN_INGEST_TRIGGER", "eventgrid")
    s = make_stack()
    s.upload("housing/a.csv", housing_csv(100, seed=16))
    container = s.settings["RETRAIN_DATA_CONTAINER"]
    url = s.blobs.get_blob_client(container, "housing/a.csv").url

    def event(api: str) -> func.EventGridEvent:
        return func.EventGridEvent(
            id=api,
            data={"api": api, "url": url},
            topic="storage",
            subject="blob",
            event_type="Microsoft.Storage.BlobCreated",
            event_time=None,
            data_version="1",
        )

    assert s.runner.deliver_event("ingest", event("PutBlock"))  # not final: skipped
    assert s.runner.deliver_event("ingest", event("PutBlob"))
    assert s.runner.deliver_event("ingest", event("PutBlob"))  # a duplicate event
    s.runner.run_until_idle()
    assert [r["state"] for r in s.runs()] == ["promoted"]
    assert s.jobs_submitted() == 1
