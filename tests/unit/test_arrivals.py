"""Arrivals: what one costs, and how a redelivery finishes what a dead delivery started."""

from __future__ import annotations

import json
from typing import Any

import pytest

from retrain.errors import DocumentMissing
from retrain.ledger import WRITE_ID, Ledger, arrival_key, model_key
from retrain.messages import CheckBatch
from retrain.pipeline.records import iso
from tests.fakes import MemoryDocumentStore
from tests.harness import World


def _arrival(w: World, name: str) -> dict[str, Any]:
    head = w.data.head("data", name)
    assert head is not None
    doc = w.ledger.get(arrival_key("data", name, head.etag))
    assert doc is not None
    return doc


def _batch(w: World) -> dict[str, Any]:
    state = w.ledger.get(model_key("housing"))
    assert state is not None
    batch: dict[str, Any] = state["batch"]
    return batch


def _crash(w: World, op: str, prefix: str, name: str) -> None:
    w.store.crash_before = (op, prefix)
    with pytest.raises(RuntimeError, match="crashed"):
        w.drop(name)


class TestCost:
    def test_a_warm_arrival_writes_only_records_of_its_own(self) -> None:
        """Arrival record, an append to the batch's log: never a write of a document another
        arrival writes too, and no condition on the append, so instances do not contend."""
        w = World()
        w.drop("housing/a.csv")
        w.store.calls.clear()
        w.drop("housing/b.csv")
        assert [op for op, _ in w.store.calls] == ["create", "append"]
        assert len(w.outbox.sent) == 1  # the opener's check only

    def test_the_cost_of_an_arrival_does_not_grow_with_its_batch(self) -> None:
        w = World()
        for i in range(200):
            w.drop(f"housing/{i:03}.csv")
        w.store.calls.clear()
        w.drop("housing/last.csv")
        ops = w.store.calls
        assert [op for op, _ in ops] == ["create", "append"]
        model = w.store.docs[model_key("housing")][0]
        assert len(json.dumps(model)) < 1000  # pointers only, no file list
        assert len(w.batch_files()) == 201

    def test_a_cold_instance_reads_the_model_state_once(self) -> None:
        w = World()
        w.drop("housing/a.csv")
        w.retrainer._ctx.ledger = Ledger(w.store)  # a new instance: nothing remembered
        w.store.calls.clear()
        w.drop("housing/b.csv")
        w.drop("housing/c.csv")
        ops = [op for op, _ in w.store.calls]
        assert ops == ["read", "create", "append", "create", "append"]


