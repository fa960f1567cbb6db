"""Batch membership as records of each arrival's own: the seal is exact under every order."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from retrain.ledger import Ledger, model_key
from retrain.messages import CheckBatch
from retrain.pipeline import Retrainer
from tests.harness import World, left_as


def _check(w: World) -> CheckBatch:
    checks = [m for _, m, _ in w.outbox.take() if isinstance(m, CheckBatch)]
    assert checks
    return checks[-1]


def _second_instance(w: World) -> Retrainer:
    """The same pipeline on another instance: its own ledger cache over the same storage."""
    return Retrainer(dataclasses.replace(w.retrainer._ctx, ledger=Ledger(w.store)))


def _file_names(run: dict[str, Any]) -> list[str]:
    return sorted(f["name"] for f in run["files"])


class TestTheSealRace:
    def test_a_member_written_after_the_seals_listing_joins_the_next_batch(self) -> None:
        """Instance A still remembers batch 1 open; instance B sealed it and recorded its run
        before A's member landed. A's file must go to batch 2, not be lost and not be in both."""
        w = World()
        w.drop("housing/a.csv")
        check = _check(w)
        other = _second_instance(w)
        w.data.put("data", "housing/late.csv", "rooms,price\n1,2\n")
        w.clock.advance(seconds=61)
        assert other.on_check_batch(check) == "sealed"  # A's cache still says batch 1 is open
        assert w.retrainer.on_blob("data", "housing/late.csv") == "batched"
        assert _file_names(w.run()) == ["housing/a.csv"]
        assert w.batch_files() == ["housing/late.csv"]
        state = w.ledger.get(model_key("housing"))
        assert state is not None
        assert state["batch"]["id"] != w.run()["run_id"]

    def test_a_member_written_between_the_seal_and_its_listing_is_in_this_run(self) -> None:
        """Instance B closed the batch and died before recording its run; instance A, which still
        remembers the batch open, wrote its member in between: A finds the batch sealed and
        records the run itself, with its file."""
        w = World()
        w.drop("housing/a.csv")
        check = _check(w)
        other = _second_instance(w)
        w.clock.advance(seconds=61)
        w.store.crash_before = ("create", "runs/")
        with pytest.raises(RuntimeError, match="crashed"):
            other.on_check_batch(check)
        w.data.put("data", "housing/c.csv", "rooms,price\n1,2\n")
        assert w.retrainer.on_blob("data", "housing/c.csv") == "batched"
        (run,) = w.retrainer.runs("housing")
        assert _file_names(run) == ["housing/a.csv", "housing/c.csv"]
        assert w.batch_files() == []
        # The check's redelivery finds the run recorded and hands it on.
        assert other.on_check_batch(check) == "resent"
        assert len(w.retrainer.runs("housing")) == 1

    def test_a_batch_whose_opener_died_before_joining_it_closes_empty(self) -> None:
        """Nothing waits on a batch no file joined: at its quiet end it is sealed with no
        file, its run ends at once (superseded, never trained), and the opener's
        redelivery joins the next batch."""
        w = World()
        w.store.crash_before = ("put_entry", "batches/")
        with pytest.raises(RuntimeError, match="crashed"):
            w.drop("housing/a.csv")
        check = _check(w)
        w.clock.advance(seconds=61)
        assert w.retrainer.on_check_batch(check) == "sealed"
        (empty,) = w.retrainer.runs("housing")
        assert (empty["state"], empty["files"], empty["job_id"]) == ("superseded", [], None)
        assert w.deliver() == ["superseded"]  # its train message frees the model
        assert w.retrainer.on_blob("data", "housing/a.csv") == "batched"  # the redelivery
        w.clock.advance(seconds=61)
        assert w.deliver()[0] == "sealed"
        run = w.retrainer.runs("housing")[-1]
        assert run["run_id"] != empty["run_id"]
        assert _file_names(run) == ["housing/a.csv"]


class TestCheckCost:
    def test_a_check_reads_the_batch_in_one_listing_and_wakes_early_once(self) -> None:
        w = World()
        w.drop("housing/a.csv")
        check = _check(w)
        w.clock.advance(seconds=50)
        for i in range(20):
            w.drop(f"housing/{i:02}.csv")
        w.clock.advance(seconds=11)  # the opener's check is due; the batch is not quiet
        w.store.calls.clear()
        assert w.retrainer.on_check_batch(check) == "waiting"
        assert [op for op, _ in w.store.calls].count("entries") == 1
        (later,) = [m for _, m, _ in w.outbox.take()]
        # A duplicate of the early check changes nothing and sends nothing.
        assert w.retrainer.on_check_batch(check) == "waiting"
        assert w.outbox.sent == []
        w.clock.advance(seconds=60)
        assert isinstance(later, CheckBatch)
        assert w.retrainer.on_check_batch(later) == "sealed"
        assert len(w.run()["files"]) == 21


def test_a_batch_listed_on_the_model_document_by_an_earlier_release_keeps_its_files() -> None:
    """An open batch written before member records: its files stay in the pointer, later
    arrivals add members, and the run holds both."""
    w = World()
    w.drop("housing/a.csv")
    check = _check(w)
    (member,) = w.store.keys("batches/")
    entry = w.store.docs.pop(member)[0]
    left_as(w, model_key("housing"), lambda d: {**d, "batch": {**d["batch"], "files": [entry]}})
    w.drop("housing/b.csv")
    assert w.batch_files() == ["housing/a.csv", "housing/b.csv"]
    w.clock.advance(seconds=61)
    assert w.retrainer.on_check_batch(check) == "sealed"
    assert _file_names(w.run()) == ["housing/a.csv", "housing/b.csv"]
