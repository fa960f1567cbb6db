"""`python -m retrain check`, storage part: the mode in use and whether the app can work there.

Each check does the least that proves a permission: a user delegation key for five minutes, a
one-blob listing of each container, a small blob written and deleted in the artifacts
container, a peek at each queue, and a message sent invisible to the jobs queue and deleted at
once (its trigger never sees it). A refusal names the built-in role that grants what failed.
"""

from __future__ import annotations

import functools
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING

from azure.core.exceptions import AzureError, ResourceNotFoundError

from retrain.errors import RetrainError
from retrain.sas import DELEGATION_ROLES, access_problem, get_delegation_key, why

if TYPE_CHECKING:
    from azure.storage.blob import BlobServiceClient
    from azure.storage.queue import QueueServiceClient

    from retrain.connection import StorageConnection

BLOB_ROLES = (
    "assign the app's identity 'Storage Blob Data Contributor' (or 'Storage Blob Data Owner') "
    "on the storage account"
)
QUEUE_ROLES = "assign the app's identity 'Storage Queue Data Contributor' on the storage account"
PROBE_PREFIX = "retrain-check/"
"""Where the write check puts (and at once deletes) its blob in the artifacts container."""


@dataclass(frozen=True)
class StorageCheck:
    """One line of the check's report."""

    check: str
    ok: bool
    detail: str


@dataclass(frozen=True)
class StoragePlaces:
    """The containers and queues the app works in."""

    data: str
    state: str
    artifacts: str
    quarantine: str
    queues: tuple[str, ...]


def check(
    connection: StorageConnection,
    blobs: BlobServiceClient,
    queues: QueueServiceClient,
    places: StoragePlaces,
) -> list[StorageCheck]:
    """Every storage check, in order; none raises."""
    found = [StorageCheck("storage mode", True, connection.describe())]
    if connection.uses_identity:
        found.append(_run("user delegation key", DELEGATION_ROLES, lambda: _delegation(blobs)))
    for role, container in (
        ("data", places.data),
        ("state", places.state),
        ("artifacts", places.artifacts),
        ("quarantine", places.quarantine),
    ):
        found.append(
            _run(
                f"{role} container {container}",
                BLOB_ROLES,
                functools.partial(_read, blobs, container),
            )
        )
    found.append(
        _run(
            f"write to {places.artifacts}",
            BLOB_ROLES,
            lambda: _write(blobs, places.artifacts),
        )
    )
    for queue in places.queues:
        found.append(_run(f"queue {queue}", QUEUE_ROLES, functools.partial(_peek, queues, queue)))
    if places.queues:
        first = places.queues[0]
        found.append(
            _run(f"send to {first}", QUEUE_ROLES, lambda: _send(queues, first)),
        )
    return found


def _run(name: str, roles: str, probe: Callable[[], str]) -> StorageCheck:
    try:
        return StorageCheck(name, True, probe())
    except AzureError as exc:
        problem = access_problem(exc, roles)
        return StorageCheck(name, False, problem or f"storage answered: {why(exc)}")
    except RetrainError as exc:
        return StorageCheck(name, False, str(exc))


def _delegation(blobs: BlobServiceClient) -> str:
    from datetime import UTC, datetime

    now = datetime.now(UTC)
    key = get_delegation_key(blobs, now - timedelta(minutes=5), now + timedelta(minutes=5))
    return f"granted (valid until {key.signed_expiry})"


def _readable(look: Callable[[], object], *, created_on: str) -> str:
    """Whether a container or queue can be read: `look` reads one item of it."""
    try:
        look()
    except ResourceNotFoundError:
        return f"not created yet (the app creates it on {created_on})"
    return "readable"


def _read(blobs: BlobServiceClient, container: str) -> str:
    client = blobs.get_container_client(container)
    return _readable(
        lambda: next(iter(client.list_blobs(results_per_page=1).by_page()), None),
        created_on="first use",
    )


def _write(blobs: BlobServiceClient, container: str) -> str:
    client = blobs.get_container_client(container)
    try:
        client.create_container()
    except AzureError as exc:
        if getattr(exc, "status_code", None) != 409:  # 409: exists already
            raise
    probe = client.get_blob_client(f"{PROBE_PREFIX}{uuid.uuid4().hex}")
    probe.upload_blob(b"retrain check")
    probe.delete_blob()
    return "a blob was written and deleted"


def _peek(queues: QueueServiceClient, queue: str) -> str:
    client = queues.get_queue_client(queue)
    return _readable(lambda: client.peek_messages(max_messages=1), created_on="first send")


def _send(queues: QueueServiceClient, queue: str) -> str:
    client = queues.get_queue_client(queue)
    try:
        # Invisible for 10 minutes and deleted at once: the queue's trigger never sees it.
        sent = client.send_message("retrain check", visibility_timeout=600)
    except ResourceNotFoundError:
        return "not created yet (the app creates it on first send)"
    client.delete_message(sent.id, sent.pop_receipt)
    return "a message was sent and deleted"
