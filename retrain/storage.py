"""Azure Storage adapters: versioned JSON documents, training data access, and delayed messages."""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import math
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Any, NamedTuple, Protocol

from azure.core.exceptions import (
    AzureError,
    HttpResponseError,
    ResourceExistsError,
    ResourceModifiedError,
    ResourceNotFoundError,
)
from azure.storage.blob import BlobServiceClient, ContainerClient
from azure.storage.queue import QueueServiceClient, TextBase64EncodePolicy
from pydantic import BaseModel

from retrain.bes import BlobRef
from retrain.errors import (
    DocumentInvalid,
    PermanentRemoteError,
    StateConflict,
    TransientRemoteError,
)
from retrain.http import redact
from retrain.sas import error_code

log = logging.getLogger(__name__)

HEAD_BYTES = 64 * 1024
"""How much of an arriving file is read to validate it: enough for any sane header line."""


class Versioned(NamedTuple):
    """A JSON document and the ETag it was read at."""

    doc: dict[str, Any]
    etag: str


LOG_BLOCKS = 50_000
"""The most blocks an append blob holds (Azure Storage's limit): a log takes one entry per block,
so a log segment is full at this many entries and the next one takes over."""


class Appended(StrEnum):
    """What an append to a log did."""

    APPENDED = "appended"
    SEALED = "sealed"
    """The log is sealed: nothing joins it any more."""
    MISSING = "missing"
    """There is no such log."""
    FULL = "full"
    """The log holds as many entries as it can; the next segment takes over."""


class Log(NamedTuple):
    """A log's entries in the order they were appended, and whether it is full."""

    entries: list[dict[str, Any]]
    full: bool


class DocumentStore(Protocol):
    """JSON documents with optimistic concurrency: every write is conditional.

    Logs are append-only lists of small entries (an append blob each): an append needs no
    condition, so any number of writers add to one log without conflicts, and a seal makes the
    log read-only for good (an append after it is refused). That is what batch membership is
    made of: whatever a log held when it was sealed is the batch.
    """

    def read(self, key: str) -> Versioned | None: ...

    def create(self, key: str, doc: dict[str, Any]) -> str:
        """Create `key` only if absent (StateConflict otherwise); returns the new ETag."""
        ...

    def replace(self, key: str, doc: dict[str, Any], etag: str) -> str:
        """Overwrite `key` only if still at `etag` (StateConflict otherwise)."""
        ...

    def keys(self, prefix: str) -> list[str]: ...

    def put_entry(self, key: str, entry: dict[str, Any], *, replace: bool) -> bool:
        """Write a small record that `entries` lists with its content: create-only (False when
        it already exists), or with `replace`, create or overwrite."""
        ...

    def entries(self, prefix: str) -> list[tuple[str, dict[str, Any]]]:
        """Every small record under `prefix` with its content, from one listing."""
        ...

    def start_log(self, key: str) -> bool:
        """Create the empty log `key` unless it exists; False when it did."""
        ...

    def append(self, key: str, entry: dict[str, Any]) -> Appended:
        """Add `entry` at the end of log `key` (one request, no condition)."""
        ...

    def seal_log(self, key: str) -> bool:
        """Make log `key` read-only for good (again: no change); False when there is none."""
        ...

    def read_log(self, key: str) -> Log | None:
        """Log `key` as it is now, or None when there is none."""
        ...


def normalize_etag(etag: object) -> str:
    """An ETag without its quotes (or weak marker): listings give `0x8D…`, downloads `"0x8D…"`.

    Every ETag that leaves this module goes through here, so the two compare equal.
    """
    text = str(etag).strip()
    if text.startswith("W/"):
        text = text[2:]
    if len(text) >= 2 and text[0] == text[-1] == '"':
        text = text[1:-1]
    return text


def wire_etag(etag: str) -> str:
    """An ETag as an If-Match header carries it (quoted)."""
    return f'"{normalize_etag(etag)}"'


class BlobUnreadable(PermanentRemoteError):
    """The blob exists but its content cannot be read as it is (e.g. in the archive tier)."""

    def __init__(self, message: str, *, etag: str, size: int) -> None:
        super().__init__(message, status=409)
        self.etag = etag
        self.size = size


@dataclass(frozen=True)
class BlobHead:
    """What validation needs from an arriving blob: identity, size and its first bytes."""

    etag: str
    size: int
    head: bytes
    last_modified: datetime | None = None
    """The blob's own Last-Modified (from the same read's properties), when known."""


class Listed(NamedTuple):
    """One blob of a listing."""

    name: str
    etag: str
    last_modified: datetime


@dataclass(frozen=True)
class BlobVersion:
    """One version of one blob: the validated thing a run trains on."""

    container: str
    name: str
    etag: str


