"""Training jobs (spec §3-4): deterministic names, the job body from the user's template,
PUT, status in neutral terms, cancel, and the failure text."""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from typing import Any

from retrain.azureml.lro import from_mutation
from retrain.azureml.template import slots
from retrain.azureml.workspace import ArmClient, as_object, object_of
from retrain.deploy import Progress
from retrain.errors import PermanentRemoteError, UsageError
from retrain.http import field_of, redact
from retrain.ports import Phase

NAME_PATTERN = re.compile(r"[a-zA-Z0-9][a-zA-Z0-9\-_]{0,254}")
"""Job (and MLflow run) names, spec §3.2; case-sensitive."""

JOB_STATES: dict[str, Phase] = {
    "NotStarted": Phase.NOT_STARTED,
    "Starting": Phase.NOT_STARTED,
    "Provisioning": Phase.NOT_STARTED,
    "Preparing": Phase.NOT_STARTED,
    "Queued": Phase.NOT_STARTED,
    "Running": Phase.RUNNING,
    "Finalizing": Phase.RUNNING,  # user code done, outputs being collected
    "CancelRequested": Phase.RUNNING,  # still moving; Canceled follows
    "Completed": Phase.FINISHED,
    "Failed": Phase.FAILED,
    "Canceled": Phase.CANCELLED,
    # Not final: NotResponding "can go back to any earlier state" (§4), Paused is a user's
    # pause and Unknown the service's default. Polling goes on; the run's deadline decides.
    "NotResponding": Phase.RUNNING,
    "Paused": Phase.RUNNING,
    "Unknown": Phase.RUNNING,
}
"""Every v2 JobStatus (spec §4) in the backend-neutral job states the pipeline tracks."""
STALLED = frozenset({"NotResponding", "Paused", "Unknown"})
"""Statuses that are not progress: reported as running, noted as stalled."""


def job_name(model: str, batch: str) -> str:
    """The job name of (model, batch): the same pair always gives the same valid name, and two
    pairs never share one (a hash of the exact pair keeps names apart after cleaning)."""
    if not model or not batch:
        raise UsageError("a job name needs a model name and a batch id")
    digest = hashlib.sha256(f"{model}\n{batch}".encode()).hexdigest()[:10]
    clean = re.sub(r"[^a-z0-9_-]+", "-", f"{model}-{batch}".casefold()).strip("-_")
    return f"retrain-{clean[: 255 - len('retrain--') - len(digest)]}-{digest}"


@dataclass(frozen=True)
class JobStatus:
    """A job as its GET shows it."""

    name: str
    status: str
    """The service's own word, e.g. `NotResponding`."""
    state: Phase
    studio_url: str | None
    outputs: dict[str, str]
    """Output name -> the URI the job writes it to, as the service echoes it."""

    @property
    def final(self) -> bool:
        """Whether the job will not change state again."""
        return self.state in (Phase.FINISHED, Phase.FAILED, Phase.CANCELLED)

    @property
    def stalled(self) -> bool:
        """Whether the service reports no progress (not final: it may recover)."""
        return self.status in STALLED or self.status not in JOB_STATES


class Jobs:
    """`{WS}/jobs`: submit, watch and cancel one training job."""

    def __init__(self, arm: ArmClient) -> None:
        self._arm = arm

    def _url(self, name: str, suffix: str = "") -> str:
        if NAME_PATTERN.fullmatch(name) is None:
            raise UsageError(f"{name!r} is not a valid job name (letters, digits, - and _)")
        return self._arm.url(f"/jobs/{name}{suffix}")

    def submit(self, name: str, body: dict[str, Any]) -> JobStatus:
        """PUT the job. Job PUT is not an LRO (§1.2): the answer is the job. A re-PUT of the
        same name (a redelivery) answers 200 and reruns nothing; if the service kept a job
        whose inputs or outputs differ from this body, that is an error, not a success."""
        what = f"PUT job {name}"
        response = self._arm.request(
            "PUT", self._url(name), what, body, conflict_is_transient=False
        )
        status = _status(name, object_of(response, what), what)
        sent = slots(body)
        for key, uri in sent.outputs.items():
            if status.outputs.get(key, uri) != uri:
                raise PermanentRemoteError(
                    f"{what}: a job named {name} already exists and writes {key!r} to "
                    f"{status.outputs[key]}, not {uri}; job names come from (model, batch), "
                    "so another run with the same batch id submitted it"
                )
        return status

    def status(self, name: str) -> JobStatus:
        """GET the job's `properties.status`."""
        what = f"GET job {name}"
        return _status(name, self._arm.get_json(self._url(name), what), what)

    def cancel(self, name: str) -> Progress:
        """POST .../cancel: 200 when done, 202 + Location to follow (spec §3.7). The job then
        goes through CancelRequested to Canceled; `status` shows it."""
        what = f"cancel job {name}"
        response = self._arm.request("POST", self._url(name, "/cancel"), what)
        return from_mutation(response, self._url(name), what)

    def failure(self, name: str) -> str:
        """Why a job failed. ARM's job has no error field (§4): run history's `error` is read,
        and the Studio link is the fallback when run history does not say."""
        what = f"run history of job {name}"
        job = self.status(name)
        info = self._arm.workspace_info()
        ws = self._arm.workspace
        url = f"{self._arm.data_plane_base(info)}/history/v1.0{ws.path}/runs/{name}/details"
        try:
            details = object_of(self._arm.request("GET", url, what), what)
        except PermanentRemoteError as exc:
            details = {"error": {"message": f"(run history unavailable: {exc})"}}
        text = _error_message(details.get("error"))
        studio = f" (see {job.studio_url})" if job.studio_url else ""
        if not text:
            return f"job {name} ended {job.status} without an error text{studio}"
        return redact(f"job {name} {job.status}: {text}")[:800] + studio


def _error_message(error: Any) -> str | None:
    """RunDetails.error is an ErrorResponse (`{"error": {"code", "message"}}`); a bare
    `{"code", "message"}` is read too, since the raw field names are unconfirmed (§4)."""
    if not isinstance(error, dict):
        return None
    inner = as_object(error.get("error")) or error
    message = inner.get("message")
    if not message:
        return None
    code = inner.get("code")
    return f"{code}: {message}" if code else str(message)


def _status(name: str, body: dict[str, Any], what: str) -> JobStatus:
    props = field_of(body, "properties", dict, what=what, required=True)
    raw = field_of(props, "status", str, what=what, required=True)
    services = field_of(props, "services", dict, what=what) or {}
    studio = as_object(services.get("Studio"))
    outputs: dict[str, str] = {}
    for key, out in (field_of(props, "outputs", dict, what=what) or {}).items():
        if isinstance(out, dict) and isinstance(out.get("uri"), str):
            outputs[key] = out["uri"]
    endpoint = studio.get("endpoint")
    return JobStatus(
        name=name,
        status=raw,
        state=JOB_STATES.get(raw, Phase.RUNNING),
        studio_url=endpoint if isinstance(endpoint, str) else None,
        outputs=outputs,
    )
