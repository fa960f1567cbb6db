"""Blob names against Azurite: what a reference names is the blob that arrived."""

from __future__ import annotations

import logging
import uuid
from datetime import UTC, datetime, timedelta

import pytest
import requests
from azure.storage.blob import BlobServiceClient

from retrain.blobdata import BlobData
from retrain.ledger import Ledger
from retrain.pipeline import Context, Places, Retrainer, Timing
from retrain.storage import BlobDocumentStore
from tests.fakes import FakeTarget, FakeTraining, ManualClock, MemoryOutbox
from tests.harness import spec

pytestmark = pytest.mark.integration

NAMES = [
    "housing/a b#c?d%20e.csv",
    "housing/x%2e%2e/y.csv",
    "housing/%2e%2e/z.csv",
    "housing/ünïcødé €.csv",
    "housing/plus+and&amp;=semi;colon.csv",
    "housing/~tilde-dash_under.score.csv",
]


@pytest.fixture
def blobs(azurite_connection: str) -> BlobServiceClient:
    return BlobServiceClient.from_connection_string(azurite_connection)


@pytest.fixture
def container(blobs: BlobServiceClient) -> str:
    name = "t" + uuid.uuid4().hex[:12]
    blobs.create_container(name)
    return name


@pytest.mark.parametrize("blob", NAMES)
def test_a_minted_reference_reads_exactly_the_named_blob(
    blobs: BlobServiceClient, container: str, blob: str, caplog: pytest.LogCaptureFixture
) -> None:
    # This test is a client holding the SAS URLs on purpose: keep urllib3 from logging them.
    caplog.set_level(logging.WARNING, logger="urllib3")
    payload = f"rooms,price\n{len(blob)},2\n".encode()
    blobs.get_blob_client(container, blob).upload_blob(payload)
    blobs.get_blob_client(container, "housing/a b").upload_blob(b"decoy: the name before '#'")
    ref = BlobData(blobs).reference(
        container, blob, write=False, expires=datetime.now(UTC) + timedelta(hours=1)
    )
    # BES reads BaseLocation + RelativeLocation + SasBlobToken, concatenated as they are.
    response = requests.get(ref.base_location + ref.relative_location + ref.sas_token, timeout=5)
    assert response.status_code == 200
    assert response.content == payload
    assert ref.path.startswith(f"{container}/housing/")
    assert " " not in ref.relative_location
    assert "#" not in ref.relative_location


def test_a_backslash_name_is_recorded_as_rejected_and_quarantined_once(
    blobs: BlobServiceClient, container: str
) -> None:
    """Azurite (like Azure Storage) stores 'a\\b' as 'a/b': a reference to the name as it
    arrived cannot authenticate. It gets a rejected arrival record, not a retry loop."""
    blobs.get_blob_client(container, "housing/a\\b.csv").upload_blob(b"rooms,price\n1,2\n")
    names = [b.name for b in blobs.get_container_client(container).list_blobs()]
    assert names == ["housing/a/b.csv"]
    ledger = Ledger(BlobDocumentStore(blobs, container + "-state"))
    context = Context(
        models={"housing": spec()},
        ledger=ledger,
        data=BlobData(blobs),
        outbox=MemoryOutbox(),
        training_for=lambda _: FakeTraining(),
        target_for=lambda _: FakeTarget(),
        places=Places(container, container + "-a", container + "-q", "jobs", "evals"),
        timing=Timing(timedelta(seconds=30), timedelta(minutes=10)),
        clock=ManualClock(),
    )
    retrainer = Retrainer(context)
    assert retrainer.on_blob(container, "housing/a\\b.csv") == "rejected"
    assert retrainer.on_blob(container, "housing/a\\b.csv") == "duplicate"
    (key,) = ledger.store.keys("arrivals/")
    record = ledger.get(key)
    assert record is not None
    assert record["status"] == "rejected"
    assert "backslash" in record["reason"]
    copied = blobs.get_blob_client(container + "-q", f"{container}/housing/a/b.csv")
    assert copied.download_blob().readall() == b"rooms,price\n1,2\n"
    assert "backslash" in copied.get_blob_properties().metadata["reason"]
