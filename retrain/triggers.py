"""What each function of the app does with its input; function_app.py only parses and calls here.

Each call looks up the Retrainer (or webhook) through `retrain.wiring` when it runs, not at
import: it is built on first use, and the local runners swap `wiring.retrainer` for their own.
"""

from __future__ import annotations

import logging
from typing import Any

from retrain import wiring
from retrain.azureml.events import job_completed
from retrain.ingest import blob_from_event
from retrain.messages import CheckBatch, parse_evaluation, parse_event, parse_jobs
from retrain.pipeline import Delivery, QueueKind

log = logging.getLogger(__name__)


def _delivery(message_id: str | None, dequeue_count: int | None) -> Delivery:
    """Which message this is, and which attempt: the same id comes back after a failure."""
    return Delivery(message_id or "", dequeue_count or 1)


def blob(container: str, name: str) -> None:
    """New training data: validate it, record the arrival, add it to the model's batch."""
    wiring.retrainer().on_blob(container, name)


def blob_event(event_id: str, event_type: str, data: Any) -> None:
    """A BlobCreated event: ingest the blob it announces (other events are skipped)."""
    retrainer = wiring.retrainer()
    found = blob_from_event(event_type, data, retrainer.places.data_container)
    if found is None:
        log.info(
            "event %s (%s) skipped: not a completed blob in the data container",
            event_id,
            event_type,
        )
        return
    retrainer.on_blob(*found)


def job_event(event_id: str, event_type: str, topic: str | None, data: Any) -> None:
    """An Azure ML run event: a completed job of a running run goes to the gate now (any other
    event is skipped)."""
    found = job_completed(event_type, topic, data)
    if found is None:
        log.info("event %s (%s) skipped: not a completed job of this app", event_id, event_type)
        return
    outcome = wiring.retrainer().on_job_completed(found)
    log.info("event %s: job %s of run %s: %s", event_id, found.job, found.run_id, outcome)


def jobs(body: bytes, message_id: str | None, dequeue_count: int | None) -> None:
    """A jobs-queue message: seal a quiet batch into a run, or submit, start and poll its job."""
    message = parse_jobs(body)
    if isinstance(message, CheckBatch):
        wiring.retrainer().on_check_batch(message)
    else:
        wiring.retrainer().on_track_run(message, delivery=_delivery(message_id, dequeue_count))


def evaluation(body: bytes, message_id: str | None, dequeue_count: int | None) -> None:
    """An evaluations-queue message: gate the trained model, promote it when it is better."""
    wiring.retrainer().on_evaluate(
        parse_evaluation(body), delivery=_delivery(message_id, dequeue_count)
    )


def poisoned(kind: QueueKind, body: bytes) -> None:
    """A message of the `kind` queue failed every delivery: keep it, fail its run with why."""
    retrainer = wiring.retrainer()
    retrainer.on_poison(retrainer.places.queue(kind), body)


def event(body: bytes) -> None:
    """Deliver a run event to the webhook, if one is configured (failures are retried)."""
    message = parse_event(body)
    hook = wiring.webhook()
    if hook is not None:
        hook.deliver(message)
    else:
        log.info("event: run %s of %s is %s", message.run_id, message.model, message.state)


def sweep() -> None:
    """Re-drive runs whose messages were lost and data whose events never came."""
    wiring.retrainer().sweep()
