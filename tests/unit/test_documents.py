"""The ledger's typed records: documents written by earlier releases load and keep working, and
the ledger refuses a document without its shape or a run moved against the state table."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from retrain.documents import FileVersion, Run, load, schema_of
from retrain.errors import DocumentInvalid, IllegalTransition, PermanentError
from retrain.ledger import Ledger, model_key, run_key
from retrain.ports import ModelRef
from tests.fakes import MemoryDocumentStore
from tests.harness import World, latest_run

CORPUS = Path(__file__).parent.parent / "fixtures" / "ledger-v1"
"""Documents as the release before typed records wrote them: one folder per situation (a
rollback and a rejected and a forced run; a restored failed deploy; a run parked for approval;
a failed job, an open batch and poison records), each a tree of ledger keys."""


def corpus(situation: str) -> dict[str, dict[str, Any]]:
    root = CORPUS / situation
    return {
        path.relative_to(root).as_posix(): json.loads(path.read_text(encoding="utf-8"))
        for path in sorted(root.rglob("*.json"))
    }


SITUATIONS = sorted(p.name for p in CORPUS.iterdir())


def test_the_corpus_covers_every_kind_of_document_and_most_run_states() -> None:
    keys = [key for s in SITUATIONS for key in corpus(s)]
    assert {key.split("/")[0] for key in keys} == {"arrivals", "models", "poison", "runs", "sweeps"}
    states = {doc["state"] for s in SITUATIONS for k, doc in corpus(s).items() if "runs/" in k}
    assert states >= {"promoted", "rejected", "failed", "superseded", "awaiting_approval"}


@pytest.mark.parametrize("situation", SITUATIONS)
def test_old_documents_load_as_records_and_keep_every_field(situation: str) -> None:
    for key, doc in corpus(situation).items():
        record = load(key, doc)
        assert record.model_dump(mode="json", exclude_unset=True) == doc, key


def test_a_run_parked_by_the_old_release_is_approved_and_promoted() -> None:
    w = World(promotion="manual")
    for key, doc in corpus("manual").items():
        w.store.create(key, doc)
    parked = w.ledger.get(model_key("housing"))
    assert parked is not None
    run_id = parked["awaiting_approval"]
    assert w.retrainer.approve("housing", run_id, by="ops") == "promoting"
    assert w.deliver() == ["promoted"]
    state = w.ledger.get(model_key("housing"))
    assert state is not None
    assert state["champion"]["run_id"] == run_id
    assert w.target.serving == ModelRef.load(latest_run(w)["outputs"]["model"])


@pytest.mark.parametrize("situation", SITUATIONS)
def test_the_operators_queries_read_old_documents(situation: str) -> None:
    w = World()
    for key, doc in corpus(situation).items():
        w.store.create(key, doc)
    runs = w.retrainer.runs("housing")
    assert runs
    assert all(Run.model_validate(r).model == "housing" for r in runs)
    assert w.retrainer.model_state("housing")["model"] == "housing"


def test_a_file_versions_etag_compares_normalised() -> None:
    quoted = FileVersion(name="housing/a.csv", etag='"0x8DC"')
    assert quoted.version == FileVersion(name="housing/a.csv", etag="0x8DC").version


class TestTheLedgerRefuses:
    def ledger_with_run(self, state: str) -> tuple[Ledger, MemoryDocumentStore, str]:
        store = MemoryDocumentStore()
        ledger = Ledger(store)
        key = run_key("housing", "r1")
        run = {
            "run_id": "r1",
            "model": "housing",
            "state": "queued",
            "created_at": "2026-11-01T12:00:00+00:00",
            "history": [],
        }
        assert ledger.create(key, run)
        if state != "queued":
            found = store.read(key)
            assert found is not None
            store.replace(key, {**run, "state": state}, found.etag)
        return ledger, store, key

    def test_a_run_moved_against_the_table_and_stores_nothing(self) -> None:
        ledger, store, key = self.ledger_with_run("queued")
        with pytest.raises(IllegalTransition, match="from queued to promoted"):
            ledger.update(key, lambda d: {**d, "state": "promoted"})
        assert store.docs[key][0]["state"] == "queued"

    def test_a_finished_run_moved_back_even_from_a_stale_cached_copy(self) -> None:
        ledger, store, key = self.ledger_with_run("queued")
        found = store.read(key)
        assert found is not None
        store.replace(key, {**found.doc, "state": "promoted"}, found.etag)  # another instance
        # The cached copy says queued, where submitted is allowed; the stored run is promoted.
        with pytest.raises(IllegalTransition, match="from promoted to submitted"):
            ledger.update(key, lambda d: {**d, "state": "submitted"})
        assert store.docs[key][0]["state"] == "promoted"

    def test_a_new_run_that_does_not_start_at_the_beginning(self) -> None:
        ledger = Ledger(MemoryDocumentStore())
        doc = {
            "run_id": "r2",
            "model": "housing",
            "state": "running",
            "created_at": "2026-11-01T12:00:00+00:00",
            "history": [],
        }
        with pytest.raises(IllegalTransition, match="cannot start in running"):
            ledger.create(run_key("housing", "r2"), doc)

    @pytest.mark.parametrize(
        ("change", "named"),
        [
            (lambda d: {**d, "batch": {"id": "b", "files": []}}, "batch.opened_at"),
            (
                lambda d: {**d, "batch": {**BATCH, "files": [{"name": "housing/a.csv"}]}},
                "batch.files.0.etag",
            ),
            (lambda d: {**d, "champion": {"run_id": "r1"}}, "champion.model"),
            (lambda d: {**d, "active_since": "yesterday"}, "active_since"),
        ],
    )
    def test_a_model_document_without_its_shape_naming_the_field(
        self, change: Any, named: str
    ) -> None:
        store = MemoryDocumentStore()
        ledger = Ledger(store)
        key = model_key("housing")
        ledger.create(key, {"model": "housing", "batch": None, "active_run": None})
        with pytest.raises(DocumentInvalid, match=named) as refused:
            ledger.update(key, change)
        assert isinstance(refused.value, PermanentError)
        assert store.docs[key][0]["batch"] is None


NOON = "2026-11-01T12:00:00+00:00"
BATCH = {"id": "b", "opened_at": NOON, "last_at": NOON}


def test_only_ledger_documents_have_a_schema() -> None:
    assert schema_of("sweeps/housing.json") is None
    assert schema_of("runs/housing/r1.json") is Run
