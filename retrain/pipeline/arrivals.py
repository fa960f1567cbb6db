"""Arrivals: a blob version is validated, recorded once, and joins its model's open batch."""

from __future__ import annotations

import functools
import logging
from datetime import datetime
from enum import StrEnum

from retrain.errors import InputRejected, RemoteError, StateConflict
from retrain.ingest import check_name, route, validate
from retrain.ledger import Doc, arrival_key, member_key, model_key, run_key
from retrain.pipeline.batches import Batches
from retrain.pipeline.context import Context, dims
from retrain.pipeline.records import (
    batch_id,
    file_entry,
    holds,
    iso,
    new_model,
    open_batch,
)
from retrain.settings import ModelSpec
from retrain.storage import Appended, BlobHead, BlobUnreadable

log = logging.getLogger(__name__)

MAX_REJOINS = 10
"""How often an arrival may find its claimed batch closed before it gives up (and is retried)."""


class Arrival(StrEnum):
    """An arrival record's status, which is also what `on_blob` answers for it."""

    ACCEPTED = "accepted"
    REJECTED = "rejected"


class Arrivals:
    """The blob trigger's step, and the re-ingest the sweep and retrain-now go through."""

    def __init__(self, ctx: Context, batches: Batches) -> None:
        self._ctx = ctx
        self._batches = batches

    def on_blob(self, container: str, name: str) -> str:
        """Handle a blob arrival; returns what happened ('batched', 'rejected', 'duplicate', …).

        A new arrival on a warm instance costs three storage requests, whatever the size of its
        batch and however many instances take part: read the blob's first bytes, create its
        arrival record, append its entry to the batch's log. Opening a batch adds three writes
        (the log, the model document, the arrival record's claim) and the batch's check. The
        arrival record names the batch *before* the entry is appended, so a redelivery can
        tell where the first delivery may have got.
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
        claim = open_batch["id"] if open_batch else None
        record.update(status=Arrival.ACCEPTED.value, batch_id=claim)
        if not self._record_arrival(key, record):
            return self._arrived_again(spec, key, file, now)
        joined, _ = self.join(spec, key, file, claim, now=now)
        log.info(
            "arrival %s/%s: joined batch %s of %s",
            container,
            name,
            joined,
            spec.name,
            extra=dims(spec.name, joined),
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
        self,
        spec: ModelSpec,
        key: str,
        file: Doc,
        claim: str | None,
        *,
        now: datetime,
        replace: bool = False,
        check: bool = True,
    ) -> tuple[str, bool]:
        """Put `file` in batch `claim`, which its arrival record (`key`) names (None: no batch
        yet); returns the batch it is in for good and whether this call added it.

        The arrival record decides where the file goes: the file is appended only to the batch
        the record names, and the record moves on only by a conditional change from the batch
        it named, either from none to a batch that is open, or from a sealed batch whose run
        record (fixed once made) does not hold the file. So two deliveries of one arrival
        never put it in two batches whatever their order. An append the log took is in the
        batch for good (the seal seals the log before it reads it); one refused because the
        log is sealed joins the next batch, unless an earlier attempt got in before the seal.
        `replace`: the entry's marks win over an entry already there (a retrain-now's).
        `check`: a batch opened here sends its check (a retrain-now sends its own).
        """
        ctx, mkey = self._ctx, model_key(spec.name)
        state: Doc = {}
        for _ in range(MAX_REJOINS):
            if claim is None:
                claim = self.claim(spec, key, None, state.get("batch"), now, check=check)
                continue
            appended = self._batches.add(spec, claim, file, replace=replace)
            if appended is Appended.APPENDED:
                return claim, True
            state = ctx.ledger.get(mkey) or {}
            batch = state.get("batch")
            if appended is Appended.MISSING and batch is not None and batch["id"] == claim:
                if batch.get("log"):
                    self._batches.start_log(spec, claim)  # open without its log: made again
                    continue
                state, added = self._join_listed(spec, key, file, claim, replace=replace)
                batch = state.get("batch")
                if batch is not None and batch["id"] == claim:
                    return claim, added
            if self._sealed_with(spec, state, claim, file, now):
                return claim, False  # an earlier attempt got in before the seal
            # Sealed before the file got in (or the record names a batch an earlier release
            # never opened): the file belongs to the next batch.
            claim = self.claim(spec, key, claim, batch, now, check=check)
        raise StateConflict(f"{key}: batch of {spec.name} kept changing under the arrival")

    def _join_listed(
        self, spec: ModelSpec, key: str, file: Doc, claim: str, *, replace: bool
    ) -> tuple[Doc, bool]:
        """Join batch `claim`, opened by an earlier release (no log), the way that release
        did: a member record, which counts if the batch was still open when it was written
        (read after the write; that release's seal lists members after it closed the batch).
        Returns the model document read after the write and whether the record was new."""
        ledger = self._ctx.ledger
        added = ledger.put_entry(member_key(spec.name, claim, key), file, replace=replace)
        return ledger.get(model_key(spec.name)) or {}, added

    def _sealed_with(
        self, spec: ModelSpec, state: Doc, claim: str | None, file: Doc, now: datetime
    ) -> bool:
        """Whether batch `claim`, no longer open on `state`, was sealed with `file` in it (its
        run record, made here from the sealed log if no one made it yet)."""
        if claim is None:
            return False
        sealed = state.get("sealed") or {}
        if sealed.get("id") == claim:
            run: Doc | None = self._batches.run_of(spec, sealed, now)
        else:
            run = self._ctx.ledger.get(run_key(spec.name, claim), remember=False)
        return run is not None and holds(self._batches.files_of(run), file)

    def claim(
        self,
        spec: ModelSpec,
        key: str,
        expected: str | None,
        batch: Doc | None,
        now: datetime,
        *,
        check: bool,
    ) -> str | None:
        """Move the arrival record from batch `expected` to the open batch (`batch`, or one
        opened now); returns the batch the record names after (another delivery's choice if
        it moved the record first)."""
        target = batch["id"] if batch is not None else self.open(spec, key, now, check=check)
        record, _ = self._ctx.ledger.update(
            key, lambda r: {**r, "batch_id": target} if r.get("batch_id") == expected else None
        )
        found = record.get("batch_id")
        return str(found) if found else None

    def open(self, spec: ModelSpec, key: str, now: datetime, *, check: bool = True) -> str:
        """The model's open batch: the one open, or one opened now by arrival `key` (which
        then sends its check, unless `check` is False)."""
        ctx = self._ctx
        new_id = batch_id(now)
        # The log first: an arrival that finds the batch open finds its log.
        self._batches.start_log(spec, new_id)
        state, opened = ctx.ledger.update(
            model_key(spec.name),
            functools.partial(open_batch, new_id=new_id, now=now, opener=key),
            initial=new_model(spec),
        )
        if opened and check:
            ctx.schedule_check(spec, state["batch"], now)
        return str(state["batch"]["id"])

    def _arrived_again(self, spec: ModelSpec, key: str, file: Doc, now: datetime) -> str:
        """A second delivery of a recorded arrival: finish what the first one may not have."""
        ctx = self._ctx
        existing = ctx.ledger.get(key) or {}
        claim = existing.get("batch_id")
        if existing.get("status") == Arrival.REJECTED:
            return "duplicate"
        state = ctx.ledger.get(model_key(spec.name)) or {}
        batch = state.get("batch")
        if batch is not None and batch.get("opened_by") == key:
            # Opening a batch sends its check after the write; the first delivery may have
            # died in between. A second check is harmless (the first to act wins).
            ctx.schedule_check(spec, batch, now)
        if batch is not None and batch["id"] == claim:
            if holds(self._batches.members(spec, batch), file):
                log.info("arrival %s@%s: duplicate event ignored", file["name"], file["etag"])
                return "duplicate"
        elif self._sealed_with(spec, state, claim, file, now):
            log.info("arrival %s@%s: duplicate event ignored", file["name"], file["etag"])
            return "duplicate"
        elif claim is not None:
            # Its batch was sealed without it: it moves to the open batch before it is added
            # anywhere (a log left unsealed by an earlier release's seal takes no more).
            claim = self.claim(spec, key, claim, batch, now, check=True)
        joined, _ = self.join(spec, key, file, claim, now=now)
        log.warning(
            "arrival %s@%s: redelivered before it reached a batch; added to %s",
            file["name"],
            file["etag"],
            joined,
            extra=dims(spec.name, joined),
        )
        return "batched"

    def claimed_files(
        self, spec: ModelSpec, state: Doc, claim: str
    ) -> tuple[list[Doc] | None, bool]:
        """The files of batch `claim` (its run's, else its members while open or just sealed;
        None if it never opened) and whether they are its run's."""
        run = self._ctx.ledger.get(run_key(spec.name, claim), remember=False)
        if run is not None:
            return self._batches.files_of(run), True
        for pointer in (state.get("batch") or {}, state.get("sealed") or {}):
            if pointer.get("id") == claim:
                return self._batches.members(spec, pointer), False
        return None, False

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
