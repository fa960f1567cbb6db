"""Promotion: under a fenced lease, call the target once, wait out provisioning, crown the run."""

from __future__ import annotations

import logging
import secrets
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta

from retrain.deploy import DeployTarget, Progress
from retrain.errors import PermanentError, RemoteError, TransientError, TransientRemoteError
from retrain.http import CallTooLate, calls_end_by
from retrain.ledger import Doc, Ledger, model_key, run_key
from retrain.messages import EvaluateRun
from retrain.pipeline.canary import Canary
from retrain.pipeline.context import (
    MIN_POLL_GAP,
    Delivery,
    Step,
    Timing,
    delivery_doc,
    dims,
    is_redelivery,
    log_retry,
)
from retrain.pipeline.gate import Gate
from retrain.pipeline.records import iso, parse
from retrain.pipeline.runs import RunStep
from retrain.ports import ModelRef
from retrain.runstate import RunState, is_terminal
from retrain.settings import ModelSpec

log = logging.getLogger(__name__)

MAX_RETRY_AFTER = 5
"""How often a promotion follows a service's Retry-After before its message fails for good
(then the host's own retries and the poison queue take over, as for any other error)."""
MAX_UNANSWERED = 5
"""How many target calls in a row may go unanswered (a timeout, a dropped connection) before
the run fails; each next try comes one call bound after the last."""


def unanswered(exc: TransientRemoteError) -> bool:
    """Whether a change sent to the service got no answer: the service may still act on it,
    late. (A read with no answer, or an answered failure, leaves nothing to wait for.)"""
    return exc.change_unanswered


def _holds(d: Doc, token: str) -> bool:
    """Whether lease `token` still holds the run `d`: its claim, on a run still promoting (the
    claim alone is not enough: a run failed, e.g. by another copy's poison, keeps its claim)."""
    return d["state"] == RunState.PROMOTING and (d.get("deployment") or {}).get("claim") == token


def _fenced(token: str, change: Callable[[Doc], None]) -> Callable[[Doc], Doc | None]:
    """A run update that applies only while lease `token` still holds a promoting run."""

    def apply(d: Doc) -> Doc | None:
        if not _holds(d, token):
            return None
        change(d)
        return d

    return apply


class LeaseTaken(TransientError):
    """The deploy lease no longer holds (another copy took it over, or the run was failed):
    a change of this holder's is not sent."""


def _holding(ledger: Ledger, key: str, token: str) -> Callable[[], None]:
    """A check, run before each change sent under the lease `token`, that it still holds."""

    def check() -> None:
        run = ledger.get(key)
        if run is None or not _holds(run, token):
            raise LeaseTaken("the deploy lease no longer holds: the change is not sent")

    return check


def _reserved(left: timedelta, timing: Timing) -> None:
    """Start a deploy only with its usual calls' worst case left of the lease (a call that would
    end past the lease is refused anyway; this spares starting one that would be cut short)."""
    if left < timing.deploy_reserve:
        raise CallTooLate("too little of the deploy lease is left to deploy")


def _give_back(d: Doc) -> None:
    d["deployment"], d["deploy_tried"] = None, True


