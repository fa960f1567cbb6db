"""The ledger: arrivals, model state and run records as JSON documents with conditional writes."""

from __future__ import annotations

import copy
import hashlib
import secrets
import threading
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from retrain.documents import check_write
from retrain.errors import DocumentMissing, PermanentError, StateConflict
from retrain.storage import Appended, DocumentStore, Log, Versioned, normalize_etag

Doc = dict[str, Any]
Mutation = Callable[[Doc], Doc | None]
"""Gets a private copy of the document; returns it changed, or None to leave it as it is."""

MAX_ATTEMPTS = 25
LOCK_STRIPES = 64
WRITE_ID = "write_id"
"""Every document the ledger writes carries the id of the write that made that version. A write
whose answer was lost (the service stored it, the connection dropped, and the storage SDK's
retry of the conditional request was refused: 412 or 409) reads the document back and finds
its own id: it landed, and the caller is told so, not that another instance got there first."""


def _stamped(doc: Doc) -> tuple[Doc, str]:
    """`doc` with a new write id, and that id."""
    stamp = secrets.token_hex(8)
    return {**doc, WRITE_ID: stamp}, stamp


def _plain(doc: Doc) -> Doc:
    """`doc` as the steps see it: without the write id (the next write replaces it)."""
    doc.pop(WRITE_ID, None)
    return doc


def arrival_key(container: str, name: str, etag: str) -> str:
    """One arrival per blob version: a re-upload gets a new ETag, a duplicate event does not.

    The ETag is hashed in its quoted form whatever form it is given in: records written before
    ETags were normalised were keyed on the quoted ETag of a download, and are found as they are.
    """
    quoted = f'"{normalize_etag(etag)}"'
    digest = hashlib.sha256(f"{container}/{name}@{quoted}".encode()).hexdigest()
    return f"arrivals/{digest}.json"


def model_key(model: str) -> str:
    """The model's state: open batch, active run, champion."""
    return f"models/{model}.json"


def run_key(model: str, run_id: str) -> str:
    """One run's record."""
    return f"runs/{model}/{run_id}.json"


def manifest_key(model: str, run_id: str) -> str:
    """The files of a run's sealed batch, written once when the run is recorded."""
    return f"manifests/{model}/{run_id}.json"


def members_prefix(model: str, batch_id: str) -> str:
    """Where a batch's member records are: one per file version that joined it."""
    return f"batches/{model}/{batch_id}/"


def member_key(model: str, batch_id: str, arrival: str) -> str:
    """The member record of the version whose arrival record is `arrival` (an arrival_key)."""
    return members_prefix(model, batch_id) + arrival.removeprefix("arrivals/")


def log_key(model: str, batch_id: str, segment: int = 0) -> str:
    """Segment `segment` of a batch's membership log: each file version that joins the batch
    appends itself; when a segment is full the next one takes over."""
    return f"logs/{model}/{batch_id}/{segment:05d}.jsonl"


