"""Storage without keys, against an Azurite that takes OAuth tokens over HTTPS: the app's
adapters on an identity connection, and SAS tokens signed with user delegation keys."""

from __future__ import annotations

import base64
import json
import logging
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import parse_qs, quote, unquote, urlsplit

import pytest
import requests
from azure.core.exceptions import ClientAuthenticationError
from azure.storage.blob import BlobServiceClient
from azure.storage.queue import QueueServiceClient, TextBase64DecodePolicy

from localdev import stack
from localdev.oauth import FakeTokenCredential, OAuthAzurite
from retrain.bes import BlobRef
from retrain.blobdata import BlobData
from retrain.connection import StorageConnection
from retrain.ledger import Ledger
from retrain.messages import TrackRun, parse_jobs
from retrain.settings import Settings
from retrain.storage import BlobVersion
from retrain.storage_check import StoragePlaces, check
from retrain.wiring import PortWrappers, build

pytestmark = pytest.mark.integration


@pytest.fixture(autouse=True)
def _quiet_urllib3(caplog: pytest.LogCaptureFixture) -> None:
    # These tests are clients holding SAS URLs on purpose: keep urllib3 from logging them.
    caplog.set_level(logging.WARNING, logger="urllib3")


@pytest.fixture
def connection(oauth_storage: OAuthAzurite) -> StorageConnection:
    return StorageConnection(blob_url=oauth_storage.blob_url, queue_url=oauth_storage.queue_url)


@pytest.fixture
def clients(
    connection: StorageConnection, oauth_storage: OAuthAzurite
) -> tuple[BlobServiceClient, QueueServiceClient]:
    return connection.clients(FakeTokenCredential(), connection_verify=str(oauth_storage.cert))


@pytest.fixture
def name() -> str:
    return "t" + uuid.uuid4().hex[:12]


def url(ref: BlobRef) -> str:
    return ref.base_location + ref.relative_location + ref.sas_token


def soon() -> datetime:
    return datetime.now(UTC) + timedelta(hours=1)


def test_data_is_read_through_a_delegation_sas_and_a_read_sas_cannot_write(
    clients: tuple[BlobServiceClient, QueueServiceClient], oauth_storage: OAuthAzurite, name: str
) -> None:
    blobs, _ = clients
    blobs.create_container(name)
    blobs.get_blob_client(name, "in.csv").upload_blob(b"x\n1\n")
    read = BlobData(blobs).reference(name, "in.csv", write=False, expires=soon())
    token = parse_qs(read.sas_token.lstrip("?"))
    assert token["skoid"]  # signed with a user delegation key
    assert token["sktid"]
    assert token["sp"] == ["r"]
    verify = str(oauth_storage.cert)
    assert requests.get(url(read), timeout=5, verify=verify).content == b"x\n1\n"
    put = requests.put(
        url(read), data=b"y", headers={"x-ms-blob-type": "BlockBlob"}, timeout=5, verify=verify
    )
    assert put.status_code == 403
    assert blobs.get_blob_client(name, "in.csv").download_blob().readall() == b"x\n1\n"


def test_a_tampered_signature_is_refused(
    clients: tuple[BlobServiceClient, QueueServiceClient], oauth_storage: OAuthAzurite, name: str
) -> None:
    blobs, _ = clients
    blobs.create_container(name)
    blobs.get_blob_client(name, "in.csv").upload_blob(b"x\n1\n")
    read = BlobData(blobs).reference(name, "in.csv", write=False, expires=soon())
    head, _, signature = read.sas_token.partition("&sig=")
    digest = bytearray(base64.b64decode(unquote(signature)))
    digest[0] ^= 1  # one bit of the signature changed
    forged = quote(base64.b64encode(bytes(digest)).decode(), safe="")
    tampered = read.base_location + read.relative_location + head + "&sig=" + forged
    assert requests.get(url(read), timeout=5, verify=str(oauth_storage.cert)).ok
    got = requests.get(tampered, timeout=5, verify=str(oauth_storage.cert))
    assert got.status_code == 403


def test_a_write_sas_creates_the_output_and_cannot_read_it(
    clients: tuple[BlobServiceClient, QueueServiceClient], oauth_storage: OAuthAzurite, name: str
) -> None:
    blobs, _ = clients
    write = BlobData(blobs).reference(name, "out/model.ilearner", write=True, expires=soon())
    verify = str(oauth_storage.cert)
    put = requests.put(
        url(write), data=b"z", headers={"x-ms-blob-type": "BlockBlob"}, timeout=5, verify=verify
    )
    assert put.status_code == 201
    assert requests.get(url(write), timeout=5, verify=verify).status_code == 403


