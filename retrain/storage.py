"""Azure Storage adapters: versioned JSON documents, training data access, and delayed messages."""

from __future__ import annotations

import contextlib
import json
import logging
import math
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, NamedTuple, Protocol

from azure.core.exceptions import (
    AzureError,
    HttpResponseError,
    ResourceExistsError,
    ResourceModifiedError,
    ResourceNotFoundError,
)
from azure.storage.blob import BlobSasPermissions, BlobServiceClient
from azure.storage.queue import QueueServiceClient, TextBase64EncodePolicy
from pydantic import BaseModel

from retrain.bes import BlobRef
from retrain.errors import (
    InputRejected,
    PermanentRemoteError,
    StateConflict,
    TransientRemoteError,
)
from retrain.http import RETRY_STATUSES, redact
from retrain.sas import signer_for

log = logging.getLogger(__name__)

HEAD_BYTES = 64 * 1024
"""How much of an arriving file is read to validate it: enough for any sane header line."""


class Versioned(NamedTuple):
    """A JSON document and the ETag it was read at."""

    doc: dict[str, Any]
    etag: str


class DocumentStore(Protocol):
    """JSON documents with optimistic concurrency: every write is conditional."""

    def read(self, key: str) -> Versioned | None: ...

    def create(self, key: str, doc: dict[str, Any]) -> str:
        """Create `key` only if absent (StateConflict otherwise); returns the new ETag."""
        ...

    def replace(self, key: str, doc: dict[str, Any], etag: str) -> str:
        """Overwrite `key` only if still at `etag` (StateConflict otherwise)."""
        ...

    def keys(self, prefix: str) -> list[str]: ...


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


def _wire(etag: str) -> str:
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


def _wrap(what: str, exc: AzureError) -> TransientRemoteError:
    # Storage errors can quote a request URL, a copy source's SAS among them.
    text = redact(f"storage {what}: {type(exc).__name__}: {exc.message or ''}")
    return TransientRemoteError(text[:400])


class BlobDocumentStore:
    """Documents as JSON blobs in one container; conditional writes on ETags."""

    def __init__(self, service: BlobServiceClient, container: str) -> None:
        self._container = service.get_container_client(container)
        self._ready = False

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
            raise _wrap(f"read {key}", exc) from exc
        return Versioned(json.loads(stream.readall()), normalize_etag(stream.properties.etag))

    def create(self, key: str, doc: dict[str, Any]) -> str:
        self._ensure()
        try:
            result = self._container.get_blob_client(key).upload_blob(_dump(doc), overwrite=False)
        except ResourceExistsError as exc:
            raise StateConflict(f"{key} already exists") from exc
        except AzureError as exc:
            raise _wrap(f"create {key}", exc) from exc
        return normalize_etag(result["etag"])

    def replace(self, key: str, doc: dict[str, Any], etag: str) -> str:
        from azure.core import MatchConditions

        try:
            result = self._container.get_blob_client(key).upload_blob(
                _dump(doc),
                overwrite=True,
                etag=_wire(etag),
                match_condition=MatchConditions.IfNotModified,
            )
        except (ResourceModifiedError, ResourceNotFoundError) as exc:
            raise StateConflict(f"{key} changed since it was read") from exc
        except AzureError as exc:
            raise _wrap(f"replace {key}", exc) from exc
        return normalize_etag(result["etag"])

    def keys(self, prefix: str) -> list[str]:
        try:
            return [b.name for b in self._container.list_blobs(name_starts_with=prefix)]
        except ResourceNotFoundError:
            return []


def _dump(doc: dict[str, Any]) -> bytes:
    return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode("utf-8")


