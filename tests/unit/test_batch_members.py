"""Batch membership as entries of each arrival's own in the batch's log: the seal is exact
under every order, a full log hands over to the next segment, and batches opened by earlier
releases keep their files."""

from __future__ import annotations

import dataclasses
import json
import re
from typing import Any

import pytest

from localdev.sample import housing_csv
from retrain.errors import DocumentMissing
from retrain.ledger import Ledger, member_key, model_key
from retrain.messages import CheckBatch
from retrain.pipeline import Retrainer
from tests.harness import World, left_as, train_next


def _check(w: World) -> CheckBatch:
    checks = [m for _, m, _ in w.outbox.take() if isinstance(m, CheckBatch)]
    assert checks
    return checks[-1]


def _second_instance(w: World) -> Retrainer:
    """The same pipeline on another instance: its own ledger cache over the same storage."""
    return Retrainer(dataclasses.replace(w.retrainer._ctx, ledger=Ledger(w.store)))


def _open_batch(w: World) -> dict[str, Any]:
    state = w.ledger.get(model_key("housing"))
    assert state is not None
    batch: dict[str, Any] = state["batch"]
    return batch


def _file_names(w: World, run: dict[str, Any] | None = None) -> list[str]:
    return sorted(f["name"] for f in w.files(run))


def _sealer_dies_before(op: str, prefix: str) -> tuple[World, Retrainer, CheckBatch]:
    """Instance B's check closes batch 1 and dies before its `op` on `prefix`; instance A
    still remembers batch 1 open, and housing/c.csv is uploaded for A to ingest."""
    w = World()
    w.drop("housing/a.csv")
    check = _check(w)
    other = _second_instance(w)
    w.clock.advance(seconds=61)
    w.store.crash_before = (op, prefix)
    with pytest.raises(RuntimeError, match="crashed"):
        other.on_check_batch(check)
    w.data.put("data", "housing/c.csv", "rooms,price\n1,2\n")
    return w, other, check


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
        assert _file_names(w) == ["housing/a.csv"]
        assert w.batch_files() == ["housing/late.csv"]
        state = w.ledger.get(model_key("housing"))
        assert state is not None
        assert state["batch"]["id"] != w.run()["run_id"]

    def test_an_append_between_the_seal_and_the_logs_seal_is_in_this_run(self) -> None:
        """Instance B closed the batch and died before it sealed the log; instance A, which
        still remembers the batch open, appended in between: the file is in this batch (its
        arrival named it, the log took it), and the run made by the check's redelivery holds
        it."""
        w, other, check = _sealer_dies_before("seal_log", "logs/")
        assert w.retrainer.on_blob("data", "housing/c.csv") == "batched"
        assert w.retrainer.runs("housing") == []
        assert other.on_check_batch(check) == "resent"
        (run,) = w.retrainer.runs("housing")
        assert _file_names(w, run) == ["housing/a.csv", "housing/c.csv"]
        assert w.batch_files() == []

    def test_an_append_after_the_logs_seal_joins_the_next_batch_even_with_no_run_yet(
        self,
    ) -> None:
        """B sealed the log and died before recording the run: A's append is refused, A
        records the run itself (from the sealed log, without its file) and joins the next
        batch; the check's redelivery finds the run and hands it on."""
        w, other, check = _sealer_dies_before("create", "runs/")
        assert w.retrainer.on_blob("data", "housing/c.csv") == "batched"
        (run,) = w.retrainer.runs("housing")
        assert _file_names(w, run) == ["housing/a.csv"]
        assert w.batch_files() == ["housing/c.csv"]
        assert other.on_check_batch(check) == "resent"
        assert len(w.retrainer.runs("housing")) == 1

    def test_a_batch_whose_opener_died_before_joining_it_closes_empty(self) -> None:
        """Nothing waits on a batch no file joined: at its quiet end it is sealed with no
        file, its run ends at once (superseded, never trained), and the opener's
        redelivery joins the next batch."""
        w = World()
        w.store.crash_before = ("append", "logs/")
        with pytest.raises(RuntimeError, match="crashed"):
            w.drop("housing/a.csv")
        check = _check(w)
        w.clock.advance(seconds=61)
        assert w.retrainer.on_check_batch(check) == "sealed"
        (empty,) = w.retrainer.runs("housing")
        assert (empty["state"], w.files(empty), empty["job_id"]) == ("superseded", [], None)
        assert w.deliver() == ["superseded"]  # its train message frees the model
        assert w.retrainer.on_blob("data", "housing/a.csv") == "batched"  # the redelivery
        w.clock.advance(seconds=61)
        assert w.deliver()[0] == "sealed"
        run = w.retrainer.runs("housing")[-1]
        assert run["run_id"] != empty["run_id"]
        assert _file_names(w, run) == ["housing/a.csv"]


