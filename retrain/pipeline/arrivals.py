"""Arrivals: a blob version is validated, recorded once, and joins its model's open batch."""

from __future__ import annotations

import functools
import logging
from datetime import datetime
from enum import StrEnum

from retrain.errors import InputRejected, RemoteError, StateConflict
from retrain.ingest import check_name, route, validate
from retrain.ledger import Doc, arrival_key, model_key, run_key
from retrain.pipeline.context import Context, dims
from retrain.pipeline.records import (
    add_to_batch,
    batch_id,
    claim_batch,
    file_entry,
    holds,
    iso,
    new_model,
)
from retrain.settings import ModelSpec
from retrain.storage import BlobHead, BlobUnreadable

log = logging.getLogger(__name__)

MAX_REJOINS = 10
"""How often an arrival may find its claimed batch closed before it gives up (and is retried)."""


class Arrival(StrEnum):
    """An arrival record's status, which is also what `on_blob` answers for it."""

    ACCEPTED = "accepted"
    REJECTED = "rejected"


class Arrivals:
    """The blob trigger's step, and the re-ingest the sweep and retrain-now go through."""

    def __init__(self, ctx: Context) -> None:
        self._ctx = ctx

    def on_blob(self, container: str, name: str) -> str:
        """Handle a blob arrival; returns what happened ('batched', 'rejected', 'duplicate', …).

        A new arrival on a warm instance costs three storage requests: read the blob's first
        bytes, create its arrival record, add it to the model's batch (one conditional write on
        the remembered ETag). Opening a batch adds one: its check is scheduled once per batch.
        The record names the batch *before* the file is added to it, so a redelivery can tell
        exactly whether the first delivery got the file in.
        """
        ctx = self._ctx
        refused = _unreferenceable(name)
        head = self._head(container, name, refused)
        if isinstance(head, str):
            return head
        key = arrival_key(container, name, head.etag)
        now = ctx.clock.now()
        record: Doc = {
            "container": container,
            "name": name,
            "etag": head.etag,
            "size": head.size,
            "arrived_at": iso(now),
        }
        try:
            spec = route(name, ctx.models.values())
            record["model"] = spec.name
            if refused is not None:
                raise refused
            validate(spec, name, size=head.size, head=head.head)
        except InputRejected as exc:
            return self._reject(container, name, key, record, exc)
        file = file_entry(name, head.etag, head.size, now, head.last_modified)
        state = ctx.ledger.known(model_key(spec.name)) or ctx.ledger.get(model_key(spec.name)) or {}
        open_batch = state.get("batch")
        claim = open_batch["id"] if open_batch else batch_id(now)
        record.update(status=Arrival.ACCEPTED.value, batch_id=claim)
        if not self._record_arrival(key, record):
            return self._arrived_again(spec, key, file, now)
        batch, opened = self.join(spec, key, file, claim, fresh=open_batch is None, now=now)
        if opened:
            ctx.schedule_check(spec, batch, now)
        log.info(
            "arrival %s/%s: batch %s of %s now has %d file(s)",
            container,
            name,
            batch["id"],
            spec.name,
            len(batch["files"]),
            extra=dims(spec.name, batch["id"]),
        )
        return "batched"

    def _head(self, container: str, name: str, refused: InputRejected | None) -> BlobHead | str:
        """The blob's head, or what `on_blob` answers when there is none to judge."""
        try:
            head = self._ctx.data.head(container, name)
        except BlobUnreadable as exc:
            try:
                spec = route(name, self._ctx.models.values())
            except InputRejected:
                raise exc from None
            self.record_unreadable(spec, container, name, exc)
            return Arrival.REJECTED.value
        except RemoteError:
            if refused is None:
                raise
            # A request signed for such a name may not authenticate: record the rejection
            # instead of failing (and being retried) forever.
            head = BlobHead("unreadable", 0, b"")
        if head is None:
            log.warning("arrival %s/%s: blob no longer exists; nothing to do", container, name)
            return "gone"
        return head

    def _reject(self, container: str, name: str, key: str, record: Doc, exc: InputRejected) -> str:
        """Record a rejected arrival once and quarantine its blob."""
        record.update(status=Arrival.REJECTED.value, reason=str(exc))
        if self._record_arrival(key, record):
            ctx = self._ctx
            ctx.data.quarantine(container, name, ctx.places.quarantine_container, str(exc))
            log.warning("arrival %s/%r rejected: %s", container, name, exc)
            return Arrival.REJECTED.value
        return "duplicate"

    def _record_arrival(self, key: str, record: Doc) -> bool:
        """Create the version's arrival record; False when one exists. A record made while the
        blob could not be read (archived) is replaced: rehydration keeps the ETag, and the
        version is judged on its content now."""
        if self._ctx.ledger.create(key, record):
            return True
        _, replaced = self._ctx.ledger.update(
            key, lambda d: dict(record) if d.get("unreadable") else None
        )
        return replaced

    def join(
        self, spec: ModelSpec, key: str, file: Doc, claim: str, *, fresh: bool, now: datetime
    ) -> tuple[Doc, bool]:
        """Add `file` to batch `claim`, which its arrival record names; returns the batch and
        whether this call opened it.

        `fresh`: `claim` is a new id, to open a batch with when none is open. When the claimed
        batch is no longer open, the record is pointed at the open one (or a new one) first.
        """
        mkey = model_key(spec.name)
        for _ in range(MAX_REJOINS):
            opened = False

            def add(d: Doc, claim: str = claim, fresh: bool = fresh) -> Doc | None:
                nonlocal opened
                batch, sealed = d.get("batch"), d.get("sealed") or {}
                # A fresh id that was sealed meanwhile was opened by a concurrent delivery of
                # this same arrival: never open a second batch under it.
                opened = batch is None and fresh and sealed.get("id") != claim
                if opened or (batch is not None and batch["id"] == claim):
                    return add_to_batch(d, file, now, claim)
                return None

            doc, _ = self._ctx.ledger.update(mkey, add, initial=new_model(spec))
            batch, sealed = doc.get("batch"), doc.get("sealed") or {}
            if batch is not None and batch["id"] == claim:
                return batch, opened
            if sealed.get("id") == claim and holds(sealed["files"], file):
                return sealed, False  # a concurrent delivery got it in before the seal
            # The claimed batch was sealed, or another arrival opened one first: claim anew.
            claim, fresh = (batch["id"], False) if batch else (batch_id(now), True)
            self._ctx.ledger.update(key, functools.partial(claim_batch, claim))
        raise StateConflict(f"{key}: batch of {spec.name} kept changing under the arrival")

    def _arrived_again(self, spec: ModelSpec, key: str, file: Doc, now: datetime) -> str:
        """A second delivery of a recorded arrival: finish what the first one may not have."""
        ctx = self._ctx
        existing = ctx.ledger.get(key) or {}
        claim = existing.get("batch_id")
        if existing.get("status") == Arrival.REJECTED or not claim:
            return "duplicate"
        state = ctx.ledger.get(model_key(spec.name)) or {}
        batch = state.get("batch")
        files = self.claimed_files(spec, state, claim, {})
        if files is not None and holds(files, file):
            opener = files[0]["name"] == file["name"] and files[0]["etag"] == file["etag"]
            if opener and batch and batch["id"] == claim:
                # Opening a batch sends its check after the write; the first delivery may have
                # died in between. A second check is harmless (the first to act wins).
                ctx.schedule_check(spec, batch, now)
            log.info("arrival %s@%s: duplicate event ignored", file["name"], file["etag"])
            return "duplicate"
        # The first delivery died between recording the arrival and adding the file: add it.
        joined, _ = self.join(spec, key, file, claim, fresh=files is None, now=now)
        ctx.schedule_check(spec, joined, now)
        log.warning(
            "arrival %s@%s: redelivered before it reached a batch; added to %s",
            file["name"],
            file["etag"],
            joined["id"],
            extra=dims(spec.name, joined["id"]),
        )
        return "batched"

    def claimed_files(
        self, spec: ModelSpec, state: Doc, claim: str, runs: dict[str, list[Doc] | None]
    ) -> list[Doc] | None:
        """The files of batch `claim`: open, just sealed, or in its run; None if it never
        opened. `runs` caches run lookups across calls."""
        batch, sealed = state.get("batch"), state.get("sealed") or {}
        if batch and batch["id"] == claim:
            return list(batch["files"])
        if sealed.get("id") == claim:
            return list(sealed["files"])
        if claim not in runs:
            run = self._ctx.ledger.get(run_key(spec.name, claim), remember=False)
            runs[claim] = run.get("files") if run else None
        return runs[claim]

    def record_unreadable(
        self, spec: ModelSpec, container: str, name: str, exc: BlobUnreadable
    ) -> None:
        """A blob that cannot be read as it is gets a rejected arrival, with the reason."""
        record = {
            "container": container,
            "name": name,
            "etag": exc.etag,
            "size": exc.size,
            "arrived_at": iso(self._ctx.clock.now()),
            "model": spec.name,
            "status": Arrival.REJECTED.value,
            "unreadable": True,
            "reason": str(exc),
        }
        self._ctx.ledger.create(arrival_key(container, name, exc.etag), record)
        log.warning(
            "arrival %s/%s of %s rejected: %s",
            container,
            name,
            spec.name,
            exc,
            extra=dims(spec.name),
        )


def _unreferenceable(name: str) -> InputRejected | None:
    """Why a blob name cannot be referenced, or None."""
    try:
        check_name(name)
    except InputRejected as exc:
        return exc
    return None
