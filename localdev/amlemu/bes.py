"""BES v2.0: batch jobs of a training web service (submit, start, status, delete).

Jobs really train: a job reads its input through the reference it was given, fits a small
model, and writes the `.ilearner` and an Evaluate Model CSV. The service records what a client
did wrong: a second start (refused with 409), status polls of one job under 1 s apart, a second
job on a blob version an earlier job trained, and references that are not percent-encoded.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import urlsplit

from azure.storage.blob import BlobSasPermissions, generate_blob_sas

from localdev import learn
from localdev.amlemu.common import (
    AUTH_FAILED,
    BadRequest,
    Conflict,
    HttpError,
    JobError,
    Shared,
    blob,
    blob_path,
    plain_etag,
    unencoded,
)
from localdev.amlemu.routes import ANY, Reply, Request, Route, not_allowed, route

_SERVICE = r"/workspaces/(?P<workspace>[^/]+)/services/(?P<service>[^/]+)"
JOBS = _SERVICE + r"/jobs/?"
START = _SERVICE + r"/jobs/(?P<job>[^/]+)/start/?"
JOB = _SERVICE + r"/jobs/(?P<job>[^/]+)(?:/start)?/?"
"""A job, also reached through its /start path by GET and DELETE (as the service always was)."""
_STATUS = re.compile(_SERVICE + r"/jobs/(?P<job>[^/]+)/?")
"""A status poll's path (GET)."""

ChampionModel = Callable[[str, str | None], dict[str, Any] | None]
"""The current model of the endpoint (workspace, RRS service id) a service evaluates against."""


@dataclass
class TrainingService:
    """A training web service reachable through BES."""

    workspace: str
    service: str
    api_key: str
    label_parameter: str = "Label Column"
    champion_endpoint: str | None = None
    """If set, the Evaluate Model output also scores this endpoint's model (a second row)."""


@dataclass
class Job:
    """One BES job."""

    id: str
    service: TrainingService
    request: dict[str, Any]
    state: str = "NotStarted"
    details: str | None = None
    results: dict[str, Any] | None = None
    started_at: datetime | None = None
    data: bytes | None = None
    """The input as the job read it when it started."""
    read_error: str | None = None
    """Why reading the input failed (the job fails with it)."""
    done: threading.Event = field(default_factory=threading.Event)
    cancel: threading.Event = field(default_factory=threading.Event)


