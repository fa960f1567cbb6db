"""The training backend: the BatchJobs protocol and its BES v2.0 adapter."""

from __future__ import annotations

import enum
import json
import logging
import re
from dataclasses import dataclass
from typing import Any, Protocol
from urllib.parse import quote

import requests

from retrain.errors import (
    PermanentRemoteError,
    RemoteError,
    TransientError,
    TransientRemoteError,
)
from retrain.http import call, field_of, json_headers, json_of, redact, shape_error

log = logging.getLogger(__name__)

API_VERSION = "2.0"
_JOB_ID = re.compile(r"^[A-Za-z0-9_-]{1,128}$")
PROBE_JOB = "0" * 32
"""A job id no service hands out (ids are random): its status GET must answer 404."""


def relative_location(container: str, name: str) -> str:
    """`container/name` as a URL path: the blob name percent-encoded per RFC 3986 (UTF-8),
    only unreserved characters and '/' left as they are. BES and the Classic endpoint append
    it to BaseLocation as it is, so a raw '#', '?', '%' or space would name another blob."""
    return f"{container}/{quote(name, safe='/')}"


@dataclass(frozen=True)
class BlobRef:
    """An AzureBlobDataReference in SAS mode. The token is a secret: never log it."""

    base_location: str
    relative_location: str
    sas_token: str

    @classmethod
    def to_blob(cls, base_location: str, container: str, name: str, sas_token: str) -> BlobRef:
        """The reference to blob `name` (unencoded) in `container`; the one place that encodes."""
        return cls(base_location.rstrip("/") + "/", relative_location(container, name), sas_token)

    def to_bes(self) -> dict[str, str | None]:
        """The reference as BES and Classic management expect it (PascalCase, unused = null)."""
        return {
            "ConnectionString": None,
            "BaseLocation": self.base_location,
            "RelativeLocation": self.relative_location,
            "SasBlobToken": self.sas_token,
        }

    @property
    def path(self) -> str:
        """'container/blob' (blob percent-encoded), without the leading slash some writers add;
        compares equal with the RelativeLocation a Classic endpoint reports back."""
        return self.relative_location.lstrip("/")

    def __repr__(self) -> str:
        return f"BlobRef({self.base_location!r}, {self.relative_location!r}, sas=<redacted>)"


class JobState(enum.Enum):
    """BES job states, in the order of the service's enum (0-4)."""

    NOT_STARTED = "NotStarted"
    RUNNING = "Running"
    FAILED = "Failed"
    CANCELLED = "Cancelled"
    FINISHED = "Finished"

    @property
    def terminal(self) -> bool:
        """Whether the job will not change state again."""
        return self in (JobState.FAILED, JobState.CANCELLED, JobState.FINISHED)


_BY_NUMBER = list(JobState)
_BY_NAME = {s.value.casefold(): s for s in JobState} | {"canceled": JobState.CANCELLED}


def parse_state(value: Any) -> JobState:
    """Normalise StatusCode: an int, a numeric string, or a name in any case, spaces or not."""
    if isinstance(value, bool):
        raise PermanentRemoteError(f"BES status: unknown StatusCode {value!r}")
    if isinstance(value, int) and 0 <= value < len(_BY_NUMBER):
        return _BY_NUMBER[value]
    if isinstance(value, str):
        text = "".join(value.split()).casefold()
        if text.isdigit() and int(text) < len(_BY_NUMBER):
            return _BY_NUMBER[int(text)]
        if text in _BY_NAME:
            return _BY_NAME[text]
    raise PermanentRemoteError(f"BES status: unknown StatusCode {value!r}")


@dataclass(frozen=True)
class JobStatus:
    """What a status GET said about a job."""

    state: JobState
    details: str | None
    outputs: dict[str, BlobRef]


class BatchJobs(Protocol):
    """Submit, start, watch and cancel a training job."""

    def submit(
        self,
        *,
        inputs: dict[str, BlobRef],
        outputs: dict[str, BlobRef],
        global_parameters: dict[str, str],
    ) -> str: ...

    def start(self, job_id: str) -> None: ...

    def status(self, job_id: str) -> JobStatus: ...

    def cancel(self, job_id: str) -> None: ...

    def probe(self) -> str:
        """Check the service answers and accepts the key, starting nothing; a fact to show."""
        ...


