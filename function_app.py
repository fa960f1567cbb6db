"""The function app: triggers only. Each parses its input, delegates to retrain/, returns."""

import logging
import os
from typing import TYPE_CHECKING

import azure.functions as func

if TYPE_CHECKING:
    from retrain.pipeline import Delivery

app = func.FunctionApp()
log = logging.getLogger(__name__)
STORAGE = "AzureWebJobsStorage"

# Read once at indexing. 'blob' (default): a blob trigger whose source is RETRAIN_BLOB_SOURCE,
# 'LogsAndContainerScan' (polling) or 'EventGrid'. 'eventgrid': an Event Grid trigger that gets
# BlobCreated events directly; it needs no binding extension, so a cold start imports less.
INGEST_TRIGGER = os.environ.get("RETRAIN_INGEST_TRIGGER", "blob")

if INGEST_TRIGGER == "eventgrid":

    @app.function_name("ingest")
    @app.event_grid_trigger(arg_name="event")
    def ingest_event(event: func.EventGridEvent) -> None:
        """A BlobCreated event: ingest the blob it announces (other events are skipped)."""
        from retrain.ingest import blob_from_event
        from retrain.wiring import retrainer

        found = blob_from_event(
            event.event_type, event.get_json(), os.environ["RETRAIN_DATA_CONTAINER"]
        )
        if found is None:
            log.info(
                "event %s (%s) skipped: not a completed blob in the data container",
                event.id,
                event.event_type,
            )
            return
        retrainer().on_blob(*found)

else:
    # Deferred binding: the host passes the blob's address, not its content (a plain InputStream
    # would load all of it into the worker). Importing retrain.binding registers the converter.
    from retrain.binding import BlobAddress

    @app.function_name("ingest")
    @app.blob_trigger(
        arg_name="blob",
        path="%RETRAIN_DATA_CONTAINER%/{name}",
        connection=STORAGE,
        source=func.BlobSource(os.environ.get("RETRAIN_BLOB_SOURCE", "LogsAndContainerScan")),
    )
    def ingest(blob: BlobAddress) -> None:
        """New training data: validate it, record the arrival, add it to the model's batch."""
        from retrain.wiring import retrainer

        retrainer().on_blob(blob.container_name, blob.blob_name)


def _delivery(msg: func.QueueMessage) -> "Delivery":
    """Which message this is, and which attempt: the same id comes back after a failure."""
    from retrain.pipeline import Delivery

    return Delivery(msg.id or "", msg.dequeue_count or 1)


@app.function_name("train")
@app.queue_trigger(arg_name="msg", queue_name="%RETRAIN_JOBS_QUEUE%", connection=STORAGE)
def train(msg: func.QueueMessage) -> None:
    """Seal a quiet batch into a run, or submit, start and poll its BES job."""
    from retrain.messages import CheckBatch, parse_jobs
    from retrain.wiring import retrainer

    message = parse_jobs(msg.get_body())
    if isinstance(message, CheckBatch):
        retrainer().on_check_batch(message)
    else:
        retrainer().on_track_run(message, delivery=_delivery(msg))


@app.function_name("evaluate")
@app.queue_trigger(arg_name="msg", queue_name="%RETRAIN_EVALUATIONS_QUEUE%", connection=STORAGE)
def evaluate(msg: func.QueueMessage) -> None:
    """Gate the retrained model and promote it when it is better."""
    from retrain.messages import parse_evaluation
    from retrain.wiring import retrainer

    retrainer().on_evaluate(parse_evaluation(msg.get_body()), delivery=_delivery(msg))


@app.function_name("train_poison")
@app.queue_trigger(arg_name="msg", queue_name="%RETRAIN_JOBS_QUEUE%-poison", connection=STORAGE)
def train_poison(msg: func.QueueMessage) -> None:
    """A jobs message failed every delivery: keep it for replay, fail its run with the reason."""
    from retrain.wiring import retrainer

    retrainer().on_poison(os.environ["RETRAIN_JOBS_QUEUE"], msg.get_body())


@app.function_name("evaluate_poison")
@app.queue_trigger(
    arg_name="msg", queue_name="%RETRAIN_EVALUATIONS_QUEUE%-poison", connection=STORAGE
)
def evaluate_poison(msg: func.QueueMessage) -> None:
    """An evaluations message failed every delivery: keep it, fail its run with the reason."""
    from retrain.wiring import retrainer

    retrainer().on_poison(os.environ["RETRAIN_EVALUATIONS_QUEUE"], msg.get_body())


@app.function_name("notify")
@app.queue_trigger(arg_name="msg", queue_name="%RETRAIN_EVENTS_QUEUE%", connection=STORAGE)
def notify(msg: func.QueueMessage) -> None:
    """Deliver a run event to the webhook, if one is configured (failures are retried)."""
    from retrain.messages import parse_event
    from retrain.wiring import webhook

    event = parse_event(msg.get_body())
    hook = webhook()
    if hook is not None:
        hook.deliver(event)
    else:
        log.info("event: run %s of %s is %s", event.run_id, event.model, event.state)


@app.function_name("sweep")
@app.timer_trigger(arg_name="timer", schedule="%RETRAIN_SWEEP_SCHEDULE%", run_on_startup=False)
def sweep(timer: func.TimerRequest) -> None:
    """Re-drive runs whose messages were lost and data whose events never came."""
    from retrain.wiring import retrainer

    retrainer().sweep()
