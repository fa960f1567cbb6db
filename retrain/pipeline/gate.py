"""The gate: judge a trained run against the champion; park it for approval when asked to."""

from __future__ import annotations

import logging
from datetime import datetime
from typing import Any

from retrain.errors import EvaluationError, PermanentRemoteError
from retrain.evaluation import Decision, decide
from retrain.ledger import Doc, model_key, run_key
from retrain.pipeline.context import dims
from retrain.pipeline.records import new_model
from retrain.pipeline.runs import RunStep
from retrain.pipeline.training import training_request
from retrain.runstate import RunState
from retrain.settings import ModelSpec

log = logging.getLogger(__name__)


class Gate(RunStep):
    """Judges a trained run by the metrics its backend reports; moves it to rejected,
    promoting or approval."""

    def judge(self, spec: ModelSpec, run: Doc, now: datetime) -> Doc:
        """Decide on trained run `run`; returns its record after the move."""
        key = run_key(spec.name, run["run_id"])
        judged = self._decide(spec, run)
        if judged is None:
            return self._ctx.ledger.get(key) or run
        decision, fields = judged
        if not decision.promote:
            log.info(
                "run %s of %s rejected: %s",
                run["run_id"],
                spec.name,
                decision.reason,
                extra=dims(spec.name, run["run_id"]),
            )
            run, _ = self._runs.move(
                spec,
                run["run_id"],
                RunState.TRAINED,
                RunState.REJECTED,
                now,
                note=decision.reason,
                **fields,
            )
            self._slot.release(spec, run["run_id"])
            return run
        log.info(
            "run %s of %s passes the gate: %s",
            run["run_id"],
            spec.name,
            decision.reason,
            extra=dims(spec.name, run["run_id"]),
        )
        if spec.promotion == "manual":
            run, moved = self._runs.move(
                spec,
                run["run_id"],
                RunState.TRAINED,
                RunState.AWAITING_APPROVAL,
                now,
                note=f"{decision.reason}; waiting for approval",
                **fields,
            )
            if moved:
                self.await_approval(spec, run["run_id"], now)
            return run
        run, _ = self._runs.move(
            spec,
            run["run_id"],
            RunState.TRAINED,
            RunState.PROMOTING,
            now,
            note=decision.reason,
            **fields,
        )
        return run

    def _decide(self, spec: ModelSpec, run: Doc) -> tuple[Decision, dict[str, Any]] | None:
        """The gate's decision and what the run records of it; None when the run was failed
        because its evaluation cannot be read."""
        ctx = self._ctx
        try:
            result = ctx.training_for(spec).result(training_request(ctx, spec, run), run["job_id"])
        except (EvaluationError, PermanentRemoteError) as exc:
            # A transient error escapes: the host re-delivers the message.
            self._runs.fail(spec, run, f"cannot read the evaluation: {exc}")
            return None
        state = ctx.ledger.get(model_key(spec.name)) or {}
        champion = result.champion
        source = "scored on the same hold-out data"
        if champion is None and state.get("champion"):
            champion = state["champion"].get("metrics")
            source = "recorded when it was promoted"
        try:
            decision = decide(spec.gate, result.challenger, champion)
        except EvaluationError as exc:
            self._runs.fail(spec, run, f"cannot read the evaluation: {exc}")
            return None
        verdict = {
            "promote": decision.promote,
            "reason": decision.reason,
            "champion_source": source if champion is not None else None,
        }
        metrics = {"challenger": result.challenger, "champion": champion}
        outputs = {**(run.get("outputs") or {}), "model": result.model.to_doc()}
        return decision, {"decision": verdict, "metrics": metrics, "outputs": outputs}

    def await_approval(self, spec: ModelSpec, run_id: str, now: datetime) -> None:
        """Park the run for approval, supersede an older parked run, free the model."""
        ctx = self._ctx
        older: list[str] = []

        def park(d: Doc) -> Doc | None:
            previous = d.get("awaiting_approval")
            older[:] = [previous] if previous and previous != run_id else []
            d["awaiting_approval"] = run_id
            if d.get("active_run") == run_id:
                d["active_run"] = None
            return d

        state, _ = ctx.ledger.update(model_key(spec.name), park, initial=new_model(spec))
        for old_id in older:
            self._runs.move(
                spec,
                old_id,
                RunState.AWAITING_APPROVAL,
                RunState.SUPERSEDED,
                now,
                note=f"superseded by run {run_id}, which also passed the gate",
            )
        if state.get("batch") and not state.get("active_run"):
            ctx.schedule_check(spec, state["batch"], now)
