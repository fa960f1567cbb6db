"""The ledger: arrivals, model state and run records as JSON documents with conditional writes."""

from __future__ import annotations

import copy
import hashlib
from collections.abc import Callable
from typing import Any

from retrain.errors import StateConflict
from retrain.storage import DocumentStore

Doc = dict[str, Any]
Mutation = Callable[[Doc], Doc | None]
"""Gets a private copy of the document; returns it changed, or None to leave it as it is."""

MAX_ATTEMPTS = 25

TERMINAL = frozenset({"promoted", "rejected", "failed", "superseded"})


def arrival_key(container: str, name: str, etag: str) -> str:
    """One arrival per blob version: a re-upload gets a new ETag, a duplicate event does not."""
    digest = hashlib.sha256(f"{container}/{name}@{etag}".encode()).hexdigest()
    return f"arrivals/{digest}.json"


def model_key(model: str) -> str:
    """The model's state: open batch, active run, champion."""
    return f"models/{model}.json"


def run_key(model: str, run_id: str) -> str:
    """One run's record."""
    return f"runs/{model}/{run_id}.json"


class Ledger:
    """Reads and changes documents only through compare-and-swap loops."""

    def __init__(self, store: DocumentStore) -> None:
        self.store = store

    def get(self, key: str) -> Doc | None:
        """The current document, or None."""
        found = self.store.read(key)
        return found.doc if found else None

    def create(self, key: str, doc: Doc) -> bool:
        """Create `key` if absent; False when it already existed."""
        try:
            self.store.create(key, doc)
        except StateConflict:
            return False
        return True

    def update(self, key: str, mutate: Mutation, *, initial: Doc | None = None) -> tuple[Doc, bool]:
        """Apply `mutate` atomically; returns the resulting document and whether it changed.

        A missing document starts from `initial` (when given). Lost races re-read and re-apply.
        """
        for _ in range(MAX_ATTEMPTS):
            found = self.store.read(key)
            if found is None:
                if initial is None:
                    raise KeyError(key)
                current, etag = copy.deepcopy(initial), None
            else:
                current, etag = found.doc, found.etag
            changed = mutate(copy.deepcopy(current))
            if changed is None:
                return current, False
            try:
                if etag is None:
                    self.store.create(key, changed)
                else:
                    self.store.replace(key, changed, etag)
            except StateConflict:
                continue
            return changed, True
        raise StateConflict(f"{key}: gave up after {MAX_ATTEMPTS} conflicting writes")
