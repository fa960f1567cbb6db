"""Review findings on issue 10's product changes: each test fails on main at 4082a5f."""

from __future__ import annotations

import itertools
from typing import Any

import pytest

from localdev.sample import housing_csv
from retrain.bes import JobState
from retrain.errors import InputRejected, PermanentRemoteError, RemoteError, TransientRemoteError
from retrain.ledger import model_key, run_key
from retrain.messages import EvaluateRun, TrackRun
from retrain.pipeline import AlreadyTrained, Delivery
from retrain.ports import ModelRef
from tests.fakes import FakeJobs
from tests.harness import (
    World,
    champion_then_second_trained,
    latest_run,
    restore_check_unreachable,
    train_next,
)


def promoted_batch_of_two() -> World:
    """A champion trained on b.csv; a.csv (older) was in its batch but never trained."""
    w = World()
    w.drop("housing/a.csv", housing_csv(10, seed=1))
    w.drop("housing/b.csv", housing_csv(10, seed=2))
    for _ in range(3):
        w.deliver()
    w.evaluation("Root Mean Squared Error\n2.5\n")
    assert w.deliver() == ["promoted"]
    assert w.run()["training_file"]["name"] == "housing/b.csv"
    return w


def run_until_trained(w: World) -> dict[str, Any]:
    for _ in range(3):
        w.deliver()
    run = latest_run(w)
    assert run["state"] == "trained"
    return run


class TestRetrainNowTrainsAVersionOnce:
    """`_trained_by` only looks at the run of the batch named in the version's arrival record;
    a version that a *requested* run trained lives in another batch, so it is never seen as
    trained and `retrain` (or `retrain_every`) trains it again and again without --force."""

    def test_a_version_a_requested_run_trained_needs_force_the_second_time(self) -> None:
        w = promoted_batch_of_two()
        w.retrainer.request("housing", "housing/a.csv", reason="first")
        second = run_until_trained(w)
        assert second["training_file"]["name"] == "housing/a.csv"
        assert second["job_id"]
        with pytest.raises(AlreadyTrained):
            w.retrainer.request("housing", "housing/a.csv", reason="again")

    def test_a_version_a_requested_run_is_training_is_refused_even_forced(self) -> None:
        w = promoted_batch_of_two()
        w.retrainer.request("housing", "housing/a.csv", reason="first")
        w.deliver()  # sealed
        w.deliver()  # submitted and started
        assert latest_run(w)["state"] == "running"
        with pytest.raises(InputRejected, match="wait"):
            w.retrainer.request("housing", "housing/a.csv", reason="again", force=True)

    def test_retrain_every_does_not_spend_a_job_per_period_on_the_same_data(self) -> None:
        w = World(retrain_every=86400)
        w.drop("housing/a.csv", housing_csv(10, seed=1))
        for _ in range(3):
            w.deliver()
        w.evaluation("Root Mean Squared Error\n2.5\n")
        assert w.deliver() == ["promoted"]
        # b.csv's own run fails before any job was submitted (BES refused the submit).
        w.clock.advance(minutes=5)
        w.drop("housing/b.csv", housing_csv(10, seed=2))
        w.jobs.errors["submit"] = PermanentRemoteError("BES submit: HTTP 400", status=400)
        w.deliver()  # sealed
        assert w.deliver() == ["failed"]
        w.clock.advance(hours=25)
        assert w.retrainer.sweep()["scheduled"] == 1  # b.csv was never trained: train it
        rejected = run_until_trained(w)
        assert rejected["training_file"]["name"] == "housing/b.csv"
        w.evaluation("Root Mean Squared Error\n9.5\n", rejected)
        assert w.deliver() == ["rejected"]
        w.clock.advance(hours=1)
        assert w.retrainer.sweep()["scheduled"] == 0  # b.csv was trained by that run
        assert len(w.jobs.submitted) == 2


class TestAStaleRestoreCheck:
    """`_restore` reads the champion, asks the target, then `_redeploy`s with a lock that
    takes an idle model (active_run None) and no champion guard. A second, slower check of
    the same failed run (a redelivery, or the sweep beside it) can so restore an older
    champion over a newer one that was promoted in between."""

    def test_does_not_overwrite_a_champion_promoted_meanwhile(self) -> None:
        w, first = champion_then_second_trained()
        w.target.provisioning = ["pending", "failed"]  # the target keeps serving the champion
        w.deliver()  # deploy: pending
        ((_, poll, _),) = w.outbox.take()
        assert isinstance(poll, EvaluateRun)
        serves = restore_check_unreachable(w, poll)
        newer: dict[str, str] = {}

        def slow_answer(model: Any) -> bool:
            # While this check's GET is on its way, another check of the same run (the sweep)
            # settles it, frees the model, and a better run is trained and promoted.
            w.target.serves = serves  # type: ignore[method-assign]
            w.retrainer.sweep()
            w.clock.advance(minutes=1)
            third = train_next(w, "housing/c.csv", seed=3, rmse=0.5)
            assert w.deliver() == ["promoted"]
            promoted = w.ledger.get(run_key("housing", third["run_id"]))
            assert promoted is not None
            newer.update(run_id=third["run_id"], model=promoted["outputs"]["model"])
            return serves(model)

        w.target.serves = slow_answer  # type: ignore[method-assign]
        w.retrainer.on_evaluate(poll, delivery=Delivery("p-1", 2))  # the host's redelivery
        w.deliver()
        state = w.ledger.get(model_key("housing"))
        assert state is not None
        assert state["champion"]["run_id"] == newer["run_id"]
        assert w.target.serving == ModelRef.load(newer["model"])
        assert first != newer["run_id"]


