"""The Azure Functions Python worker's own logic indexes function_app.py and invokes `ingest`
with the deferred blob reference a host sends (tests/real_worker.py drives it): the custom blob
converter works in the worker, not only against the extension's interface (test_binding.py)."""

from __future__ import annotations

import contextlib
import json
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from azure.core.exceptions import ResourceNotFoundError
from azure.storage.blob import BlobServiceClient

from localdev import stack
from localdev.sample import housing_csv

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parent.parent
WORKER_PYTHON = ROOT / ".venv-worker" / "bin" / "python"


@pytest.fixture
def worker(azurite_connection: str) -> Iterator[tuple[dict[str, str], BlobServiceClient]]:
    if not WORKER_PYTHON.exists():
        pytest.skip("no .venv-worker: `make setup` builds it where Python 3.13 is installed")
    settings = stack.app_settings(
        azurite_connection,
        [stack.model_spec("http://127.0.0.1:9")],
        suffix=f"-{uuid.uuid4().hex[:8]}",
    )
    blobs = BlobServiceClient.from_connection_string(azurite_connection)
    data = blobs.get_container_client(settings["RETRAIN_DATA_CONTAINER"])
    data.create_container()
    data.upload_blob("housing/2026-12-07.csv", housing_csv(10, seed=3))
    yield settings, blobs
    for name in ("RETRAIN_DATA_CONTAINER", "RETRAIN_STATE_CONTAINER"):
        with contextlib.suppress(ResourceNotFoundError):
            blobs.delete_container(settings[name])


def drive(settings: dict[str, str], **blob: str) -> dict[str, Any]:
    ask = {"settings": settings, "blob": blob}
    done = subprocess.run(
        [str(WORKER_PYTHON), str(ROOT / "tests" / "real_worker.py")],
        input=json.dumps(ask),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    answer: dict[str, Any] = json.loads(done.stdout)
    return answer


def test_the_worker_indexes_every_function_and_defers_the_blob(
    worker: tuple[dict[str, str], BlobServiceClient],
) -> None:
    settings, _ = worker
    answer = drive(settings, container=settings["RETRAIN_DATA_CONTAINER"], name="housing/x.csv")
    assert answer["init"] == {"status": "Success", "exception": None}
    functions = answer["functions"]
    assert set(functions) == {
        "ingest",
        "train",
        "evaluate",
        "train_poison",
        "evaluate_poison",
        "notify",
        "job_events",
        "sweep",
    }
    (blob,) = functions["ingest"]
    assert blob["type"] == "blobTrigger"
    assert blob["properties"] == {"SupportsDeferredBinding": True}  # the host sends a reference
    assert blob["connection"] == "AzureWebJobsStorage"


def test_ingest_takes_the_hosts_blob_reference_and_records_the_arrival(
    worker: tuple[dict[str, str], BlobServiceClient],
) -> None:
    settings, blobs = worker
    container = settings["RETRAIN_DATA_CONTAINER"]
    answer = drive(settings, container=container, name="housing/2026-12-07.csv")
    assert answer["ingest"] == {"status": "Success", "exception": None}
    state = blobs.get_container_client(settings["RETRAIN_STATE_CONTAINER"])
    arrivals = [
        json.loads(state.download_blob(b.name).readall())
        for b in state.list_blobs(name_starts_with="arrivals/")
    ]
    assert [(a["container"], a["name"], a["status"]) for a in arrivals] == [
        (container, "housing/2026-12-07.csv", "accepted")
    ]


def test_a_reference_without_a_blob_name_fails_the_invocation_naming_it(
    worker: tuple[dict[str, str], BlobServiceClient],
) -> None:
    settings, _ = worker
    answer = drive(settings, container=settings["RETRAIN_DATA_CONTAINER"], name="")
    assert answer["ingest"]["status"] == "Failure"
    assert "no BlobName" in answer["ingest"]["exception"]
