"""A poisoned message is always kept, whatever its body says."""

from __future__ import annotations

import json
import posixpath
from typing import Any

from retrain.storage import Versioned
from tests.fakes import MemoryDocumentStore
from tests.harness import World


class ResolvingStore(MemoryDocumentStore):
    """Resolves '.' and '..' in keys, as a blob URL path does on its way to the service."""

    def read(self, key: str) -> Versioned | None:
        return super().read(posixpath.normpath(key))

    def create(self, key: str, doc: dict[str, Any]) -> str:
        return super().create(posixpath.normpath(key), doc)

    def replace(self, key: str, doc: dict[str, Any], etag: str) -> str:
        return super().replace(posixpath.normpath(key), doc, etag)


def world() -> World:
    w = World()
    w.store = ResolvingStore()
    w.ledger.store = w.store
    w.retrainer._ctx.ledger = w.ledger
    return w


def kept(w: World) -> list[dict[str, Any]]:
    return [w.store.docs[k][0] for k in w.store.docs if k.startswith("poison/")]


def test_a_forged_run_id_is_kept_with_its_parse_error_and_touches_no_other_document() -> None:
    w = world()
    w.drop("housing/a.csv")  # the model document exists, as it does in a live account
    before = {k: v for k, v in w.store.docs.items()}
    body = json.dumps(
        {"version": 1, "kind": "track-run", "model": "housing", "run_id": "../../models/housing"}
    ).encode()
    assert w.retrainer.on_poison("jobs", body) == "recorded"
    (record,) = kept(w)
    assert record["body"] == body.decode()
    assert record["replayed"] is False
    assert "cannot be parsed" in record["reason"]
    assert "run_id" in record["reason"]
    assert record["run_id"] is None
    assert {k: v for k, v in w.store.docs.items() if not k.startswith("poison/")} == before
    assert not any(".." in key for _, key in w.store.calls)


def test_a_message_for_a_model_that_is_not_configured_is_kept() -> None:
    w = world()
    body = b'{"version": 1, "kind": "track-run", "model": "other", "run_id": "r1"}'
    assert w.retrainer.on_poison("jobs", body) == "recorded"
    (record,) = kept(w)
    assert "model 'other' is not configured" in record["reason"]


def test_a_body_that_is_not_json_is_kept() -> None:
    w = world()
    assert w.retrainer.on_poison("evals", b"\xff\xfe not json") == "recorded"
    (record,) = kept(w)
    assert "cannot be parsed" in record["reason"]


def parked_then_poisoned() -> tuple[World, str]:
    """A run waiting for approval whose evaluate message went to poison (it failed on every
    delivery after the run was parked)."""
    from localdev.sample import housing_csv
    from retrain.messages import EvaluateRun

    w = World(promotion="manual")
    w.drop("housing/a.csv", housing_csv(10, seed=1))
    for _ in range(3):
        w.deliver()
    w.evaluation("Root Mean Squared Error\n2.5\n")
    w.deliver()
    run_id = w.run()["run_id"]
    assert w.run()["state"] == "awaiting_approval"
    body = EvaluateRun(model="housing", run_id=run_id).model_dump_json().encode()
    assert w.retrainer.on_poison("evals", body) == "failed"
    return w, run_id


def test_a_failed_parked_run_no_longer_waits_and_its_replay_parks_it_without_the_model() -> None:
    from retrain.ledger import model_key

    w, run_id = parked_then_poisoned()
    state = w.ledger.get(model_key("housing"))
    assert state is not None
    assert state["awaiting_approval"] is None  # failed: it waits for no one
    assert len(w.retrainer.replay_poison()) == 1
    assert w.run()["state"] == "awaiting_approval"
    state = w.ledger.get(model_key("housing"))
    assert state is not None
    assert (state["awaiting_approval"], state["active_run"]) == (run_id, None)


def test_a_record_that_cannot_be_replayed_is_kept_with_why_and_the_rest_are_replayed() -> None:
    from retrain.ledger import model_key

    w, _ = parked_then_poisoned()
    w.ledger.update(model_key("housing"), lambda d: {**d, "awaiting_approval": "another-run"})
    from retrain.messages import TrackRun

    other = TrackRun(model="housing", run_id="gone-run").model_dump_json().encode()
    w.retrainer.on_poison("jobs", other)  # a second record, replayable as it is
    assert len(w.retrainer.replay_poison()) == 1
    refused = [r for r in kept(w) if not r["replayed"]]
    assert len(refused) == 1
    assert "another-run of housing waits for approval" in refused[0]["replay_refused"]


def test_a_record_with_an_unknown_state_is_kept_and_touches_no_run() -> None:
    from retrain.ledger import model_key

    w, _ = parked_then_poisoned()
    (key,) = [k for k in w.store.docs if k.startswith("poison/")]
    w.ledger.update(key, lambda d: {**d, "state_before": "bogus"})
    assert w.retrainer.replay_poison() == []
    (record,) = kept(w)
    assert "not a run state" in record["replay_refused"]
    assert w.run()["state"] == "failed"
    state = w.ledger.get(model_key("housing"))
    assert state is not None
    assert state["active_run"] is None