class BlobData:
    """Training data, quarantine and artifacts in the app's storage account. SAS tokens are
    signed with the account key, or with user delegation keys on an identity connection."""

    def __init__(self, service: BlobServiceClient) -> None:
        self._service = service
        self._signer = signer_for(service)
        self._created: set[str] = set()

    def head(self, container: str, name: str) -> BlobHead | None:
        blob = self._service.get_blob_client(container, name)
        try:
            stream = blob.download_blob(offset=0, length=HEAD_BYTES)
            return BlobHead(
                normalize_etag(stream.properties.etag),
                _total_size(stream.properties),
                stream.readall(),
                stream.properties.last_modified,
            )
        except ResourceNotFoundError:
            return None
        except HttpResponseError as exc:
            archived = getattr(exc, "error_code", None) == "BlobArchived"
            if exc.status_code != 416 and not archived:  # 416: a range read of an empty blob
                raise _wrap(f"read {container}/{name}", exc) from exc
            if archived:
                return self._archived(blob, container, name)
        except AzureError as exc:
            raise _wrap(f"read {container}/{name}", exc) from exc
        try:
            props = blob.get_blob_properties()
        except ResourceNotFoundError:
            return None
        except AzureError as exc:
            raise _wrap(f"read {container}/{name}", exc) from exc
        return BlobHead(normalize_etag(props.etag), int(props.size), b"", props.last_modified)

    def _archived(self, blob: Any, container: str, name: str) -> BlobHead | None:
        try:
            props = blob.get_blob_properties()  # properties stay readable in the archive tier
        except ResourceNotFoundError:
            return None
        except AzureError as exc:
            raise _wrap(f"read {container}/{name}", exc) from exc
        raise BlobUnreadable(
            f"{container}/{name} is in the archive tier and cannot be read; rehydrate it to the "
            "hot or cool tier (a new version arrives as a new file)",
            etag=normalize_etag(props.etag),
            size=int(props.size),
        )

    def _sas(
        self,
        container: str,
        name: str,
        permission: BlobSasPermissions,
        expires: datetime,
        start: datetime | None = None,
    ) -> str:
        """A blob-scoped SAS; HTTPS only (`spr=https`) unless storage is a loopback emulator."""
        return self._signer.sign(container, name, permission, expires, start)

    def quarantine(self, container: str, name: str, target: str, reason: str) -> None:
        self._ensure(target)
        # Azure Storage (and Azurite) store a '\' in a name as '/': copy what is stored.
        stored = name.replace("\\", "/")
        source = BlobRef.to_blob(
            self._service.url,
            container,
            stored,
            "?"
            + self._sas(container, stored, BlobSasPermissions(read=True), _in(timedelta(hours=1))),
        )
        copy = self._service.get_blob_client(target, f"{container}/{stored}")
        try:
            copy.start_copy_from_url(
                source.base_location + source.relative_location + source.sas_token,
                metadata={"reason": _ascii(reason)[:1000], "source": _ascii(f"{container}/{name}")},
            )
        except ResourceNotFoundError:
            log.warning("quarantine: %s/%r vanished before it could be copied", container, name)
        except HttpResponseError as exc:
            if exc.status_code in RETRY_STATUSES:
                raise _wrap(f"quarantine {container}/{name!r}", exc) from exc
            # Retrying cannot help (a name the service refuses, a copy it forbids): the arrival
            # record already holds the rejection and its reason.
            log.warning(
                "quarantine: %s/%r cannot be copied (HTTP %s); its rejection is recorded",
                container,
                name,
                exc.status_code,
            )
        except AzureError as exc:
            raise _wrap(f"quarantine {container}/{name!r}", exc) from exc

    def read_text(self, container: str, name: str, *, max_bytes: int) -> str:
        blob = self._service.get_blob_client(container, name)
        try:
            stream = blob.download_blob(offset=0, length=max_bytes + 1)
            data = stream.readall()
        except ResourceNotFoundError as exc:
            raise PermanentRemoteError(
                f"{container}/{name} does not exist (the job wrote no output "
                "there; check the output names in the model spec)"
            ) from exc
        except AzureError as exc:
            raise _wrap(f"read {container}/{name}", exc) from exc
        if len(data) > max_bytes:
            raise PermanentRemoteError(f"{container}/{name} is larger than {max_bytes} bytes")
        return data.decode("utf-8-sig", errors="replace")

    def listing(self, container: str, prefix: str) -> list[Listed]:
        return [
            Listed(str(b.name), normalize_etag(b.etag), b.last_modified)
            for b in self._list(container, prefix)
        ]

    def newest(self, container: str, prefix: str) -> str | None:
        blobs = self._list(container, prefix)
        if not blobs:
            return None
        return str(max(blobs, key=lambda b: (b.last_modified, b.name)).name)

    def _list(self, container: str, prefix: str) -> list[Any]:
        client = self._service.get_container_client(container)
        try:
            return list(client.list_blobs(name_starts_with=prefix))
        except ResourceNotFoundError:
            return []
        except AzureError as exc:
            raise _wrap(f"list {container}/{prefix}", exc) from exc

    def reference(self, container: str, name: str, *, write: bool, expires: datetime) -> BlobRef:
        if write:
            self._ensure(container)
        permission = (
            BlobSasPermissions(create=True, write=True) if write else BlobSasPermissions(read=True)
        )
        sas = self._sas(container, name, permission, expires, _in(timedelta(minutes=-5)))
        return BlobRef.to_blob(self._service.url, container, name, "?" + sas)

    def freeze(self, source: BlobVersion, container: str, name: str) -> bool:
        from azure.core import MatchConditions

        target = self._service.get_blob_client(container, name)
        origin = f"{source.container}/{source.name}"
        try:
            props = target.get_blob_properties()
        except ResourceNotFoundError:
            props = None
        except AzureError as exc:
            raise _wrap(f"read {container}/{name}", exc) from exc
        version = normalize_etag(source.etag)
        if props is not None and (props.metadata or {}).get(FROZEN_ETAG) == version:
            status = props.copy.status if props.copy else "success"
            if status == "pending":
                return False
            if status == "success":
                return True  # made by an earlier delivery; a failed or aborted copy is redone
        self._ensure(container)
        sas = self._sas(
            source.container,
            source.name,
            permission=BlobSasPermissions(read=True),
            expires=_in(timedelta(hours=1)),
        )
        url = self._service.get_blob_client(source.container, source.name).url
        try:
            result = target.start_copy_from_url(
                f"{url}?{sas}",
                metadata={FROZEN_FROM: _ascii(origin)[:1000], FROZEN_ETAG: version},
                source_etag=_wire(source.etag),
                source_match_condition=MatchConditions.IfNotModified,
            )
        except (ResourceModifiedError, ResourceNotFoundError) as exc:
            raise InputRejected(
                f"{origin} changed after it was validated: version {source.etag} no longer "
                "exists, so it cannot be trained (a new version is an arrival of its own)"
            ) from exc
        except AzureError as exc:
            raise _wrap(f"copy {origin} to {container}/{name}", exc) from exc
        return str(result.get("copy_status")) == "success"

    def _ensure(self, container: str) -> None:
        if container in self._created:
            return
        with contextlib.suppress(ResourceExistsError):
            self._service.create_container(container)
        self._created.add(container)


def _total_size(props: Any) -> int:
    # A ranged read reports the range's size; the blob's size is after the '/' in Content-Range.
    content_range = getattr(props, "content_range", None)
    if content_range and "/" in content_range:
        total = content_range.rsplit("/", 1)[1]
        if total.isdigit():
            return int(total)
    return int(props.size)


def _in(delta: timedelta) -> datetime:
    from datetime import UTC

    return datetime.now(UTC) + delta


def _ascii(text: str) -> str:
    return text.encode("ascii", "backslashreplace").decode("ascii")


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
            raise _wrap(f"enqueue to {queue}", exc) from exc
