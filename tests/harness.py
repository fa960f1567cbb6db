"""The in-memory world the pipeline's unit tests drive: a Retrainer over fakes and a manual
clock, and the scenarios several test modules start from."""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta
from typing import Any
from urllib.parse import unquote

import pytest

from localdev.sample import housing_csv
from retrain.backends.bes import BesTraining
from retrain.bes import BlobRef
from retrain.deploy import Progress
from retrain.errors import RemoteError, TransientRemoteError
from retrain.ledger import Ledger, model_key
from retrain.messages import CheckBatch, EvaluateRun, TrackRun
from retrain.pipeline import Context, Delivery, Places, Retrainer, Timing
from retrain.ports import ModelRef, TrainingBackend
from retrain.settings import ModelSpec
from tests.fakes import (
    FakeData,
    FakeJobs,
    FakeTarget,
    ManualClock,
    MemoryDocumentStore,
    MemoryOutbox,
)

PLACES = Places("data", "artifacts", "quarantine", "jobs", "evals")


def spec(**overrides: Any) -> ModelSpec:
    base: dict[str, Any] = {
        "name": "housing",
        "columns": ["rooms", "price"],
        "training": {
            "kind": "bes",
            "jobs_url": "https://bes.example/workspaces/w/services/s/jobs",
            "api_key_setting": "K",
            "global_parameters": {"Label Column": "price"},
        },
        "gate": {"metric": "Root Mean Squared Error"},
        "target": {
            "kind": "classic",
            "endpoint_url": "https://management.azureml.net/workspaces/w/webservices/p/"
            "endpoints/prod",
            "api_key_setting": "E",
            "resource_name": "M [trained model]",
        },
        "quiet_period": 60,
        "max_wait": 300,
        "job_deadline": 3600,
    }
    base.update(overrides)
    return ModelSpec.model_validate(base)


def raw_spec(**overrides: Any) -> dict[str, Any]:
    """The JSON of `spec()` with top-level fields replaced, as a settings file would hold it."""
    data = spec().model_dump(mode="json")
    data.update(overrides)
    return data


class World:
    """The pipeline over fakes: by default the real BES adapter over a fake BES service
    (`jobs`) and fake storage; with `training`, that backend instead of the BES adapter."""

    def __init__(
        self,
        jobs: FakeJobs | None = None,
        *,
        training: TrainingBackend | None = None,
        **overrides: Any,
    ) -> None:
        self.spec = spec(**overrides)
        self.store = MemoryDocumentStore()
        self.ledger = Ledger(self.store)
        self.data = FakeData()
        self.outbox = MemoryOutbox()
        self.jobs = jobs or FakeJobs()
        self.training = training or BesTraining(self.jobs, self.data, self.spec.training)
        self.target = FakeTarget()
        self.clock = ManualClock()
        context = Context(
            models={"housing": self.spec},
            ledger=self.ledger,
            data=self.data,
            outbox=self.outbox,
            training_for=lambda _: self.training,
            target_for=lambda _: self.target,
            places=PLACES,
            timing=Timing(timedelta(seconds=30), timedelta(minutes=10)),
            clock=self.clock,
        )
        self.retrainer = Retrainer(context)

    def drop(self, name: str, text: str = "rooms,price\n1,2\n") -> str:
        self.data.put("data", name, text)
        return self.retrainer.on_blob("data", name)

    def deliver(self) -> list[str]:
        """Deliver every message sent so far whose delay has passed (advancing the clock)."""
        results = []
        for _queue, msg, delay in self.outbox.take():
            self.clock.advance(seconds=delay.total_seconds())
            if isinstance(msg, CheckBatch):
                results.append(self.retrainer.on_check_batch(msg))
            elif isinstance(msg, TrackRun):
                results.append(self.retrainer.on_track_run(msg))
            else:
                assert isinstance(msg, EvaluateRun)
                results.append(self.retrainer.on_evaluate(msg))
        return results

    def batch_files(self) -> list[str]:
        """The names of the files in the model's open batch."""
        return [f["name"] for f in self.retrainer.batch_files("housing")]

    def run(self) -> dict[str, Any]:
        (key,) = self.store.keys("runs/")
        found = self.store.read(key)
        assert found is not None
        return found.doc

    def files(self, run: dict[str, Any] | None = None) -> list[dict[str, Any]]:
        """The files of `run` (default: the one run), read from its manifest."""
        return self.retrainer.run_files(run or self.run())

    def evaluation(self, text: str, run: dict[str, Any] | None = None) -> None:
        """Write the Evaluate Model output of `run`'s job (default: the one run) where the job
        was told to write it."""
        run = run or self.run()
        (job,) = (j for j in self.jobs.submitted if j["job_id"] == run["job_id"])
        ref: BlobRef = job["outputs"][self.spec.training.evaluation_output]
        container, _, name = unquote(ref.relative_location).partition("/")
        self.data.put(container, name, text)


