"""The function app: wiring only. Each trigger parses its input and makes one call into
retrain.triggers, imported on first call so that indexing loads no domain code."""

import os

import azure.functions as func

app = func.FunctionApp()
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
        from retrain import triggers

        triggers.blob_event(event.id, event.event_type, event.get_json())

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
        from retrain import triggers

        triggers.blob(blob.container_name, blob.blob_name)


@app.function_name("train")
@app.queue_trigger(arg_name="msg", queue_name="%RETRAIN_JOBS_QUEUE%", connection=STORAGE)
def train(msg: func.QueueMessage) -> None:
    """Seal a quiet batch into a run, or submit, start and poll its BES job."""
    from retrain import triggers

    triggers.jobs(msg.get_body(), msg.id, msg.dequeue_count)


@app.function_name("evaluate")
@app.queue_trigger(arg_name="msg", queue_name="%RETRAIN_EVALUATIONS_QUEUE%", connection=STORAGE)
def evaluate(msg: func.QueueMessage) -> None:
    """Gate the retrained model and promote it when it is better."""
    from retrain import triggers

    triggers.evaluation(msg.get_body(), msg.id, msg.dequeue_count)


@app.function_name("train_poison")
@app.queue_trigger(arg_name="msg", queue_name="%RETRAIN_JOBS_QUEUE%-poison", connection=STORAGE)
def train_poison(msg: func.QueueMessage) -> None:
    """A jobs message failed every delivery: keep it for replay, fail its run with the reason."""
    from retrain import triggers

    triggers.poisoned("jobs", msg.get_body())


@app.function_name("evaluate_poison")
@app.queue_trigger(
    arg_name="msg", queue_name="%RETRAIN_EVALUATIONS_QUEUE%-poison", connection=STORAGE
)
def evaluate_poison(msg: func.QueueMessage) -> None:
    """An evaluations message failed every delivery: keep it, fail its run with the reason."""
    from retrain import triggers

    triggers.poisoned("evaluations", msg.get_body())


@app.function_name("notify")
@app.queue_trigger(arg_name="msg", queue_name="%RETRAIN_EVENTS_QUEUE%", connection=STORAGE)
def notify(msg: func.QueueMessage) -> None:
    """Deliver a run event to the webhook, if one is configured (failures are retried)."""
    from retrain import triggers

    triggers.event(msg.get_body())


@app.function_name("job_events")
@app.event_grid_trigger(arg_name="event")
def job_events(event: func.EventGridEvent) -> None:
    """An Azure ML job's completion (Event Grid): its run goes to the gate without waiting for
    its next poll. Without a subscription it never runs; the polls find the end."""
    from retrain import triggers

    triggers.job_event(event.id, event.event_type, event.topic, event.get_json())


@app.function_name("sweep")
@app.timer_trigger(arg_name="timer", schedule="%RETRAIN_SWEEP_SCHEDULE%", run_on_startup=False)
def sweep(timer: func.TimerRequest) -> None:
    """Re-drive runs whose messages were lost and data whose events never came."""
    from retrain import triggers

    triggers.sweep()
