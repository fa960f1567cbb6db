"""Target calls that get no answer at all (a read timeout, a dropped connection): the service
may still act on such a call, late. Nothing may change the target again before one call bound
has passed, by when it has acted; then the step follows what the target shows."""

from __future__ import annotations

import pytest

from retrain.deploy import Progress
from retrain.errors import TransientRemoteError
from retrain.messages import EvaluateRun
from retrain.pipeline import Delivery
from retrain.pipeline.promotion import MAX_UNANSWERED
from retrain.ports import ModelRef
from tests.fakes import FakeTarget
from tests.harness import World, evaluated


class SilentTarget(FakeTarget):
    """Acts on each deploy call, but the first `silent` of them never answer."""

    def __init__(self, silent: int, *, status: int | None = None) -> None:
        super().__init__()
        self.silent = silent
        self.status = status
        self.calls = 0

    def deploy(self, model: ModelRef) -> Progress:
        self.calls += 1
        progress = super().deploy(model)  # the service acts on it ...
        if self.silent:
            self.silent -= 1  # ... and the answer is lost, or it was an answered 503
            raise lost_answer("PUT deployment housing/blue: timed out", self.status)
        return progress


def lost_answer(text: str, status: int | None = None) -> TransientRemoteError:
    """The error `retrain.http.call` raises for a change with no answer (or an answered one)."""
    error = TransientRemoteError(text, status=status)
    error.change_unanswered = status is None
    return error


def trained(target: FakeTarget) -> tuple[World, EvaluateRun]:
    w = World()
    w.target = target
    return w, evaluated(w)


def test_a_deploy_with_no_answer_keeps_the_lease_and_looks_one_call_bound_later() -> None:
    w, msg = trained(SilentTarget(1))
    timing = w.retrainer._ctx.timing
    assert w.retrainer.on_evaluate(msg, delivery=Delivery("e-1")) == "retry"
    held = w.run()["deployment"]
    assert held is not None
    assert not held["deployed"]
    ((_, copy, delay),) = w.outbox.take()
    assert isinstance(copy, EvaluateRun)
    assert (copy.lease, copy.retries) == (held["claim"], 1)
    assert delay >= timing.call_bound
    # Any other copy meanwhile (a duplicate, a re-drive) finds the lease held: it changes
    # nothing, and looks again only after a whole lease.
    assert w.retrainer.on_evaluate(msg, delivery=Delivery("e-2")) == "waiting"
    ((_, _, waited),) = w.outbox.take()
    assert waited == timing.deploy_lease
    assert w.target.calls == 1
    assert w.retrainer.on_evaluate(copy, delivery=Delivery("e-3")) == "promoted"
    assert len(w.target.deploys) == 1  # the late-acting call was followed, not repeated


def test_an_answered_failure_gives_the_lease_back_for_the_hosts_retry() -> None:
    """A 503 is an answer: the service did not act. The host's retry may call at once."""
    w, msg = trained(SilentTarget(1, status=503))
    with pytest.raises(TransientRemoteError):
        w.retrainer.on_evaluate(msg, delivery=Delivery("e-1"))
    assert w.run()["deployment"] is None
    assert w.outbox.take() == []
    assert w.retrainer.on_evaluate(msg, delivery=Delivery("e-1", 2)) == "promoted"


class DeadTarget(SilentTarget):
    """Never answers, and never acts."""

    def deploy(self, model: ModelRef) -> Progress:
        self.calls += 1
        raise lost_answer("PUT deployment housing/blue: timed out")


def test_a_target_that_never_answers_fails_the_run_after_its_tries() -> None:
    w, msg = trained(DeadTarget(0))
    answers = [w.retrainer.on_evaluate(msg, delivery=Delivery("e-1"))]
    while w.outbox.sent:
        answers += w.deliver()
    assert answers == ["retry"] * (MAX_UNANSWERED + 1) + ["failed"]
    assert w.target.calls == MAX_UNANSWERED + 1
    run = w.run()
    assert run["state"] == "failed"
    assert "tried again 6 times (no answer" in run["error"]
    assert "target_after" in run  # the restore check ran, a call bound after the last call


def test_a_deploy_that_landed_unanswered_each_time_is_crowned_not_failed() -> None:
    """Every answer lost until the tries are spent: the target serves the model all along, so
    the last copy verifies and crowns it (failing would make the restore undo it)."""
    w, msg = trained(SilentTarget(MAX_UNANSWERED + 1))
    answers = [w.retrainer.on_evaluate(msg, delivery=Delivery("e-1"))]
    while w.outbox.sent:
        answers += w.deliver()
    assert answers[-1] == "promoted"
    assert len(w.target.deploys) == 1


def test_a_crashed_holders_redelivery_takes_over_one_call_bound_later() -> None:
    """The holder died during its call: its message comes back; the call may still land."""
    w, msg = trained(FakeTarget())
    crash = w.target.deploy

    def dies_calling(model: ModelRef) -> Progress:
        crash(model)
        raise SystemExit("the worker died")  # not an error any handler catches

    w.target.deploy = dies_calling  # type: ignore[method-assign]
    with pytest.raises(SystemExit):
        w.retrainer.on_evaluate(msg, delivery=Delivery("e-1"))
    del w.target.deploy
    assert w.retrainer.on_evaluate(msg, delivery=Delivery("e-1", 2)) == "resent"
    ((_, copy, delay),) = w.outbox.take()
    assert delay == w.retrainer._ctx.timing.call_bound
    assert isinstance(copy, EvaluateRun)
    assert copy.lease == w.run()["deployment"]["claim"]
    answers = []
    w.outbox.send("evals", copy)
    while w.outbox.sent:
        answers += w.deliver()
    assert answers[-1] == "promoted"
    assert len(w.target.deploys) == 1
