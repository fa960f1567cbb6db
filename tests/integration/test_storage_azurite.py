"""The storage adapters against Azurite: conditional writes, ranged reads, SAS, base64 queues."""

from __future__ import annotations

import logging
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import requests
from azure.storage.blob import BlobServiceClient
from azure.storage.queue import QueueClient, TextBase64DecodePolicy

from retrain.blobdata import BlobData
from retrain.errors import InputRejected, StateConflict
from retrain.ledger import Ledger
from retrain.messages import TrackRun, parse_jobs
from retrain.storage import HEAD_BYTES, Appended, BlobDocumentStore, BlobVersion, Log, QueueOutbox

pytestmark = pytest.mark.integration


@pytest.fixture
def blobs(azurite_connection: str) -> BlobServiceClient:
    return BlobServiceClient.from_connection_string(azurite_connection)


@pytest.fixture
def name() -> str:
    return "t" + uuid.uuid4().hex[:12]


class TestDocuments:
    def test_create_is_create_only_and_replace_needs_the_current_etag(
        self, blobs: BlobServiceClient, name: str
    ) -> None:
        store = BlobDocumentStore(blobs, name)
        etag = store.create("a.json", {"n": 1})
        with pytest.raises(StateConflict):
            store.create("a.json", {"n": 2})
        newer = store.replace("a.json", {"n": 2}, etag)
        with pytest.raises(StateConflict):
            store.replace("a.json", {"n": 3}, etag)
        found = store.read("a.json")
        assert found is not None
        assert found.doc == {"n": 2}
        assert found.etag == newer
        assert store.read("missing.json") is None
        assert store.keys("a") == ["a.json"]

    def test_concurrent_updates_through_the_ledger_all_land(
        self, blobs: BlobServiceClient, name: str
    ) -> None:
        """Interleaved read-modify-write cycles lose no increment (ETag compare-and-swap)."""
        from concurrent.futures import ThreadPoolExecutor

        ledger = Ledger(BlobDocumentStore(blobs, name))
        ledger.create("counter.json", {"n": 0})

        def bump(_: int) -> None:
            ledger.update("counter.json", lambda d: {"n": d["n"] + 1})

        with ThreadPoolExecutor(8) as pool:
            list(pool.map(bump, range(40)))
        assert ledger.get("counter.json") == {"n": 40}


class TestData:
    def test_head_reads_only_the_first_bytes_of_a_large_blob(
        self, blobs: BlobServiceClient, name: str
    ) -> None:
        blobs.create_container(name)
        payload = b"a,b\n" + b"1,2\n" * 100_000
        blobs.get_blob_client(name, "big.csv").upload_blob(payload)
        head = BlobData(blobs).head(name, "big.csv")
        assert head is not None
        assert head.size == len(payload)
        assert len(head.head) == HEAD_BYTES
        assert head.etag.strip('"')

    def test_head_of_an_empty_and_a_missing_blob(self, blobs: BlobServiceClient, name: str) -> None:
        blobs.create_container(name)
        blobs.get_blob_client(name, "empty.csv").upload_blob(b"")
        data = BlobData(blobs)
        empty = data.head(name, "empty.csv")
        assert empty is not None
        assert (empty.size, empty.head) == (0, b"")
        assert data.head(name, "missing.csv") is None

    def test_read_sas_reads_and_cannot_write_write_sas_cannot_read(
        self, blobs: BlobServiceClient, name: str, caplog: pytest.LogCaptureFixture
    ) -> None:
        # This test is a client holding the SAS URLs on purpose: keep urllib3 from logging them.
        caplog.set_level(logging.WARNING, logger="urllib3")
        blobs.create_container(name)
        blobs.get_blob_client(name, "in.csv").upload_blob(b"x\n1\n")
        data = BlobData(blobs)
        expires = datetime.now(UTC) + timedelta(hours=1)
        read = data.reference(name, "in.csv", write=False, expires=expires)
        url = read.base_location + read.relative_location + read.sas_token
        assert requests.get(url, timeout=5).content == b"x\n1\n"
        put = requests.put(url, data=b"y", headers={"x-ms-blob-type": "BlockBlob"}, timeout=5)
        assert put.status_code == 403
        write = data.reference(name, "out.csv", write=True, expires=expires)
        url = write.base_location + write.relative_location + write.sas_token
        put = requests.put(url, data=b"z", headers={"x-ms-blob-type": "BlockBlob"}, timeout=5)
        assert put.status_code == 201
        assert requests.get(url, timeout=5).status_code == 403
        assert "sig=" in write.sas_token
        assert "sig=" not in repr(write)

    def test_quarantine_copies_with_the_reason_and_keeps_the_original(
        self, blobs: BlobServiceClient, name: str
    ) -> None:
        blobs.create_container(name)
        blobs.get_blob_client(name, "m/bad.csv").upload_blob(b"\x00binary")
        BlobData(blobs).quarantine(name, "m/bad.csv", name + "-q", "binary data — NUL bytes")
        copy = blobs.get_blob_client(name + "-q", f"{name}/m/bad.csv")
        assert copy.download_blob().readall() == b"\x00binary"
        assert copy.get_blob_properties().metadata["reason"] == "binary data \\u2014 NUL bytes"
        assert blobs.get_blob_client(name, "m/bad.csv").exists()