class TestCheckCost:
    def test_a_check_reads_the_batch_once_and_wakes_early_once(self) -> None:
        w = World()
        w.drop("housing/a.csv")
        check = _check(w)
        w.clock.advance(seconds=50)
        for i in range(20):
            w.drop(f"housing/{i:02}.csv")
        w.clock.advance(seconds=11)  # the opener's check is due; the batch is not quiet
        w.store.calls.clear()
        assert w.retrainer.on_check_batch(check) == "waiting"
        ops = [op for op, _ in w.store.calls]
        # One read of the log (and one listing of member records an earlier release's
        # instances may have written during a rolling upgrade).
        assert (ops.count("read_log"), ops.count("entries")) == (1, 1)
        (later,) = [m for _, m, _ in w.outbox.take()]
        # A duplicate of the early check changes nothing and sends nothing.
        assert w.retrainer.on_check_batch(check) == "waiting"
        assert w.outbox.sent == []
        w.clock.advance(seconds=60)
        assert isinstance(later, CheckBatch)
        assert w.retrainer.on_check_batch(later) == "sealed"
        assert len(w.files()) == 21


def _as_earlier_release(w: World, *, listed: bool) -> None:
    """The open batch as an earlier release opened it: no log; its file a member record
    (the previous release) or, with `listed`, in the pointer (the release before)."""
    (key,) = w.store.logs
    (entry,) = w.store.logs.pop(key)[0]
    batch = _open_batch(w)
    pointer = {k: v for k, v in batch.items() if k != "log"}
    if listed:
        pointer["files"] = [entry]
    else:
        member = member_key("housing", batch["id"], batch["opened_by"])
        w.store.docs[member] = (entry, "e0")
    left_as(w, model_key("housing"), lambda d: {**d, "batch": pointer})


@pytest.mark.parametrize("listed", [True, False], ids=["files-on-pointer", "member-records"])
def test_a_batch_opened_by_an_earlier_release_keeps_its_files(listed: bool) -> None:
    """An open batch without a log: later arrivals join it as that release did (member
    records, confirmed by a read of the model), and the run holds every file."""
    w = World()
    w.drop("housing/a.csv")
    check = _check(w)
    _as_earlier_release(w, listed=listed)
    w.store.calls.clear()
    w.drop("housing/b.csv")
    assert [op for op, _ in w.store.calls] == ["create", "append", "read", "put_entry", "read"]
    assert w.batch_files() == ["housing/a.csv", "housing/b.csv"]
    w.clock.advance(seconds=61)
    assert w.retrainer.on_check_batch(check) == "sealed"
    assert _file_names(w) == ["housing/a.csv", "housing/b.csv"]
    assert w.store.logs == {}  # no log was made for it


class TestFullLog:
    def test_a_full_segment_hands_over_and_the_seal_reads_every_segment(self) -> None:
        w = World()
        w.store.log_blocks = 3
        for i in range(7):
            w.drop(f"housing/{i}.csv")
        check = _check(w)
        opened = _open_batch(w)["id"]
        assert sorted(w.store.logs) == [f"logs/housing/{opened}/{n:05d}.jsonl" for n in range(3)]
        w.clock.advance(seconds=61)
        assert w.retrainer.on_check_batch(check) == "sealed"
        assert len(w.files()) == 7
        assert all(sealed for _, sealed in w.store.logs.values())

    def test_a_seal_leaves_no_segment_open_behind_a_full_one(self) -> None:
        """The last segment is exactly full at the seal: the seal makes the next one sealed,
        so a late arrival that finds the last one full is refused there, not taken in a
        batch already recorded."""
        w = World()
        w.store.log_blocks = 2
        w.drop("housing/a.csv")
        w.drop("housing/b.csv")
        check = _check(w)
        other = _second_instance(w)
        w.clock.advance(seconds=61)
        assert other.on_check_batch(check) == "sealed"
        assert len(w.store.logs) == 2  # the full one, and the next one made sealed
        w.data.put("data", "housing/late.csv", "rooms,price\n1,2\n")
        assert w.retrainer.on_blob("data", "housing/late.csv") == "batched"  # stale cache
        assert _file_names(w) == ["housing/a.csv", "housing/b.csv"]
        assert w.batch_files() == ["housing/late.csv"]


def test_a_log_line_that_is_not_json_is_named() -> None:
    from retrain.errors import DocumentInvalid
    from retrain.storage import parse_log

    assert parse_log("logs/x/1/00000.jsonl", b'{"name":"a"}\n{"name":"b"}\n') == [
        {"name": "a"},
        {"name": "b"},
    ]
    with pytest.raises(DocumentInvalid, match=r"logs/x/1/00000.jsonl: line 2 is not a JSON object"):
        parse_log("logs/x/1/00000.jsonl", b'{"name":"a"}\n[1]\n')


def test_a_redelivered_entry_keeps_the_first_and_a_retrain_nows_marks_win() -> None:
    from retrain.pipeline.records import fold_log

    first = {"name": "a", "etag": "1", "arrived_at": "2026-01-01T00:00:00+00:00"}
    again = {**first, "arrived_at": "2026-01-01T00:05:00+00:00"}
    asked = {**first, "requested": "manual", "replace": True}
    assert fold_log([first, again]) == [first]
    assert fold_log([first, again, asked]) == [{**first, "requested": "manual"}]