@dataclass(eq=False)
class Deployment(RunStep):
    """The evaluate step: gate a trained run, then promote it through the model's target."""

    _gate: Gate
    _canary: Canary = field(init=False)

    def __post_init__(self) -> None:
        self._canary = Canary(self._ctx, self._runs, self._slot)

    def on_evaluate(self, msg: EvaluateRun, *, delivery: Delivery | None = None) -> str:
        """Gate the trained model; promote it through the model's target when it is better."""
        ctx = self._ctx
        spec = ctx.spec(msg.model)
        run = self.live_run(spec, msg.run_id)
        if isinstance(run, str):
            return run
        if run["state"] == RunState.TRAINED:
            run = self._gate.judge(spec, run, ctx.clock.now())
        if run["state"] != RunState.PROMOTING:
            return str(run["state"])
        if msg.retries > MAX_UNANSWERED and not self._landed(spec, run):
            # Sent one call bound after the last call that got no answer: the target has had
            # time to act on it, and the restore check the failure owes may look now.
            return self._runs.fail(
                spec,
                run,
                f"promotion failed: the target call was tried again {msg.retries} times (no "
                "answer: the call timed out or the worker making it ended; the service's "
                "Retry-After; or a call not sent, too slow to end within the deploy lease)",
            )
        step = Step()
        try:
            return self._promote(spec, run, msg, delivery, step)
        except PermanentError as exc:  # a refused call, an unusable answer or reference
            return self._runs.fail(spec, run, f"promotion failed: {exc}")
        except TransientRemoteError as exc:
            if unanswered(exc) and msg.retries <= MAX_UNANSWERED:
                # The service may act on the call late: look again (and change anything) only
                # once one call's worst case has passed, by when it has acted.
                return self._again(spec, msg, step, exc, ctx.timing.call_bound)
            if exc.retry_after is None or msg.retries >= MAX_RETRY_AFTER:
                raise  # the host retries the message, then keeps it as poison
            # Honour the service's Retry-After with a delayed copy of the message, instead of
            # failing the invocation and waiting out the queue's visibility timeout.
            return self._again(spec, msg, step, exc, timedelta(seconds=exc.retry_after))

    def _landed(self, spec: ModelSpec, run: Doc) -> bool:
        """Whether the target serves the run's model after all (a call whose answer was lost
        did land): then the promotion goes on to verify and crown it."""
        try:
            return self._ctx.target_for(spec).serves(ModelRef.load(run["outputs"]["model"]))
        except RemoteError as exc:
            log.warning(
                "run %s of %s: the target cannot say what it serves: %s",
                run["run_id"],
                spec.name,
                exc,
                extra=dims(spec.name, run["run_id"]),
            )
            return False

    def _again(
        self, spec: ModelSpec, msg: EvaluateRun, step: Step, exc: Exception, after: timedelta
    ) -> str:
        """Send a copy of the message `after` from now; it carries the deploy lease this
        delivery kept, if it kept one."""
        ctx = self._ctx
        poll = msg.poll + 1 if step.polled else msg.poll
        delay = max(after, MIN_POLL_GAP)
        log_retry(spec, msg.run_id, exc, delay)
        ctx.outbox.send(
            ctx.places.evaluations_queue,
            EvaluateRun(
                model=spec.name,
                run_id=msg.run_id,
                poll=poll,
                retries=msg.retries + 1,
                lease=step.lease,
            ),
            delay=delay,
        )
        return "retry"

    def _promote(
        self, spec: ModelSpec, run: Doc, msg: EvaluateRun, delivery: Delivery | None, step: Step
    ) -> str:
        """Deploy once (or poll the deploy in progress), then verify and crown."""
        target = self._ctx.target_for(spec)
        key = run_key(spec.name, run["run_id"])
        ref = ModelRef.load(run["outputs"]["model"])
        pending = run.get("deployment")
        progress: Progress | str
        if pending is None or not pending.get("deployed"):
            outcome = self._deploy(spec, target, run, ref, msg, delivery, step)
            if isinstance(outcome, str):
                return outcome
            run, progress = outcome
            step.polled = True  # the claim took the chain's poll: a retry must use the next
        else:
            claim = self._runs.claim_poll(key, "deployment", msg.poll, delivery)
            if not claim:
                return "duplicate"
            step.polled = True
            if claim == "again" and not self._canary.overdue(spec, run):
                # The failed attempt may have just asked how the step is doing, or sent a
                # change whose answer never came (the service may act on it late): look in
                # the chain's next poll, one call bound on at the least (past the promotion's
                # timeout, the run fails or its canary stops instead).
                return self._provisioning(spec, run, msg, self._ctx.timing.call_bound)
            if pending.get("canary"):
                progress = self._canary.advance(spec, target, run, msg)
            else:
                progress = target.progress(pending["operation"])
        if not isinstance(progress, str) and progress.state == "staged":
            progress = self._canary.begin(spec, target, run, msg, progress)
        if isinstance(progress, str):
            return progress  # a canary step sent the next message, or ended the run
        if progress.state == "failed":
            return self._runs.fail(spec, run, f"the target refused the model: {progress.detail}")
        if progress.state == "pending":
            return self._provisioning(spec, run, msg)
        if not target.serves(ref):
            raise TransientRemoteError(
                f"promotion of run {run['run_id']}: the target still serves another model "
                "after the update"
            )
        return self._crown(spec, run, ref)

    def _provisioning(
        self, spec: ModelSpec, run: Doc, msg: EvaluateRun, at_least: timedelta = MIN_POLL_GAP
    ) -> str:
        """The target is still provisioning: look again later, or fail past its timeout."""
        ctx = self._ctx
        deployment = run["deployment"]
        timeout = getattr(spec.target, "provisioning_timeout", None)
        if timeout is not None and ctx.clock.now() >= parse(deployment["started_at"]) + timeout:
            return self._runs.fail(spec, run, f"provisioning did not finish within {timeout}")
        poll = max(msg.poll, int(deployment["polls"])) + 1
        ctx.outbox.send(
            ctx.places.evaluations_queue,
            EvaluateRun(model=spec.name, run_id=run["run_id"], poll=poll),
            delay=max(ctx.timing.delay(poll), at_least),
        )
        log.info(
            "run %s of %s: the target is provisioning (poll %d)",
            run["run_id"],
            spec.name,
            poll,
            extra=dims(spec.name, run["run_id"]),
        )
        return "provisioning"

    def _deploy(
        self,
        spec: ModelSpec,
        target: DeployTarget,
        run: Doc,
        ref: ModelRef,
        msg: EvaluateRun,
        delivery: Delivery | None,
        step: Step,
    ) -> tuple[Doc, Progress] | str:
        """Claim the run's deploy lease, call the target once, record it under the lease.

        The lease's token fences every write after the call: a holder that lost the lease
        cannot record a deployment or crown a model. Expiry is never read off a clock another
        instance wrote: a waiter re-sends itself with the lease's duration as the queue delay
        and takes over only if the very claim it saw is still there, undeployed, when it wakes
        (the queue service times the wait). The holder measures on its own clock and starts the
        target call only while the call's worst case still fits in its lease.
        """
        key = run_key(spec.name, run["run_id"])
        # The holder times its own lease on a clock no one can set: wall-clock jumps (or an
        # instance whose clock is off) cannot make it think it has more lease left than it has.
        began = self._ctx.clock.monotonic()
        token = secrets.token_hex(8)
        claimed = self._claim_lease(spec, run, msg, delivery, token)
        if isinstance(claimed, str):
            return claimed
        progress = self._call_target(spec, target, ref, msg, key, token, began, step)
        if progress == "retry":
            return progress
        if isinstance(progress, str):  # no change sent: the lease no longer held
            return self._lease_lost(spec, self._ctx.ledger.get(key) or run)

        def deployed(d: Doc) -> None:
            d["deployment"].update(operation=progress.operation, deployed=True)

        run, recorded = self._ctx.ledger.update(key, _fenced(token, deployed))
        if not recorded:
            return self._lease_lost(spec, run)
        return run, progress

    def _lease_lost(self, spec: ModelSpec, run: Doc) -> str:
        """The lease no longer held during the target calls: the holder that took it over
        finishes the promotion; a run failed meanwhile gets its restore check now."""
        log.error(
            "run %s of %s: the deploy lease was lost during the target call (run now %s); "
            "the holder that took it over finishes the promotion, or the restore check runs",
            run["run_id"],
            spec.name,
            run["state"],
            extra=dims(spec.name, run["run_id"]),
        )
        if is_terminal(run["state"]):
            # Failed while this call was changing the target: its restore check, if still
            # owed, runs now, after the change; if it already ran (before this call
            # landed) and the model is idle, the target is compared with the champion now.
            self._slot.release(spec, run["run_id"])
            state = self._ctx.ledger.get(model_key(spec.name)) or {}
            if state.get("champion") and not state.get("active_run"):
                self._slot.reconcile(spec, state["champion"], by="holder")
        return "lease lost"

    def _claim_lease(
        self,
        spec: ModelSpec,
        run: Doc,
        msg: EvaluateRun,
        delivery: Delivery | None,
        token: str,
    ) -> Doc | str:
        """Take the run's deploy lease as `token`; else what `on_evaluate` answers, having
        sent itself again for when a held lease would have run out."""
        ctx = self._ctx
        lease = ctx.timing.deploy_lease
        started = ctx.clock.now()
        mine = delivery_doc(delivery)

        def claim(d: Doc) -> Doc | None:
            held = d.get("deployment")
            if d["state"] != RunState.PROMOTING or (held and held.get("deployed")):
                return None
            if held and msg.lease != held["claim"]:
                return None
            d["deployment"] = {
                "claim": token,
                "by": mine,
                "poll_by": mine,
                "lease_seconds": lease.total_seconds(),
                "started_at": iso(started),
                "polls": 0,
                "operation": None,
                "deployed": False,
            }
            return d

        run, claimed = ctx.ledger.update(run_key(spec.name, run["run_id"]), claim)
        if claimed:
            return run
        held = run.get("deployment") or {}
        if run["state"] != RunState.PROMOTING or held.get("deployed"):
            return "duplicate"
        # Another delivery holds the lease: look again after a whole lease, and take over
        # only if that same claim is still there then. A later attempt of the holder's own
        # message knows the holder is gone (it crashed, or its process stood still past the
        # queue's lease) but not whether its target call is still on the way: it takes over
        # one call bound later, by when the service has acted on that call.
        again = is_redelivery(mine, held.get("by"))
        ctx.outbox.send(
            ctx.places.evaluations_queue,
            EvaluateRun(
                model=spec.name,
                run_id=run["run_id"],
                poll=msg.poll,
                lease=held["claim"],
                retries=msg.retries + 1 if again else msg.retries,
            ),
            delay=ctx.timing.call_bound if again else lease,
        )
        return "resent" if again else "waiting"

    def _call_target(
        self,
        spec: ModelSpec,
        target: DeployTarget,
        ref: ModelRef,
        msg: EvaluateRun,
        key: str,
        token: str,
        began: float,
        step: Step,
    ) -> Progress | str:
        """The target calls under the lease: what the target answered, or "retry" when too
        little lease was left to make them (the lease is given back and the message sent again),
        or "lease lost" when another copy took the lease over meanwhile. However many calls the
        target makes, none starts unless it ends, at its longest, before the lease runs out, and
        no change is sent once the lease is another copy's (a redelivery of this message takes
        it over one call bound after its holder went quiet, e.g. stood still past the queue's
        visibility)."""
        ctx = self._ctx
        lease = ctx.timing.deploy_lease
        bound = ctx.timing.call_bound.total_seconds()
        holding = _holding(ctx.ledger, key, token)
        try:
            with calls_end_by(
                ctx.clock.monotonic, began + lease.total_seconds(), bound, before_change=holding
            ):
                state = ctx.ledger.get(model_key(spec.name)) or {}
                if not state.get("champion"):
                    target.preflight()  # a first promotion checks the target is set up right
                _reserved(lease - timedelta(seconds=ctx.clock.monotonic() - began), ctx.timing)
                return target.deploy(ref)
        except CallTooLate as exc:
            # Nothing was sent that could still land: give the lease back, go again.
            log.info(
                "run %s of %s: %s; sent again",
                msg.run_id,
                spec.name,
                exc,
                extra=dims(spec.name, msg.run_id),
            )
            ctx.ledger.update(key, _fenced(token, _give_back))
            again = msg.model_copy(update={"retries": msg.retries + 1})
            ctx.outbox.send(ctx.places.evaluations_queue, again, delay=MIN_POLL_GAP)
            return "retry"
        except LeaseTaken:
            return "lease lost"
        except TransientRemoteError as exc:
            if unanswered(exc):
                step.lease = token  # kept: see `Step.lease`
            else:
                ctx.ledger.update(key, _fenced(token, _give_back))
            raise
        except Exception:
            # Give the claim back so the retry of this message need not wait out the lease.
            ctx.ledger.update(key, _fenced(token, _give_back))
            raise

    def _crown(self, spec: ModelSpec, run: Doc, model: ModelRef) -> str:
        """End the verified run `promoted`, then make it the champion.

        The run's own move comes first and is conditional on it still being `promoting`, so a
        run failed meanwhile (e.g. by another copy's poison) is never crowned; a crash between
        the two writes is finished by `release`, which seats a promoted run that still holds
        the model (the message's redelivery or the sweep get there)."""
        now = self._ctx.clock.now()
        run_id = run["run_id"]
        doc, moved = self._runs.move(
            spec, run_id, RunState.PROMOTING, RunState.PROMOTED, now, note=f"deployed {model}"
        )
        if not moved and doc["state"] != RunState.PROMOTED:
            log.error(
                "run %s of %s is %s now; its verified deploy is not crowned",
                run_id,
                spec.name,
                doc["state"],
                extra=dims(spec.name, run_id),
            )
            self._slot.release(spec, run_id)  # its owed restore check runs after this deploy
            return str(doc["state"])
        if not self._slot.seat(spec, doc):
            state = self._ctx.ledger.get(model_key(spec.name)) or {}
            log.error(
                "run %s of %s is deployed but run %s holds the model; not crowned (the sweep "
                "compares target and champion once the model is idle)",
                run_id,
                spec.name,
                state.get("active_run"),
                extra=dims(spec.name, run_id),
            )
            return "superseded"
        log.info(
            "run %s of %s promoted: the target serves %s",
            run_id,
            spec.name,
            model,
            extra=dims(spec.name, run_id, run.get("job_id")),
        )
        self._slot.release(spec, run_id)
        return RunState.PROMOTED.value
