"""The sweep and retrains on demand: what they cost, what they refuse, what they say."""

from __future__ import annotations

import hashlib
import logging
from datetime import timedelta
from typing import Any

import pytest

from localdev.sample import housing_csv
from retrain.cli import main
from retrain.errors import InputRejected, PermanentRemoteError
from retrain.ledger import arrival_key, model_key
from retrain.messages import CheckBatch, RunEvent
from retrain.pipeline import AlreadyTrained, Context, Places, Retrainer, Timing
from retrain.pipeline.batches import Batches
from retrain.pipeline.records import parse, sweep_key
from tests.harness import World

GOOD = "Root Mean Squared Error\n2.5\n"


def runs(w: World) -> list[dict[str, Any]]:
    found = [w.store.read(k) for k in w.store.keys("runs/")]
    return sorted((f.doc for f in found if f), key=lambda r: r["created_at"])


def promoted(w: World, name: str = "housing/a.csv") -> dict[str, Any]:
    """Drop `name`, train it and promote it as the champion; returns its run."""
    w.drop(name, housing_csv(10, seed=1))
    for _ in range(3):
        w.deliver()
    w.evaluation(GOOD, runs(w)[-1])
    assert w.deliver() == ["promoted"]
    return runs(w)[-1]


def with_events(w: World) -> World:
    """The same world, with the events queue configured."""
    context = Context(
        models={"housing": w.spec},
        ledger=w.ledger,
        data=w.data,
        outbox=w.outbox,
        training_for=lambda _: w.training,
        target_for=lambda _: w.target,
        places=Places("data", "artifacts", "quarantine", "jobs", "evals", "events"),
        timing=Timing(timedelta(seconds=30), timedelta(minutes=10)),
        clock=w.clock,
    )
    w.retrainer = Retrainer(context)
    return w


def events(w: World) -> list[RunEvent]:
    return [m for q, m, _ in w.outbox.sent if q == "events" and isinstance(m, RunEvent)]


class TestRetrainNow:
    def test_a_version_already_trained_is_refused_naming_its_run(self) -> None:
        w = World()
        run = promoted(w)
        with pytest.raises(AlreadyTrained, match=f"already trained by run {run['run_id']}"):
            w.retrainer.request("housing", reason="requested by dave")
        with pytest.raises(AlreadyTrained):
            w.retrainer.request("housing", "housing/a.csv", reason="requested by dave")
        assert w.outbox.sent == []
        state = w.ledger.get(model_key("housing"))
        assert state is not None
        assert state["batch"] is None
        assert len(w.jobs.submitted) == 1

    def test_the_cli_refuses_with_exit_code_2(
        self, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
    ) -> None:
        w = World()
        run = promoted(w)
        monkeypatch.setattr("retrain.cli._app", lambda: w.retrainer)
        assert main(["retrain", "housing", "--by", "dave"]) == 2
        err = capsys.readouterr().err
        assert f"already trained by run {run['run_id']}" in err
        assert "--force" in err
        assert main(["retrain", "housing", "--by", "dave", "--force", "--reason", "BES down"]) == 0
        w.deliver()
        forced = runs(w)[-1]
        assert forced["run_id"] != run["run_id"]
        assert forced["forced"] is True
        assert forced["training_file"]["forced"] is True
        assert forced["training_file"]["requested"] == "requested by dave: BES down"
        assert forced["training_file"]["trained_before_by"] == run["run_id"]
        assert main(["show", forced["run_id"]]) == 0
        assert "FORCED (requested by dave: BES down)" in capsys.readouterr().out

    def test_a_version_whose_run_never_started_a_job_is_not_trained(self) -> None:
        w = World()
        w.drop("housing/a.csv")
        w.deliver()  # sealed
        w.jobs.errors["submit"] = PermanentRemoteError(
            "BES submit: HTTP 400: bad input", status=400
        )
        w.deliver()
        assert runs(w)[-1]["state"] == "failed"
        w.retrainer.request("housing", reason="requested by dave")
        w.deliver()
        assert runs(w)[-1]["forced"] is False

    def test_a_version_whose_event_never_came_is_trained_once(self) -> None:
        w = World()
        w.data.put("data", "housing/a.csv", housing_csv(10, seed=1))  # no event came
        w.retrainer.request("housing", "housing/a.csv", reason="requested by dave")
        head = w.data.head("data", "housing/a.csv")
        assert head is not None
        assert w.ledger.get(arrival_key("data", "housing/a.csv", head.etag)) is not None
        for _ in range(3):
            w.deliver()
        w.clock.advance(hours=1)
        assert w.retrainer.sweep()["blobs"] == 0  # recorded: the sweep has nothing to ingest
        w.deliver()
        assert len(runs(w)) == 1
        assert len(w.jobs.submitted) == 1

    def test_a_version_in_a_run_still_in_progress_is_refused(self) -> None:
        w = World()
        w.drop("housing/a.csv")
        w.deliver()  # sealed: the run is queued
        with pytest.raises(InputRejected, match=r"is in run .*, which is queued"):
            w.retrainer.request("housing", "housing/a.csv", reason="requested by dave")
        with pytest.raises(InputRejected, match="which is queued"):
            w.retrainer.request("housing", "housing/a.csv", reason="x", force=True)