class TestCrownOfAFailedRun:
    """`_crown` checks only the model document (`active_run`), not the run's state, yet the
    README says crowning is conditional on the run still being `promoting`. A run failed (its
    message's earlier attempt went to poison) while its restore check could not reach the
    target keeps `active_run`, so a paused delivery of the same run crowns it: the champion
    pointer names a run recorded `failed`."""

    def test_a_run_failed_meanwhile_is_not_crowned(self) -> None:
        w, first = champion_then_second_trained()
        w.target.provisioning = ["pending"]
        w.deliver()  # deploy: pending
        ((_, poll, _),) = w.outbox.take()
        assert isinstance(poll, EvaluateRun)
        run_id = latest_run(w)["run_id"]
        serves = w.target.serves

        def down(model: Any) -> bool:
            raise TransientRemoteError("endpoint GET: 503")

        def poisoned_meanwhile(model: Any) -> bool:
            # Attempt 1 of the poll is paused here; attempts 2..5 failed and the message went
            # to poison, failing the run; its restore check finds the target unreachable.
            w.target.serves = down  # type: ignore[method-assign]
            with pytest.raises(RemoteError):
                w.retrainer.on_poison("evals", poll.model_dump_json().encode())
            w.target.serves = serves  # type: ignore[method-assign]
            return serves(model)

        w.target.serves = poisoned_meanwhile  # type: ignore[method-assign]
        w.retrainer.on_evaluate(poll, delivery=Delivery("p-1"))
        run = w.ledger.get(run_key("housing", run_id))
        state = w.ledger.get(model_key("housing"))
        assert run is not None
        assert state is not None
        crowned = state["champion"]["run_id"] == run_id
        assert crowned == (run["state"] == "promoted"), (run["state"], state["champion"])
        assert first


class TestAHolderWhoseCallLandedLate:
    """README: "A holder whose deploy call returned after its run was failed runs the check
    again after its call." It does not: the failure's own check (made before the call landed)
    already cleared `restore_pending`, so the holder's `_release` does nothing and the target
    serves the failed run's model, the champion pointer another, until a sweep finds the model
    idle (and only one sweep restore per stall period)."""

    def test_runs_the_restore_check_again_after_its_call(self) -> None:
        w, _ = champion_then_second_trained()
        champion_model = w.target.serving
        ((_, msg, _),) = w.outbox.take()
        assert isinstance(msg, EvaluateRun)
        original = w.target.deploy

        def deploy_while_poisoned(model: Any) -> Any:
            w.retrainer.on_poison("evals", msg.model_dump_json().encode())
            return original(model)  # lands after the run was failed and checked

        w.target.deploy = deploy_while_poisoned  # type: ignore[method-assign]
        assert w.retrainer.on_evaluate(msg, delivery=Delivery("m-1")) == "lease lost"
        w.deliver()  # whatever the holder set going; no sweep
        assert w.target.serving == champion_model


class TestPollGap:
    """`_claim_poll` lets a redelivery (same id, later attempt) make its poll again, but the
    first attempt may already have sent the chain's next poll before it died (crash after the
    enqueue, before the ack). The redelivery comes back when the message's visibility runs
    out, on the queue's clock, not the chain's: when that meets the next poll's delay, the two
    status calls of one job are made at the same moment. Nothing compares `polled_at`."""

    def test_a_redelivery_and_the_next_poll_are_not_closer_than_a_second(self) -> None:
        w = World(jobs=FakeJobs([JobState.RUNNING] * 5 + [JobState.FINISHED]))
        w.drop("housing/a.csv", housing_csv(10, seed=1))
        w.deliver()  # sealed
        assert w.deliver() == ["started"]
        ((_, first, delay),) = w.outbox.take()
        assert isinstance(first, TrackRun)
        w.clock.advance(seconds=delay.total_seconds())
        status = w.jobs.status
        at: list[float] = []

        def timed(job_id: str) -> Any:
            at.append(w.clock.monotonic())
            return status(job_id)

        w.jobs.status = timed  # type: ignore[method-assign]
        assert w.retrainer.on_track_run(first, delivery=Delivery("m-1")) == "running"
        # The worker dies before the ack: the next poll is out, the message comes back too.
        ((_, second, delay),) = w.outbox.take()
        w.clock.advance(seconds=delay.total_seconds())
        w.retrainer.on_track_run(first, delivery=Delivery("m-1", 2))  # visibility ran out
        assert isinstance(second, TrackRun)
        w.retrainer.on_track_run(second, delivery=Delivery("m-2"))  # its delay ran out
        gaps = [b - a for a, b in itertools.pairwise(at)]
        assert min(gaps) >= 1, at


class TestARehydratedBlobFoundBySweep:
    """`_sweep_blob` skips a record only when it is neither accepted nor unreadable, then reads
    `record["batch_id"]`, which an unreadable record (made by `_record_unreadable`) does not
    have: every sweep raises KeyError on it (counted in `errors`), so the sweep never judges a
    rehydrated blob again, and the listing mark stays pinned just before it (every later blob
    is looked at again by every sweep). Rehydration keeps the ETag and sends no BlobCreated."""

    def test_a_blob_rehydrated_later_is_ingested_by_the_sweep(self) -> None:
        w = World()
        w.data.put("data", "housing/old.csv", housing_csv(10, seed=1))
        w.data.archived.add(("data", "housing/old.csv"))
        w.clock.current = w.data.EPOCH
        w.clock.advance(minutes=1)
        assert w.retrainer.sweep()["errors"] == 0  # recorded as unreadable
        w.data.archived.discard(("data", "housing/old.csv"))  # rehydrated: same ETag
        w.clock.advance(minutes=1)
        counts = w.retrainer.sweep()
        state = w.ledger.get(model_key("housing")) or {}
        assert counts["errors"] == 0, counts
        assert state.get("batch"), state
