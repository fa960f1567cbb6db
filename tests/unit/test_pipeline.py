"""The Retrainer's state machine, with fakes and a manual clock."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest

from localdev.sample import housing_csv
from retrain.bes import JobState, JobStatus
from retrain.deploy import Progress
from retrain.errors import InputRejected, PermanentRemoteError, RemoteError, TransientRemoteError
from retrain.ledger import arrival_key, model_key, run_key
from retrain.messages import CheckBatch, EvaluateRun, TrackRun
from retrain.pipeline import DEPLOY_CALLS, Delivery, Timing
from retrain.pipeline.operations import in_flight
from retrain.ports import ModelRef
from tests.fakes import (
    FakeJobs,
    FakeTarget,
)
from tests.harness import (
    World,
    champion_run,
    champion_then_second_trained,
    evaluated,
    failing_provisioning,
    latest_run,
    left_as,
    poisoned_during_deploy,
    restore_check_unreachable,
    sealed_without_its_run,
)


class TestIngest:
    def test_arrival_is_batched_and_a_check_is_scheduled_after_the_quiet_period(self) -> None:
        w = World()
        assert w.drop("housing/a.csv") == "batched"
        ((queue, msg, delay),) = w.outbox.sent
        assert queue == "jobs"
        assert isinstance(msg, CheckBatch)
        assert delay == timedelta(seconds=60)

    def test_same_blob_version_twice_is_one_arrival(self) -> None:
        w = World()
        assert w.drop("housing/a.csv") == "batched"
        assert w.drop("housing/b.csv") == "batched"
        assert w.retrainer.on_blob("data", "housing/b.csv") == "duplicate"
        assert len(w.outbox.sent) == 1  # only the batch's opener schedules its check
        assert w.batch_files() == ["housing/a.csv", "housing/b.csv"]

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
        assert len(w.files(run)) == 5
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
        assert len(w.files()) == 5

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
        assert len(w.files()) == 2

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
        # The job reads the run's own copy of exactly the validated version.
        frozen = f"artifacts/housing/{run['run_id']}/input.csv"
        assert request["inputs"]["input1"].relative_location == frozen
        ((source, copy),) = w.data.frozen
        assert (source.name, source.etag, copy) == (
            "housing/a.csv",
            w.files(run)[0]["etag"],
            frozen,
        )
        model_ref = request["outputs"]["output1"]
        assert model_ref.relative_location.endswith("/model.ilearner")
        assert "sp=cw&" in model_ref.sas_token

    def test_an_overwrite_after_validation_never_reaches_the_job(self) -> None:
        w = self.sealed()
        w.data.put("data", "housing/a.csv", "rooms\n1\n")  # a new version lacking a column
        assert w.deliver() == ["failed"]
        assert w.jobs.submitted == []
        assert "changed after it was validated" in w.run()["error"]

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

    def test_a_start_whose_answer_was_lost_is_not_repeated_and_the_run_goes_on(self) -> None:
        w = self.sealed(FakeJobs([JobState.RUNNING, JobState.FINISHED]))
        ((_, msg, _),) = w.outbox.take()
        assert isinstance(msg, TrackRun)
        w.jobs.errors["start"] = TransientRemoteError("BES start: connection failed")
        assert w.retrainer.on_track_run(msg, delivery=Delivery("m-1")) == "retry"
        assert w.run()["state"] == "submitted"
        assert w.jobs.started == ["job1"]  # the service did start it
        # The retry asks BES first and does not start (or cancel) a running job.
        assert w.deliver() == ["started"]
        assert w.jobs.started == ["job1"]
        assert w.jobs.cancelled == []
        w.deliver()
        assert w.run()["state"] == "trained"

    def test_a_redelivery_after_a_start_does_not_look_at_the_job_at_once(self) -> None:
        """Found by the long chaos run: two status GETs of one job 0.675 s apart. An attempt
        that started the job and then died is redelivered; it asked BES at once, within a
        second of the start (and of any status call the first attempt made), where a start
        still on its way could also be missed."""
        w = self.sealed(FakeJobs([JobState.RUNNING]))
        ((_, msg, _),) = w.outbox.take()
        assert isinstance(msg, TrackRun)
        w.jobs.errors["start"] = RuntimeError("the worker died")  # type: ignore[assignment]
        with pytest.raises(RuntimeError):
            w.retrainer.on_track_run(msg, delivery=Delivery("m-1"))
        assert w.run()["state"] == "submitted"
        assert w.retrainer.on_track_run(msg, delivery=Delivery("m-1", 2)) == "resent"
        assert w.jobs.polls == []  # no status call from the redelivery
        ((_, later, delay),) = w.outbox.take()
        assert isinstance(later, TrackRun)
        assert later.poll == msg.poll + 1
        assert delay >= w.retrainer._ctx.timing.call_bound  # a start in flight has landed by then
        assert w.retrainer.on_track_run(later) == "started"
        assert w.jobs.started == ["job1"]
        assert w.run()["state"] == "running"

    def test_a_409_on_start_means_already_started(self) -> None:
        w = self.sealed(FakeJobs([JobState.FINISHED]))
        ((_, msg, _),) = w.outbox.take()
        assert isinstance(msg, TrackRun)
        w.retrainer.on_track_run(msg, delivery=Delivery("m-1"))
        left_as(w, run_key("housing", msg.run_id), lambda d: {**d, "state": "submitted"})
        w.jobs.status = lambda job_id: JobStatus(JobState.NOT_STARTED, None, {})  # type: ignore[method-assign]
        w.outbox.take()
        assert w.retrainer.on_track_run(msg, delivery=Delivery("m-1", 2)) == "resent"
        ((_, later, _),) = w.outbox.take()
        assert isinstance(later, TrackRun)
        # The service says NotStarted (stale), the start is refused with 409: already started.
        assert w.retrainer.on_track_run(later, delivery=Delivery("m-2")) == "started"
        assert w.jobs.cancelled == []
        assert w.run()["state"] == "running"

    def test_duplicate_deliveries_make_one_poll_chain(self) -> None:
        """Two copies of the start message and of every poll: polls are made once each."""
        w = self.sealed(FakeJobs([JobState.RUNNING] * 3 + [JobState.FINISHED]))
        ((_, msg, _),) = w.outbox.take()
        assert isinstance(msg, TrackRun)
        w.outbox.sent.append(("jobs", msg, timedelta(0)))
        w.outbox.sent.append(("jobs", msg, timedelta(0)))
        seq = 0
        results: list[str] = []
        evaluations = 0
        for _ in range(12):
            pending = w.outbox.take()
            if not pending:
                break
            for _q, m, delay in pending:
                if not isinstance(m, TrackRun):
                    evaluations += 1  # the evaluation that follows training
                    continue
                w.clock.advance(seconds=delay.total_seconds())
                for _copy in range(2):  # every message is delivered twice, as separate messages
                    seq += 1
                    results.append(w.retrainer.on_track_run(m, delivery=Delivery(f"m-{seq}")))
        assert w.jobs.started == ["job1"]
        assert w.jobs.polls == ["job1"] * 4  # one status call per poll, none twice
        assert evaluations == 1
        assert w.run()["state"] == "trained"

    def test_a_retry_after_zero_still_waits_the_least_poll_gap(self) -> None:
        w = self.sealed(FakeJobs([JobState.RUNNING]))
        w.deliver()
        ((_, poll, _),) = w.outbox.take()
        assert isinstance(poll, TrackRun)
        w.jobs.errors["status"] = TransientRemoteError("429", status=429, retry_after=0)
        assert w.retrainer.on_track_run(poll, delivery=Delivery("p")) == "retry"
        ((_, again, delay),) = w.outbox.sent
        assert isinstance(again, TrackRun)
        assert again.poll == poll.poll + 1  # poll 1 was claimed; the retry is the next poll
        assert delay >= timedelta(seconds=1)

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
        w.jobs.errors["submit"] = TransientRemoteError("429", status=429, retry_after=7)
        ((_, msg, _),) = w.outbox.take()
        assert w.retrainer.on_track_run(msg) == "retry"  # type: ignore[arg-type]
        ((_, again, delay),) = w.outbox.sent
        assert again == msg
        assert delay == timedelta(seconds=7)
        assert w.run()["state"] == "queued"

    def test_permanent_error_fails_the_run(self) -> None:
        w = self.sealed()
        w.jobs.errors["submit"] = PermanentRemoteError(
            "BES submit: HTTP 400: bad input name", status=400
        )
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
        model = ModelRef.load(w.run()["outputs"]["model"])
        assert model == ModelRef("artifacts", f"housing/{w.run()['run_id']}/model.ilearner")
        assert w.target.serving == model
        assert w.target.deploys == [model]
        assert state["champion"]["model"] == model.to_doc()

    def test_redelivered_promotion_does_not_patch_twice(self) -> None:
        w = self.trained()
        w.evaluation("Root Mean Squared Error\n2.5\n")
        ((_, msg, _),) = w.outbox.take()
        assert isinstance(msg, EvaluateRun)
        w.retrainer.on_evaluate(msg, delivery=Delivery("m-1"))
        # The first attempt died after the deploy, before the run was marked promoted.
        left_as(w, run_key("housing", msg.run_id), lambda d: {**d, "state": "promoting"})
        assert w.retrainer.on_evaluate(msg, delivery=Delivery("m-2")) == "duplicate"
        # The redelivery knows its first attempt is gone, not whether a call it made has
        # landed: it looks one call bound later, and does not deploy again.
        assert w.retrainer.on_evaluate(msg, delivery=Delivery("m-1", 2)) == "provisioning"
        ((_, copy, delay),) = w.outbox.take()
        assert delay >= w.retrainer._ctx.timing.call_bound
        assert w.retrainer.on_evaluate(copy, delivery=Delivery("m-3")) == "promoted"
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
                "champion": {
                    "run_id": "old",
                    "model": "artifacts/housing/old/model.ilearner",
                    "metrics": {"Root Mean Squared Error": -3.0},
                },
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
            raise PermanentRemoteError(
                "Classic endpoint PATCH prod: HTTP 400: Resource not found", status=400
            )

        w.target.deploy = refuse  # type: ignore[method-assign]
        w.deliver()
        assert w.run()["state"] == "failed"
        assert w.ledger.get("models/housing.json")["champion"] is None  # type: ignore[index]

    def test_a_503_with_retry_after_on_the_patch_is_retried_after_that_delay(self) -> None:
        w = self.trained()
        w.evaluation("Root Mean Squared Error\n2.5\n")
        ((_, msg, _),) = w.outbox.take()
        assert isinstance(msg, EvaluateRun)
        original = w.target.deploy

        def busy(model: Any) -> Any:
            w.target.deploy = original  # type: ignore[method-assign]
            raise TransientRemoteError("PATCH: HTTP 503", status=503, retry_after=2)

        w.target.deploy = busy  # type: ignore[method-assign]
        assert w.retrainer.on_evaluate(msg, delivery=Delivery("m-1")) == "retry"
        ((_, again, delay),) = w.outbox.sent
        assert delay == timedelta(seconds=2)  # not the host's 30 s visibility timeout
        assert w.run()["deployment"] is None  # the lease is given back for the retry
        assert w.deliver() == ["promoted"]
        assert isinstance(again, EvaluateRun)
        assert again.retries == 1

    def test_a_service_that_keeps_asking_for_later_ends_in_the_poison_path(self) -> None:
        w = self.trained()
        w.evaluation("Root Mean Squared Error\n2.5\n")
        ((_, msg, _),) = w.outbox.take()

        def busy(model: Any) -> Any:
            raise TransientRemoteError("PATCH: HTTP 503", status=503, retry_after=2)

        w.target.deploy = busy  # type: ignore[method-assign]
        assert isinstance(msg, EvaluateRun)
        tired = msg.model_copy(update={"retries": 5})
        with pytest.raises(RemoteError):
            w.retrainer.on_evaluate(tired, delivery=Delivery("m-1"))


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

    def test_polls_failing_past_the_timeout_end_the_run_even_when_redelivered(self) -> None:
        """Every poll's status call fails with an answer (the host redelivers each one): the
        redeliveries look again later, and past the timeout the run fails, not loops."""
        target = {
            "kind": "new",
            "subscription_id": "s",
            "resource_group": "r",
            "web_service": "w",
            "provisioning_timeout": 1800,
        }
        w = self.trained(["pending"], target=target)
        w.deliver()  # deploy -> pending, poll 1 scheduled

        def busy(operation: str | None) -> Progress:
            raise TransientRemoteError("GET web service: HTTP 503", status=503)

        w.target.progress = busy  # type: ignore[method-assign]
        for attempt in range(40):
            ((_, poll, delay),) = w.outbox.take()
            assert isinstance(poll, EvaluateRun)
            w.clock.advance(seconds=delay.total_seconds())
            try:
                answer = w.retrainer.on_evaluate(poll, delivery=Delivery(f"p-{attempt}"))
            except TransientRemoteError:
                w.clock.advance(seconds=30)  # the host's visibility timeout, then again
                answer = w.retrainer.on_evaluate(poll, delivery=Delivery(f"p-{attempt}", 2))
            if answer == "failed":
                break
        assert w.run()["state"] == "failed"
        assert "provisioning did not finish within 0:30:00" in w.run()["error"]

    def test_a_pending_deploy_without_an_operation_is_followed_to_the_end(self) -> None:
        """A target that answers 'pending' with no operation to follow (a New web service
        still Provisioning) is asked again through `progress(None)` until it serves."""
        w = self.trained(["pending", "pending"])
        deploy = w.target.deploy

        def no_operation(model: ModelRef) -> Progress:
            progress = deploy(model)
            return Progress(progress.state, progress.detail)  # the operation dropped

        w.target.deploy = no_operation  # type: ignore[method-assign]
        answers: list[str] = []
        while w.outbox.sent:
            answers += w.deliver()
        assert answers[-1] == "promoted"
        assert w.run()["state"] == "promoted"

    def test_stale_provisioning_poll_is_dropped(self) -> None:
        w = self.trained(["pending", "pending", "pending"])
        w.deliver()  # deploy -> pending, poll 1 scheduled
        ((_, poll1, _),) = w.outbox.sent
        w.deliver()  # poll 1 -> pending, poll 2 scheduled
        w.deliver()  # poll 2 -> pending, poll 3 scheduled
        assert isinstance(poll1, EvaluateRun)
        assert w.retrainer.on_evaluate(poll1) == "duplicate"
        assert w.run()["deployment"]["polls"] == 2

    def test_a_redelivered_provisioning_poll_asks_in_the_next_poll_not_at_once(self) -> None:
        """The same class as a redelivered job poll: the attempt that died may have just asked
        how the operation is doing."""
        w = self.trained(["pending", "pending"])
        w.deliver()  # deploy -> pending, poll 1 scheduled
        ((_, poll1, _),) = w.outbox.take()
        assert isinstance(poll1, EvaluateRun)
        asked: list[str | None] = []
        progress = w.target.progress

        def dies_after_asking(operation: str | None) -> Progress:
            asked.append(operation)
            progress(operation)
            raise RuntimeError("the worker died")

        w.target.progress = dies_after_asking  # type: ignore[method-assign]
        with pytest.raises(RuntimeError):
            w.retrainer.on_evaluate(poll1, delivery=Delivery("p-1"))
        assert w.retrainer.on_evaluate(poll1, delivery=Delivery("p-1", 2)) == "provisioning"
        assert asked == ["op-1"]  # the redelivery did not ask again
        ((_, poll2, delay),) = w.outbox.take()
        assert isinstance(poll2, EvaluateRun)
        assert poll2.poll == poll1.poll + 1
        # ... nor before one call bound: had it been changing the target, the change has landed
        assert delay >= w.retrainer._ctx.timing.call_bound
        del w.target.progress
        assert w.retrainer.on_evaluate(poll2) == "promoted"


class TestSweep:
    def test_batch_whose_check_was_lost_is_checked_again(self) -> None:
        w = World()
        w.drop("housing/a.csv")
        w.outbox.take()  # the check message is lost
        w.clock.advance(minutes=30)
        assert w.retrainer.sweep()["checks"] == 1
        assert w.deliver() == ["sealed"]
        assert w.retrainer.sweep()["checks"] == 0

    def test_scheduled_retrain_of_an_old_champion_needs_data_it_has_not_seen(self) -> None:
        w = World(retrain_every=86400)
        w.drop("housing/a.csv", housing_csv(10, seed=1))
        for _ in range(3):
            w.deliver()
        w.evaluation("Root Mean Squared Error\n2.5\n")
        assert w.deliver() == ["promoted"]
        w.clock.advance(hours=25)
        assert w.retrainer.sweep()["scheduled"] == 0  # nothing the champion has not seen
        assert w.outbox.sent == []
        assert len(w.store.keys("runs/")) == 1

    @pytest.mark.parametrize("state", ["running", "submitted"])
    def test_a_re_driven_run_keeps_the_chain_pace(self, state: str) -> None:
        """The sweep judges a stall on its own clock, against times other instances wrote: the
        chain may be alive, or a start on its way. The re-sent message is delayed so its status
        call is not within a second of another, nor before a start in flight has landed."""
        w = World()
        w.drop("housing/a.csv", housing_csv(10, seed=1))
        w.deliver()  # sealed
        if state == "submitted":
            w.jobs.errors["start"] = TransientRemoteError("BES start: 503", status=503)
        w.deliver()
        assert w.run()["state"] == state
        w.outbox.take()  # the chain's message is lost
        w.clock.advance(hours=1)
        assert w.retrainer.sweep()["runs"] == 1
        ((_, message, delay),) = w.outbox.sent
        assert isinstance(message, TrackRun)
        timing = w.retrainer._ctx.timing
        assert delay >= (timing.call_bound if state == "submitted" else timedelta(seconds=2))

    def test_awaiting_approval_is_not_stalled(self) -> None:
        w = World(promotion="manual")
        w.drop("housing/a.csv", housing_csv(10, seed=1))
        for _ in range(3):
            w.deliver()
        w.evaluation("Root Mean Squared Error\n2.5\n")
        w.deliver()
        assert w.run()["state"] == "awaiting_approval"
        w.clock.advance(days=3)
        assert w.retrainer.sweep() == {
            "checks": 0,
            "runs": 0,
            "blobs": 0,
            "scheduled": 0,
            "restores": 0,
            "errors": 0,
        }


LATER = {"run_id": "later-run", "model": "artifacts/housing/later-run/model.ilearner"}
"""A champion crowned by a later run, as the model document records it."""


class TestDeployLease:
    def trained(self) -> tuple[World, EvaluateRun]:
        w = World()
        return w, evaluated(w)

    def claim_then_crash(self, w: World, msg: EvaluateRun, delivery: Delivery) -> None:
        def crash(model: Any) -> Any:
            raise SystemExit("the worker died after claiming the deploy")

        w.target.deploy = crash  # type: ignore[method-assign]
        with pytest.raises(SystemExit):
            w.retrainer.on_evaluate(msg, delivery=delivery)
        del w.target.deploy

    def test_redelivery_of_the_same_message_takes_the_claim_over(self) -> None:
        w, msg = self.trained()
        self.claim_then_crash(w, msg, Delivery("m-1"))
        # It takes over one call bound later: the call the holder made may still land.
        assert w.retrainer.on_evaluate(msg, delivery=Delivery("m-1", 2)) == "resent"
        ((_, copy, delay),) = w.outbox.take()
        assert delay == w.retrainer._ctx.timing.call_bound
        assert w.retrainer.on_evaluate(copy, delivery=Delivery("m-2")) == "promoted"
        assert len(w.target.deploys) == 1

    def test_a_concurrent_copy_of_the_same_attempt_does_not_take_over(self) -> None:
        w, msg = self.trained()
        self.claim_then_crash(w, msg, Delivery("m-1"))
        assert w.retrainer.on_evaluate(msg, delivery=Delivery("m-1")) == "waiting"
        assert w.target.deploys == []

    def test_another_copy_waits_a_whole_lease_then_takes_over_the_same_claim(self) -> None:
        w, msg = self.trained()
        self.claim_then_crash(w, msg, Delivery("m-1"))
        held = w.run()["deployment"]["claim"]
        assert w.retrainer.on_evaluate(msg, delivery=Delivery("m-2")) == "waiting"
        ((_, again, delay),) = w.outbox.take()
        assert isinstance(again, EvaluateRun)
        assert again.lease == held
        assert delay == w.retrainer._ctx.timing.deploy_lease
        # Expiry is never read off a clock: even with no time passing here (another instance's
        # clock may run behind), the copy that waited a lease on the queue takes over.
        assert w.retrainer.on_evaluate(again, delivery=Delivery("m-3")) == "promoted"
        assert len(w.target.deploys) == 1

    def test_a_copy_that_saw_an_older_claim_waits_again(self) -> None:
        w, msg = self.trained()
        self.claim_then_crash(w, msg, Delivery("m-1"))
        old = w.run()["deployment"]["claim"]
        assert w.retrainer.on_evaluate(msg, delivery=Delivery("m-1", 2)) == "resent"
        ((_, copy, _),) = w.outbox.take()
        assert isinstance(copy, EvaluateRun)
        self.claim_then_crash(w, copy, Delivery("m-3"))  # took over: a new claim
        stale = msg.model_copy(update={"lease": old})
        assert w.retrainer.on_evaluate(stale, delivery=Delivery("m-2")) == "waiting"
        assert w.target.deploys == []

    def test_a_holder_that_lost_its_lease_mid_call_neither_records_nor_crowns(self) -> None:
        """The first holder's deploy call outlives its lease; a copy takes over and finishes.
        When the first call returns, its writes are fenced off by the lease token."""
        w, msg = self.trained()
        original = w.target.deploy
        outcome: list[str] = []

        def slow_deploy(model: Any) -> Any:
            w.target.deploy = original  # type: ignore[method-assign]
            held = w.run()["deployment"]["claim"]
            takeover = msg.model_copy(update={"lease": held})
            outcome.append(w.retrainer.on_evaluate(takeover, delivery=Delivery("m-2")))
            return original(model)

        w.target.deploy = slow_deploy  # type: ignore[method-assign]
        assert w.retrainer.on_evaluate(msg, delivery=Delivery("m-1")) == "lease lost"
        assert outcome == ["promoted"]
        state = w.ledger.get(model_key("housing"))
        assert state is not None
        assert state["champion"]["run_id"] == w.run()["run_id"]
        assert state["previous_champion"] is None  # crowned once, not twice

    def test_a_stale_holder_of_an_older_run_cannot_crown_over_the_new_champion(self) -> None:
        w, msg = self.trained()
        assert w.retrainer.on_evaluate(msg, delivery=Delivery("m-1")) == "promoted"
        first = w.run()["run_id"]
        # A stale delivery of the first run, which had deployed before it stalled, comes back
        # after the model moved on (another run holds it now).
        left_as(w, run_key("housing", first), lambda d: {**d, "state": "promoting"})
        w.ledger.update(
            model_key("housing"),
            lambda d: {**d, "active_run": "later-run", "champion": LATER},
        )
        # It looks one call bound later (its attempt may have been changing the target).
        assert w.retrainer.on_evaluate(msg, delivery=Delivery("m-1", 2)) == "provisioning"
        assert w.deliver() == ["superseded"]
        state = w.ledger.get(model_key("housing"))
        assert state is not None
        assert state["champion"] == LATER

    def test_no_call_is_started_when_the_lease_is_nearly_spent(self) -> None:
        w, msg = self.trained()
        lease = w.retrainer._ctx.timing.deploy_lease

        def slow_preflight() -> list[str]:
            w.clock.advance(seconds=lease.total_seconds())  # the first promotion's checks
            return ["ok"]

        w.target.preflight = slow_preflight  # type: ignore[method-assign]
        assert w.retrainer.on_evaluate(msg, delivery=Delivery("m-1")) == "retry"
        assert w.target.deploys == []
        assert w.run()["deployment"] is None  # given back: the retry claims afresh


def test_the_deploy_lease_is_derived_from_the_http_timeouts() -> None:
    short = Timing(timedelta(seconds=30), timedelta(minutes=10), call_bound=timedelta(seconds=5))
    long = Timing(timedelta(seconds=30), timedelta(minutes=10), call_bound=timedelta(seconds=50))
    assert short.deploy_lease < long.deploy_lease
    assert long.deploy_lease >= 4 * long.call_bound


class TestFailedPromotionRestoresTheTarget:
    def champion_then_trained(self) -> tuple[World, str]:
        return champion_then_second_trained()

    def latest(self, w: World) -> dict[str, Any]:
        return latest_run(w)

    def test_a_failure_after_the_target_changed_puts_the_champion_back(self) -> None:
        w, champion = self.champion_then_trained()
        champion_model = w.target.serving

        answers = ["pending", "failed"]

        def applied_then_failed(operation: str | None) -> Progress:
            if answers.pop(0) == "pending":
                return Progress("pending", operation="op-1")
            w.target.serving = w.target.requested  # the service switched, then gave up
            return Progress("failed", "provisioning failed (injected)")

        w.target.progress = applied_then_failed  # type: ignore[method-assign]
        w.deliver()  # deploy: pending
        w.deliver()  # poll: failed
        failed = [w.store.docs[k][0] for k in w.store.keys("runs/")]
        (bad,) = [r for r in failed if r["state"] == "failed"]
        assert "restoring the champion" in bad["target_after"]
        del w.target.progress
        assert w.deliver() == ["promoted"]  # the restore run
        assert w.target.serving == champion_model
        state = w.ledger.get(model_key("housing"))
        assert state is not None
        assert champion_model is not None
        assert state["champion"]["model"] == champion_model.to_doc()
        assert state["previous_champion"] is None  # a restore does not shift the history
        restore = self.latest(w)
        assert (restore["kind"], restore["restores"]) == ("restore", champion)
        assert state["active_run"] is None

    def test_rollback_asks_the_target_not_the_pointer(self) -> None:
        w, champion = self.champion_then_trained()
        w.deliver()  # the second run is promoted
        first_model = w.ledger.get(run_key("housing", champion))["outputs"]["model"]  # type: ignore[index]
        w.target.serving = ModelRef.load(first_model)  # e.g. someone re-deployed it by hand
        with pytest.raises(InputRejected, match="already serves"):
            w.retrainer.rollback("housing", champion, by="me")
        w.target.serving = ModelRef("artifacts", "elsewhere/model.ilearner")
        second = self.latest(w)["run_id"]
        # The pointer says run 2 is served; the target says otherwise: rolling "forward" to
        # run 2 is allowed, because the target does not serve it.
        assert w.retrainer.rollback("housing", second, by="me").startswith("rollback-")


class TestWedgedModel:
    def test_a_sealed_batch_whose_run_was_never_recorded_is_recorded_by_the_sweep(self) -> None:
        w = sealed_without_its_run()
        # ...and the check message was lost with the worker.
        assert w.retrainer.sweep()["runs"] == 0  # a writer may still be at work
        w.clock.advance(minutes=30)
        assert w.retrainer.sweep()["runs"] == 1
        assert w.run()["state"] == "queued"
        assert [type(m) for _, m, _ in w.outbox.sent] == [TrackRun]

    def test_a_rollback_claim_without_its_record_is_freed(self) -> None:
        w = World()
        w.drop("housing/a.csv", housing_csv(10, seed=1))
        for _ in range(3):
            w.deliver()
        w.evaluation("Root Mean Squared Error\n2.5\n")
        w.deliver()
        first = w.run()["run_id"]
        w.target.serving = None
        w.store.crash_before = ("create", "runs/housing/rollback-")
        with pytest.raises(RuntimeError):
            w.retrainer.rollback("housing", first, by="me")
        with pytest.raises(InputRejected, match="has no run record"):
            w.retrainer.rollback("housing", first, by="me")
        w.clock.advance(minutes=30)
        assert w.retrainer.sweep()["runs"] == 1
        assert w.ledger.get(model_key("housing"))["active_run"] is None  # type: ignore[index]
        assert w.retrainer.rollback("housing", first, by="me").startswith("rollback-")


class TestRestoreIsOwedUntilDefinite:
    """A failed promotion's restore check is recorded with the failure and retried until it
    has a definite outcome; the model stays held meanwhile."""

    def test_a_crash_inside_the_restore_is_finished_by_the_redelivery(self) -> None:
        w, champion = champion_then_second_trained()
        champion_model, poll = failing_provisioning(w)
        w.store.crash_before = ("create", "runs/housing/restore-")
        with pytest.raises(RuntimeError):
            w.retrainer.on_evaluate(poll, delivery=Delivery("p-1"))
        failed = latest_run(w)
        assert failed["state"] == "failed"
        assert failed["restore_pending"] is True
        del w.target.progress
        # The host redelivers the message: the run is failed, its restore is still owed.
        assert w.retrainer.on_evaluate(poll, delivery=Delivery("p-1", 2)) == "failed"
        assert w.deliver() == ["promoted"]  # the restore run, under its one id
        assert w.target.serving == champion_model
        state = w.ledger.get(model_key("housing"))
        assert state is not None
        assert state["active_run"] is None
        done = w.ledger.get(run_key("housing", failed["run_id"]))
        assert done is not None
        assert "restore_pending" not in done
        assert f"restore-{failed['run_id']}" in done["target_after"]
        assert state["champion"]["run_id"] == f"restore-{failed['run_id']}"
        assert w.ledger.get(run_key("housing", champion)) is not None

    def test_a_target_that_cannot_answer_keeps_the_check_owed_and_the_model_held(self) -> None:
        w, _ = champion_then_second_trained()
        champion_model, poll = failing_provisioning(w)
        serves = restore_check_unreachable(w, poll)
        failed = latest_run(w)
        assert "unknown" in failed["target_after"]
        state = w.ledger.get(model_key("housing"))
        assert state is not None
        assert state["active_run"] == failed["run_id"]  # nothing else may promote meanwhile
        # The next sweep tries again once the target answers.
        w.target.serves = serves  # type: ignore[method-assign]
        with pytest.raises(InputRejected, match="keeps the model until the target is known"):
            w.retrainer.rollback("housing", champion_run(w), by="me")
        del w.target.progress
        w.retrainer.sweep()
        assert w.deliver() == ["promoted"]
        assert w.target.serving == champion_model

    def test_a_restore_claim_whose_record_was_never_made_is_made_by_the_sweep(self) -> None:
        w, _ = champion_then_second_trained()
        champion_model, poll = failing_provisioning(w)
        w.store.crash_before = ("create", "runs/housing/restore-")
        with pytest.raises(RuntimeError):
            w.retrainer.on_evaluate(poll, delivery=Delivery("p-1"))
        del w.target.progress
        # The message is lost with the worker: only the sweep is left.
        w.clock.advance(minutes=30)
        assert w.retrainer.sweep()["runs"] == 1
        assert w.deliver() == ["promoted"]
        assert w.target.serving == champion_model


class TestFailedWhileAHolderDeploys:
    def test_a_run_failed_during_the_call_is_not_recorded_deployed_and_the_target_comes_back(
        self,
    ) -> None:
        """A copy's message went to poison (the run is failed) while another delivery holds
        the lease and is calling the target: the holder's writes are fenced off by the run's
        state, and the target is compared with the champion after the call."""
        w, _ = champion_then_second_trained()
        champion_model = w.target.serving
        ((_, msg, _),) = w.outbox.take()
        assert isinstance(msg, EvaluateRun)
        assert poisoned_during_deploy(w, msg) == "lease lost"
        run = w.ledger.get(run_key("housing", msg.run_id))
        assert run is not None
        assert run["state"] == "failed"
        assert not (run.get("deployment") or {}).get("deployed")
        assert w.target.serving != champion_model  # the late call changed the target...
        assert w.deliver() == ["promoted"]  # ...which the holder saw after it: a restore
        assert w.target.serving == champion_model
        assert w.retrainer.sweep()["restores"] == 0

    def test_a_holder_restores_even_when_the_sweep_restored_moments_before(self) -> None:
        def sweep_restores(w: World) -> None:
            # changed outside the app
            w.target.serving = ModelRef("artifacts", "elsewhere/model.ilearner")
            assert w.retrainer.sweep()["restores"] == 1
            assert w.deliver() == ["promoted"]  # the sweep's restore; its limit is spent

        w, _ = champion_then_second_trained(before_second=sweep_restores)
        champion_model = w.target.serving
        ((_, msg, _),) = w.outbox.take()
        assert isinstance(msg, EvaluateRun)
        assert poisoned_during_deploy(w, msg) == "lease lost"
        assert w.deliver() == ["promoted"]  # the holder's restore, not held to the sweep's
        assert w.target.serving == champion_model

    def test_a_target_that_keeps_refusing_the_champion_gets_one_restore_per_stall(
        self,
    ) -> None:
        w, _ = champion_then_second_trained()
        w.deliver()  # the second run is promoted
        # changed outside the app
        w.target.serving = ModelRef("artifacts", "elsewhere/model.ilearner")
        w.target.provisioning = ["failed"] * 10
        assert w.retrainer.sweep()["restores"] == 1
        w.deliver()  # the restore fails: the target refuses
        assert latest_run(w)["state"] == "failed"
        assert w.retrainer.sweep()["restores"] == 0  # not a failed restore per sweep
        w.clock.advance(minutes=30)  # past the stall (RETRAIN_SWEEP_STALL + the poll delay)
        assert w.retrainer.sweep()["restores"] == 1

    def test_a_holder_refused_the_crown_ends_its_run_uncrowned(self) -> None:
        w, _ = champion_then_second_trained()
        ((_, msg, _),) = w.outbox.take()
        assert isinstance(msg, EvaluateRun)
        run_id = latest_run(w)["run_id"]
        original = w.target.deploy

        def deploy_then_lose_the_model(model: Any) -> Any:
            progress = original(model)
            w.ledger.update(model_key("housing"), lambda d: {**d, "active_run": "other"})
            return progress

        w.target.deploy = deploy_then_lose_the_model  # type: ignore[method-assign]
        assert w.retrainer.on_evaluate(msg, delivery=Delivery("m-1")) == "superseded"
        run = w.ledger.get(run_key("housing", run_id))
        assert run is not None
        assert run["state"] == "promoted"  # terminal, not promoting forever...
        state = w.ledger.get(model_key("housing"))
        assert state is not None
        assert state["champion"]["run_id"] != run_id  # ...and not crowned over the holder


class TestChainsAfterAnInterruptedStep:
    def test_a_retry_after_a_fresh_deploy_continues_the_chain(self) -> None:
        w, _ = champion_then_second_trained()
        serves = w.target.serves
        calls = {"n": 0}

        def busy_once(model: Any) -> bool:
            calls["n"] += 1
            if calls["n"] == 2:  # the check after the deploy call
                raise TransientRemoteError("GET: 503", retry_after=2)
            return serves(model)

        w.target.serves = busy_once  # type: ignore[method-assign]
        assert w.deliver() == ["retry"]
        assert w.deliver() == ["promoted"]  # before: "duplicate", the run left promoting
        assert len(w.target.deploys) == 2  # the first run's and this one's, once each

    def test_a_lost_first_poll_message_after_the_start_is_sent_again(self) -> None:
        w = World()
        w.drop("housing/a.csv", housing_csv(10, seed=1))
        w.deliver()  # seal
        send = w.outbox.send
        failed = {"done": False}

        def send_fails_once(queue: str, message: Any, **kwargs: Any) -> None:
            if isinstance(message, TrackRun) and message.poll == 1 and not failed["done"]:
                failed["done"] = True
                raise TransientRemoteError("queue: 503")
            send(queue, message, **kwargs)

        w.outbox.send = send_fails_once  # type: ignore[method-assign]
        assert w.deliver() == ["retry"]  # submitted and started; the poll message failed
        assert w.run()["state"] == "running"
        assert w.deliver() != ["duplicate"]  # before: dropped, and the run never polled
        assert w.run()["polls"] == 1


class TestAStartWithNoAnswer:
    def queued(self) -> World:
        w = World()
        w.drop("housing/a.csv", housing_csv(10, seed=1))
        w.deliver()  # sealed: the track message waits
        return w

    def test_is_looked_at_again_only_after_the_service_must_have_acted(self) -> None:
        w = self.queued()
        w.jobs.errors["start"] = TransientRemoteError("BES start: read timed out")
        assert w.deliver() == ["retry"]
        ((_, again, delay),) = w.outbox.sent[-1:]
        assert isinstance(again, TrackRun)
        assert delay >= w.retrainer._ctx.timing.call_bound
        assert w.deliver() == ["started"]  # status first: running, so not started again
        assert w.jobs.started == ["job1"]

    def test_a_refused_start_is_tried_again_at_the_chain_pace(self) -> None:
        w = self.queued()
        w.jobs.errors["start"] = TransientRemoteError("BES start: HTTP 503", status=503)
        assert w.deliver() == ["retry"]
        ((_, _, delay),) = w.outbox.sent[-1:]
        assert delay < w.retrainer._ctx.timing.call_bound


class TestRetrainNowRefusesVersionsInFlight:
    def test_a_version_in_a_sealed_batch_whose_run_is_not_recorded_yet(self) -> None:
        w = sealed_without_its_run()
        # The request's arrival path finds the version in the sealed batch and records its
        # run (the first listing after the seal decides it); the run trains the version.
        with pytest.raises(InputRejected, match="queued; wait for it to end"):
            w.retrainer.request("housing", "housing/a.csv", reason="now")
        assert [f["name"] for f in w.files()] == ["housing/a.csv"]

    def test_force_does_not_retrain_a_version_its_run_is_still_training(self) -> None:
        w = World()
        w.drop("housing/a.csv", housing_csv(10, seed=1))
        w.deliver()
        w.deliver()
        assert w.run()["state"] == "running"
        with pytest.raises(InputRejected, match="running; wait"):
            w.retrainer.request("housing", "housing/a.csv", reason="now", force=True)

    def test_a_version_whose_batch_is_sealed_while_the_request_looks_is_not_batched_again(
        self,
    ) -> None:
        """Found by the long chaos run: the request saw the version waiting in the open batch,
        a worker sealed that batch, and the request's write opened a second batch with it: two
        runs trained one version."""
        w = World()
        w.drop("housing/a.csv", housing_csv(10, seed=1))
        ((_, check, _),) = w.outbox.take()
        operations = w.retrainer._operations
        marks = operations._marks

        def marks_then_sealed(*args: Any, **kwargs: Any) -> Any:
            decided = marks(*args, **kwargs)
            w.clock.advance(seconds=61)
            assert w.retrainer.on_check_batch(check) == "sealed"  # type: ignore[arg-type]
            return decided

        operations._marks = marks_then_sealed  # type: ignore[method-assign]
        with pytest.raises(InputRejected, match="sealed while this request was made"):
            w.retrainer.request("housing", "housing/a.csv", reason="now")
        state = w.ledger.get(model_key("housing"))
        assert state is not None
        assert state["batch"] is None  # no second batch holds the version
        assert len(w.store.keys("runs/")) == 1

    def test_a_version_sealed_into_a_running_batch_is_not_batched_again_even_forced(
        self,
    ) -> None:
        """The same race when the request decided the version may be retrained (forced, its
        earlier run over): the model's sealed batch, whose run holds the model, has it."""
        w = World()
        w.drop("housing/a.csv", housing_csv(10, seed=1))
        w.deliver()
        state = w.ledger.get(model_key("housing"))
        assert state is not None
        with pytest.raises(InputRejected, match="whose run is training it"):
            in_flight(state, w.files(), "housing/a.csv", w.files()[0]["etag"])


