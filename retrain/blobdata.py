"""Training data in blob storage: the app's `DataStore` adapter (heads, reads, listings, the
frozen input copy, quarantine and SAS references)."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

from azure.core.exceptions import (
    AzureError,
    HttpResponseError,
    ResourceExistsError,
    ResourceModifiedError,
    ResourceNotFoundError,
)
from azure.storage.blob import BlobSasPermissions, BlobServiceClient

from retrain.bes import BlobRef
from retrain.errors import InputRejected, PermanentRemoteError, RetrainError
from retrain.http import RETRY_STATUSES
from retrain.sas import error_code, signer_for
from retrain.storage import (
    FROZEN_ETAG,
    FROZEN_FROM,
    HEAD_BYTES,
    BlobHead,
    BlobUnreadable,
    BlobVersion,
    Listed,
    normalize_etag,
    storage_error,
    wire_etag,
)

log = logging.getLogger(__name__)


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
            archived = error_code(exc) == "BlobArchived"
            if exc.status_code != 416 and not archived:  # 416: a range read of an empty blob
                raise storage_error(f"read {container}/{name}", exc) from exc
            if archived:
                return self._archived(blob, container, name)
        except AzureError as exc:
            raise storage_error(f"read {container}/{name}", exc) from exc
        props = _properties(blob, container, name)
        if props is None:
            return None
        return BlobHead(normalize_etag(props.etag), int(props.size), b"", props.last_modified)

    def _archived(self, blob: Any, container: str, name: str) -> BlobHead | None:
        props = _properties(blob, container, name)  # readable in the archive tier
        if props is None:
            return None
        raise BlobUnreadable(
            f"{container}/{name} is in the archive tier and cannot be read; rehydrate it to the "
            "hot or cool tier (a new version arrives as a new file)",
            etag=normalize_etag(props.etag),
            size=int(props.size),
        )

    def quarantine(self, container: str, name: str, target: str, reason: str) -> None:
        self._ensure(target)
        # Azure Storage (and Azurite) store a '\' in a name as '/': copy what is stored.
        stored = name.replace("\\", "/")
        source = BlobRef.to_blob(
            self._service.url,
            container,
            stored,
            "?"
            + self._signer.sign(
                container, stored, BlobSasPermissions(read=True), _in(timedelta(hours=1))
            ),
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
                raise storage_error(f"quarantine {container}/{name!r}", exc) from exc
            # Retrying cannot help (a name the service refuses, a copy it forbids): the arrival
            # record already holds the rejection and its reason.
            log.warning(
                "quarantine: %s/%r cannot be copied (HTTP %s); its rejection is recorded",
                container,
                name,
                exc.status_code,
            )
        except AzureError as exc:
            raise storage_error(f"quarantine {container}/{name!r}", exc) from exc

    def read_text(self, container: str, name: str, *, max_bytes: int) -> str:
        blob = self._service.get_blob_client(container, name)
        missing = PermanentRemoteError(
            f"{container}/{name} does not exist (the job wrote no output "
            "there; check the output names in the model spec)"
        )
        with _storage_errors(f"read {container}/{name}", missing):
            data = blob.download_blob(offset=0, length=max_bytes + 1).readall()
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
            raise storage_error(f"list {container}/{prefix}", exc) from exc

    def reference(self, container: str, name: str, *, write: bool, expires: datetime) -> BlobRef:
        if write:
            self._ensure(container)
        permission = (
            BlobSasPermissions(create=True, write=True) if write else BlobSasPermissions(read=True)
        )
        sas = self._signer.sign(container, name, permission, expires, _in(timedelta(minutes=-5)))
        return BlobRef.to_blob(self._service.url, container, name, "?" + sas)

    def freeze(self, source: BlobVersion, container: str, name: str) -> bool:
        from azure.core import MatchConditions

        target = self._service.get_blob_client(container, name)
        origin = f"{source.container}/{source.name}"
        props = _properties(target, container, name)
        version = normalize_etag(source.etag)
        if props is not None and (props.metadata or {}).get(FROZEN_ETAG) == version:
            status = props.copy.status if props.copy else "success"
            if status == "pending":
                return False
            if status == "success":
                return True  # made by an earlier delivery; a failed or aborted copy is redone
        self._ensure(container)
        sas = self._signer.sign(
            source.container,
            source.name,
            permission=BlobSasPermissions(read=True),
            expires=_in(timedelta(hours=1)),
        )
        url = self._service.get_blob_client(source.container, source.name).url
        changed = InputRejected(
            f"{origin} changed after it was validated: version {source.etag} no longer "
            "exists, so it cannot be trained (a new version is an arrival of its own)"
        )
        with _storage_errors(
            f"copy {origin} to {container}/{name}",
            changed,
            missing_when=(ResourceModifiedError, ResourceNotFoundError),
        ):
            result = target.start_copy_from_url(
                f"{url}?{sas}",
                metadata={FROZEN_FROM: _ascii(origin)[:1000], FROZEN_ETAG: version},
                source_etag=wire_etag(source.etag),
                source_match_condition=MatchConditions.IfNotModified,
            )
        return str(result.get("copy_status")) == "success"

    def _ensure(self, container: str) -> None:
        if container in self._created:
            return
        with contextlib.suppress(ResourceExistsError):
            self._service.create_container(container)
        self._created.add(container)


@contextlib.contextmanager
def _storage_errors(
    what: str,
    missing: RetrainError,
    *,
    missing_when: tuple[type[AzureError], ...] = (ResourceNotFoundError,),
) -> Iterator[None]:
    """Storage failures as the app's errors: `missing` when the blob is not there (or not as
    expected: `missing_when`), any other a transient `storage_error` about `what`."""
    try:
        yield
    except missing_when as exc:
        raise missing from exc
    except AzureError as exc:
        raise storage_error(what, exc) from exc


def _total_size(props: Any) -> int:
    # A ranged read reports the range's size; the blob's size is after the '/' in Content-Range.
    content_range = getattr(props, "content_range", None)
    if content_range and "/" in content_range:
        total = content_range.rsplit("/", 1)[1]
        if total.isdigit():
            return int(total)
    return int(props.size)


def _in(delta: timedelta) -> datetime:
    return datetime.now(UTC) + delta


def _ascii(text: str) -> str:
    return text.encode("ascii", "backslashreplace").decode("ascii")


def _properties(blob: Any, container: str, name: str) -> Any:
    """A blob's properties, or None when it does not exist."""
    try:
        return blob.get_blob_properties()
    except ResourceNotFoundError:
        return None
    except AzureError as exc:
        raise storage_error(f"read {container}/{name}", exc) from exc
