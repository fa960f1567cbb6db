"""The deploy lease bounds the target's calls, however many one deploy makes.

A waiting copy takes the lease over once it has run out, so a call of the holder still on its
way then could meet the new holder's change (Azure ML refuses a second change of an endpoint
while one runs). An online endpoint's deploy makes up to seven calls (more with the preflight
of a first promotion), the lease is sized for a few: each call starts only if, at its longest,
it ends before the lease runs out."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import requests
import responses

from retrain.clock import ManualClock
from retrain.deploy import Progress
from retrain.http import CallTooLate, call, calls_end_by
from retrain.messages import EvaluateRun
from retrain.pipeline import Delivery
from retrain.pipeline.promotion import MAX_UNANSWERED
from retrain.ports import ModelRef
from tests.fakes import FakeTarget
from tests.harness import World, evaluated

URL = "https://ml.example/endpoint"


class ManyCallsTarget(FakeTarget):
    """Each deploy makes `reads` GETs, then a PUT, through `retrain.http.call`; while `slow`,
    each call takes its longest (the clock moves one call bound during it)."""

    def __init__(self, clock: ManualClock, bound: float, reads: int) -> None:
        super().__init__()
        self.clock, self.bound, self.reads = clock, bound, reads
        self.slow = True
        self.session = requests.Session()
        self.spans: list[tuple[str, float, float]] = []
        """(method, start, end) of every call sent, on the instance's monotonic clock."""

    def _call(self, method: str) -> None:
        started = self.clock.monotonic()
        call(self.session, method, URL, what=f"{method} endpoint", timeout=(1, 1), headers={})
        if self.slow:
            self.clock.advance(seconds=self.bound)
        self.spans.append((method, started, self.clock.monotonic()))

    def deploy(self, model: ModelRef) -> Progress:
        for _ in range(self.reads):
            self._call("GET")
        self._call("PUT")
        return super().deploy(model)


@responses.activate
def test_no_call_of_a_deploy_is_on_its_way_when_the_lease_runs_out() -> None:
    responses.add(responses.GET, URL, json={})
    responses.add(responses.PUT, URL, json={})
    w = World()
    timing = w.retrainer._ctx.timing
    bound, lease = timing.call_bound.total_seconds(), timing.deploy_lease.total_seconds()
    target = ManyCallsTarget(w.clock, bound, reads=7)
    w.target = target
    msg = evaluated(w)
    began = w.clock.monotonic()
    assert w.retrainer.on_evaluate(msg, delivery=Delivery("e-1")) == "retry"
    assert target.spans, "the deploy made no call"
    assert all(end <= began + lease for _, _, end in target.spans), target.spans
    assert [m for m, _, _ in target.spans].count("PUT") == 0  # the change was never sent
    assert len(responses.calls) == len(target.spans)  # the refused call reached nothing
    assert w.run()["deployment"] is None  # the lease is given back
    ((_, copy, _),) = w.outbox.take()
    assert isinstance(copy, EvaluateRun)
    target.slow = False
    assert w.retrainer.on_evaluate(copy, delivery=Delivery("e-2")) == "promoted"
    assert [m for m, _, _ in target.spans].count("PUT") == 1


@responses.activate
def test_a_call_that_could_end_past_the_limit_is_not_sent() -> None:
    responses.add(responses.GET, URL, json={})
    clock = ManualClock()
    session = requests.Session()
    start = clock.monotonic()
    with calls_end_by(clock.monotonic, start + 100, 30):
        call(session, "GET", URL, what="GET endpoint", timeout=(1, 1), headers={})
        clock.advance(seconds=70)  # 30 s left: a call of up to 30 s still ends in time
        call(session, "GET", URL, what="GET endpoint", timeout=(1, 1), headers={})
        clock.advance(seconds=1)
        with pytest.raises(CallTooLate, match="not sent"):
            call(session, "GET", URL, what="GET endpoint", timeout=(1, 1), headers={})
    assert len(responses.calls) == 2
    call(session, "GET", URL, what="GET endpoint", timeout=(1, 1), headers={})  # no limit now
    assert len(responses.calls) == 3


