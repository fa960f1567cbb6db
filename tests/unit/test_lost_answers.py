"""Document writes whose answer was lost: the service stored the write, the connection dropped,
and the storage SDK's retry of the conditional request was refused (412 or 409). The writer must
learn that its write landed, not conclude that another instance got there first and stop."""

from __future__ import annotations

from localdev.sample import housing_csv
from retrain.bes import JobState
from retrain.ledger import WRITE_ID, Ledger
from retrain.messages import CheckBatch, TrackRun
from retrain.pipeline import Delivery
from tests.fakes import MemoryDocumentStore
from tests.harness import World


def _drive(lose_of: int | None = None) -> tuple[list[str], World]:
    """One file from its arrival to its promotion; the answer of write `lose_of` is lost."""
    w = World()
    w.store.lose_answer_of = lose_of
    results = [w.drop("housing/a.csv", housing_csv(10, seed=1))]
    for _ in range(3):
        results += w.deliver()
    w.evaluation("Root Mean Squared Error\n2.5\n")
    for _ in range(3):
        results += w.deliver()
    return results, w


def test_every_write_of_a_promotion_may_lose_its_answer() -> None:
    """Each document write of the whole pipeline in turn loses its answer: every time the run
    is promoted by the same deliveries, with one deploy, as when nothing was lost."""
    expected, clean = _drive()
    assert expected[-1] == "promoted"
    writes = clean.store.writes
    assert writes > 10
    differs = {}
    for n in range(writes):
        results, w = _drive(n)
        run = w.run()
        if results != expected or run["state"] != "promoted" or len(w.target.deploys) != 1:
            differs[n] = (results, run["state"], len(w.target.deploys))
    assert not differs, f"with the answer of write n lost (of {writes}): {differs}"


class TestLedger:
    def test_an_update_whose_answer_was_lost_landed_once(self) -> None:
        store = MemoryDocumentStore()
        ledger = Ledger(store)
        ledger.create("k", {"n": 0})
        store.lose_answer = ("replace", "k")
        doc, changed = ledger.update("k", lambda d: {**d, "n": d["n"] + 1})
        assert (doc, changed) == ({"n": 1}, True)
        found = store.read("k")
        assert found is not None
        assert found.doc["n"] == 1

    def test_a_create_whose_answer_was_lost_was_created_by_this_call(self) -> None:
        store = MemoryDocumentStore()
        store.lose_answer = ("create", "k")
        assert Ledger(store).create("k", {"n": 0})
        assert not Ledger(store).create("k", {"n": 1})  # another writer's: it exists

    def test_another_writers_change_is_still_not_this_ones(self) -> None:
        store = MemoryDocumentStore()
        mine, theirs = Ledger(store), Ledger(store)
        mine.create("k", {"n": 0, "claim": None})
        theirs.update("k", lambda d: {**d, "claim": "theirs"})
        doc, changed = mine.update(
            "k", lambda d: {**d, "claim": "mine"} if not d["claim"] else None
        )
        assert (doc["claim"], changed) == ("theirs", False)

    def test_the_steps_never_see_the_write_id(self) -> None:
        store = MemoryDocumentStore()
        ledger = Ledger(store)
        ledger.create("k", {"n": 0})
        seen = []
        ledger.update("k", lambda d: seen.append(dict(d)) or {**d, "n": 1})
        assert seen == [{"n": 0}]
        assert ledger.get("k") == {"n": 1}
        assert Ledger(store).get("k") == {"n": 1}
        found = store.read("k")
        assert found is not None
        assert WRITE_ID in found.doc


def test_an_opener_whose_write_lost_its_answer_still_sends_the_batchs_check() -> None:
    w = World()
    w.store.lose_answer = ("create", "models/")
    assert w.drop("housing/a.csv") == "batched"
    checks = [m for _, m, _ in w.outbox.sent if isinstance(m, CheckBatch)]
    assert len(checks) == 1


class TestPollClaim:
    @staticmethod
    def running() -> tuple[World, TrackRun]:
        """A run whose job is running, and the message of its next poll."""
        w = World()
        w.jobs.script = [JobState.RUNNING]
        w.drop("housing/a.csv", housing_csv(10, seed=1))
        w.deliver()  # the check seals the batch
        w.deliver()  # submit and start
        ((_, poll, _),) = w.outbox.take()
        assert isinstance(poll, TrackRun)
        w.clock.advance(minutes=1)
        w.jobs.polls.clear()
        return w, poll

    def test_the_same_delivery_made_twice_polls_once(self) -> None:
        """One message handed to the function twice with the same id and attempt (not a
        redelivery after a failure): the second is a copy, refused, not taken for a claim of
        its own whose answer was lost."""
        w, poll = self.running()
        delivery = Delivery("m-1", attempt=1)
        assert w.retrainer.on_track_run(poll, delivery=delivery) == "running"
        assert w.retrainer.on_track_run(poll, delivery=delivery) == "duplicate"
        assert len(w.jobs.polls) == 1

    def test_a_claim_whose_answer_was_lost_polls_once(self) -> None:
        w, poll = self.running()
        w.store.lose_answer = ("replace", "runs/")
        assert w.retrainer.on_track_run(poll, delivery=Delivery("m-1")) == "running"
        assert w.store.lose_answer is None  # the claim's answer was lost
        assert w.retrainer.on_track_run(poll, delivery=Delivery("m-1")) == "duplicate"
        assert len(w.jobs.polls) == 1
