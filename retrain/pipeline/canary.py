"""Canary steps: traffic moves to the new deployment in the spec's shares, each held, then all.

The target has provisioned the new model and smoke-scored it (`staged`); from there every step
is one message. The run records the plan and where it stands under `deployment.canary`:

    deployment, previous   the new deployment, the one that served all traffic before
    saved                  the traffic map before the first step (what a failure restores)
    shares                 the new deployment's share at each step; the last is 100
    hold_seconds, smoke    how long a step holds; whether the hold ends with a smoke request
    step, phase            the share being made (`moving`) or held (`holding`), or `restoring`
    hold_until, operation  when the hold ends; the traffic change to follow
    since, reason          when the phase began; why the canary stopped (`restoring`)

Each phase change is a conditional write from the phase it leaves, so a duplicated or
redelivered message neither repeats nor skips a step; a message that comes before the hold ends
(the sweep's re-drive) sends itself again for the rest. The endpoint is the truth: a move reads
its map first and PUTs only when the map differs and no change is running, so a crash between a
PUT and its record does not PUT twice. Nothing here waits: a hold is a delayed message. The
run's deploy claim was recorded `deployed` before the first step, so no other delivery takes the
promotion over during a hold, however long, and the model's slot stays with the run until it
ends.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, cast

from retrain.azureml.spec import iso as duration
from retrain.deploy import SUCCEEDED, DeployTarget, Progress, TrafficTarget
from retrain.errors import PermanentError, PermanentRemoteError
from retrain.ledger import Doc, model_key, run_key
from retrain.messages import EvaluateRun
from retrain.pipeline.context import MIN_POLL_GAP, dims
from retrain.pipeline.records import iso, parse
from retrain.pipeline.runs import RunStep
from retrain.runstate import RunState, is_terminal
from retrain.settings import ModelSpec

log = logging.getLogger(__name__)

REDEPLOYS = ("rollback", "restore")
"""Run kinds that move all traffic at once: the way back is not a new model on trial."""


@dataclass(eq=False)
class Canary(RunStep):
    """Drives a staged promotion's traffic steps, one message per step."""

    def begin(
        self, spec: ModelSpec, target: DeployTarget, run: Doc, msg: EvaluateRun, staged: Progress
    ) -> Progress | str:
        """Record the plan and the traffic map to restore, then make the first step."""
        traffic = cast("TrafficTarget", target)
        deployment = str(staged.operation or "").partition(" ")[2]
        saved = traffic.traffic()
        record = {
            **self._plan(spec, run, saved, deployment),
            "deployment": deployment,
            "saved": saved,
            "step": 0,
            "phase": "moving",
            "since": iso(self._ctx.clock.now()),
            "operation": None,
        }

        def start(d: Doc) -> Doc | None:
            held = d.get("deployment") or {}
            if d["state"] != RunState.PROMOTING or not held.get("deployed") or held.get("canary"):
                return None
            held["canary"] = record
            return d

        run, _ = self._ctx.ledger.update(run_key(spec.name, run["run_id"]), start)
        if run["state"] != RunState.PROMOTING or not (run.get("deployment") or {}).get("canary"):
            return "duplicate"
        shares = run["deployment"]["canary"]["shares"]
        if len(shares) > 1:
            self._note(spec, run, f"canary on {deployment}: {shares} %, traffic before {saved}")
        return self.advance(spec, target, run, msg)

    def _plan(self, spec: ModelSpec, run: Doc, saved: dict[str, int], new: str) -> Doc:
        """The shares to move through: the spec's steps, or all at once when there is nothing
        to try the model against (a rollback or a restore, an endpoint without traffic)."""
        canary = getattr(spec.target, "canary", None)
        if canary is None or run.get("kind") in REDEPLOYS or not saved:
            return {"shares": [100], "previous": None, "hold_seconds": 0, "smoke": False}
        previous = [name for name, share in saved.items() if share == 100 and name != new]
        if not previous:
            raise PermanentRemoteError(
                f"canary: the endpoint's traffic {saved} is not all on the other deployment; "
                f"put all of it on one deployment (not {new}) before promoting, or remove "
                "target.canary"
            )
        return {
            "shares": [*canary.steps, 100],
            "previous": previous[0],
            "hold_seconds": canary.hold.total_seconds(),
            "smoke": canary.smoke_each_step,
        }

    def advance(
        self, spec: ModelSpec, target: DeployTarget, run: Doc, msg: EvaluateRun
    ) -> Progress | str:
        """One step of the recorded canary: SUCCEEDED once all traffic is on the new
        deployment (the promotion then verifies and crowns), else what `on_evaluate` answers."""
        traffic = cast("TrafficTarget", target)
        canary = run["deployment"]["canary"]
        if canary["phase"] == "restoring":
            return self._restoring(spec, traffic, run, msg)
        timeout = getattr(spec.target, "provisioning_timeout", None)
        if timeout is not None and self._ctx.clock.now() >= self._deadline(run, timeout):
            return self._stop(
                spec,
                traffic,
                run,
                msg,
                f"the promotion's deadline (provisioning_timeout {duration(timeout)}) passed",
            )
        if canary["phase"] == "holding":
            return self._holding(spec, traffic, run, msg)
        return self._moving(spec, traffic, run, msg)

    def overdue(self, spec: ModelSpec, run: Doc) -> bool:
        """Whether the run's canary steps are past the promotion's deadline (then the next
        look stops them; a run without canary steps is never overdue here)."""
        canary = (run.get("deployment") or {}).get("canary")
        timeout = getattr(spec.target, "provisioning_timeout", None)
        if not canary or timeout is None or canary["phase"] == "restoring":
            return False
        return self._ctx.clock.now() >= self._deadline(run, timeout)

    def _moving(
        self, spec: ModelSpec, target: TrafficTarget, run: Doc, msg: EvaluateRun
    ) -> Progress | str:
        canary = run["deployment"]["canary"]
        step = canary["step"]
        wanted = _traffic(canary, step)
        try:
            progress = target.shift(wanted, canary.get("operation"))
        except PermanentError as exc:
            return self._stop(spec, target, run, msg, f"the traffic change was refused: {exc}")
        if progress.state == "failed":
            return self._stop(
                spec, target, run, msg, f"the traffic change failed: {progress.detail}"
            )
        if progress.state == "pending":
            if progress.operation != canary.get("operation"):
                changed = self._change(spec, run, ("moving", step), operation=progress.operation)
                if changed is None:
                    return "duplicate"
                run = changed
            return self._later(spec, run, msg, self._ctx.timing.first_delay)
        if step == len(canary["shares"]) - 1:
            return SUCCEEDED
        now = self._ctx.clock.now()
        until = now + timedelta(seconds=canary["hold_seconds"])
        changed = self._change(
            spec, run, ("moving", step), phase="holding", hold_until=iso(until), operation=None
        )
        if changed is None:
            return "duplicate"
        self._note(spec, changed, f"canary step {step + 1}: traffic {wanted}; held until {until}")
        return self._later(spec, changed, msg, until - now)

    def _holding(
        self, spec: ModelSpec, target: TrafficTarget, run: Doc, msg: EvaluateRun
    ) -> Progress | str:
        canary = run["deployment"]["canary"]
        step = canary["step"]
        left = parse(canary["hold_until"]) - self._ctx.clock.now()
        if left > timedelta(0):
            return self._later(spec, run, msg, left)  # came early (a re-drive): hold on
        if canary["smoke"]:
            failed = target.smoke(canary["deployment"])
            if failed is not None:
                return self._stop(spec, target, run, msg, failed)
        now = iso(self._ctx.clock.now())
        changed = self._change(
            spec, run, ("holding", step), phase="moving", step=step + 1, since=now, operation=None
        )
        if changed is None:
            return "duplicate"
        return self._moving(spec, target, changed, msg)

    def _stop(
        self, spec: ModelSpec, target: TrafficTarget, run: Doc, msg: EvaluateRun, reason: str
    ) -> str:
        """A step failed: put back the saved map (as for a refused deploy when nothing moved
        in steps: the restore check follows the failed run)."""
        canary = run["deployment"]["canary"]
        if len(canary["shares"]) == 1:
            return self._runs.fail(spec, run, f"the target refused the model: {reason}")
        step = canary["step"]
        why = (
            f"canary stopped at step {step + 1} of {len(canary['shares'])} "
            f"({canary['shares'][step]} % to {canary['deployment']}): {reason}"
        )
        now = iso(self._ctx.clock.now())
        changed = self._change(
            spec,
            run,
            (canary["phase"], step),
            phase="restoring",
            reason=why,
            since=now,
            operation=None,
        )
        if changed is None:
            return "duplicate"
        log.warning(
            "run %s of %s: %s", run["run_id"], spec.name, why, extra=dims(spec.name, run["run_id"])
        )
        return self._restoring(spec, target, changed, msg)

    def _restoring(self, spec: ModelSpec, target: TrafficTarget, run: Doc, msg: EvaluateRun) -> str:
        canary = run["deployment"]["canary"]
        saved, why = canary["saved"], canary["reason"]
        try:
            progress = target.shift(saved, canary.get("operation"))
        except PermanentError as exc:
            progress = Progress("failed", str(exc))
        if progress.state == "succeeded":
            return self._runs.fail(spec, run, f"{why}; traffic restored to {saved}")
        timeout = getattr(spec.target, "provisioning_timeout", None) or timedelta(hours=1)
        if (
            progress.state == "pending"
            and self._ctx.clock.now() >= parse(canary["since"]) + timeout
        ):
            progress = Progress("failed", f"it did not settle within {duration(timeout)}")
        if progress.state == "failed":
            return self._runs.fail(
                spec,
                run,
                f"{why}; restoring the traffic to {saved} failed "
                f"({progress.detail}): the restore check follows",
            )
        if progress.operation != canary.get("operation"):
            changed = self._change(
                spec, run, ("restoring", canary["step"]), operation=progress.operation
            )
            if changed is None:
                return "duplicate"
            run = changed
        return self._later(spec, run, msg, self._ctx.timing.first_delay)

    def _change(self, spec: ModelSpec, run: Doc, at: tuple[str, int], **fields: Any) -> Doc | None:
        """Update the canary record only from `at` (phase, step) of a promoting run; None when
        another delivery moved it first (a run failed meanwhile gives its model back now)."""

        def apply(d: Doc) -> Doc | None:
            canary = (d.get("deployment") or {}).get("canary") or {}
            if d["state"] != RunState.PROMOTING or (canary.get("phase"), canary.get("step")) != at:
                return None
            canary.update(fields)
            return d

        doc, changed = self._ctx.ledger.update(run_key(spec.name, run["run_id"]), apply)
        if changed:
            return doc
        if is_terminal(doc["state"]):
            # Failed while this step was changing the endpoint: its restore check runs now,
            # after the change, and an idle model's target is compared with its champion.
            self._slot.release(spec, doc["run_id"])
            state = self._ctx.ledger.get(model_key(spec.name)) or {}
            if state.get("champion") and not state.get("active_run"):
                self._slot.reconcile(spec, state["champion"], by="holder")
        return None

    def _later(self, spec: ModelSpec, run: Doc, msg: EvaluateRun, delay: timedelta) -> str:
        """Send the run's next message after `delay` (never past the promotion's deadline)."""
        ctx = self._ctx
        timeout = getattr(spec.target, "provisioning_timeout", None)
        if timeout is not None and run["deployment"]["canary"]["phase"] != "restoring":
            delay = min(delay, self._deadline(run, timeout) - ctx.clock.now())
        poll = max(msg.poll, run["deployment"].get("polls", 0)) + 1
        ctx.outbox.send(
            ctx.places.evaluations_queue,
            EvaluateRun(model=spec.name, run_id=run["run_id"], poll=poll),
            delay=max(delay, MIN_POLL_GAP),
        )
        return "canary"

    def _deadline(self, run: Doc, timeout: timedelta) -> datetime:
        return parse(run["deployment"]["started_at"]) + timeout

    def _note(self, spec: ModelSpec, run: Doc, text: str) -> None:
        log.info(
            "run %s of %s: %s", run["run_id"], spec.name, text, extra=dims(spec.name, run["run_id"])
        )


def _traffic(canary: Doc, step: int) -> dict[str, int]:
    """The map of step `step`: the new deployment's share, the rest on the previous one."""
    share = canary["shares"][step]
    if share == 100:
        return {canary["deployment"]: 100}
    return {canary["deployment"]: share, canary["previous"]: 100 - share}
