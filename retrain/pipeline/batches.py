"""Batches: a model's open batch is sealed into a run once it has been quiet long enough.

A batch is a pointer on the model document (id, when it opened, who opened it) and one member
record per file version under `batches/{model}/{id}/`, which each arrival writes for itself: no
arrival rewrites a document another arrival writes too. The check reads the members in one
listing. Sealing is two steps: the model document's pointer moves from `batch` to `sealed`
(one conditional write: from then on no arrival counts itself in), then a listing made after
that write becomes the run record, created once. Whoever creates the run record first decides
the batch's files for good; an arrival whose member came too late finds itself missing from it
and joins the next batch (see arrivals.py).
"""

from __future__ import annotations

import logging
from datetime import datetime

from retrain.ledger import Doc, members_prefix, model_key, run_key
from retrain.messages import CheckBatch, TrackRun
from retrain.pipeline.context import Context, dims
from retrain.pipeline.records import check_due, iso, merge_files, new_run, parse
from retrain.settings import ModelSpec

log = logging.getLogger(__name__)

_EPOCH = "1970-01-01T00:00:00+00:00"


class Batches:
    """The check-batch step: wait out the quiet period, seal, and start the batch's run."""

    def __init__(self, ctx: Context) -> None:
        self._ctx = ctx

    def members(self, spec: ModelSpec, batch: Doc) -> list[Doc]:
        """The files of open or sealed batch `batch`: its member records (one listing), with
        the list documents written before member records kept in the pointer itself."""
        listed = self._ctx.ledger.entries(members_prefix(spec.name, batch["id"]))
        return merge_files(batch.get("files") or [], listed)

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
        if not batch.get("force"):
            if now < check_due(spec, batch):
                return self._wait(spec, batch, check_due(spec, batch), now)
            files = self.members(spec, batch)
            # A batch still empty at its quiet end lost every claimant to another batch (or its
            # opener died before joining it): it is sealed like any other and its run, holding
            # no file, ends at once, so nothing waits on it; a late claimant moves on.
            if files and now < check_due(spec, batch, files):
                return self._wait(spec, batch, check_due(spec, batch, files), now)
        if state.get("active_run"):
            log.info(
                "batch %s of %s waits for run %s to end",
                batch["id"],
                spec.name,
                state["active_run"],
                extra=dims(spec.name, state["active_run"]),
            )
            return "busy"
        return self._seal(spec, batch["id"], now)

    def _seal(self, spec: ModelSpec, run_id: str, now: datetime) -> str:
        """Move the pointer from open to sealed, claiming the model for the batch's run."""

        def seal(d: Doc) -> Doc | None:
            if not d.get("batch") or d["batch"]["id"] != run_id or d.get("active_run"):
                return None
            d["sealed"], d["batch"], d["active_run"] = d["batch"], None, run_id
            d["active_since"] = iso(now)
            return d

        state, _ = self._ctx.ledger.update(model_key(spec.name), seal)
        if state.get("active_run") != run_id:
            return "stale"
        self.start_run(spec, state["sealed"], now)
        return "sealed"

    def _wait(self, spec: ModelSpec, batch: Doc, due: datetime, now: datetime) -> str:
        """The batch is not quiet yet: look again at `due`. Of several checks waking early,
        the one that records the new time goes on; the others end here."""

        def later(d: Doc) -> Doc | None:
            b = d.get("batch")
            if not b or b["id"] != batch["id"] or parse(b.get("check_at") or _EPOCH) >= due:
                return None
            b["check_at"] = iso(due)
            return d

        _, rescheduled = self._ctx.ledger.update(model_key(spec.name), later)
        if rescheduled:
            self._ctx.schedule_check(spec, batch, now, due=due)
        return "waiting"

    def run_of(self, spec: ModelSpec, sealed: Doc, now: datetime) -> Doc:
        """The run record of sealed batch `sealed`, made from a listing of its members if no
        one made it yet (created once: the first listing to land is the batch's for good)."""
        ctx = self._ctx
        key = run_key(spec.name, sealed["id"])
        found = ctx.ledger.get(key, remember=False)
        if found is not None:
            return found
        run = new_run(spec, sealed, self.members(spec, sealed), now)
        if ctx.ledger.create(key, run):
            if run["files"]:
                ctx.emit(spec, run, run["history"][0]["note"])
            log.info(
                "run %s of %s: sealed %d file(s)",
                run["run_id"],
                spec.name,
                len(run["files"]),
                extra=dims(spec.name, run["run_id"]),
            )
            return run
        return ctx.ledger.get(key, remember=False) or run

    def start_run(self, spec: ModelSpec, sealed: Doc, now: datetime) -> Doc:
        """Record the run of a sealed batch (once) and hand it to the train step."""
        run = self.run_of(spec, sealed, now)
        self._ctx.outbox.send(
            self._ctx.places.jobs_queue, TrackRun(model=spec.name, run_id=run["run_id"])
        )
        return run