FROZEN_FROM = "retrain_source"
FROZEN_ETAG = "retrain_source_etag"
"""Metadata on a run's input copy naming the blob version it was copied from."""


class DataStore(Protocol):
    """Access to training data and the app's own artifacts."""

    def head(self, container: str, name: str) -> BlobHead | None:
        """The blob's ETag, size and first HEAD_BYTES, or None if it no longer exists.

        Raises BlobUnreadable when the blob exists but its content cannot be read (archived).
        """
        ...

    def quarantine(self, container: str, name: str, target: str, reason: str) -> None:
        """Copy the blob to the quarantine container with the reason in metadata."""
        ...

    def read_text(self, container: str, name: str, *, max_bytes: int) -> str: ...

    def listing(self, container: str, prefix: str) -> list[Listed]:
        """Name, ETag and last-modified time of every blob under `prefix`."""
        ...

    def newest(self, container: str, prefix: str) -> str | None:
        """The most recently modified blob under `prefix`."""
        ...

    def reference(self, container: str, name: str, *, write: bool, expires: datetime) -> BlobRef:
        """A SAS reference to one blob: read-only, or create/write for job outputs."""
        ...

    def freeze(self, source: BlobVersion, container: str, name: str) -> bool:
        """Copy exactly version `source` to `container/name` (server-side, once); True when
        the copy is complete, False while the service is still copying. Raises InputRejected
        when that version no longer exists (the blob was overwritten or deleted)."""
        ...


class Outbox(Protocol):
    """Sends queue messages, optionally invisible for a while."""

    def send(self, queue: str, message: BaseModel, *, delay: timedelta = timedelta(0)) -> None: ...

    def send_raw(self, queue: str, body: str) -> None:
        """Send a body as it is (replaying a kept message)."""
        ...


def storage_error(what: str, exc: AzureError) -> TransientRemoteError:
    # Storage errors can quote a request URL, a copy source's SAS among them.
    text = redact(f"storage {what}: {type(exc).__name__}: {exc.message or ''}")
    return TransientRemoteError(text[:400])


class BlobDocumentStore:
    """Documents as JSON blobs in one container; conditional writes on ETags."""

    def __init__(self, service: BlobServiceClient, container: str) -> None:
        self._container = service.get_container_client(container)
        self._ready = False

    @classmethod
    def over(cls, container: ContainerClient) -> BlobDocumentStore:
        """The store over a container client the caller already has."""
        store = cls.__new__(cls)
        store._container, store._ready = container, False
        return store

    def _ensure(self) -> None:
        if not self._ready:
            with contextlib.suppress(ResourceExistsError):
                self._container.create_container()
            self._ready = True

    def read(self, key: str) -> Versioned | None:
        try:
            stream = self._container.download_blob(key)
        except ResourceNotFoundError:
            return None
        except AzureError as exc:
            raise storage_error(f"read {key}", exc) from exc
        return Versioned(json.loads(stream.readall()), normalize_etag(stream.properties.etag))

    def create(self, key: str, doc: dict[str, Any]) -> str:
        self._ensure()
        try:
            result = self._container.get_blob_client(key).upload_blob(_dump(doc), overwrite=False)
        except ResourceExistsError as exc:
            raise StateConflict(f"{key} already exists") from exc
        except AzureError as exc:
            raise storage_error(f"create {key}", exc) from exc
        return normalize_etag(result["etag"])

    def replace(self, key: str, doc: dict[str, Any], etag: str) -> str:
        from azure.core import MatchConditions

        try:
            result = self._container.get_blob_client(key).upload_blob(
                _dump(doc),
                overwrite=True,
                etag=wire_etag(etag),
                match_condition=MatchConditions.IfNotModified,
            )
        except (ResourceModifiedError, ResourceNotFoundError) as exc:
            raise StateConflict(f"{key} changed since it was read") from exc
        except AzureError as exc:
            raise storage_error(f"replace {key}", exc) from exc
        return normalize_etag(result["etag"])

    def keys(self, prefix: str) -> list[str]:
        try:
            return [b.name for b in self._container.list_blobs(name_starts_with=prefix)]
        except ResourceNotFoundError:
            return []

    def put_entry(self, key: str, entry: dict[str, Any], *, replace: bool) -> bool:
        """An empty blob whose metadata carries the entry, so a listing returns it; an entry
        too large for metadata (a very long name, a long reason) goes in the content instead."""
        self._ensure()
        encoded = base64.b64encode(_dump(entry)).decode("ascii")
        body, metadata = (
            (b"", {ENTRY_FIELD: encoded})
            if len(encoded) <= ENTRY_INLINE
            else (
                _dump(entry),
                {ENTRY_FIELD: ""},
            )
        )
        try:
            self._container.get_blob_client(key).upload_blob(
                body, overwrite=replace, metadata=metadata
            )
        except ResourceExistsError:
            return False
        except AzureError as exc:
            raise storage_error(f"write {key}", exc) from exc
        return True

    def entries(self, prefix: str) -> list[tuple[str, dict[str, Any]]]:
        found: list[tuple[str, dict[str, Any]]] = []
        try:
            for blob in self._container.list_blobs(name_starts_with=prefix, include=["metadata"]):
                encoded = (blob.metadata or {}).get(ENTRY_FIELD)
                if encoded:
                    found.append((blob.name, json.loads(base64.b64decode(encoded))))
                else:
                    read = self.read(blob.name)
                    if read is not None:
                        found.append((blob.name, read.doc))
        except ResourceNotFoundError:
            return []
        except AzureError as exc:
            raise storage_error(f"list {prefix}", exc) from exc
        return found

    def start_log(self, key: str) -> bool:
        self._ensure()
        try:
            self._container.get_blob_client(key).create_append_blob(if_none_match="*")
        except ResourceExistsError:
            return False
        except AzureError as exc:
            raise storage_error(f"create log {key}", exc) from exc
        return True

    def append(self, key: str, entry: dict[str, Any]) -> Appended:
        try:
            self._container.get_blob_client(key).append_block(_dump(entry) + b"\n")
        except ResourceNotFoundError:
            return Appended.MISSING
        except HttpResponseError as exc:
            refused = _LOG_REFUSALS.get(error_code(exc) or "")
            if refused is None:
                raise storage_error(f"append to {key}", exc) from exc
            return refused
        except AzureError as exc:
            raise storage_error(f"append to {key}", exc) from exc
        return Appended.APPENDED

    def seal_log(self, key: str) -> bool:
        try:
            self._container.get_blob_client(key).seal_append_blob()
        except ResourceNotFoundError:
            return False
        except AzureError as exc:
            raise storage_error(f"seal log {key}", exc) from exc
        return True

    def read_log(self, key: str) -> Log | None:
        try:
            stream = self._container.download_blob(key)
            body = stream.readall()
        except ResourceNotFoundError:
            return None
        except AzureError as exc:
            raise storage_error(f"read log {key}", exc) from exc
        blocks = stream.properties.append_blob_committed_block_count or 0
        return Log(parse_log(key, body), blocks >= LOG_BLOCKS)


