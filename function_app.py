"""The function app: triggers only. Each parses its input, delegates to retrain/, returns."""

import logging
import os

import azure.functions as func

# SDK-type binding: the host passes a reference and the worker builds a BlobClient, so the
# blob's content never crosses into this process (a plain InputStream would load all of it).
import azurefunctions.extensions.bindings.blob as blobext

app = func.FunctionApp()
log = logging.getLogger(__name__)

# Read once at indexing: 'EventGrid' (needs an Event Grid subscription, low latency, required on
# Flex Consumption) or 'LogsAndContainerScan' (polling, the default).
BLOB_SOURCE = func.BlobSource(os.environ.get("RETRAIN_BLOB_SOURCE", "LogsAndContainerScan"))
STORAGE = "AzureWebJobsStorage"


@app.function_name("ingest")
@app.blob_trigger(
    arg_name="client",
    path="%RETRAIN_DATA_CONTAINER%/{name}",
    connection=STORAGE,
    source=BLOB_SOURCE,
)
def ingest(client: blobext.BlobClient) -> None:
    """New training data: validate it, record the arrival, add it to the model's batch."""
    from retrain.wiring import retrainer

    retrainer().on_blob(client.container_name, client.blob_name)


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
        retrainer().on_track_run(message)


@app.function_name("evaluate")
@app.queue_trigger(arg_name="msg", queue_name="%RETRAIN_EVALUATIONS_QUEUE%", connection=STORAGE)
def evaluate(msg: func.QueueMessage) -> None:
    """Gate the retrained model and promote it when it is better."""
    from retrain.messages import parse_evaluation
    from retrain.wiring import retrainer

    retrainer().on_evaluate(parse_evaluation(msg.get_body()), delivery=msg.id)


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