def test_requests_signed_with_the_published_key_are_refused(
    oauth_storage: OAuthAzurite, name: str
) -> None:
    """The account's key is one the app never sees: shared-key access is of no use to it."""
    keyed = BlobServiceClient(
        oauth_storage.blob_url,
        credential={"account_name": stack.DEV_ACCOUNT, "account_key": stack.DEV_KEY},
        connection_verify=str(oauth_storage.cert),
    )
    with pytest.raises(ClientAuthenticationError):
        keyed.create_container(name)


def test_the_pipeline_adapters_work_on_an_identity_connection(
    oauth_storage: OAuthAzurite, monkeypatch: pytest.MonkeyPatch, name: str
) -> None:
    """The composition root on identity settings: ledger writes, a queue send, a frozen input
    copied through a delegation SAS, and a job's input reference minted from a delegation key."""
    settings_env = stack.app_settings("", [stack.model_spec("http://127.0.0.1:9")], suffix=name)
    del settings_env["AzureWebJobsStorage"]
    monkeypatch.delenv("AzureWebJobsStorage", raising=False)
    for key, value in {**settings_env, **oauth_storage.identity_settings()}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(oauth_storage.cert))
    settings = Settings()
    assert settings.storage.uses_identity
    ports: dict[str, Any] = {}

    def capture(kind: str) -> Callable[[Any], Any]:
        def keep(port: Any) -> Any:
            ports[kind] = port
            return port

        return keep

    credential = FakeTokenCredential()
    wrappers = PortWrappers(store=capture("store"), data=capture("data"), outbox=capture("outbox"))
    build(settings, decorate=wrappers, credential=credential)
    ledger = Ledger(ports["store"])
    ledger.create("notes/r1.json", {"note": "first"})  # a free-form document: no schema
    ledger.update("notes/r1.json", lambda doc: {**doc, "polls": 1})
    assert ledger.get("notes/r1.json") == {"note": "first", "polls": 1}

    ports["outbox"].send(settings.jobs_queue, TrackRun(model="housing", run_id="r1", poll=1))
    blobs, queues = settings.storage.clients(credential)
    raw = queues.get_queue_client(
        settings.jobs_queue, message_decode_policy=TextBase64DecodePolicy()
    )
    (received,) = raw.receive_messages()
    assert parse_jobs(received.content.encode()) == TrackRun(model="housing", run_id="r1", poll=1)

    blobs.create_container(settings.data_container)
    upload = blobs.get_blob_client(settings.data_container, "housing/a.csv")
    etag = str(upload.upload_blob(b"rooms,price\n1,2\n")["etag"])
    data: BlobData = ports["data"]
    source = BlobVersion(settings.data_container, "housing/a.csv", etag)
    assert data.freeze(source, settings.artifacts_container, "r1/input.csv") is True
    ref = data.reference(settings.artifacts_container, "r1/input.csv", write=False, expires=soon())
    assert urlsplit(ref.base_location).scheme == "https"
    got = requests.get(url(ref), timeout=5, verify=str(oauth_storage.cert))
    assert got.content == b"rooms,price\n1,2\n"
    assert credential.scopes
    assert all("storage.azure.com" in s for s in credential.scopes)


def places(name: str) -> StoragePlaces:
    return StoragePlaces(name, name + "-state", name + "-art", name + "-q", (name + "-jobs",))


def test_check_reports_the_identity_mode_and_every_permission(
    connection: StorageConnection,
    clients: tuple[BlobServiceClient, QueueServiceClient],
    name: str,
) -> None:
    blobs, queues = clients
    blobs.create_container(name)
    queues.create_queue(name + "-jobs")
    found = {c.check: c for c in check(connection, blobs, queues, places(name))}
    assert all(c.ok for c in found.values()), found
    assert found["storage mode"].detail.startswith("identity: DefaultAzureCredential")
    assert found["user delegation key"].detail.startswith("granted")
    assert found[f"state container {name}-state"].detail.startswith("not created yet")
    assert found[f"write to {name}-art"].detail == "a blob was written and deleted"
    assert found[f"send to {name}-jobs"].detail == "a message was sent and deleted"
    assert queues.get_queue_client(name + "-jobs").peek_messages() == []
    assert list(blobs.get_container_client(name + "-art").list_blobs()) == []


def test_check_says_what_to_fix_when_storage_refuses_the_identity(
    connection: StorageConnection, oauth_storage: OAuthAzurite, name: str
) -> None:
    wrong = FakeTokenCredential(audience="https://management.azure.com")
    blobs, queues = connection.clients(wrong, connection_verify=str(oauth_storage.cert))
    found = {c.check: c for c in check(connection, blobs, queues, places(name))}
    key = found["user delegation key"]
    assert not key.ok
    assert "did not accept the app's credentials" in key.detail
    assert not found[f"data container {name}"].ok
    report = json.dumps([vars(c) for c in found.values()])
    assert "eyJ" not in report  # no token in what check prints