_LOG_REFUSALS = {"BlobIsSealed": Appended.SEALED, "BlockCountExceedsLimit": Appended.FULL}
"""The error codes of an Append Block refused for what the log is, not for the request."""


def parse_log(key: str, body: bytes) -> list[dict[str, Any]]:
    """A log's entries, one JSON object per line; a line that is not one is named."""
    entries: list[dict[str, Any]] = []
    for number, line in enumerate(body.splitlines(), start=1):
        try:
            entry = json.loads(line)
        except ValueError:
            entry = None
        if not isinstance(entry, dict):
            raise DocumentInvalid(f"{key}: line {number} is not a JSON object; fix or remove it")
        entries.append(entry)
    return entries


ENTRY_FIELD = "entry"
ENTRY_INLINE = 7 * 1024
"""Blob metadata holds at most 8 KiB in all: an entry whose encoding is longer is stored as the
blob's content (and read separately when listed)."""


def _dump(doc: dict[str, Any]) -> bytes:
    return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode("utf-8")


class QueueOutbox:
    """Storage queues, base64-encoded as the Functions queue trigger expects by default."""

    def __init__(self, service: QueueServiceClient) -> None:
        self._service = service

    def send(self, queue: str, message: BaseModel, *, delay: timedelta = timedelta(0)) -> None:
        self._send(queue, message.model_dump_json(), delay)

    def send_raw(self, queue: str, body: str) -> None:
        self._send(queue, body, timedelta(0))

    def _send(self, queue: str, body: str, delay: timedelta) -> None:
        client = self._service.get_queue_client(
            queue, message_encode_policy=TextBase64EncodePolicy()
        )
        # Round up: a check scheduled for the end of a quiet period must not arrive before it.
        seconds = max(0, min(math.ceil(delay.total_seconds()), 7 * 24 * 3600 - 1))
        try:
            client.send_message(body, visibility_timeout=seconds or None)
        except ResourceNotFoundError:
            with contextlib.suppress(ResourceExistsError):
                client.create_queue()
            client.send_message(body, visibility_timeout=seconds or None)
        except AzureError as exc:
            raise storage_error(f"enqueue to {queue}", exc) from exc