class TestBlobLogRefusals:
    """The adapter reads why an append was refused from the service's error code (a full log
    cannot be made on the local emulator: it does not count blocks)."""

    class Refusing:
        def __init__(self, code: Any, status: int) -> None:
            self.code, self.status = code, status

        def get_blob_client(self, key: str) -> Any:
            return self

        def append_block(self, body: bytes) -> None:
            from azure.core.exceptions import HttpResponseError, ResourceExistsError

            error = (ResourceExistsError if self.status == 409 else HttpResponseError)(
                message=self.code
            )
            error.error_code = self.code  # type: ignore[attr-defined]
            raise error

    @pytest.mark.parametrize(
        ("code", "as_enum", "result"),
        [
            ("BlockCountExceedsLimit", False, "full"),
            ("BlockCountExceedsLimit", True, "full"),
            ("BlobIsSealed", False, "sealed"),
        ],
    )
    def test_a_refusal_for_what_the_log_is_is_an_answer(
        self, code: str, as_enum: bool, result: str
    ) -> None:
        """The SDK gives a code it knows as a `StorageErrorCode` member (BlockCountExceedsLimit
        is one), and one it does not know as text (BlobIsSealed): both are read."""
        from azure.storage.blob import StorageErrorCode

        from retrain.storage import BlobDocumentStore

        given: Any = StorageErrorCode(code) if as_enum else code
        store = BlobDocumentStore.over(self.Refusing(given, 409))  # type: ignore[arg-type]
        assert store.append("logs/x/1/00000.jsonl", {"name": "a"}) == result

    def test_any_other_refusal_is_an_error_that_names_the_log(self) -> None:
        from retrain.errors import RemoteError
        from retrain.storage import BlobDocumentStore

        store = BlobDocumentStore.over(self.Refusing("ServerBusy", 503))  # type: ignore[arg-type]
        with pytest.raises(RemoteError, match=r"append to logs/x/1/00000\.jsonl"):
            store.append("logs/x/1/00000.jsonl", {"name": "a"})


class TestManifest:
    """A sealed batch's files are written once, as the run's manifest; the run record names
    it, so its updates do not copy the list."""

    @staticmethod
    def promoted_with(files: int) -> World:
        w = World()
        for i in range(files):
            w.drop(f"housing/{i:04d}.csv", housing_csv(10, seed=1))
        for _ in range(3):
            w.deliver()
        w.evaluation("Root Mean Squared Error\n2.5\n")
        assert w.deliver() == ["promoted"]
        return w

    def test_the_run_record_does_not_grow_with_the_batch(self) -> None:
        few, many = self.promoted_with(3), self.promoted_with(300)
        assert len(many.files()) == 300
        assert (few.run()["file_count"], many.run()["file_count"]) == (3, 300)
        size = [len(json.dumps(w.run())) for w in (few, many)]
        assert size[1] - size[0] < 20, size  # the counts' digits (3 vs 300, 0x3 vs 0x300)

    def test_the_manifest_is_written_once_and_every_run_update_leaves_it(self) -> None:
        w = self.promoted_with(5)
        manifest = w.run()["manifest"]
        writes = [op for op, key in w.store.calls if key == manifest and op != "read"]
        run_writes = [op for op, key in w.store.calls if key.startswith("runs/") and op != "read"]
        assert writes == ["create"]
        assert len(run_writes) > 5  # queued, submitted, polls, trained, promoting, promoted

    def test_a_rollback_run_names_the_manifest_of_the_run_it_restores(self) -> None:
        w = self.promoted_with(2)
        first = w.run()
        w.clock.advance(minutes=5)
        train_next(w, "housing/z.csv", seed=2, rmse=1.5)
        assert w.deliver() == ["promoted"]
        w.retrainer.rollback("housing", by="ops")
        (restore,) = [r for r in w.retrainer.runs("housing") if r.get("kind") == "rollback"]
        assert restore["manifest"] == first["manifest"]
        assert [f["name"] for f in w.files(restore)] == ["housing/0000.csv", "housing/0001.csv"]

    def test_a_run_recorded_before_manifests_keeps_its_files(self) -> None:
        """The previous release listed the files in the run record: a redelivery of one of
        them is a duplicate, and the sweep leaves it."""
        w = World()
        w.drop("housing/a.csv")
        w.deliver()
        run = w.run()
        files = w.files(run)
        older = {k: v for k, v in run.items() if k not in ("manifest", "file_count")}
        left_as(w, f"runs/housing/{run['run_id']}.json", lambda _: {**older, "files": files})
        del w.store.docs[run["manifest"]]
        assert w.files(w.run()) == files
        assert w.retrainer.on_blob("data", "housing/a.csv") == "duplicate"
        w.clock.advance(minutes=30)
        assert w.retrainer.sweep()["blobs"] == 0
        assert w.batch_files() == []

    def test_a_missing_manifest_is_an_error_that_names_it(self) -> None:
        w = World()
        w.drop("housing/a.csv")
        w.deliver()
        manifest = w.run()["manifest"]
        del w.store.docs[manifest]
        with pytest.raises(DocumentMissing, match=re.escape(manifest)):
            w.files()
