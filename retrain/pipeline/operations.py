"""What on-call asks for: approve, reject, roll back, retrain now, and the read-only queries."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from retrain.errors import InputRejected
from retrain.ingest import validate
from retrain.ledger import Doc, arrival_key, model_key, run_key
from retrain.messages import CheckBatch, EvaluateRun
from retrain.pipeline.arrivals import Arrival, Arrivals
from retrain.pipeline.batches import Batches
from retrain.pipeline.context import dims
from retrain.pipeline.records import file_entry, holds, new_model
from retrain.pipeline.runs import RunStep
from retrain.ports import ModelRef
from retrain.runstate import RunState, is_terminal
from retrain.settings import ModelSpec
from retrain.storage import BlobHead

log = logging.getLogger(__name__)


class AlreadyTrained(InputRejected):
    """A retrain was asked for on a file version a run already trained."""

    def __init__(self, message: str, *, run_id: str) -> None:
        super().__init__(message)
        self.run_id = run_id


def in_flight(state: Doc, sealed_files: list[Doc], blob: str, etag: str) -> None:
    """Refuse to put a version in a new batch while a sealed batch's run trains it: the model's
    sealed batch (whose files are `sealed_files`) holds it and its run still holds the model."""
    sealed = state.get("sealed") or {}
    if sealed.get("id") == state.get("active_run") and holds(
        sealed_files, {"name": blob, "etag": etag}
    ):
        raise InputRejected(
            f"{blob} (version {etag}) is in batch {sealed['id']}, whose run is training it; "
            "wait for it to end"
        )


def _sealed_meanwhile(blob: str, etag: str, batch: str) -> InputRejected:
    return InputRejected(
        f"{blob} (version {etag}) was in batch {batch}, which was sealed while this request "
        "was made: that batch's run trains it"
    )


@dataclass(eq=False)
class Operations(RunStep):
    """The operator's commands, each checked against the ledger before it changes anything."""

    _arrivals: Arrivals
    _batches: Batches

    # ----------------------------------------------------------------- approval

    def approve(self, name: str, run_id: str, *, by: str) -> str:
        """Promote a run that waits for approval, through the same path as automatic ones."""
        ctx = self._ctx
        spec = ctx.spec(name)
        run = ctx.ledger.get(run_key(name, run_id))
        if run is None:
            raise InputRejected(f"run {run_id} of {name} does not exist")
        if run["state"] != RunState.AWAITING_APPROVAL:
            raise InputRejected(f"run {run_id} is {run['state']}, not awaiting approval")
        self._slot.claim_model(spec, run_id, "approve")
        _, moved = self._runs.move(
            spec,
            run_id,
            RunState.AWAITING_APPROVAL,
            RunState.PROMOTING,
            ctx.clock.now(),
            note=f"approved by {by}",
            approved_by=by,
        )
        if not moved:
            self._slot.release(spec, run_id)
            raise InputRejected(f"run {run_id} changed state while being approved")
        self._slot.unpark(name, run_id)
        ctx.outbox.send(ctx.places.evaluations_queue, EvaluateRun(model=name, run_id=run_id))
        return RunState.PROMOTING.value

    def reject(self, name: str, run_id: str, *, by: str, reason: str) -> str:
        """Turn down a run that waits for approval, recording who and why."""
        spec = self._ctx.spec(name)
        run, moved = self._runs.move(
            spec,
            run_id,
            RunState.AWAITING_APPROVAL,
            RunState.REJECTED,
            self._ctx.clock.now(),
            note=f"rejected by {by}: {reason}",
            rejected_by=by,
            rejected_reason=reason,
        )
        if not moved:
            raise InputRejected(f"run {run_id} is {run['state']}, not awaiting approval")
        self._slot.unpark(name, run_id)
        return RunState.REJECTED.value

    # ----------------------------------------------------------------- rollback

    def rollback(self, name: str, to: str | None = None, *, by: str) -> str:
        """Re-deploy an earlier promoted run's model (default: the previous champion).

        A rollback is a run of its own, which deploys that run's model through the model's
        target (as a restore does). Whether the target
        already serves that model is asked of the target itself, not of the champion pointer.
        Returns the rollback run's id.
        """
        ctx = self._ctx
        spec = ctx.spec(name)
        state = ctx.ledger.get(model_key(name)) or {}
        if to is None:
            previous = state.get("previous_champion")
            if not previous:
                raise InputRejected(f"{name} has no previous champion to roll back to")
            to = str(previous["run_id"])
        source = ctx.ledger.get(run_key(name, to))
        if source is None:
            raise InputRejected(f"run {to} of {name} does not exist")
        if source["state"] != RunState.PROMOTED:
            raise InputRejected(
                f"run {to} is {source['state']}; only a promoted run's model can be restored"
            )
        if ctx.target_for(spec).serves(ModelRef.load(source["outputs"]["model"])):
            raise InputRejected(f"{name} already serves the model of run {to} (its target says so)")
        return self._slot.redeploy(spec, source, kind="rollback", by=by)

    # ------------------------------------------------------------- retrain now

    def request(
        self, name: str, blob: str | None = None, *, reason: str, force: bool = False
    ) -> str:
        """Retrain `name` now on `blob` (default: its newest data file), through the batch path.

        The file is validated like any arrival and added to the model's batch, which is marked
        to be sealed without waiting for the quiet period. Returns the batch id. A file version
        some run already trained is refused (AlreadyTrained) unless `force`, which is recorded
        on the file's batch entry and so on the run.
        """
        ctx = self._ctx
        spec = ctx.spec(name)
        container = ctx.places.data_container
        blob, head = self._requested_version(spec, blob)
        # The version goes through the arrival path first, so it has exactly one arrival record
        # and one batch, whether or not its event ever came.
        self._arrivals.on_blob(container, blob)
        key = arrival_key(container, blob, head.etag)
        record = ctx.ledger.get(key, remember=False) or {}
        if record.get("status") != Arrival.ACCEPTED:
            raise InputRejected(f"{blob}: {record.get('reason') or 'its arrival was not accepted'}")
        mark, trained, waiting_in = self._marks(
            spec, blob, head.etag, record, reason=reason, force=force
        )
        now = ctx.clock.now()
        file = file_entry(blob, head.etag, head.size, now, head.last_modified, **mark)
        claim: str | None = waiting_in
        if waiting_in is None:
            # A new entry: in the open batch, or one opened for it, unless a sealed batch
            # (on the same read) still trains it. The version's record follows it into that
            # batch, so a second request sees it in flight (and, once a job has trained it,
            # by whom); of two requests racing, the one that moves the record decides.
            state = ctx.ledger.get(model_key(name)) or {}
            sealed = state.get("sealed")
            if sealed and sealed.get("id") == state.get("active_run"):
                run = self._batches.run_of(spec, sealed, now)
                in_flight(state, self._batches.files_of(run), blob, head.etag)
            claim = self._arrivals.claim(
                spec, key, record.get("batch_id"), state.get("batch"), now, check=False
            )
        joined, _ = self._arrivals.join(spec, key, file, claim, now=now, replace=True, check=False)
        self._force(spec, joined, blob, head.etag)
        log.info(
            "retrain of %s requested on %s (%s%s)",
            name,
            blob,
            reason,
            f"; forced, already trained by run {trained}" if trained and force else "",
            extra=dims(name),
        )
        return joined

    def _force(self, spec: ModelSpec, batch: str, blob: str, etag: str) -> None:
        """Mark open batch `batch` to be sealed without waiting, and send its check."""
        ctx = self._ctx

        def forcing(d: Doc) -> Doc | None:
            open_batch = d.get("batch")
            if not open_batch or open_batch["id"] != batch or open_batch.get("force"):
                return None
            open_batch["force"] = True
            return d

        doc, _ = ctx.ledger.update(model_key(spec.name), forcing, initial=new_model(spec))
        if (doc.get("batch") or {}).get("id") != batch:
            raise _sealed_meanwhile(blob, etag, batch)
        ctx.outbox.send(ctx.places.jobs_queue, CheckBatch(model=spec.name, batch_id=batch))

    def _requested_version(self, spec: ModelSpec, blob: str | None) -> tuple[str, BlobHead]:
        """The blob to retrain on (default: the newest under the model's prefix), validated."""
        data, container = self._ctx.data, self._ctx.places.data_container
        if blob is None:
            newest = data.newest(container, spec.prefix)
            if newest is None:
                raise InputRejected(f"no data under {container}/{spec.prefix} to retrain on")
            blob = newest
        if not blob.startswith(spec.prefix):
            raise InputRejected(f"{blob!r} is not under {spec.name}'s data prefix {spec.prefix!r}")
        head = data.head(container, blob)
        if head is None:
            raise InputRejected(f"{container}/{blob} does not exist")
        try:
            validate(spec, blob, size=head.size, head=head.head)
        except InputRejected as exc:
            raise InputRejected(f"{blob}: {exc}") from exc
        return blob, head

    def _marks(
        self, spec: ModelSpec, blob: str, etag: str, record: Doc, *, reason: str, force: bool
    ) -> tuple[Doc, str | None, str | None]:
        """What the version's batch entry records of the request, the run that trained it
        before (if any), and the open batch it waits in (if it does); raises when the version
        cannot be retrained now."""
        ctx = self._ctx
        state = ctx.ledger.get(model_key(spec.name)) or {}
        open_batch = state.get("batch") or {}
        if record.get("batch_id") and open_batch.get("id") == record.get("batch_id"):
            # It waits in the open batch (its record names the batch it is in): seal that now.
            return {"requested": reason}, None, str(open_batch["id"])
        taken = str(record.get("batch_id") or "?")
        trained = self._trained_by(spec, ctx.places.data_container, blob, etag)
        holder = ctx.ledger.get(run_key(spec.name, taken), remember=False)
        sealed = state.get("sealed") or {}
        if holder is None and taken in (state.get("active_run"), sealed.get("id")):
            # Sealed, its run not recorded yet: that run trains this version.
            raise InputRejected(
                f"{blob} (version {etag}) is in batch {taken}, which was sealed and "
                "whose run is starting; wait for it to end"
            )
        if trained and not force:
            raise AlreadyTrained(
                f"{blob} (version {etag}) was already trained by run {trained}; "
                "training the same data again can only repeat that run's result. Upload "
                "new data, or retrain with --force if that run failed for a reason other "
                "than its data (e.g. the training service was down); a forced retrain is "
                "recorded on the run",
                run_id=trained,
            )
        if holder is not None and not is_terminal(holder["state"]):
            # Even with --force: the run still holds (and may be training on) this version.
            raise InputRejected(
                f"{blob} (version {etag}) is in run {taken}, which is "
                f"{holder['state']}; wait for it to end"
            )
        # Not trained (its run ended before a job started), or forced: a new entry.
        mark: dict[str, Any] = {"requested": reason}
        if force:
            mark.update(forced=True)
            if trained:
                mark.update(trained_before_by=trained)
        return mark, trained, None

    def _trained_by(self, spec: ModelSpec, container: str, name: str, etag: str) -> str | None:
        """The run that trained this version of the file, if any: the last run its arrival
        record names as having trained it, else the run of its arrival batch when that run
        submitted a training job with this version as its training file."""
        ledger = self._ctx.ledger
        record = ledger.get(arrival_key(container, name, etag), remember=False)
        if record and record.get("trained_by"):
            return str(record["trained_by"][-1])
        if not record or record.get("status") != Arrival.ACCEPTED or not record.get("batch_id"):
            return None
        run = ledger.get(run_key(spec.name, record["batch_id"]), remember=False)
        trained = (run or {}).get("training_file")
        if run is None or not run.get("job_id") or not trained:
            return None
        return str(run["run_id"]) if holds([trained], {"name": name, "etag": etag}) else None

    # ------------------------------------------------------------------ queries

    def poisoned(self) -> list[Doc]:
        """Every kept poison message, oldest first."""
        ledger = self._ctx.ledger
        docs = [d for k in ledger.store.keys("poison/") if (d := ledger.get(k))]
        return sorted(docs, key=lambda d: d.get("poisoned_at", ""))

    def runs(self, model: str | None = None) -> list[Doc]:
        """Every run record, oldest first (of one model, or all)."""
        ledger = self._ctx.ledger
        prefix = f"runs/{model}/" if model else "runs/"
        return [doc for k in ledger.store.keys(prefix) if (doc := ledger.get(k)) is not None]

    def find_run(self, run_id: str) -> Doc:
        """A run by id, whichever model it belongs to."""
        for name in self._ctx.models:
            run = self._ctx.ledger.get(run_key(name, run_id))
            if run is not None:
                return run
        raise InputRejected(f"no run {run_id!r}; list runs with `python -m retrain runs`")

    def model_state(self, name: str) -> Doc:
        """A model's document: open batch, active run, champion."""
        self._ctx.spec(name)
        return self._ctx.ledger.get(model_key(name)) or {}

    def batch_files(self, name: str) -> list[Doc]:
        """The files waiting in the model's open batch (none when no batch is open)."""
        batch = self.model_state(name).get("batch")
        return self._batches.members(self._ctx.spec(name), batch) if batch else []

    def probe(self, name: str) -> str:
        """Check a model's training service answers and takes its credentials; starts nothing."""
        return self._ctx.training_for(self._ctx.spec(name)).probe()

    def preflight(self, name: str) -> list[str]:
        """Check a model's target is reachable and updatable as configured."""
        return self._ctx.target_for(self._ctx.spec(name)).preflight()