def test_outbox_round_trips_base64_json_and_delays(azurite_connection: str, name: str) -> None:
    """The queue trigger expects base64 bodies; a delayed message stays invisible."""
    import base64

    from azure.storage.queue import QueueServiceClient

    outbox = QueueOutbox(QueueServiceClient.from_connection_string(azurite_connection))
    message = TrackRun(model="m", run_id="r", poll=2)
    outbox.send(name, message)
    raw = QueueClient.from_connection_string(azurite_connection, name)
    (received,) = raw.receive_messages()
    assert parse_jobs(base64.b64decode(received.content)) == message
    raw.delete_message(received)

    outbox.send(name, message, delay=timedelta(seconds=30))
    decoding = QueueClient.from_connection_string(
        azurite_connection, name, message_decode_policy=TextBase64DecodePolicy()
    )
    assert list(decoding.receive_messages()) == []
    assert decoding.get_queue_properties().approximate_message_count == 1


class TestFrozenInput:
    def test_the_validated_version_is_copied_and_an_overwrite_is_refused(
        self, blobs: BlobServiceClient, name: str
    ) -> None:
        data = BlobData(blobs)
        blobs.create_container(name)
        source = blobs.get_blob_client(name, "housing/a.csv")
        etag = str(source.upload_blob(b"rooms,price\n1,2\n")["etag"])
        version = BlobVersion(name, "housing/a.csv", etag)
        assert data.freeze(version, name + "art", "run/input.csv") is True
        copy = blobs.get_blob_client(name + "art", "run/input.csv")
        assert copy.download_blob().readall() == b"rooms,price\n1,2\n"
        meta = copy.get_blob_properties().metadata
        assert meta["retrain_source"] == f"{name}/housing/a.csv"
        assert meta["retrain_source_etag"] == etag.strip('"')
        assert data.freeze(version, name + "art", "run/input.csv") is True  # done already
        source.upload_blob(b"rooms\n1\n", overwrite=True)  # overwritten after validation
        assert copy.download_blob().readall() == b"rooms,price\n1,2\n"
        with pytest.raises(InputRejected, match="changed after it was validated"):
            data.freeze(version, name + "art", "other/input.csv")


class TestEtags:
    def test_listing_and_ranged_read_give_the_same_etag_and_time(
        self, blobs: BlobServiceClient, name: str
    ) -> None:
        """Azure lists ETags bare and returns them quoted on a download: the adapter hands out
        one form, so a listed version and a read version of the same blob compare equal."""
        blobs.create_container(name)
        blobs.get_blob_client(name, "m/a.csv").upload_blob(b"a,b\n1,2\n")
        data = BlobData(blobs)
        (listed,) = data.listing(name, "m/")
        head = data.head(name, "m/a.csv")
        assert head is not None
        assert head.etag == listed.etag
        assert '"' not in head.etag
        assert head.last_modified == listed.last_modified

    def test_document_etags_are_bare_and_conditional_writes_still_work(
        self, blobs: BlobServiceClient, name: str
    ) -> None:
        store = BlobDocumentStore(blobs, name)
        etag = store.create("d.json", {"n": 1})
        found = store.read("d.json")
        assert found is not None
        assert found.etag == etag
        assert '"' not in etag
        newer = store.replace("d.json", {"n": 2}, etag)
        assert '"' not in newer
        with pytest.raises(StateConflict):
            store.replace("d.json", {"n": 3}, etag)


