"""What the emulated services share: their state (faults, recorded calls and violations, a
lock, the clock), the errors they answer with, and how they read references and score rows."""

from __future__ import annotations

import re
import threading
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote

from azure.storage.blob import BlobClient

from localdev import learn
from localdev.emuhttp import Faults as BaseFaults
from localdev.emuhttp import HttpError as HttpError
from localdev.emuhttp import Recording, log
from retrain.clock import Clock

AUTH_FAILED = (
    "AuthenticationFailed: Server failed to authenticate the request. Make sure the value of "
    "Authorization header is formed correctly including the signature."
)
"""What Azure Storage answers for a URL whose path does not match what the SAS signed."""

_ENCODED = re.compile(r"(?:[A-Za-z0-9._~/-]|%[0-9A-Fa-f]{2})*")


@dataclass
class Faults(BaseFaults):
    """Faults to inject (see `localdev.emuhttp.Faults`)."""

    fail_details: str = "Module execution encountered an internal error (injected)."


@dataclass
class Shared(Recording):
    """State every emulated service reads or records into."""

    account_key: str | None = None
    """The storage account's key: result SAS tokens, and the New service's linked storage."""
    clock: Clock | None = None
    """With a clock, a job lasts `faults.job_seconds` of *its* time and finishes when a status
    request finds the time passed (no thread, no waiting): hours run in seconds."""
    faults: Faults = field(default_factory=Faults)
    calls: list[tuple[str, str, int]] = field(default_factory=list)
    """Every answered (or dropped, status 0) request: (method, path, status)."""
    violations: list[dict[str, Any]] = field(default_factory=list)
    """Contract breaches by the client: {"kind", "job", "detail"}; kinds: "second start",
    "poll under 1 s", "second job on blob version", "unencoded reference"."""
    lock: threading.RLock = field(default_factory=threading.RLock)

    def violation(self, kind: str, job: str | None, detail: str) -> None:
        """Record a breach of the contract by the client (never a secret in `detail`)."""
        with self.lock:
            self.violations.append({"kind": kind, "job": job, "detail": detail})
        log.warning("contract violation: %s (job %s): %s", kind, job, detail)


class BadRequest(HttpError):
    """A 400 with a message, as the service would answer."""

    def __init__(self, message: str) -> None:
        super().__init__(400, "BadArgument", message)


class Conflict(HttpError):
    """A 409: another operation is in progress, or a job was started already."""

    def __init__(self, message: str, *, code: str = "Conflict") -> None:
        super().__init__(409, code, message)


class JobError(Exception):
    """The job failed; the message becomes the status Details."""


def unencoded(relative: str) -> bool:
    """Whether a RelativeLocation holds a raw character a URL path cannot carry as it is.

    Allowed: RFC 3986 unreserved characters, "/" and "%XX" triplets. Anything else ("#", "?",
    a space, "%" not followed by two hex digits, a backslash, a newline, non-ASCII) changes the
    URL Storage sees, so its signature no longer matches.
    """
    return _ENCODED.fullmatch(relative) is None


def blob_path(relative: str) -> str:
    """'container/name' of an (encoded) RelativeLocation: percent-decoded, no leading slash."""
    return unquote(relative.lstrip("/"), errors="strict")


def plain_etag(value: str | None) -> str:
    """An ETag without quotes (listings and downloads disagree on them)."""
    text = (value or "").strip()
    if text.startswith("W/"):
        text = text[2:]
    return text.strip('"')


def blob(ref: dict[str, Any]) -> BlobClient:
    """The blob an (encoded) reference names. `from_blob_url` percent-decodes the container and
    the name (splitting at raw "/" first) and the client encodes them again on each request."""
    relative = str(ref["RelativeLocation"]).lstrip("/")
    if ref.get("ConnectionString"):
        container, _, name = blob_path(relative).partition("/")
        return BlobClient.from_connection_string(ref["ConnectionString"], container, name)
    sas = ref.get("SasBlobToken") or ""
    return BlobClient.from_blob_url(f"{ref['BaseLocation']}{relative}{sas}")


def score(model: dict[str, Any] | None, body: dict[str, Any]) -> dict[str, Any]:
    """RRS: score the rows of input1 with a service's current model."""
    if model is None:
        raise BadRequest("the endpoint has no trained model yet")
    table = (body.get("Inputs") or {}).get("input1") or {}
    names, values = table.get("ColumnNames") or [], table.get("Values") or []
    index = {n: i for i, n in enumerate(names)}
    missing = [f for f in model["features"] if f not in index]
    if missing:
        raise BadRequest(f"missing feature(s): {missing}")
    scored = [
        [*row, learn.predict(model, [float(row[index[f]]) for f in model["features"]])]
        for row in values
    ]
    return {
        "Results": {
            "output1": {
                "type": "table",
                "value": {"ColumnNames": [*names, "Scored Labels"], "Values": scored},
            }
        }
    }
