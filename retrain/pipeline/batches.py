"""Batches: a model's open batch is sealed into a run once it has been quiet long enough.

A batch is a pointer on the model document (id, when it opened, who opened it) and a log under
`logs/{model}/{id}/` (an append blob, created before the pointer is published) to which each
arriving file version appends one entry: no arrival rewrites a document another arrival writes
too, and an append needs no condition, so instances never conflict over a batch. The check
reads the log. Sealing is two steps: the model document's pointer moves from `batch` to
`sealed` (one conditional write: new arrivals go to the next batch), then the log is sealed
(an append after that is refused, so its writer joins the next batch) and what it holds
becomes the run record, created once. A log holds 50,000 entries; a full one hands over to the
next segment, and the seal seals each segment up to the first one that is not full (creating
it sealed if no arrival did), so no segment is left open behind it.

Batches opened by earlier releases have no log: their files are member records under
`batches/{model}/{id}/` (one listing) or a list on the pointer, read as they are (arrivals.py
joins such a batch the way that release did).
"""

from __future__ import annotations

import logging
from datetime import datetime

from retrain.errors import DocumentMissing
from retrain.ledger import Doc, log_key, manifest_key, members_prefix, model_key, run_key
from retrain.messages import CheckBatch, TrackRun
from retrain.pipeline.context import Context, dims
from retrain.pipeline.records import check_due, fold_log, iso, merge_files, new_run, parse
from retrain.settings import ModelSpec
from retrain.storage import Appended

log = logging.getLogger(__name__)

_EPOCH = "1970-01-01T00:00:00+00:00"


class Batches:
    """The check-batch step: wait out the quiet period, seal, and start the batch's run."""

    def __init__(self, ctx: Context) -> None:
        self._ctx = ctx
        self._segments: dict[str, tuple[str, int]] = {}
        """Per model, the batch this instance last appended to and the segment it reached."""

    def add(self, spec: ModelSpec, batch: str, file: Doc, *, replace: bool = False) -> Appended:
        """Append `file` to the log of batch `batch` (`replace`: its marks win over an entry of
        the same version already there). APPENDED: it is in the batch for good; SEALED: the
        batch was sealed before; MISSING: the batch has no log (opened by an earlier release,
        or never opened)."""
        ledger = self._ctx.ledger
        known, segment = self._segments.get(spec.name, (batch, 0))
        segment = segment if known == batch else 0
        entry = {**file, "replace": True} if replace else file
        while True:
            key = log_key(spec.name, batch, segment)
            result = ledger.append(key, entry)
            if result is Appended.FULL:
                segment += 1
                self._segments[spec.name] = (batch, segment)
            elif result is Appended.MISSING and segment > 0:
                # The one before is full, so this segment is the batch's (a seal that got
                # here first created it sealed).
                ledger.start_log(key)
            else:
                return result

    def start_log(self, spec: ModelSpec, batch: str) -> None:
        """Create the log of a batch about to be opened (or found open without one)."""
        self._ctx.ledger.start_log(log_key(spec.name, batch))

    def members(self, spec: ModelSpec, batch: Doc, *, seal: bool = False) -> list[Doc]:
        """The files of open or sealed batch `batch`, read from its log (sealed first when
        `seal`: then they are the batch's for good), with the member records (one listing) and
        the list of earlier releases."""
        listed = self._ctx.ledger.entries(members_prefix(spec.name, batch["id"]))
        logged = self._log(spec, batch["id"], seal=seal) if batch.get("log") else []
        return merge_files(batch.get("files") or [], listed, logged)

    def _log(self, spec: ModelSpec, batch: str, *, seal: bool) -> list[Doc]:
        """The entries of every segment of the batch's log, each sealed first when `seal`."""
        ledger = self._ctx.ledger
        entries: list[Doc] = []
        segment = 0
        while True:
            key = log_key(spec.name, batch, segment)
            if seal and not ledger.seal_log(key):
                ledger.start_log(key)  # none yet: made sealed, so no arrival starts it later
                ledger.seal_log(key)
            found = ledger.read_log(key)
            if found is None:
                return fold_log(entries)
            entries.extend(found.entries)
            if not found.full:
                return fold_log(entries)
            segment += 1

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
        """The run record of sealed batch `sealed`, made from its sealed log if no one made it
        yet (created once: the first to land is the batch's for good; a log once sealed reads
        the same to every instance)."""
        ctx = self._ctx
        key = run_key(spec.name, sealed["id"])
        found = ctx.ledger.get(key, remember=False)
        if found is not None:
            return found
        files = self.members(spec, sealed, seal=True)
        manifest = manifest_key(spec.name, sealed["id"])
        written = {"model": spec.name, "run_id": sealed["id"], "files": files}
        if not ctx.ledger.create(manifest, written):
            # Another instance wrote it first (or this one, before it died): that one is the
            # batch's, so the run is made from it.
            files = (ctx.ledger.get(manifest, remember=False) or written)["files"]
        run = new_run(spec, sealed, files, manifest, now)
        if ctx.ledger.create(key, run):
            if files:
                ctx.emit(spec, run, run["history"][0]["note"])
            log.info(
                "run %s of %s: sealed %d file(s)",
                run["run_id"],
                spec.name,
                len(files),
                extra=dims(spec.name, run["run_id"]),
            )
            return run
        return ctx.ledger.get(key, remember=False) or run

    def files_of(self, run: Doc) -> list[Doc]:
        """The files of run `run`: its manifest's, or, for a run recorded before manifests, its
        own list. A missing manifest is an error that names it (it is written before the run)."""
        key = run.get("manifest")
        if not key:
            return list(run.get("files") or [])
        found = self._ctx.ledger.get(key, remember=False)
        if found is None:
            raise DocumentMissing(f"{key}: the manifest of run {run['run_id']} does not exist")
        return list(found.get("files") or [])

    def start_run(self, spec: ModelSpec, sealed: Doc, now: datetime) -> Doc:
        """Record the run of a sealed batch (once) and hand it to the train step."""
        run = self.run_of(spec, sealed, now)
        self._ctx.outbox.send(
            self._ctx.places.jobs_queue, TrackRun(model=spec.name, run_id=run["run_id"])
        )
        return run