class Ledger:
    """Reads and changes documents only through compare-and-swap loops.

    Every write is checked first (`retrain.documents.check_write`): a document without its
    record's shape, or a run moved between states the state table does not connect, is refused
    with a PermanentError and nothing is stored.

    It remembers the last version of each document it read or wrote (up to `remember`): an
    update on a warm instance first tries that version's ETag and so costs one write instead of
    a read and a write. A stale version fails the condition and the update starts over from a
    fresh read, so the cache can cost a wasted write, never a wrong one.
    """

    def __init__(self, store: DocumentStore, *, remember: int = 256) -> None:
        self.store = store
        self._remember = remember
        self._known: OrderedDict[str, Versioned] = OrderedDict()
        self._lock = threading.Lock()
        # Concurrent invocations on one instance take turns per document instead of racing
        # each other's conditional writes (a lost race costs a read and a write).
        self._turns = [threading.Lock() for _ in range(LOCK_STRIPES)]

    def _keep(self, key: str, doc: Doc, etag: str) -> None:
        with self._lock:
            self._known[key] = Versioned(doc, etag)
            self._known.move_to_end(key)
            while len(self._known) > self._remember:
                self._known.popitem(last=False)

    def _forget(self, key: str) -> None:
        with self._lock:
            self._known.pop(key, None)

    def known(self, key: str) -> Doc | None:
        """A private copy of the last version this instance read or wrote (maybe stale), or None."""
        with self._lock:
            found = self._known.get(key)
        return _plain(copy.deepcopy(found.doc)) if found else None

    def get(self, key: str, *, remember: bool = True) -> Doc | None:
        """The current document, or None. `remember=False` for scans that would otherwise push
        the hot documents out of memory."""
        found = self.store.read(key)
        if found is None:
            self._forget(key)
            return None
        if remember:
            self._keep(key, copy.deepcopy(found.doc), found.etag)
        return _plain(found.doc)

    def create(self, key: str, doc: Doc) -> bool:
        """Create `key` if absent; False when it already existed (before this call: a create
        of this call whose answer was lost is found by its write id)."""
        check_write(key, None, doc)
        doc, stamp = _stamped(doc)
        try:
            etag = self.store.create(key, doc)
        except StateConflict:
            found = self.store.read(key)
            if found is None or found.doc.get(WRITE_ID) != stamp:
                return False
            etag = found.etag
        self._keep(key, copy.deepcopy(doc), etag)
        return True

    def put_entry(self, key: str, entry: Doc, *, replace: bool = False) -> bool:
        """Write a small record that `entries` lists (create-only unless `replace`); False when
        create-only found one. Not remembered: nothing reads one back alone."""
        check_write(key, None, entry)
        return self.store.put_entry(key, entry, replace=replace)

    def entries(self, prefix: str) -> list[Doc]:
        """Every small record under `prefix`, from one listing."""
        return [entry for _, entry in self.store.entries(prefix)]

    def start_log(self, key: str) -> bool:
        """Create the empty log `key` unless it exists; False when it did."""
        return self.store.start_log(key)

    def append(self, key: str, entry: Doc) -> Appended:
        """Add `entry` (checked like a document under `key`) at the end of log `key`."""
        check_write(key, None, entry)
        return self.store.append(key, entry)

    def seal_log(self, key: str) -> bool:
        """Make log `key` read-only for good; False when there is none."""
        return self.store.seal_log(key)

    def read_log(self, key: str) -> Log | None:
        """Log `key` as it is now (not remembered), or None."""
        return self.store.read_log(key)

    def update(self, key: str, mutate: Mutation, *, initial: Doc | None = None) -> tuple[Doc, bool]:
        """Apply `mutate` atomically; returns the resulting document and whether it changed.

        A missing document starts from `initial` (DocumentMissing without one). Lost races
        re-read and re-apply.
        """
        stripe = int(hashlib.blake2b(key.encode(), digest_size=2).hexdigest(), 16)
        with self._turns[stripe % LOCK_STRIPES]:
            return self._update(key, mutate, initial)

    def _update(self, key: str, mutate: Mutation, initial: Doc | None) -> tuple[Doc, bool]:
        with self._lock:
            known = self._known.get(key)
        tried: str | None = None  # the write id of a write refused as conflicting
        if known is not None:
            changed = mutate(_plain(copy.deepcopy(known.doc)))
            # "Nothing to do" on a copy that may be stale proves nothing: decide again below.
            # Neither does a refused write: the stale copy may be what made it wrong.
            if changed is not None and self._allowed(key, known.doc, changed):
                changed, stamp = _stamped(changed)
                try:
                    etag = self.store.replace(key, changed, known.etag)
                except StateConflict:
                    self._forget(key)
                    tried = stamp
                else:
                    self._keep(key, copy.deepcopy(changed), etag)
                    return _plain(changed), True
        for _ in range(MAX_ATTEMPTS):
            found = self.store.read(key)
            version: str | None = None
            if found is None:
                if initial is None:
                    raise DocumentMissing(f"{key} does not exist")
                current = copy.deepcopy(initial)
            else:
                current, version = found.doc, found.etag
                self._keep(key, copy.deepcopy(current), version)
                if tried is not None and current.get(WRITE_ID) == tried:
                    return _plain(current), True  # the refused write was this one's, answer lost
            changed = mutate(_plain(copy.deepcopy(current)))
            if changed is None:
                return _plain(current), False
            check_write(key, None if version is None else current, changed)
            changed, tried = _stamped(changed)
            try:
                if version is None:
                    new_etag = self.store.create(key, changed)
                else:
                    new_etag = self.store.replace(key, changed, version)
            except StateConflict:
                continue
            self._keep(key, copy.deepcopy(changed), new_etag)
            return _plain(changed), True
        raise StateConflict(f"{key}: gave up after {MAX_ATTEMPTS} conflicting writes")

    @staticmethod
    def _allowed(key: str, before: Doc, after: Doc) -> bool:
        try:
            check_write(key, before, after)
        except PermanentError:
            return False
        return True
