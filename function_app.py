"""The function app: triggers only. Each parses its input, delegates to retrain/, returns."""

import os

import azure.functions as func

# SDK-type binding: the host passes a reference and the worker builds a BlobClient, so the
# blob's content never crosses into this process (a plain InputStream would load all of it).
import azurefunctions.extensions.bindings.blob as blobext

app = func.FunctionApp()

# Read once at indexing: 'EventGrid' (needs an Event Grid subscription, low latency, required on
# Flex Consumption) or 'LogsAndContainerScan' (polling, the default).
BLOB_SOURCE = func.BlobSource(os.environ.get("RETRAIN_BLOB_SOURCE", "LogsAndContainerScan"))


@app.function_name("ingest")
@app.blob_trigger(
    arg_name="client",
    path="%RETRAIN_DATA_CONTAINER%/{name}",
    connection="AzureWebJobsStorage",
    source=BLOB_SOURCE,
)
def ingest(client: blobext.BlobClient) -> None:
    """New training data: validate it, record the arrival, add it to the model's batch."""
    from retrain.wiring import retrainer

    retrainer().on_blob(client.container_name, client.blob_name)


@app.function_name("train")
@app.queue_trigger(
    arg_name="msg", queue_name="%RETRAIN_JOBS_QUEUE%", connection="AzureWebJobsStorage"
)
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
@app.queue_trigger(
    arg_name="msg", queue_name="%RETRAIN_EVALUATIONS_QUEUE%", connection="AzureWebJobsStorage"
)
def evaluate(msg: func.QueueMessage) -> None:
    """Gate the retrained model and promote it when it is better."""
    from retrain.messages import parse_evaluation
    from retrain.wiring import retrainer

    retrainer().on_evaluate(parse_evaluation(msg.get_body()))
