"""The Retrainer's state machine, with fakes and a manual clock."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest

from localdev.sample import housing_csv
from retrain.bes import JobState
from retrain.errors import RemoteError
from retrain.ledger import Ledger, model_key, run_key
from retrain.messages import CheckBatch, EvaluateRun, TrackRun
from retrain.pipeline import Places, Retrainer, Timing
from retrain.settings import ModelSpec
from tests.fakes import (
    FakeData,
    FakeJobs,
    FakeTarget,
    ManualClock,
    MemoryDocumentStore,
    MemoryOutbox,
)

PLACES = Places("data", "artifacts", "quarantine", "jobs", "evals")


def spec(**overrides: Any) -> ModelSpec:
    base: dict[str, Any] = {
        "name": "housing",
        "columns": ["rooms", "price"],
        "bes": {
            "jobs_url": "https://bes.example/workspaces/w/services/s/jobs",
            "api_key_setting": "K",
            "global_parameters": {"Label Column": "price"},
        },
        "gate": {"metric": "Root Mean Squared Error"},
        "target": {
            "kind": "classic",
            "endpoint_url": "https://management.azureml.net/workspaces/w/webservices/p/"
            "endpoints/prod",
            "api_key_setting": "E",
            "resource_name": "M [trained model]",
        },
        "quiet_period": 60,
        "max_wait": 300,
        "job_deadline": 3600,
    }
    base.update(overrides)
    return ModelSpec.model_validate(base)


class World:
    def __init__(self, jobs: FakeJobs | None = None, **overrides: Any) -> None:
        self.spec = spec(**overrides)
        self.store = MemoryDocumentStore()
        self.ledger = Ledger(self.store)
        self.data = FakeData()
        self.outbox = MemoryOutbox()
        self.jobs = jobs or FakeJobs()
        self.target = FakeTarget()
        self.clock = ManualClock()
        self.retrainer = Retrainer(
            models={"housing": self.spec},
            ledger=self.ledger,
            data=self.data,
            outbox=self.outbox,
            jobs_for=lambda _: self.jobs,
            target_for=lambda _: self.target,
            places=PLACES,
            timing=Timing(timedelta(seconds=30), timedelta(minutes=10)),
            clock=self.clock,
        )

    def drop(self, name: str, text: str = "rooms,price\n1,2\n") -> str:
        self.data.put("data", name, text)
        return self.retrainer.on_blob("data", name)

    def deliver(self) -> list[str]:
        """Deliver every message sent so far whose delay has passed (advancing the clock)."""
        results = []
        for _queue, msg, delay in self.outbox.take():
            self.clock.advance(seconds=delay.total_seconds())
            if isinstance(msg, CheckBatch):
                results.append(self.retrainer.on_check_batch(msg))
            elif isinstance(msg, TrackRun):
                results.append(self.retrainer.on_track_run(msg))
            else:
                assert isinstance(msg, EvaluateRun)
                results.append(self.retrainer.on_evaluate(msg))
        return results

    def run(self) -> dict[str, Any]:
        (key,) = self.store.keys("runs/")
        found = self.store.read(key)
        assert found is not None
        return found.doc

    def evaluation(self, text: str) -> None:
        run = self.run()
        self.data.put("artifacts", run["outputs"]["evaluation"].split("/", 1)[1], text)


class TestIngest:
    def test_arrival_is_batched_and_a_check_is_scheduled_after_the_quiet_period(self) -> None:
        w = World()
        assert w.drop("housing/a.csv") == "batched"
        ((queue, msg, delay),) = w.outbox.sent
        assert queue == "jobs"
        assert isinstance(msg, CheckBatch)
        assert msg.arrivals == 1
        assert delay == timedelta(seconds=60)

    def test_same_blob_version_twice_is_one_arrival(self) -> None:
        w = World()
        assert w.drop("housing/a.csv") == "batched"
        assert w.drop("housing/b.csv") == "batched"
        assert w.retrainer.on_blob("data", "housing/b.csv") == "duplicate"
        assert len(w.outbox.sent) == 1  # only the batch's opener schedules its check
        batch = w.ledger.get(model_key("housing"))["batch"]  # type: ignore[index]
        assert [f["name"] for f in batch["files"]] == ["housing/a.csv", "housing/b.csv"]

    def test_a_duplicate_of_the_opener_resends_the_check_it_may_have_lost(self) -> None:
        w = World()
        assert w.drop("housing/a.csv") == "batched"
        assert w.retrainer.on_blob("data", "housing/a.csv") == "duplicate"
        assert [type(m) for _, m, _ in w.outbox.sent] == [CheckBatch, CheckBatch]
        w.clock.advance(seconds=61)
        assert [w.retrainer.on_check_batch(m) for _, m, _ in w.outbox.sent[:2]] == [
            "sealed",
            "resent",
        ]

    def test_bad_file_is_rejected_and_quarantined(self) -> None:
        w = World()
        assert w.drop("housing/a.csv", "rooms\n1\n") == "rejected"
        assert w.data.quarantined == [
            (
                "data/housing/a.csv",
                "quarantine",
                "the header lacks columns ['price']; it has ['rooms']",
            )
        ]
        assert w.outbox.sent == []

    def test_vanished_blob_is_ignored(self) -> None:
        w = World()
        assert w.retrainer.on_blob("data", "housing/gone.csv") == "gone"


class TestCoalescing:
    def test_files_within_the_quiet_period_make_one_run(self) -> None:
        w = World()
        for i in range(5):
            w.drop(f"housing/{i}.csv")
            w.clock.advance(seconds=10)
        checks = w.deliver()
        assert checks.count("sealed") == 1
        run = w.run()
        assert len(run["files"]) == 5
        assert run["training_file"]["name"] == "housing/4.csv"

    def test_check_delivered_early_waits_and_reschedules(self) -> None:
        w = World()
        w.drop("housing/a.csv")
        ((_, msg, _),) = w.outbox.take()
        assert isinstance(msg, CheckBatch)
        assert w.retrainer.on_check_batch(msg) == "waiting"
        ((_, again, delay),) = w.outbox.sent
        assert again == msg
        assert delay == timedelta(seconds=60)

    def test_max_wait_bounds_a_batch_that_never_goes_quiet(self) -> None:
        w = World(quiet_period=60, max_wait=120)
        for i in range(5):
            w.drop(f"housing/{i}.csv")
            w.clock.advance(seconds=30)
        ((_, first, delay),) = w.outbox.take()  # one check per batch, sent by its opener
        assert delay == timedelta(seconds=60)
        assert isinstance(first, CheckBatch)
        assert w.retrainer.on_check_batch(first) == "sealed"
        assert len(w.run()["files"]) == 5

    def test_an_early_check_moves_to_the_new_quiet_end_once(self) -> None:
        """Arrivals after the opener push the quiet end; the check follows it, and of two
        copies of the check that wake early only one goes on."""
        w = World(quiet_period=60, max_wait=600)
        w.drop("housing/a.csv")
        w.clock.advance(seconds=50)
        w.drop("housing/b.csv")
        ((_, check, _),) = w.outbox.take()
        assert isinstance(check, CheckBatch)
        w.clock.advance(seconds=10)
        assert w.retrainer.on_check_batch(check) == "waiting"
        assert w.retrainer.on_check_batch(check) == "waiting"
        ((_, again, delay),) = w.outbox.take()
        assert delay == timedelta(seconds=50)
        w.clock.advance(seconds=50)
        assert isinstance(again, CheckBatch)
        assert w.retrainer.on_check_batch(again) == "sealed"
        assert len(w.run()["files"]) == 2

    def test_batch_waits_while_a_run_is_active(self) -> None:
        w = World()
        w.drop("housing/a.csv")
        assert w.deliver() == ["sealed"]
        w.outbox.take()
        w.drop("housing/b.csv")
        assert w.deliver() == ["busy"]
        assert len(w.store.keys("runs/")) == 1


class TestTraining:
    def sealed(self, jobs: FakeJobs | None = None, **overrides: Any) -> World:
        w = World(jobs, **overrides)
        w.drop("housing/a.csv")
        assert w.deliver() == ["sealed"]
        return w

    def test_submit_persists_the_job_then_starts_it_with_scoped_sas(self) -> None:
        w = self.sealed()
        assert w.deliver() == ["started"]
        run = w.run()
        assert run["state"] == "running"
        assert run["job_id"] == "job1" == w.jobs.started[0]
        (request,) = w.jobs.submitted
        assert "sp=r&" in request["inputs"]["input1"].sas_token
        assert request["inputs"]["input1"].relative_location == "data/housing/a.csv"
        model_ref = request["outputs"]["output1"]
        assert model_ref.relative_location.endswith("/model.ilearner")
        assert "sp=cw&" in model_ref.sas_token

    def test_polls_back_off_and_finish_into_evaluation(self) -> None:
        jobs = FakeJobs(
            [JobState.NOT_STARTED, JobState.RUNNING, JobState.RUNNING, JobState.FINISHED]
        )
        w = self.sealed(jobs)
        delays = []
        for _ in range(5):
            pending = list(w.outbox.sent)
            delays += [d for q, m, d in pending if isinstance(m, TrackRun)]
            w.deliver()
        assert w.run()["state"] == "trained"
        assert delays == [
            timedelta(0),
            timedelta(seconds=30),
            timedelta(seconds=60),
            timedelta(seconds=120),
            timedelta(seconds=240),
        ]
        assert w.run()["polls"] == 4

    def test_failed_job_records_details_and_frees_the_model(self) -> None:
        w = self.sealed(FakeJobs([JobState.FAILED], details="Error 0001: column not found"))
        w.deliver()
        w.deliver()
        run = w.run()
        assert run["state"] == "failed"
        assert "Error 0001: column not found" in run["error"]
        assert w.ledger.get("models/housing.json")["active_run"] is None  # type: ignore[index]

    def test_deadline_cancels_the_job(self) -> None:
        w = self.sealed(FakeJobs([JobState.RUNNING]), job_deadline=100)
        for _ in range(6):
            w.deliver()
        run = w.run()
        assert run["state"] == "failed"
        assert w.jobs.cancelled == ["job1"]
        assert "outlived its deadline" in run["error"]

    def test_duplicate_track_message_does_not_submit_twice(self) -> None:
        w = self.sealed()
        ((_, msg, _),) = w.outbox.take()
        assert isinstance(msg, TrackRun)
        w.retrainer.on_track_run(msg)
        w.retrainer.on_track_run(msg)
        assert len(w.jobs.submitted) == 1

    def test_stale_poll_message_is_dropped(self) -> None:
        w = self.sealed(FakeJobs([JobState.RUNNING]))
        w.deliver()
        ((_, poll, _),) = w.outbox.sent
        assert isinstance(poll, TrackRun)
        assert poll.poll == 1
        assert w.retrainer.on_track_run(poll) == "running"
        ((_, second, _),) = w.outbox.take()[1:]
        assert w.retrainer.on_track_run(second) == "running"
        assert w.retrainer.on_track_run(poll) == "duplicate"  # a stale copy of poll 1
        assert w.run()["polls"] == 2

    def test_lost_run_message_is_resent_by_a_redelivered_check(self) -> None:
        w = World()
        w.drop("housing/a.csv")
        ((_, check, _),) = w.outbox.take()
        w.clock.advance(seconds=60)
        assert isinstance(check, CheckBatch)
        assert w.retrainer.on_check_batch(check) == "sealed"
        w.outbox.take()  # the TrackRun is lost
        assert w.retrainer.on_check_batch(check) == "resent"
        ((_, track, _),) = w.outbox.sent
        assert isinstance(track, TrackRun)
        assert track.run_id == w.run()["run_id"]

    def test_job_submitted_by_a_losing_delivery_is_deleted_unstarted(self) -> None:
        w = self.sealed()
        ((_, msg, _),) = w.outbox.take()
        original = w.jobs.submit

        def racing_submit(**kwargs: Any) -> str:
            job = original(**kwargs)
            key = run_key("housing", w.run()["run_id"])
            w.ledger.update(key, lambda d: {**d, "state": "submitted", "job_id": "other"})
            return job

        w.jobs.submit = racing_submit  # type: ignore[method-assign]
        assert w.retrainer.on_track_run(msg) == "conflict"
        assert w.jobs.cancelled == ["job1"]
        assert w.jobs.started == []

    def test_retryable_error_reschedules_with_retry_after(self) -> None:
        w = self.sealed()
        w.jobs.errors["submit"] = RemoteError("429", status=429, retryable=True, retry_after=7)
        ((_, msg, _),) = w.outbox.take()
        assert w.retrainer.on_track_run(msg) == "retry"  # type: ignore[arg-type]
        ((_, again, delay),) = w.outbox.sent
        assert again == msg
        assert delay == timedelta(seconds=7)
        assert w.run()["state"] == "queued"

    def test_permanent_error_fails_the_run(self) -> None:
        w = self.sealed()
        w.jobs.errors["submit"] = RemoteError("BES submit: HTTP 400: bad input name", status=400)
        w.deliver()
        assert w.run()["state"] == "failed"
        assert "bad input name" in w.run()["error"]


class TestEvaluate:
    def trained(self) -> World:
        w = World()
        w.drop("housing/a.csv", housing_csv(10, seed=1))
        w.deliver()
        w.deliver()
        w.deliver()
        assert w.run()["state"] == "trained"
        return w

    def test_first_model_is_promoted_and_becomes_champion(self) -> None:
        w = self.trained()
        w.evaluation("Root Mean Squared Error\n2.5\n")
        assert w.deliver() == ["promoted"]
        state = w.ledger.get("models/housing.json")
        assert state is not None
        assert state["champion"]["metrics"] == {"Root Mean Squared Error": 2.5}
        assert w.target.serving == w.run()["outputs"]["model"]
        assert "sp=r&" in w.target.deploys[0].sas_token

    def test_redelivered_promotion_does_not_patch_twice(self) -> None:
        w = self.trained()
        w.evaluation("Root Mean Squared Error\n2.5\n")
        ((_, msg, _),) = w.outbox.take()
        assert isinstance(msg, EvaluateRun)
        w.retrainer.on_evaluate(msg)
        w.ledger.update(run_key("housing", msg.run_id), lambda d: {**d, "state": "promoting"})
        assert w.retrainer.on_evaluate(msg) == "promoted"
        assert len(w.target.deploys) == 1

    def test_unreadable_evaluation_fails_the_run(self) -> None:
        w = self.trained()
        w.evaluation("Mean Absolute Error\n")
        w.deliver()
        assert w.run()["state"] == "failed"
        assert "no data row" in w.run()["error"]

    @pytest.mark.parametrize(
        ("csv", "named"),
        [
            ("Root Mean Squared Error\n-5\n", "Root Mean Squared Error is -5"),
            ("Root Mean Squared Error,Coefficient of Determination\n1,7.5\n", "is 7.5"),
            ("Root Mean Squared Error\n1\n-2\n", "the champion's row"),
            ("Root Mean Squared Error,root mean squared error\n3,1\n", "two columns"),
            ("Root Mean Squared Error\nNaN\n", "is nan"),
        ],
    )
    def test_impossible_metrics_fail_the_run_and_promote_nothing(
        self, csv: str, named: str
    ) -> None:
        w = self.trained()
        w.evaluation(csv)
        w.deliver()
        run = w.run()
        assert run["state"] == "failed"
        assert run["error"].startswith("cannot read the evaluation")
        assert named in run["error"]
        assert w.target.deploys == []
        assert w.ledger.get("models/housing.json")["champion"] is None  # type: ignore[index]

    def test_an_impossible_recorded_champion_fails_the_run(self) -> None:
        w = self.trained()
        w.ledger.update(
            "models/housing.json",
            lambda d: {
                **d,
                "champion": {"run_id": "old", "metrics": {"Root Mean Squared Error": -3.0}},
            },
        )
        w.evaluation("Root Mean Squared Error\n2.5\n")
        w.deliver()
        assert w.run()["state"] == "failed"
        assert "the champion's row: Root Mean Squared Error is -3" in w.run()["error"]
        assert w.target.deploys == []

    def test_refused_patch_fails_the_run_and_keeps_no_champion(self) -> None:
        w = self.trained()
        w.evaluation("Root Mean Squared Error\n2.5\n")

        def refuse(model: Any) -> None:
            raise RemoteError(
                "Classic endpoint PATCH prod: HTTP 400: Resource not found", status=400
            )

        w.target.deploy = refuse  # type: ignore[method-assign]
        w.deliver()
        assert w.run()["state"] == "failed"
        assert w.ledger.get("models/housing.json")["champion"] is None  # type: ignore[index]


def test_unknown_model_in_a_message_is_an_error() -> None:
    w = World()
    with pytest.raises(Exception, match="not configured"):
        w.retrainer.on_track_run(TrackRun(model="other", run_id="r"))


class TestAsyncPromotion:
    def trained(self, provisioning: list[str], **overrides: Any) -> World:
        w = World(**overrides)
        w.target = FakeTarget(provisioning)
        w.drop("housing/a.csv", housing_csv(10, seed=1))
        for _ in range(3):
            w.deliver()
        w.evaluation("Root Mean Squared Error\n2.5\n")
        return w

    def test_pending_provisioning_is_polled_by_delayed_messages(self) -> None:
        w = self.trained(["pending", "pending", "pending"])
        results, delays = [], []
        for _ in range(5):
            delays += [d for _, m, d in w.outbox.sent if isinstance(m, EvaluateRun)]
            results += w.deliver()
        assert results == ["provisioning", "provisioning", "provisioning", "promoted"]
        assert delays == [
            timedelta(0),
            timedelta(seconds=30),
            timedelta(seconds=60),
            timedelta(seconds=120),
        ]
        assert len(w.target.deploys) == 1
        assert w.run()["deployment"]["operation"] == "op-1"

    def test_failed_provisioning_fails_the_run_and_keeps_the_champion(self) -> None:
        w = self.trained(["pending", "failed"])
        w.deliver()
        w.deliver()
        run = w.run()
        assert run["state"] == "failed"
        assert "ModuleError: cannot load the model (injected)" in run["error"]
        state = w.ledger.get("models/housing.json")
        assert state is not None
        assert state["champion"] is None
        assert state["active_run"] is None

    def test_provisioning_past_its_timeout_fails(self) -> None:
        target = {
            "kind": "new",
            "subscription_id": "s",
            "resource_group": "r",
            "web_service": "w",
            "provisioning_timeout": 100,
        }
        w = self.trained(["pending"] * 20, target=target)
        for _ in range(8):
            w.deliver()
        assert w.run()["state"] == "failed"
        assert "provisioning did not finish within 0:01:40" in w.run()["error"]

    def test_stale_provisioning_poll_is_dropped(self) -> None:
        w = self.trained(["pending", "pending", "pending"])
        w.deliver()  # deploy -> pending, poll 1 scheduled
        ((_, poll1, _),) = w.outbox.sent
        w.deliver()  # poll 1 -> pending, poll 2 scheduled
        w.deliver()  # poll 2 -> pending, poll 3 scheduled
        assert isinstance(poll1, EvaluateRun)
        assert w.retrainer.on_evaluate(poll1) == "duplicate"
        assert w.run()["deployment"]["polls"] == 2


class TestSweep:
    def test_batch_whose_check_was_lost_is_checked_again(self) -> None:
        w = World()
        w.drop("housing/a.csv")
        w.outbox.take()  # the check message is lost
        w.clock.advance(minutes=30)
        assert w.retrainer.sweep()["checks"] == 1
        assert w.deliver() == ["sealed"]
        assert w.retrainer.sweep()["checks"] == 0

    def test_scheduled_retrain_when_the_champion_is_old(self) -> None:
        w = World(retrain_every=86400)
        w.drop("housing/a.csv", housing_csv(10, seed=1))
        for _ in range(3):
            w.deliver()
        w.data.put(
            "artifacts",
            w.run()["outputs"]["evaluation"].split("/", 1)[1],
            "Root Mean Squared Error\n2.5\n",
        )
        assert w.deliver() == ["promoted"]
        w.clock.advance(hours=23)
        assert w.retrainer.sweep()["scheduled"] == 0
        w.clock.advance(hours=2)
        assert w.retrainer.sweep()["scheduled"] == 1
        assert w.retrainer.sweep()["scheduled"] == 0  # the batch is open now
        ((_, check, _),) = w.outbox.sent
        assert isinstance(check, CheckBatch)
        assert w.deliver() == ["sealed"]
        runs = w.store.keys("runs/")
        assert len(runs) == 2

    def test_awaiting_approval_is_not_stalled(self) -> None:
        w = World(promotion="manual")
        w.drop("housing/a.csv", housing_csv(10, seed=1))
        for _ in range(3):
            w.deliver()
        w.evaluation("Root Mean Squared Error\n2.5\n")
        w.deliver()
        assert w.run()["state"] == "awaiting_approval"
        w.clock.advance(days=3)
        assert w.retrainer.sweep() == {"checks": 0, "runs": 0, "blobs": 0, "scheduled": 0}


class TestDeployLease:
    def trained(self) -> tuple[World, EvaluateRun]:
        w = World()
        w.drop("housing/a.csv", housing_csv(10, seed=1))
        for _ in range(3):
            w.deliver()
        w.evaluation("Root Mean Squared Error\n2.5\n")
        ((_, msg, _),) = w.outbox.take()
        assert isinstance(msg, EvaluateRun)
        return w, msg

    def claim_then_crash(self, w: World, msg: EvaluateRun, delivery: str) -> None:
        def crash(model: Any) -> Any:
            raise SystemExit("the worker died after claiming the deploy")

        w.target.deploy = crash  # type: ignore[method-assign]
        with pytest.raises(SystemExit):
            w.retrainer.on_evaluate(msg, delivery=delivery)
        del w.target.deploy

    def test_redelivery_of_the_same_message_takes_the_claim_over(self) -> None:
        w, msg = self.trained()
        self.claim_then_crash(w, msg, "m-1")
        assert w.retrainer.on_evaluate(msg, delivery="m-1") == "promoted"
        assert len(w.target.deploys) == 1

    def test_another_copy_waits_for_the_lease_and_never_patches_twice(self) -> None:
        w, msg = self.trained()
        self.claim_then_crash(w, msg, "m-1")
        assert w.retrainer.on_evaluate(msg, delivery="m-2") == "waiting"
        ((_, again, delay),) = w.outbox.take()
        assert again == msg
        assert timedelta(seconds=1) <= delay <= timedelta(minutes=2)
        w.clock.advance(minutes=3)  # the claimant never came back: its lease ran out
        assert w.retrainer.on_evaluate(msg, delivery="m-2") == "promoted"
        assert len(w.target.deploys) == 1