class Bes:
    """The training web services and their jobs."""

    def __init__(
        self, shared: Shared, services: list[dict[str, Any]], champion_model: ChampionModel
    ) -> None:
        self.shared = shared
        self.services = {(s["workspace"], s["service"]): TrainingService(**s) for s in services}
        self.champion_model = champion_model
        self.jobs: dict[str, Job] = {}
        self.started: list[tuple[str, list[str]]] = []
        """Every job that was started, with its output locations (kept after DELETE)."""
        self.trained: list[dict[str, Any]] = []
        """One per job that read its input: {"job", "version", "blob", "etag", "sha256"}."""
        self._polled: dict[str, float] = {}
        self._versions: dict[tuple[str, str], str] = {}

    def routes(self) -> list[Route]:
        """The BES route table."""
        return [
            route("POST", JOBS, self._submit),
            route(ANY, JOBS, self._jobs_other),
            route("POST", START, self._start),
            route("GET", JOB, self._status),
            route("DELETE", JOB, self._delete),
            route(ANY, JOB, self._job_other),
        ]

    def observe(self, method: str, path: str) -> None:
        """Note a status poll as it arrives, before any fault decides its answer."""
        found = _STATUS.fullmatch(path)
        if method == "GET" and found is not None:
            self.note_poll(found["job"])

    # ---- HTTP

    def _service(self, request: Request) -> TrainingService:
        service = self.services.get((request.params["workspace"], request.params["service"]))
        if service is None:
            raise HttpError(404, "WebServiceNotFound")
        request.authorize(service.api_key)
        if request.query.get("api-version") != ["2.0"]:
            raise HttpError(400, "BadArgument", "api-version=2.0 is required")
        return service

    def _job(self, request: Request) -> Job:
        service = self._service(request)
        job = self.jobs.get(request.params["job"])
        if job is None or job.service is not service:
            raise HttpError(404, "JobNotFound")
        return job

    def _submit(self, request: Request) -> Reply:
        return Reply(200, self.submit(self._service(request), request.body or {}))

    def _jobs_other(self, request: Request) -> Reply:
        self._service(request)
        raise not_allowed()

    def _start(self, request: Request) -> Reply:
        self.start(self._job(request))
        return Reply(200)

    def _status(self, request: Request) -> Reply:
        job = self.status(self._job(request))
        return Reply(200, {"StatusCode": job.state, "Results": job.results, "Details": job.details})

    def _delete(self, request: Request) -> Reply:
        job = self._job(request)
        job.cancel.set()
        if job.state in ("NotStarted", "Running"):
            job.state = "Cancelled"
        del self.jobs[job.id]
        return Reply(200)

    def _job_other(self, request: Request) -> Reply:
        self._job(request)
        raise not_allowed()

    # ---- the service

    def note_poll(self, job_id: str) -> None:
        """A status GET of a job arrived; two within 1 s of each other is a violation."""
        now = self.shared.seconds()
        with self.shared.lock:
            if job_id not in self.jobs:
                return
            last = self._polled.get(job_id)
            self._polled[job_id] = now
        if last is not None and now - last < 1.0:
            self.shared.violation("poll under 1 s", job_id, f"status GETs {now - last:.3f} s apart")

    def submit(self, service: TrainingService, body: dict[str, Any]) -> str:
        """Register a job in NotStarted; nothing runs until start."""
        for name, ref in (body.get("Outputs") or {}).items():
            if not isinstance(ref, dict) or not ref.get("RelativeLocation"):
                raise BadRequest(f"output {name!r}: missing RelativeLocation")
        if not isinstance(body.get("Inputs"), dict):
            raise BadRequest("Inputs must be an object keyed by web service input name")
        job = Job(uuid.uuid4().hex, service, body)
        with self.shared.lock:
            self.jobs[job.id] = job
        for side in ("Inputs", "Outputs"):
            for name, ref in (body.get(side) or {}).items():
                relative = str((ref or {}).get("RelativeLocation") or "")
                if unencoded(relative):
                    # Accepted here; the job fails when Storage refuses the URL.
                    self.shared.violation(
                        "unencoded reference", job.id, f"{side} {name!r}: {relative!r}"
                    )
        return job.id

    def start(self, job: Job) -> None:
        """Run the job in the background; a job that is not NotStarted cannot start again."""
        with self.shared.lock:
            if job.state != "NotStarted":
                self.shared.violation(
                    "second start", job.id, f"start of a job in state {job.state}"
                )
                raise Conflict(
                    f"Job {job.id} is {job.state}; a job can be started only once.",
                    code="JobAlreadyStarted",
                )
            job.state = "Running"
            outputs = job.request.get("Outputs") or {}
            locations = [
                str(o.get("RelativeLocation")) for o in outputs.values() if isinstance(o, dict)
            ]
            self.started.append((job.id, sorted(locations)))
        clock = self.shared.clock
        if clock is not None:
            job.started_at = clock.now()
            self._read_input(job)
            return
        threading.Thread(target=self._run, args=(job,), daemon=True).start()

    def status(self, job: Job) -> Job:
        """The job as a status request sees it (on a clock: finished once its time is up)."""
        clock, faults = self.shared.clock, self.shared.faults
        if (
            clock is not None
            and job.state == "Running"
            and job.started_at is not None
            and not faults.hang_jobs
            and clock.now() >= job.started_at + timedelta(seconds=faults.job_seconds)
        ):
            self._finish(job)
        return job

    def _read_input(self, job: Job) -> None:
        """Read the job's input once, as it starts; record which blob version it trained on."""
        try:
            job.data = self._take_input(job)
        except JobError as exc:
            job.read_error = str(exc)
        except Exception as exc:  # noqa: BLE001 - any failure of the job is reported, like BES
            job.read_error = f"{type(exc).__name__}: {exc}"

    def _take_input(self, job: Job) -> bytes:
        inputs = job.request.get("Inputs") or {}
        if len(inputs) != 1:
            raise JobError(f"expected exactly one input, got {sorted(inputs)}")
        ref = next(iter(inputs.values()))
        if not isinstance(ref, dict) or unencoded(str(ref.get("RelativeLocation") or "")):
            raise JobError(AUTH_FAILED)
        download = blob(ref).download_blob()
        data: bytes = download.readall()
        path = blob_path(str(ref["RelativeLocation"]))
        etag = plain_etag(download.properties.etag)
        metadata = download.properties.metadata or {}
        source, source_etag = metadata.get("retrain_source"), metadata.get("retrain_source_etag")
        version = (source, plain_etag(source_etag)) if source and source_etag else (path, etag)
        with self.shared.lock:
            first = self._versions.setdefault(version, job.id)
            self.trained.append(
                {
                    "job": job.id,
                    "version": version,
                    "blob": path,
                    "etag": etag,
                    "sha256": hashlib.sha256(data).hexdigest(),
                }
            )
        if first != job.id:
            self.shared.violation(
                "second job on blob version",
                job.id,
                f"{version[0]} at {version[1]} was already trained by job {first}",
            )
        return data

    def _run(self, job: Job) -> None:
        self._read_input(job)
        faults = self.shared.faults
        wait = None if faults.hang_jobs else faults.job_seconds
        if job.cancel.wait(wait):
            return
        self._finish(job)

    def _finish(self, job: Job) -> None:
        faults = self.shared.faults
        with self.shared.lock:
            fail = faults.fail_jobs > 0
            if fail:
                faults.fail_jobs -= 1
        if fail:
            job.state, job.details = "Failed", str(faults.fail_details)
            job.done.set()
            return
        try:
            results = self._train(job)
        except JobError as exc:
            job.state, job.details = "Failed", str(exc)
        except Exception as exc:  # noqa: BLE001 - any failure of the job is reported, like BES
            job.state, job.details = "Failed", f"{type(exc).__name__}: {exc}"
        else:
            job.state, job.results = "Finished", results
        job.done.set()

    def _train(self, job: Job) -> dict[str, Any]:
        if job.read_error is not None:
            raise JobError(job.read_error)
        service, body = job.service, job.request
        params = body.get("GlobalParameters") or {}
        label = params.get(service.label_parameter)
        if not label:
            raise JobError(f"global parameter {service.label_parameter!r} (the label) is not set")
        ref = next(iter((body.get("Inputs") or {}).values()))
        text = (job.data or b"").decode("utf-8-sig")
        delimiter = "\t" if ref["RelativeLocation"].endswith(".tsv") else ","
        try:
            table = learn.read_table(text, label, delimiter=delimiter)
        except (ValueError, StopIteration) as exc:
            raise JobError(f"Error 0000: cannot read the training data: {exc}") from exc
        train_rows, holdout = learn.split(len(table.rows))
        model = learn.fit(table, train_rows)
        rows = [learn.evaluate(model, table, holdout)]
        champion = self.champion_model(service.workspace, service.champion_endpoint)
        if champion and champion["features"] == model["features"]:
            rows.append(learn.evaluate(champion, table, holdout))
        return self._write_outputs(body.get("Outputs") or {}, model, rows)

    def _write_outputs(
        self, outputs: dict[str, Any], model: dict[str, Any], rows: list[dict[str, float]]
    ) -> dict[str, Any]:
        results: dict[str, Any] = {}
        for name, out in outputs.items():
            location = out["RelativeLocation"]
            if unencoded(str(location)):
                raise JobError(AUTH_FAILED)
            if location.endswith(".ilearner"):
                payload = json.dumps(model).encode()
            elif location.endswith((".csv", ".tsv")):
                payload = learn.evaluation_csv(rows).encode()
            else:
                raise JobError(f"output {name!r}: unsupported extension in {location!r}")
            blob(out).upload_blob(payload, overwrite=True)
            results[name] = self._result_ref(out)
        return results

    def _result_ref(self, out: dict[str, Any]) -> dict[str, Any]:
        base = out.get("BaseLocation") or ""
        relative = out["RelativeLocation"].lstrip("/")
        token = out.get("SasBlobToken")
        account_key = self.shared.account_key
        if account_key and base:
            account = (
                urlsplit(base).path.strip("/") or (urlsplit(base).hostname or "").split(".")[0]
            )
            container, _, name = relative.partition("/")
            token = "?" + generate_blob_sas(
                account,
                container,
                name,
                account_key=account_key,
                permission=BlobSasPermissions(read=True),
                expiry=datetime.now(UTC) + timedelta(hours=24, minutes=5),
            )
        return {
            "ConnectionString": None,
            "BaseLocation": base,
            "RelativeLocation": relative,
            "SasBlobToken": token,
        }
