"""The Retrainer: what each trigger and each operator command does, as steps of a per-run
state machine.

Each step lives in its own module; this facade wires them to one shared `Context` and is all
that the triggers, the CLI and the local tools call:

    arrivals    on_blob: validate, record once, join the open batch
    batches     on_check_batch: seal a quiet batch into a run
    training    on_track_run: submit, start once, poll by delayed messages
    gate        judge a trained run; park it for approval
    promotion   on_evaluate: deploy lease, provisioning, verify, crown
    slot        the model's active-run slot: claim, release, the restore a failed promotion owes
    runs        the one place that moves a run (state table, history, event)
    recovery    sweep: re-drive, repair, reconcile, ingest what no event brought
    poison      keep a poisoned message, fail its run, replay it
    operations  approve, reject, rollback, retrain now, queries
"""

from __future__ import annotations

from retrain.azureml.events import JobCompleted
from retrain.ledger import Doc
from retrain.messages import CheckBatch, EvaluateRun, TrackRun
from retrain.pipeline.arrivals import Arrivals
from retrain.pipeline.batches import Batches
from retrain.pipeline.context import DEPLOY_CALLS, Context, Delivery, Places, QueueKind, Timing
from retrain.pipeline.gate import Gate
from retrain.pipeline.operations import AlreadyTrained, Operations
from retrain.pipeline.poison import Poison
from retrain.pipeline.promotion import Deployment
from retrain.pipeline.records import sweep_key
from retrain.pipeline.recovery import Recovery
from retrain.pipeline.runs import RunMover
from retrain.pipeline.slot import ModelSlot
from retrain.pipeline.training import Training

__all__ = [
    "DEPLOY_CALLS",
    "AlreadyTrained",
    "Context",
    "Delivery",
    "Places",
    "QueueKind",
    "Retrainer",
    "Timing",
    "sweep_key",
]


class Retrainer:
    """Ingest → coalesce → train → evaluate → promote, each step idempotent."""

    def __init__(self, ctx: Context) -> None:
        """Wire every step to `ctx`, the ports and settings they share."""
        self._ctx = ctx
        slot = ModelSlot(ctx)
        runs = RunMover(ctx, slot)
        self._batches = Batches(ctx)
        self._arrivals = Arrivals(ctx, self._batches)
        self._training = Training(ctx, runs, slot)
        gate = Gate(ctx, runs, slot)
        self._promotion = Deployment(ctx, runs, slot, gate)
        self._operations = Operations(ctx, runs, slot, self._arrivals, self._batches)
        self._recovery = Recovery(ctx, slot, self._arrivals, self._batches, self._operations)
        self._poison = Poison(ctx, runs, slot, gate)

    @property
    def places(self) -> Places:
        """The containers and queues the pipeline uses, as the wiring named them."""
        return self._ctx.places

    # ------------------------------------------------------------------ triggers

    def on_blob(self, container: str, name: str) -> str:
        """Handle a blob arrival; returns what happened ('batched', 'rejected', 'duplicate', …)."""
        return self._arrivals.on_blob(container, name)

    def on_check_batch(self, msg: CheckBatch) -> str:
        """Seal the model's batch into a run once it has been quiet long enough."""
        return self._batches.on_check_batch(msg)

    def on_track_run(self, msg: TrackRun, *, delivery: Delivery | None = None) -> str:
        """Submit, start or poll the run's training job; never waits inside the invocation."""
        return self._training.on_track_run(msg, delivery=delivery)

    def on_job_completed(self, event: JobCompleted) -> str:
        """A job completion event: its run goes to the gate without waiting for its next poll."""
        return self._training.on_job_completed(event)

    def on_evaluate(self, msg: EvaluateRun, *, delivery: Delivery | None = None) -> str:
        """Gate the trained model; promote it through the model's target when it is better."""
        return self._promotion.on_evaluate(msg, delivery=delivery)

    def on_poison(self, queue: str, body: bytes) -> str:
        """A message failed every delivery: keep it for replay and fail its run with the reason."""
        return self._poison.on_poison(queue, body)

    def sweep(self) -> dict[str, int]:
        """Re-drive what a lost message or event left behind. Safe to run anywhere, any time."""
        return self._recovery.sweep()

    # ---------------------------------------------------------------- operations

    def approve(self, name: str, run_id: str, *, by: str) -> str:
        """Promote a run that waits for approval, through the same path as automatic ones."""
        return self._operations.approve(name, run_id, by=by)

    def reject(self, name: str, run_id: str, *, by: str, reason: str) -> str:
        """Turn down a run that waits for approval, recording who and why."""
        return self._operations.reject(name, run_id, by=by, reason=reason)

    def request(
        self, name: str, blob: str | None = None, *, reason: str, force: bool = False
    ) -> str:
        """Retrain `name` now on `blob` (default: its newest data file); returns the batch id."""
        return self._operations.request(name, blob, reason=reason, force=force)

    def rollback(self, name: str, to: str | None = None, *, by: str) -> str:
        """Re-deploy an earlier promoted run's model (default: the previous champion)."""
        return self._operations.rollback(name, to, by=by)

    def replay_poison(self) -> list[str]:
        """Send every poisoned message back to its queue, reviving the run it failed."""
        return self._poison.replay_poison()

    # ------------------------------------------------------------------- queries

    def poisoned(self) -> list[Doc]:
        """Every kept poison message, oldest first."""
        return self._operations.poisoned()

    def runs(self, model: str | None = None) -> list[Doc]:
        """Every run record, oldest first (of one model, or all)."""
        return self._operations.runs(model)

    def find_run(self, run_id: str) -> Doc:
        """A run by id, whichever model it belongs to."""
        return self._operations.find_run(run_id)

    def run_files(self, run: Doc) -> list[Doc]:
        """The files of run `run` (its batch's manifest)."""
        return self._batches.files_of(run)

    def model_state(self, name: str) -> Doc:
        """A model's document: open batch, active run, champion."""
        return self._operations.model_state(name)

    def batch_files(self, name: str) -> list[Doc]:
        """The files waiting in the model's open batch (one listing of its member records)."""
        return self._operations.batch_files(name)

    def probe(self, name: str) -> str:
        """Check a model's training service answers and takes its credentials; starts nothing."""
        return self._operations.probe(name)

    def preflight(self, name: str) -> list[str]:
        """Check a model's target is reachable and updatable as configured."""
        return self._operations.preflight(name)