def test_an_idle_sweep_over_300_blobs_costs_a_listing_not_a_read_per_blob(
    azurite_connection: str, name: str
) -> None:
    """Storage requests of an idle sweep, counted on the wire: before ETags were normalised
    (the sweep never matched a listed blob to its arrival) this was 1,502 for 300 blobs. The
    batch is still open, so its files are looked at again, by reading the batch once."""
    from azure.core.pipeline.transport import RequestsTransport

    from retrain.clock import SystemClock
    from retrain.pipeline import Context, Places, Retrainer, Timing
    from tests.fakes import FakeTarget, FakeTraining, MemoryOutbox
    from tests.harness import spec as harness_spec

    requests_made: list[str] = []

    class Counting(RequestsTransport):
        def send(self, request: Any, **kwargs: Any) -> Any:
            requests_made.append(f"{request.method} {request.url.split('?')[0]}")
            return super().send(request, **kwargs)

    service = BlobServiceClient.from_connection_string(azurite_connection, transport=Counting())
    service.create_container(name)
    spec = harness_spec()  # the unit tests' model, as the pipeline sees it
    context = Context(
        models={"housing": spec},
        ledger=Ledger(BlobDocumentStore(service, name + "-state")),
        data=BlobData(service),
        outbox=MemoryOutbox(),
        training_for=lambda _: FakeTraining(),
        target_for=lambda _: FakeTarget(),
        places=Places(name, name + "-artifacts", name + "-q", "jobs", "evals"),
        timing=Timing(timedelta(seconds=30), timedelta(minutes=10), stall=timedelta(0)),
        clock=SystemClock(),
    )
    retrainer = Retrainer(context)
    for i in range(300):
        blob = f"housing/{i:04d}.csv"
        service.get_blob_client(name, blob).upload_blob(b"rooms,price\n1,2\n")
        assert retrainer.on_blob(name, blob) == "batched"
    retrainer.sweep()  # the first sweep after the arrivals looks at each once
    requests_made.clear()
    counts = retrainer.sweep()
    assert counts["blobs"] == counts["errors"] == 0
    # list the prefix (one page), read the model document and the listing mark; the batch's
    # run (none yet), its member records (one listing) and its log
    assert len(requests_made) == 6, requests_made


class TestEntries:
    """Member records: small records a listing returns with their content."""

    def test_an_entry_is_listed_with_its_content_in_one_request(
        self, blobs: BlobServiceClient, name: str
    ) -> None:
        store = BlobDocumentStore(blobs, name)
        odd = "housing/ünïcode 数据 ☃ & ?#%.csv"
        assert store.put_entry("b/1/x.json", {"name": odd, "size": 3}, replace=False)
        assert store.put_entry("b/1/y.json", {"name": "y"}, replace=False)
        store.create("b/2/z.json", {"name": "elsewhere"})
        assert dict(store.entries("b/1/")) == {
            "b/1/x.json": {"name": odd, "size": 3},
            "b/1/y.json": {"name": "y"},
        }

    def test_create_only_keeps_the_first_and_replace_overwrites(
        self, blobs: BlobServiceClient, name: str
    ) -> None:
        store = BlobDocumentStore(blobs, name)
        assert store.put_entry("m.json", {"n": 1}, replace=False)
        assert not store.put_entry("m.json", {"n": 2}, replace=False)
        assert store.entries("m") == [("m.json", {"n": 1})]
        assert store.put_entry("m.json", {"n": 3}, replace=True)
        assert store.entries("m") == [("m.json", {"n": 3})]

    def test_an_entry_too_large_for_metadata_is_kept_in_the_content(
        self, blobs: BlobServiceClient, name: str
    ) -> None:
        store = BlobDocumentStore(blobs, name)
        big = {"name": "界" * 1024, "requested": "r" * 4000}
        assert store.put_entry("big.json", big, replace=False)
        assert store.entries("big") == [("big.json", big)]

    def test_no_container_yet_lists_nothing(self, blobs: BlobServiceClient, name: str) -> None:
        assert BlobDocumentStore(blobs, name).entries("any/") == []


