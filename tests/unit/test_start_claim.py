"""Schedules around the run's start claim that once broke a promise of the training step: two
status calls of one job within a second, or a run left `submitted` with no message to move it.
Each docstring gives the schedule; each test failed on the code before its fix."""

from __future__ import annotations

from dataclasses import replace
from datetime import datetime
from itertools import pairwise
from typing import Any

from retrain.bes import JobStatus
from retrain.errors import StateConflict, TransientRemoteError
from retrain.ledger import Ledger
from retrain.messages import TrackRun
from retrain.pipeline import Delivery, Retrainer
from tests.harness import World


def sealed() -> World:
    w = World()
    w.drop("housing/a.csv")
    assert w.deliver() == ["sealed"]
    return w


def first_start_refused(w: World) -> TrackRun:
    """The submitting delivery's start gets a 503 (the service did not act): its retry, which
    carries the claim the submit wrote, is returned."""
    ((_, msg, _),) = w.outbox.take()
    assert isinstance(msg, TrackRun)
    w.jobs.errors["start"] = TransientRemoteError("BES start: 503", status=503)
    assert w.retrainer.on_track_run(msg, delivery=Delivery("m-1")) == "retry"
    w.jobs.started.clear()  # a 503: the service did not start it
    ((_, retry, _),) = w.outbox.take()
    assert isinstance(retry, TrackRun)
    return retry


def other_instance(w: World) -> Retrainer:
    return Retrainer(replace(w.retrainer._ctx, ledger=Ledger(w.store)))


def key_of(w: World) -> str:
    (key,) = w.store.keys("runs/")
    return key