class TestScheduledRetrain:
    def test_no_new_data_does_not_fire_and_says_so(self, caplog: pytest.LogCaptureFixture) -> None:
        w = World(retrain_every=86400)
        run = promoted(w)
        w.clock.advance(days=2)
        with caplog.at_level(logging.INFO, logger="retrain.pipeline"):
            assert w.retrainer.sweep()["scheduled"] == 0
        assert f"no new data (the newest file was trained by run {run['run_id']})" in caplog.text
        assert w.outbox.sent == []
        assert len(w.jobs.submitted) == 1

    def test_data_no_run_trained_fires(self) -> None:
        w = World(retrain_every=86400)
        promoted(w)
        w.drop("housing/b.csv", housing_csv(10, seed=2))
        w.deliver()  # sealed
        w.jobs.errors["submit"] = PermanentRemoteError("BES submit: HTTP 503", status=503)
        w.deliver()
        assert runs(w)[-1]["state"] == "failed"
        w.clock.advance(days=2)
        assert w.retrainer.sweep()["scheduled"] == 1
        ((_, check, _),) = w.outbox.take()
        assert isinstance(check, CheckBatch)
        w.retrainer.on_check_batch(check)
        assert runs(w)[-1]["training_file"]["name"] == "housing/b.csv"

    def test_a_quarantined_newest_file_is_logged_and_announced_once(
        self, caplog: pytest.LogCaptureFixture
    ) -> None:
        w = World(retrain_every=86400)
        run = promoted(w)
        with_events(w)
        assert w.drop("housing/b.csv", "rooms;price\n1;2\n") == "rejected"
        w.outbox.take()
        w.clock.advance(days=2)
        with caplog.at_level(logging.WARNING, logger="retrain.pipeline"):
            assert w.retrainer.sweep()["scheduled"] == 0
        assert "scheduled retrain skipped: " in caplog.text
        assert "housing/b.csv" in caplog.text
        (event,) = events(w)
        assert (event.model, event.run_id, event.state) == (
            "housing",
            run["run_id"],
            "schedule_skipped",
        )
        assert "housing/b.csv" in event.reason
        w.clock.advance(hours=1)  # past the sweep's claim: tried again, said again in the log
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="retrain.pipeline"):
            w.retrainer.sweep()
        assert "scheduled retrain skipped" in caplog.text
        assert len(events(w)) == 1  # the same reason is announced once


class TestSweepCost:
    @staticmethod
    def idle_sweep_calls(blobs: int, *, trained: bool = True) -> int:
        """The requests of a sweep after `blobs` arrivals (their batch a run when `trained`,
        else still open) and a first sweep."""
        w = World()
        for i in range(blobs):
            w.drop(f"housing/{i:04d}.csv")
        if trained:
            w.deliver()  # the check seals the batch into its run
        w.retrainer.sweep()
        w.clock.advance(minutes=5)
        w.store.calls.clear()
        w.data.calls.clear()
        assert w.retrainer.sweep()["blobs"] == 0
        return len(w.store.calls) + len(w.data.calls)

    def test_an_idle_sweep_does_not_grow_with_the_blobs_ingested(self) -> None:
        few, many = self.idle_sweep_calls(3), self.idle_sweep_calls(300)
        assert few == many == 4  # list the prefix, read the model, the listing mark, the run

    def test_the_files_of_a_batch_not_yet_a_run_cost_one_read_of_the_batch(self) -> None:
        """They are not settled until their run holds them, so each sweep looks at them again:
        by reading the batch's files once, not each file's arrival record."""
        few = self.idle_sweep_calls(3, trained=False)
        many = self.idle_sweep_calls(300, trained=False)
        assert few == many <= 7  # + its run (none yet), its member records, its log

    def test_arrivals_recorded_with_quoted_etags_still_match(self) -> None:
        """Records and batch entries written before ETags were normalised carry the quoted
        ETag of a download; the same version listed or read now must still be found."""
        w = World()
        w.data.put("data", "housing/a.csv", "rooms,price\n1,2\n")
        head = w.data.head("data", "housing/a.csv")
        assert head is not None
        quoted = f'"{head.etag}"'
        old_key = hashlib.sha256(f"data/housing/a.csv@{quoted}".encode()).hexdigest()
        assert arrival_key("data", "housing/a.csv", head.etag) == f"arrivals/{old_key}.json"
        entry = {"name": "housing/a.csv", "etag": quoted, "size": head.size, "arrived_at": "t"}
        w.store.docs[f"arrivals/{old_key}.json"] = (
            {**entry, "status": "accepted", "batch_id": "b1", "model": "housing"},
            "e0",
        )
        w.store.docs[model_key("housing")] = (
            {
                "model": "housing",
                "batch": {"id": "b1", "opened_at": "x", "last_at": "x", "files": [entry]},
                "active_run": None,
                "champion": None,
            },
            "e0",
        )
        assert w.retrainer.on_blob("data", "housing/a.csv") == "duplicate"
        assert w.retrainer.sweep()["blobs"] == 0
        assert len(w.batch_files()) == 1