@responses.activate
def test_a_service_too_slow_for_the_lease_every_time_fails_the_run_saying_so() -> None:
    responses.add(responses.GET, URL, json={})
    w = World()
    bound = w.retrainer._ctx.timing.call_bound.total_seconds()
    target = ManyCallsTarget(w.clock, bound, reads=7)
    w.target = target
    msg = evaluated(w)
    outcomes = []
    for attempt in range(1, 10):
        outcomes.append(w.retrainer.on_evaluate(msg, delivery=Delivery(f"e-{attempt}")))
        sent = w.outbox.take()
        if not sent:
            break
        ((_, msg, _),) = sent  # type: ignore[assignment]
    assert outcomes == ["retry"] * (MAX_UNANSWERED + 1) + ["failed"]
    assert "too slow to end within the deploy lease" in w.run()["error"]
    assert [m for m, _, _ in target.spans].count("PUT") == 0


class StalledTarget(FakeTarget):
    """Each deploy makes a GET, then a PUT, through `retrain.http.call`; the first deploy
    stands still between the two (`stall` runs there), as a holder whose process stood still
    past the queue's visibility."""

    def __init__(self, stall: Callable[[], None]) -> None:
        super().__init__()
        self.stall: Callable[[], None] | None = stall
        self.session = requests.Session()
        self.sent: list[str] = []

    def deploy(self, model: ModelRef) -> Progress:
        call(self.session, "GET", URL, what="GET endpoint", timeout=(1, 1), headers={})
        if self.stall is not None:
            stall, self.stall = self.stall, None
            stall()
        call(self.session, "PUT", URL, what="PUT endpoint", timeout=(1, 1), headers={})
        self.sent.append("PUT")
        return super().deploy(model)


@responses.activate
def test_a_holder_that_stood_still_sends_no_change_once_its_lease_was_taken_over() -> None:
    """The host hands the holder's message to another instance (its visibility ran out while
    the holder stood still); that copy takes the lease one call bound later and deploys. The
    holder, going on within its own lease, sends no change: one PUT in all."""
    responses.add(responses.GET, URL, json={})
    responses.add(responses.PUT, URL, json={})
    w = World()
    msg = evaluated(w)
    taken: list[str] = []

    def redelivered_meanwhile() -> None:
        w.clock.advance(seconds=25)
        assert w.retrainer.on_evaluate(msg, delivery=Delivery("e-1", 2)) == "resent"
        ((_, copy, delay),) = w.outbox.take()
        w.clock.advance(seconds=delay.total_seconds())
        taken.append(w.retrainer.on_evaluate(copy, delivery=Delivery("e-2")))

    target = StalledTarget(redelivered_meanwhile)
    w.target = target
    assert w.retrainer.on_evaluate(msg, delivery=Delivery("e-1", 1)) == "lease lost"
    assert taken == ["promoted"]
    assert target.sent == ["PUT"]  # the new holder's; the old one's was not sent
    assert [c.request.method for c in responses.calls].count("PUT") == 1


@responses.activate
def test_a_holder_sends_no_change_once_its_run_was_failed_from_outside() -> None:
    """Another copy's message went to poison (the run is failed) while the holder was between
    its read and its change: the run keeps the claim, but the change is not sent."""
    responses.add(responses.GET, URL, json={})
    responses.add(responses.PUT, URL, json={})
    w = World()
    msg = evaluated(w)
    target = StalledTarget(lambda: w.retrainer.on_poison("evals", msg.model_dump_json().encode()))
    w.target = target
    assert w.retrainer.on_evaluate(msg, delivery=Delivery("e-1")) == "lease lost"
    assert target.sent == []
    assert [c.request.method for c in responses.calls] == ["GET"]
    assert w.run()["state"] == "failed"