def left_as(w: World, key: str, change: Callable[[dict[str, Any]], dict[str, Any]]) -> None:
    """Rewrite a stored document behind the ledger's back, as an instance that died between two
    writes left it (the ledger itself refuses to move a run backwards)."""
    found = w.store.read(key)
    assert found is not None
    w.store.replace(key, change(found.doc), found.etag)


def sealed_without_its_run() -> World:
    """A World whose one batch was sealed by a worker that died before recording its run."""
    w = World()
    w.drop("housing/a.csv")
    ((_, check, _),) = w.outbox.take()
    w.clock.advance(seconds=61)
    w.store.crash_before = ("create", "runs/")
    with pytest.raises(RuntimeError):
        w.retrainer.on_check_batch(check)  # type: ignore[arg-type]
    return w


def evaluated(w: World) -> EvaluateRun:
    """Train `w`'s first run to its evaluation; the evaluate message, taken from the outbox."""
    w.drop("housing/a.csv", housing_csv(10, seed=1))
    for _ in range(3):
        w.deliver()
    w.evaluation("Root Mean Squared Error\n2.5\n")
    ((_, msg, _),) = w.outbox.take()
    assert isinstance(msg, EvaluateRun)
    return msg


def champion_then_second_trained(
    before_second: Callable[[World], None] | None = None,
) -> tuple[World, str]:
    """A World whose first run is the champion and whose second (better) run is trained,
    its evaluate message waiting in the outbox; `before_second` runs between the two."""
    w = World()
    w.drop("housing/a.csv", housing_csv(10, seed=1))
    for _ in range(3):
        w.deliver()
    w.evaluation("Root Mean Squared Error\n2.5\n")
    assert w.deliver() == ["promoted"]
    champion = w.run()["run_id"]
    if before_second is not None:
        before_second(w)
    w.clock.advance(minutes=5)
    train_next(w, "housing/b.csv", seed=2, rmse=1.5)
    return w, champion


def train_next(w: World, name: str, *, seed: int, rmse: float) -> dict[str, Any]:
    """Drop `name`, run its batch to `trained`, and write its evaluation (RMSE `rmse`); the
    evaluate message waits in the outbox. Returns the run."""
    w.drop(name, housing_csv(10, seed=seed))
    for _ in range(3):
        w.deliver()
    run = latest_run(w)
    w.evaluation(f"Root Mean Squared Error\n{rmse}\n", run)
    return run


def restore_check_unreachable(w: World, poll: EvaluateRun) -> Callable[[Any], bool]:
    """Deliver `poll` (its provisioning fails) while the target cannot say what it serves: the
    restore check stays owed. Returns the target's real `serves`, to put back."""
    serves: Callable[[Any], bool] = w.target.serves

    def down(model: Any) -> bool:
        raise TransientRemoteError("endpoint GET: 503", status=503)

    w.target.serves = down  # type: ignore[method-assign]
    with pytest.raises(RemoteError, match="restore check"):
        w.retrainer.on_evaluate(poll, delivery=Delivery("p-1"))
    assert latest_run(w)["restore_pending"] is True
    return serves


def poisoned_during_deploy(w: World, msg: EvaluateRun) -> str:
    """Deliver `msg` while, during its deploy call, another copy's poison fails the run: the
    call lands after the run was failed and checked."""
    original = w.target.deploy

    def deploy_while_poisoned(model: Any) -> Any:
        w.retrainer.on_poison("evals", msg.model_dump_json().encode())
        return original(model)

    w.target.deploy = deploy_while_poisoned  # type: ignore[method-assign]
    try:
        return w.retrainer.on_evaluate(msg, delivery=Delivery("m-1"))
    finally:
        del w.target.deploy


def champion_run(w: World) -> str:
    state = w.ledger.get(model_key("housing"))
    assert state is not None
    return str(state["champion"]["run_id"])


def latest_run(w: World) -> dict[str, Any]:
    docs = [w.store.docs[k][0] for k in w.store.keys("runs/")]
    return max(docs, key=lambda d: d["created_at"])


def applied_then_failed(w: World) -> None:
    """The target takes the new model, then reports the provisioning failed."""
    answers = ["pending", "failed"]

    def progress(operation: str | None) -> Progress:
        if answers.pop(0) == "pending":
            return Progress("pending", operation="op-1")
        w.target.serving = w.target.requested
        return Progress("failed", "provisioning failed (injected)")

    w.target.progress = progress  # type: ignore[method-assign]


def failing_provisioning(w: World) -> tuple[ModelRef | None, EvaluateRun]:
    """Deploy the second run (provisioning pending, then failing after the switch); returns
    the champion's model and the provisioning poll message, not yet delivered."""
    champion_model = w.target.serving
    applied_then_failed(w)
    w.deliver()  # deploy: pending
    ((_, poll, _),) = w.outbox.take()
    assert isinstance(poll, EvaluateRun)
    return champion_model, poll