class TestRehydratedBlob:
    def test_a_blob_read_again_after_rehydration_is_judged_on_its_content(self) -> None:
        w = World()
        w.data.put("data", "housing/old.csv", "rooms,price\n1,2\n")
        w.data.archived.add(("data", "housing/old.csv"))
        assert w.retrainer.on_blob("data", "housing/old.csv") == "rejected"
        w.data.archived.discard(("data", "housing/old.csv"))  # rehydrated: same ETag
        assert w.retrainer.on_blob("data", "housing/old.csv") == "batched"
        etag = w.data.blobs[("data", "housing/old.csv")][1]
        record = w.ledger.get(arrival_key("data", "housing/old.csv", etag))
        assert record is not None
        assert record["status"] == "accepted"
        assert "unreadable" not in record


def test_the_lease_leaves_room_for_every_call_of_a_deploy() -> None:
    w = World()
    w.drop("housing/a.csv", housing_csv(10, seed=1))
    for _ in range(3):
        w.deliver()
    w.evaluation("Root Mean Squared Error\n2.5\n")
    ((_, msg, _),) = w.outbox.take()
    timing = w.retrainer._ctx.timing
    spare = timing.deploy_lease - timing.call_bound * DEPLOY_CALLS

    def slow_preflight() -> list[str]:
        w.clock.advance(seconds=spare.total_seconds() + 1)  # one call's room is not enough
        return ["ok"]

    w.target.preflight = slow_preflight  # type: ignore[method-assign]
    assert w.retrainer.on_evaluate(msg, delivery=Delivery("m-1")) == "retry"  # type: ignore[arg-type]
    assert w.target.deploys == []


def test_the_host_lets_a_deploy_invocation_finish() -> None:
    """host.json's functionTimeout covers a first promotion's preflight and deploy calls at
    the default HTTP timeouts (the host would otherwise kill the holder mid-lease)."""
    import json
    from pathlib import Path

    from retrain.http import worst_call
    from retrain.settings import Settings

    fields = Settings.model_fields
    bound = worst_call(fields["http_connect_timeout"].default, fields["http_read_timeout"].default)
    host = json.loads((Path(__file__).parents[2] / "host.json").read_text())
    h, m, s = (int(x) for x in host["functionTimeout"].split(":"))
    assert h * 3600 + m * 60 + s >= bound * (DEPLOY_CALLS + 1) + 60