class TestRedelivery:
    def test_died_before_opening_the_batch_the_redelivery_opens_it(self) -> None:
        w = World()
        _crash(w, "create", "models/", "housing/a.csv")
        assert _arrival(w, "housing/a.csv")["batch_id"] is None  # recorded in no batch yet
        assert w.outbox.sent == []
        assert w.retrainer.on_blob("data", "housing/a.csv") == "batched"
        claimed = _arrival(w, "housing/a.csv")["batch_id"]
        assert _batch(w)["id"] == claimed
        assert w.batch_files() == ["housing/a.csv"]
        ((_, check, _),) = w.outbox.sent
        assert isinstance(check, CheckBatch)
        assert check.batch_id == claimed

    def test_died_before_joining_a_batch_since_sealed_goes_into_the_next(self) -> None:
        w = World()
        w.drop("housing/a.csv")
        first = _batch(w)["id"]
        _crash(w, "append", "logs/", "housing/b.csv")
        assert _arrival(w, "housing/b.csv")["batch_id"] == first
        assert w.deliver() == ["sealed"]  # the batch closes without b
        assert w.retrainer.on_blob("data", "housing/b.csv") == "batched"
        second = _batch(w)
        assert second["id"] != first
        assert w.batch_files() == ["housing/b.csv"]
        assert _arrival(w, "housing/b.csv")["batch_id"] == second["id"]
        assert [f["name"] for f in w.files()] == ["housing/a.csv"]

    def test_an_opener_that_died_before_sending_its_check_sends_it_when_redelivered(
        self, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        w = World()

        def die(*_: Any, **__: Any) -> None:
            raise RuntimeError("crashed before send")

        monkeypatch.setattr(w.outbox, "send", die)
        with pytest.raises(RuntimeError, match="crashed"):
            w.drop("housing/a.csv")
        monkeypatch.undo()
        # It died after opening the batch, before its member record: the redelivery adds it.
        assert w.retrainer.on_blob("data", "housing/a.csv") == "batched"
        assert w.deliver() == ["sealed"]

    def test_a_duplicate_of_a_joiner_sends_nothing(self) -> None:
        w = World()
        w.drop("housing/a.csv")
        w.drop("housing/b.csv")
        w.outbox.take()
        assert w.retrainer.on_blob("data", "housing/b.csv") == "duplicate"
        assert w.outbox.sent == []
        assert len(w.batch_files()) == 2

    def test_a_duplicate_after_its_batch_ran_is_not_trained_again(self) -> None:
        w = World()
        w.drop("housing/a.csv")
        assert w.deliver() == ["sealed"]
        assert w.retrainer.on_blob("data", "housing/a.csv") == "duplicate"
        state = w.ledger.get(model_key("housing"))
        assert state is not None
        assert state["batch"] is None
        assert not any(isinstance(m, CheckBatch) for _, m, _ in w.outbox.sent)


class TestRememberedVersions:
    def test_a_stale_version_costs_a_write_never_a_wrong_one(self) -> None:
        store = MemoryDocumentStore()
        mine, theirs = Ledger(store), Ledger(store)
        mine.create("k", {"n": 0})
        theirs.update("k", lambda d: {**d, "n": d["n"] + 1})
        doc, changed = mine.update("k", lambda d: {**d, "n": d["n"] + 1})
        assert changed
        assert doc == {"n": 2}
        found = store.read("k")
        assert found is not None
        assert {k: v for k, v in found.doc.items() if k != WRITE_ID} == doc

    def test_nothing_to_do_on_a_stale_version_is_decided_again_on_a_fresh_one(self) -> None:
        store = MemoryDocumentStore()
        mine, theirs = Ledger(store), Ledger(store)
        mine.create("k", {"open": False})
        theirs.update("k", lambda d: {**d, "open": True})
        doc, changed = mine.update("k", lambda d: {**d, "done": True} if d["open"] else None)
        assert changed
        assert doc == {"open": True, "done": True}

    def test_memory_is_bounded(self) -> None:
        ledger = Ledger(MemoryDocumentStore(), remember=2)
        for key in "abc":
            ledger.create(key, {})
        assert ledger.known("a") is None
        assert ledger.known("c") == {}

    def test_a_document_deleted_under_a_remembered_version_starts_from_initial(self) -> None:
        store = MemoryDocumentStore()
        ledger = Ledger(store)
        ledger.create("k", {"n": 5})
        del store.docs["k"]
        doc, _ = ledger.update("k", lambda d: {**d, "n": d["n"] + 1}, initial={"n": 0})
        assert doc == {"n": 1}
        with pytest.raises(DocumentMissing, match="missing does not exist"):
            Ledger(store).update("missing", lambda d: d)


def test_a_concurrent_delivery_that_finds_its_batch_sealed_opens_no_second() -> None:
    """Two deliveries of one arrival: the first joined batch X and X was sealed before the
    second's write. The second must see the file in X, not put it in another batch."""
    w = World()
    w.drop("housing/a.csv")
    record = _arrival(w, "housing/a.csv")
    assert w.deliver() == ["sealed"]
    head = w.data.head("data", "housing/a.csv")
    assert head is not None
    file = {
        "name": "housing/a.csv",
        "etag": head.etag,
        "size": head.size,
        "arrived_at": iso(w.clock.now()),
    }
    joined, added = w.retrainer._arrivals.join(
        w.spec,
        arrival_key("data", "housing/a.csv", head.etag),
        file,
        record["batch_id"],
        now=w.clock.now(),
    )
    assert (joined, added) == (record["batch_id"], False)
    state = w.ledger.get(model_key("housing"))
    assert state is not None
    assert state["batch"] is None


def test_the_sweep_finishes_an_arrival_whose_retries_ran_out() -> None:
    """Recorded, never added, never redelivered (the host gave up): the sweep adds it, and
    leaves arrivals that are in their batch or their run alone."""
    w = World()
    w.drop("housing/a.csv")
    assert w.deliver() == ["sealed"]
    _crash(w, "append", "logs/", "housing/b.csv")
    assert w.retrainer.sweep()["blobs"] == 1
    assert w.batch_files() == ["housing/b.csv"]
    assert _arrival(w, "housing/b.csv")["batch_id"] == _batch(w)["id"]
    assert w.retrainer.sweep()["blobs"] == 0