class TestSweepErrors:
    def test_an_archived_blob_is_rejected_and_the_sweep_goes_on(self) -> None:
        w = World()
        w.drop("housing/a.csv")
        w.outbox.take()  # the batch's check is lost
        w.data.put("data", "housing/archived.csv", "rooms,price\n1,2\n")
        w.data.archived.add(("data", "housing/archived.csv"))
        w.data.put("data", "housing/z.csv", "rooms,price\n1,2\n")  # its event never came
        w.clock.advance(minutes=30)
        counts = w.retrainer.sweep()
        # The archived blob goes through ingest like any other and is rejected there.
        assert counts == {
            "checks": 1,
            "runs": 0,
            "blobs": 2,
            "scheduled": 0,
            "restores": 0,
            "errors": 0,
        }
        head = w.data.blobs[("data", "housing/archived.csv")]
        record = w.ledger.get(arrival_key("data", "housing/archived.csv", head[1]))
        assert record is not None
        assert record["status"] == "rejected"
        assert "archive tier" in record["reason"]
        assert w.retrainer.sweep()["errors"] == 0  # recorded: not tried again

    def test_an_archived_blob_delivered_by_its_trigger_is_rejected_not_retried(self) -> None:
        w = World()
        w.data.put("data", "housing/archived.csv", "rooms,price\n1,2\n")
        w.data.archived.add(("data", "housing/archived.csv"))
        assert w.retrainer.on_blob("data", "housing/archived.csv") == "rejected"
        head = w.data.blobs[("data", "housing/archived.csv")]
        record = w.ledger.get(arrival_key("data", "housing/archived.csv", head[1]))
        assert record is not None
        assert "archive tier" in record["reason"]

    def test_a_failing_blob_is_counted_and_tried_again_next_time(self) -> None:
        w = World()
        for name in ("housing/a.csv", "housing/b.csv"):
            w.data.put("data", name, "rooms,price\n1,2\n")  # no events came
        head = w.data.head("data", "housing/a.csv")
        assert head is not None
        w.store.crash_before = ("read", arrival_key("data", "housing/a.csv", head.etag))
        assert w.retrainer.sweep()["errors"] == 1
        assert w.batch_files() == ["housing/b.csv"]
        assert w.retrainer.sweep() == {
            "checks": 0,
            "runs": 0,
            "blobs": 1,
            "scheduled": 0,
            "restores": 0,
            "errors": 0,
        }

    def test_an_open_batch_that_cannot_be_read_is_one_error_and_no_blob_judged(self) -> None:
        w = World()
        for name in ("housing/a.csv", "housing/b.csv", "housing/c.csv"):
            w.drop(name)
        w.clock.advance(minutes=30)
        (log,) = w.store.logs
        w.store.crash_before = ("read_log", log)
        w.store.calls.clear()
        counts = w.retrainer.sweep()
        assert (counts["errors"], counts["blobs"]) == (1, 0)
        assert [op for op, _ in w.store.calls].count("read_log") == 1
        assert w.store.read(sweep_key("housing")) is None  # the mark did not move