class TestLogs:
    """Batch logs: append blobs, unconditional appends, a seal that refuses any later one."""

    def test_appends_read_back_in_order_and_a_seal_refuses_the_next(
        self, blobs: BlobServiceClient, name: str
    ) -> None:
        store = BlobDocumentStore(blobs, name)
        key = "logs/housing/b1/00000.jsonl"
        assert store.append(key, {"name": "a"}) is Appended.MISSING
        assert store.read_log(key) is None
        assert store.start_log(key)
        assert not store.start_log(key)  # a second opener finds it, takes nothing away
        odd = "housing/ünïcode 数据 ☃ & ?#%.csv"
        assert store.append(key, {"name": odd}) is Appended.APPENDED
        assert store.append(key, {"name": "b", "n": 2}) is Appended.APPENDED
        assert store.seal_log(key)
        assert store.seal_log(key)  # sealing again changes nothing
        assert store.append(key, {"name": "late"}) is Appended.SEALED
        assert store.read_log(key) == Log([{"name": odd}, {"name": "b", "n": 2}], full=False)

    def test_a_missing_log_cannot_be_sealed(self, blobs: BlobServiceClient, name: str) -> None:
        store = BlobDocumentStore(blobs, name)
        store.start_log("other.jsonl")
        assert not store.seal_log("logs/none/00000.jsonl")

    def test_concurrent_appends_all_land_without_conflict(
        self, blobs: BlobServiceClient, name: str
    ) -> None:
        from concurrent.futures import ThreadPoolExecutor

        store = BlobDocumentStore(blobs, name)
        key = "logs/housing/b2/00000.jsonl"
        store.start_log(key)
        with ThreadPoolExecutor(8) as pool:
            results = list(pool.map(lambda i: store.append(key, {"name": f"f{i}"}), range(64)))
        assert set(results) == {Appended.APPENDED}
        found = store.read_log(key)
        assert found is not None
        assert sorted(e["name"] for e in found.entries) == sorted(f"f{i}" for i in range(64))


def test_instances_sharing_a_burst_never_conflict(azurite_connection: str, name: str) -> None:
    """Three instances (each its own ledger cache) take turns with arrivals of one model: each
    arrival costs three requests on the wire whatever the batch's size, none is refused with
    412 or 409, and the seal's run record lists every file once."""
    from azure.core.pipeline.transport import RequestsTransport

    from retrain.clock import ManualClock
    from retrain.messages import CheckBatch
    from retrain.pipeline import Context, Places, Retrainer, Timing
    from tests.fakes import FakeTarget, FakeTraining, MemoryOutbox
    from tests.harness import spec as harness_spec

    seen: list[tuple[str, int]] = []

    class Counting(RequestsTransport):
        def send(self, request: Any, **kwargs: Any) -> Any:
            response = super().send(request, **kwargs)
            seen.append((request.method, response.status_code))
            return response

    service = BlobServiceClient.from_connection_string(azurite_connection, transport=Counting())
    service.create_container(name)
    clock = ManualClock()
    outbox = MemoryOutbox()

    def instance() -> Retrainer:
        return Retrainer(
            Context(
                models={"housing": harness_spec()},
                ledger=Ledger(BlobDocumentStore(service, name + "-state")),
                data=BlobData(service),
                outbox=outbox,
                training_for=lambda _: FakeTraining(),
                target_for=lambda _: FakeTarget(),
                places=Places(name, name + "-artifacts", name + "-q", "jobs", "evals"),
                timing=Timing(timedelta(seconds=30), timedelta(minutes=10)),
                clock=clock,
            )
        )

    instances = [instance() for _ in range(3)]
    names = [f"housing/{i:03d}.csv" for i in range(60)]
    for blob in names:
        service.get_blob_client(name, blob).upload_blob(b"rooms,price\n1,2\n")
    for i, blob in enumerate(names[:6]):  # each instance warms up (reads the model once)
        assert instances[i % 3].on_blob(name, blob) == "batched"
    seen.clear()
    for i, blob in enumerate(names[6:]):
        assert instances[i % 3].on_blob(name, blob) == "batched"
    assert len(seen) == 3 * len(names[6:])
    assert not [status for _, status in seen if status in (409, 412)]
    ((_, check, _),) = outbox.take()
    assert isinstance(check, CheckBatch)
    clock.advance(seconds=3600)
    assert instances[1].on_check_batch(check) == "sealed"
    (run,) = instances[2].runs("housing")
    assert sorted(f["name"] for f in instances[0].run_files(run)) == names