class TestStartClaimSchedules:
    def test_a_delivery_that_stood_still_before_its_start_does_not_start_the_job_again(
        self,
    ) -> None:
        """Found by the long chaos run (seeds 3100014, 3200038: "second start"). A delivery asked
        the job's status (NotStarted) and then stood still (a paused worker); the sweep judged
        the run stalled and its re-driven copy asked and started the job; the first delivery
        then woke and started it again."""
        w = sealed()
        retry = first_start_refused(w)
        assert w.run()["state"] == "submitted"
        other = other_instance(w)
        answers: list[str] = []
        real_status = w.jobs.status

        def status_then_stand_still(job_id: str) -> JobStatus:
            seen = real_status(job_id)
            if len(w.jobs.polls) == 1:  # the first delivery's status call: it stands still
                w.clock.advance(hours=1)
                assert other.sweep()["runs"] == 1
                ((_, redriven, delay),) = w.outbox.take()
                assert isinstance(redriven, TrackRun)
                assert delay >= w.retrainer._ctx.timing.start_lease
                w.clock.advance(seconds=delay.total_seconds())
                answers.append(other.on_track_run(redriven, delivery=Delivery("m-3")))
            return seen

        w.jobs.status = status_then_stand_still  # type: ignore[method-assign]
        assert w.retrainer.on_track_run(retry, delivery=Delivery("m-2")) in ("resent", "duplicate")
        assert answers == ["started"]  # the re-driven copy took over and started the job
        assert w.jobs.started == ["job1"]
        assert w.jobs.second_starts == []  # the one that stood still did not start it again
        assert w.run()["state"] == "running"

    def test_a_copy_that_finds_another_delivery_starting_waits_one_start_lease(self) -> None:
        w = sealed()
        retry = first_start_refused(w)
        claim = w.run()["start"]["claim"]
        assert retry.start == claim  # the retry carries the claim its delivery gave back
        stranger = retry.model_copy(update={"start": None, "poll": retry.poll + 1})
        assert w.retrainer.on_track_run(stranger, delivery=Delivery("m-9")) == "waiting"
        assert w.jobs.polls == []  # it did not ask: the claim's holder may be starting
        ((_, later, delay),) = w.outbox.take()
        assert isinstance(later, TrackRun)
        assert (later.start, later.poll) == (claim, stranger.poll)
        assert delay == w.retrainer._ctx.timing.start_lease
        # Whoever comes first with the claim it saw takes it over; the other copy is a duplicate.
        assert w.retrainer.on_track_run(later, delivery=Delivery("m-10")) == "started"
        assert w.retrainer.on_track_run(retry, delivery=Delivery("m-2")) == "duplicate"
        assert (w.jobs.started, w.jobs.second_starts) == (["job1"], [])

    def test_a_holder_that_stood_still_before_its_status_call_does_not_poll_beside_the_taker(
        self,
    ) -> None:
        """Schedule (SUBMITTED, two instances A and B):
        1. A takes poll n and the start claim C (conditional write), then stands still before
           its status GET leaves (a pause; nothing checks the lease before the status call).
        2. The sweep (B) finds the run stalled, re-drives (n+1, start=C) one start lease later.
        3. B's copy finds C still there, takes over, GETs the status (NotStarted), starts.
        4. A wakes and sent its status GET at once: two status GETs of one job, 0 s apart (the
        start stayed single). The holder now checks its lease before the status call too."""
        w = sealed()
        retry = first_start_refused(w)
        other = other_instance(w)
        times: list[datetime] = []
        real_status = w.jobs.status
        real_replace = w.store.replace
        paused = [False]

        def status(job_id: str) -> JobStatus:
            times.append(w.clock.now())
            return real_status(job_id)

        def replace_then_stand_still(key: str, doc: dict[str, Any], etag: str) -> str:
            new = real_replace(key, doc, etag)
            if not paused[0] and (doc.get("poll_by") or {}).get("id") == "m-2":
                paused[0] = True  # A's claim landed; A stands still before its status GET
                w.clock.advance(hours=1)
                assert other.sweep()["runs"] == 1
                ((_, redriven, delay),) = w.outbox.take()
                assert isinstance(redriven, TrackRun)
                w.clock.advance(seconds=delay.total_seconds())
                assert other.on_track_run(redriven, delivery=Delivery("m-3")) == "started"
            return new

        w.jobs.status = status  # type: ignore[method-assign]
        w.store.replace = replace_then_stand_still  # type: ignore[method-assign]
        w.retrainer.on_track_run(retry, delivery=Delivery("m-2"))
        assert paused[0]
        assert w.jobs.second_starts == []
        gaps = [(b - a).total_seconds() for a, b in pairwise(times)]
        assert all(g >= 1 for g in gaps), f"status GETs of one job at gaps {gaps} s"

    def test_a_claim_taken_on_a_fresh_read_after_a_stale_cached_refusal_is_not_left_orphaned(
        self,
    ) -> None:
        """`take` set `held_by_another` and never reset it, but the ledger may call it twice:
        first on its cached copy, then on a fresh read. Schedule (instances A and B):
        1. A submits (claim X, poll 0); its start gets a 503; retry R1 (1, X).
        2. B handles R1: takes over (claim C, poll 1), its start gets a 503; retry R2 (2, C).
        3. A handles R2. Its ledger's cached copy is the old version (claim X): a concurrent
           invocation on A whose slow read of that version landed after this one's read.
           `take` on the cache: X != C, held_by_another = True, refused. Fresh read: claim C ==
           R2's, so `take` writes A's claim T at poll 2 and the write succeeds; but the flag is
           still set, so A sends W (2, C) one lease later and returns "waiting".
        4. W arrives: poll 2 is made and W is not a redelivery of A's message: "duplicate".
        The run is left SUBMITTED, the job never started, and no message is left (only the
        sweep, 15+ min later, moves it)."""
        w = sealed()
        retry1 = first_start_refused(w)
        key = key_of(w)
        stale = w.store.docs[key]  # the version A wrote (claim X), as A's cache holds it
        b = other_instance(w)
        w.jobs.errors["start"] = TransientRemoteError("BES start: 503", status=503)
        w.clock.advance(seconds=60)
        assert b.on_track_run(retry1, delivery=Delivery("m-2")) == "retry"
        w.jobs.started.clear()
        ((_, retry2, delay),) = w.outbox.take()
        assert isinstance(retry2, TrackRun)
        assert retry2.start == w.run()["start"]["claim"]
        w.clock.advance(seconds=delay.total_seconds())

        ledger = w.retrainer._ctx.ledger
        real_get = ledger.get

        def get(k: str, *, remember: bool = True) -> Any:
            found = real_get(k, remember=remember)
            if k == key:  # the concurrent slow read of the older version lands now
                ledger._keep(k, stale[0], stale[1])
            return found

        ledger.get = get  # type: ignore[method-assign,assignment]
        answer = w.retrainer.on_track_run(retry2, delivery=Delivery("m-3"))
        ledger.get = real_get  # type: ignore[method-assign]
        # Deliver everything that is left, on any instance, without the sweep.
        for _ in range(5):
            w.clock.advance(minutes=5)
            w.deliver()
        assert w.jobs.started == ["job1"], (
            f"A answered {answer!r}; the run is {w.run()['state']} with claim "
            f"{w.run()['start']['claim']} at poll {w.run()['polls']} and no message left"
        )

    def test_a_retry_before_the_claim_keeps_the_claim_its_message_carried(self) -> None:
        """A copy carrying the claim it may take over (a retry, the sweep's copy, a holder's
        hand-over) meets a transient storage error on its claim write: `_retry` sent
        `start=step.start_claim` (None, nothing was claimed) instead of the message's own
        `start`, so the retry found the claim "held by another" and waited a whole start lease
        (2 call bounds + 10 s) before it could take over."""
        w = sealed()
        retry = first_start_refused(w)
        assert retry.start is not None
        real_replace = w.store.replace
        failed = [False]

        def replace_once(key: str, doc: dict[str, Any], etag: str) -> str:
            if key.startswith("runs/") and not failed[0]:
                failed[0] = True
                raise TransientRemoteError("replace run: 503", status=503)
            return real_replace(key, doc, etag)

        w.store.replace = replace_once  # type: ignore[method-assign]
        assert w.retrainer.on_track_run(retry, delivery=Delivery("m-2")) == "retry"
        ((_, again, _),) = w.outbox.take()
        assert isinstance(again, TrackRun)
        assert again.start == retry.start

    def test_a_claim_write_whose_answer_is_lost_still_starts_the_job(self) -> None:
        """The claim's conditional write lands but its answer is lost; the storage SDK's own
        retry of the PUT gets 412, the ledger re-reads and `claim_poll` found its own poll taken
        by the same attempt of the same message (not a redelivery): "duplicate". Nothing was
        sent; the run stood `submitted` with an orphan claim until the sweep. The attempt now
        knows its own claim."""
        w = sealed()
        retry = first_start_refused(w)
        real_replace = w.store.replace
        lost = [False]

        def replace_answer_lost(key: str, doc: dict[str, Any], etag: str) -> str:
            new = real_replace(key, doc, etag)
            if key.startswith("runs/") and not lost[0]:
                lost[0] = True
                raise StateConflict(key)  # the SDK's retried PUT: 412
            return new

        w.store.replace = replace_answer_lost  # type: ignore[method-assign]
        answer = w.retrainer.on_track_run(retry, delivery=Delivery("m-2"))
        w.store.replace = real_replace  # type: ignore[method-assign]
        for _ in range(5):
            w.clock.advance(minutes=5)
            w.deliver()
        assert w.jobs.started == ["job1"], f"answered {answer!r}, state {w.run()['state']}"

    def test_a_transient_error_after_the_job_id_is_persisted_does_not_strand_the_run(
        self,
    ) -> None:
        """`_submit` persists the job id with the chain's poll and the start claim, then notes
        the run on the arrival record. A transient storage error on that note reached `_retry`
        with `step.polled` False and no `step.start_claim` (they were set only after `_submit`
        returned), so the retry re-used poll 0 without the claim: "duplicate", and no message
        was left; only the sweep moved the run."""
        w = sealed()
        ((_, msg, _),) = w.outbox.take()
        assert isinstance(msg, TrackRun)
        real_replace = w.store.replace
        failed = [False]

        def replace(key: str, doc: dict[str, Any], etag: str) -> str:
            if key.startswith("arrivals/") and not failed[0]:
                failed[0] = True
                raise TransientRemoteError("storage replace arrival: 503")
            return real_replace(key, doc, etag)

        w.store.replace = replace  # type: ignore[method-assign]
        assert w.retrainer.on_track_run(msg, delivery=Delivery("m-1")) == "retry"
        w.store.replace = real_replace  # type: ignore[method-assign]
        assert w.run()["state"] == "submitted"
        for _ in range(5):
            w.clock.advance(minutes=5)
            w.deliver()
        assert w.jobs.started == ["job1"], f"run {w.run()['state']}, started {w.jobs.started}"