class TestTrainingFile:
    def test_the_newest_by_last_modified_is_trained_not_the_last_delivered(self) -> None:
        w = World()
        w.data.put("data", "housing/new.csv", "rooms,price\n1,2\n")
        w.data.put("data", "housing/old.csv", "rooms,price\n1,2\n", modified=w.data.EPOCH)
        w.retrainer.on_blob("data", "housing/new.csv")
        w.retrainer.on_blob("data", "housing/old.csv")  # delivered last, modified first
        w.deliver()
        (run,) = runs(w)
        assert run["training_file"]["name"] == "housing/new.csv"
        assert run["training_file_reason"] == "newest by last-modified of 2 file(s)"
        assert [f["name"] for f in w.files(run)] == ["housing/new.csv", "housing/old.csv"]

    def test_entries_without_the_time_fall_back_to_delivery_order(self) -> None:
        w = World()
        w.drop("housing/a.csv")
        w.drop("housing/b.csv")

        for entries, _ in w.store.logs.values():
            for entry in entries:
                entry.pop("modified_at")  # entries written before it was recorded
        w.data.put("data", "housing/b.csv", "rooms,price\n1,2\n", modified=w.data.EPOCH)
        w.deliver()
        (run,) = runs(w)
        assert run["training_file"]["name"] == "housing/b.csv"
        assert run["training_file_reason"].startswith("last delivered of 2 file(s)")


class TestEarlierReleaseSeal:
    def test_a_file_an_earlier_release_sealed_out_of_its_batch_is_ingested_again(
        self, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """During a rolling upgrade an instance of the release before batch logs seals a batch
        reading only its member records: a file that joined through the log is not in the run.
        The sweep does not settle a file while its batch is not a run, so it finds the file
        once the run lacks it and brings it into the next batch."""
        w = World()
        assert w.drop("housing/a.csv") == "batched"
        ((_, check, _),) = w.outbox.take()
        w.clock.advance(minutes=30)
        assert w.retrainer.sweep()["blobs"] == 0  # held by the open batch: left for later
        with monkeypatch.context() as earlier:
            earlier.setattr(Batches, "_log", lambda self, spec, batch, *, seal: [])
            assert w.retrainer.on_check_batch(check) == "sealed"  # type: ignore[arg-type]
        (run,) = runs(w)
        assert w.files(run) == []
        w.deliver()  # the empty run ends
        w.clock.advance(minutes=30)
        assert w.retrainer.sweep()["blobs"] == 1
        assert w.batch_files() == ["housing/a.csv"]

    @staticmethod
    def sealed_as_earlier_release(w: World, monkeypatch: pytest.MonkeyPatch) -> None:
        """Seal the open batch as an instance of the release before logs does, and end its run
        (empty: the file joined through the log)."""
        (check,) = [m for _, m, _ in w.outbox.take() if isinstance(m, CheckBatch)]
        w.clock.advance(minutes=2)
        with monkeypatch.context() as earlier:
            earlier.setattr(Batches, "_log", lambda self, spec, batch, *, seal: [])
            assert w.retrainer.on_check_batch(check) == "sealed"
        w.deliver()

    def everywhere(self, w: World) -> list[str]:
        """The file names in any run, or waiting in the open batch."""
        return [f["name"] for run in runs(w) for f in w.files(run)] + w.batch_files()

    def test_a_file_the_sweep_ingested_is_looked_at_until_its_run_holds_it(
        self, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """Its event never came; the sweep ingests it (into a batch with a log) and must not
        move its mark past it then: an earlier release's seal may still leave it out."""
        w = World()
        w.data.put("data", "housing/a.csv", "rooms,price\n1,2\n")  # no event
        w.clock.advance(minutes=30)
        assert w.retrainer.sweep()["blobs"] == 1
        self.sealed_as_earlier_release(w, monkeypatch)
        assert self.everywhere(w) == []
        w.clock.advance(minutes=30)
        assert w.retrainer.sweep()["blobs"] == 1
        assert self.everywhere(w) == ["housing/a.csv"]

    def test_a_file_sealed_out_twice_is_still_found(self, monkeypatch: pytest.MonkeyPatch) -> None:
        w = World()
        assert w.drop("housing/a.csv") == "batched"
        for _ in range(2):
            self.sealed_as_earlier_release(w, monkeypatch)
            w.clock.advance(minutes=30)
            assert w.retrainer.sweep()["blobs"] == 1
        assert w.batch_files() == ["housing/a.csv"]
        w.deliver()  # this release seals it: the run holds it, and the mark may pass it
        w.clock.advance(minutes=30)
        assert w.retrainer.sweep()["blobs"] == 0
        mark = w.store.read(sweep_key("housing"))
        assert mark is not None
        (listed,) = w.data.listing("data", "housing/")
        assert parse(mark.doc["listed_through"]) >= listed.last_modified
