"""Batches: a model's open batch is sealed into a run once it has been quiet long enough."""

from __future__ import annotations

import logging
from datetime import datetime

from retrain.ledger import Doc, model_key, run_key
from retrain.messages import CheckBatch, TrackRun
from retrain.pipeline.context import Context, dims
from retrain.pipeline.records import check_due, iso, new_run, parse
from retrain.settings import ModelSpec

log = logging.getLogger(__name__)

_EPOCH = "1970-01-01T00:00:00+00:00"


class Batches:
    """The check-batch step: wait out the quiet period, seal, and start the batch's run."""

    def __init__(self, ctx: Context) -> None:
        self._ctx = ctx

    def on_check_batch(self, msg: CheckBatch) -> str:
        """Seal the model's batch into a run once it has been quiet long enough."""
        ctx = self._ctx
        spec = ctx.spec(msg.model)
        state = ctx.ledger.get(model_key(spec.name)) or {}
        batch = state.get("batch")
        now = ctx.clock.now()
        if not batch or batch["id"] != msg.batch_id:
            sealed = state.get("sealed") or {}
            if state.get("active_run") == msg.batch_id and sealed.get("id") == msg.batch_id:
                # Sealed by a delivery that may have died before it started the run.
                self.start_run(spec, sealed, now)
                return "resent"
            return "stale"
        if now < check_due(spec, batch) and not batch.get("force"):
            return self._wait(spec, batch, now)
        if state.get("active_run"):
            log.info(
                "batch %s of %s waits for run %s to end",
                batch["id"],
                spec.name,
                state["active_run"],
                extra=dims(spec.name, state["active_run"]),
            )
            return "busy"
        run_id = batch["id"]

        def seal(d: Doc) -> Doc | None:
            if not d.get("batch") or d["batch"]["id"] != run_id or d.get("active_run"):
                return None
            d["sealed"], d["batch"], d["active_run"] = d["batch"], None, run_id
            d["active_since"] = iso(now)
            return d

        state, _ = ctx.ledger.update(model_key(spec.name), seal)
        if state.get("active_run") != run_id:
            return "stale"
        self.start_run(spec, state["sealed"], now)
        return "sealed"

    def _wait(self, spec: ModelSpec, batch: Doc, now: datetime) -> str:
        """Arrivals since this check was scheduled moved the batch's quiet end: look again
        then. Of several checks waking early, the one that records the new time goes on."""
        due = check_due(spec, batch)

        def later(d: Doc) -> Doc | None:
            b = d.get("batch")
            if not b or b["id"] != batch["id"] or parse(b.get("check_at") or _EPOCH) >= due:
                return None
            b["check_at"] = iso(due)
            return d

        _, rescheduled = self._ctx.ledger.update(model_key(spec.name), later)
        if rescheduled:
            self._ctx.schedule_check(spec, batch, now)
        return "waiting"

    def start_run(self, spec: ModelSpec, batch: Doc, now: datetime) -> None:
        """Record the run of a sealed batch (once) and hand it to the train step."""
        ctx = self._ctx
        run = new_run(spec, batch, now)
        if ctx.ledger.create(run_key(spec.name, run["run_id"]), run):
            ctx.emit(spec, run, run["history"][0]["note"])
            log.info(
                "run %s of %s: sealed %d file(s)",
                run["run_id"],
                spec.name,
                len(batch["files"]),
                extra=dims(spec.name, run["run_id"]),
            )
        ctx.outbox.send(ctx.places.jobs_queue, TrackRun(model=spec.name, run_id=run["run_id"]))