class BesClient:
    """BES v2.0 over HTTPS: `Authorization: Bearer <key>`, `api-version=2.0` on every call."""

    def __init__(
        self,
        jobs_url: str,
        api_key: str,
        *,
        session: requests.Session,
        timeout: tuple[float, float],
        key_setting: str | None = None,
    ) -> None:
        self._key_setting = key_setting
        """The app setting holding the key, to name in errors."""
        self._jobs_url = jobs_url.rstrip("/")
        self._headers = json_headers(api_key)
        self._session = session
        self._timeout = timeout

    def _url(self, suffix: str = "") -> str:
        return f"{self._jobs_url}{suffix}?api-version={API_VERSION}"

    def _job(self, job_id: str) -> str:
        if not _JOB_ID.match(job_id):
            raise PermanentRemoteError(f"BES: refusing to use malformed job id {job_id!r}")
        return f"/{job_id}"

    def submit(
        self,
        *,
        inputs: dict[str, BlobRef],
        outputs: dict[str, BlobRef],
        global_parameters: dict[str, str],
    ) -> str:
        """Create a job (it stays NotStarted until `start`); returns its id."""
        body = {
            "Inputs": {name: ref.to_bes() for name, ref in inputs.items()},
            "Outputs": {name: ref.to_bes() for name, ref in outputs.items()},
            "GlobalParameters": dict(global_parameters),
        }
        response = call(
            self._session,
            "POST",
            self._url(),
            what="BES submit",
            timeout=self._timeout,
            headers=self._headers,
            json_body=body,
            send_body=True,
        )
        job_id = json_of(response, what="BES submit")
        if not isinstance(job_id, str) or not _JOB_ID.match(job_id.strip('"')):
            raise shape_error("BES submit", "the reply", "a job id string", job_id)
        return job_id.strip('"')

    def start(self, job_id: str) -> None:
        """Start a submitted job."""
        call(
            self._session,
            "POST",
            self._url(self._job(job_id) + "/start"),
            what=f"BES start {job_id}",
            timeout=self._timeout,
            headers=self._headers,
            json_body={},
            send_body=True,
        )

    def status(self, job_id: str) -> JobStatus:
        """GET the job; a finished job's outputs carry fresh read-only SAS tokens."""
        what = f"BES status {job_id}"
        response = call(
            self._session,
            "GET",
            self._url(self._job(job_id)),
            what=what,
            timeout=self._timeout,
            headers=self._headers,
        )
        body = json_of(response, what=what)
        if not isinstance(body, dict):
            raise shape_error(what, "the reply", "a JSON object", body)
        code = body.get("StatusCode", body.get("Status Code"))
        if code is None:
            raise PermanentRemoteError(f"{what}: the response has no StatusCode")
        state = parse_state(code)
        outputs: dict[str, BlobRef] = {}
        results = field_of(body, "Results", dict, what=what) or {}
        for name, ref in results.items():
            if ref is None:
                continue
            where = f"{what}: Results[{name!r}]"
            if not isinstance(ref, dict):
                raise shape_error(where, "the reference", "a JSON object", ref)
            base = field_of(ref, "BaseLocation", str, what=where, required=True)
            relative = field_of(ref, "RelativeLocation", str, what=where, required=True)
            token = field_of(ref, "SasBlobToken", str, what=where)
            outputs[name] = BlobRef(base, relative, token or "")
        details = body.get("Details")
        if details is not None and not isinstance(details, str):
            details = json.dumps(details, default=str)
        return JobStatus(state, redact(details) if details is not None else None, outputs)

    def cancel(self, job_id: str) -> None:
        """DELETE the job (cancels it if running)."""
        call(
            self._session,
            "DELETE",
            self._url(self._job(job_id)),
            what=f"BES delete {job_id}",
            timeout=self._timeout,
            headers=self._headers,
        )

    def probe(self) -> str:
        """GET the status of a job that cannot exist: 404 means the service answered and took
        the key; 401/403 means the key is wrong. Nothing is submitted or started."""
        key = f"app setting {self._key_setting}" if self._key_setting else "the BES API key"
        try:
            response = call(
                self._session,
                "GET",
                self._url(f"/{PROBE_JOB}"),
                what="BES probe",
                timeout=self._timeout,
                headers=self._headers,
            )
        except RemoteError as exc:
            if exc.status == 404:
                return "BES service answers and accepts the key"
            if exc.status in (401, 403):
                raise PermanentRemoteError(
                    f"BES refused the key in {key} (HTTP {exc.status}): set it to the API key "
                    "of the training web service that training.jobs_url names",
                    status=exc.status,
                ) from exc
            got = f"HTTP {exc.status}" if exc.status else "no answer"
            kind = TransientRemoteError if isinstance(exc, TransientError) else PermanentRemoteError
            raise kind(
                f"BES probe: a status GET of an unknown job should answer 404, got {got} "
                f"({exc}); check training.jobs_url (the BES 'Batch Requests' URL, as copied)",
                status=exc.status,
            ) from exc
        raise PermanentRemoteError(
            f"BES probe: a status GET of an unknown job should answer 404, got HTTP "
            f"{response.status_code}; check training.jobs_url (the BES 'Batch Requests' URL)",
            status=response.status_code,
        )
