"""A local emulator of Azure ML Studio (classic) BES v2.0 and endpoint management.

It follows the contracts in the REST spec (Bearer keys, api-version=2.0 on BES, PascalCase,
StatusCode names, `.ilearner` outputs, no PATCH of `default`) and really trains: it reads the
input through the reference it is given, fits a small model, writes the `.ilearner` and an
Evaluate Model CSV, and serves predictions from each endpoint's current model.

It is as strict as the spec and records what a client did wrong in `Emulator.violations`: a
second start (refused with 409), status polls of one job under 1 s apart, a second job on a blob
version an earlier job trained, and references that are not percent-encoded (refused the way
Azure Storage refuses them). `Emulator.trained` records what each job read.

Run it: `python -m localdev.amlemu --config emulator.json --port 8765`.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import hashlib
import json
import logging
import re
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from azure.storage.blob import BlobClient, BlobSasPermissions, generate_blob_sas

from localdev import learn
from retrain.clock import Clock

log = logging.getLogger("amlemu")


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
class Endpoint:
    """A Classic predictive web service endpoint with one updatable trained-model resource."""

    workspace: str
    webservice: str
    name: str
    api_key: str
    resource_name: str
    model: dict[str, Any] | None = None
    location: dict[str, Any] | None = None
    patches: list[dict[str, Any]] = field(default_factory=list)
    """Every accepted PATCH's Location, SAS included, for tests to inspect."""

    @property
    def service_id(self) -> str:
        """The id RRS calls use for this endpoint."""
        return f"{self.webservice}-{self.name}"


@dataclass
class WebService:
    """A New (ARM) web service: a definition whose trained-model asset can be PATCHed."""

    subscription: str
    resource_group: str
    name: str
    arm_token: str
    api_key: str
    asset_name: str = "Housing Model [trained model]"
    location: str = "South Central US"
    read_only: bool = False
    payloads_in_blob: bool = False
    assets: dict[str, Any] | None = None
    state: str = "Succeeded"
    model: dict[str, Any] | None = None
    pending: dict[str, Any] | None = None
    operations: dict[str, dict[str, Any]] = field(default_factory=dict)
    patches: list[dict[str, Any]] = field(default_factory=list)
    """The assets of every accepted PATCH, for tests to inspect."""

    def __post_init__(self) -> None:
        if self.assets is None:
            self.assets = {
                "asset1": {
                    "name": "Score Model",
                    "type": "Module",
                    "locationInfo": {"uri": "aml://module/score-model"},
                },
                "asset2": {
                    "name": self.asset_name,
                    "type": "Resource",
                    "locationInfo": {"uri": "https://example.invalid/initial.ilearner"},
                    "outputPorts": {"Results dataset": {"type": "Dataset"}},
                },
            }

    @property
    def arm_id(self) -> str:
        """The resource id."""
        return (
            f"/subscriptions/{self.subscription}/resourceGroups/{self.resource_group}"
            "/providers/Microsoft.MachineLearning/webServices/" + self.name
        )


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


@dataclass
class Faults:
    """Faults to inject. One-shot HTTP faults are consumed in order by matching requests."""

    job_seconds: float = 0.0
    hang_jobs: bool = False
    fail_jobs: int = 0
    fail_details: str = "Module execution encountered an internal error (injected)."
    provisioning_seconds: float = 0.0
    fail_provisioning: int = 0
    http: list[dict[str, Any]] = field(default_factory=list)
    """One-shot faults, each matching an optional "method" and a "path" substring:
    {"status": 429, "retry_after": 1}: answer that instead, doing nothing;
    {"drop": true}: close the connection without answering, doing nothing;
    {"delay": s}: hold the request s seconds, then handle and answer it;
    {"lose_response": true}: handle the request (the service acts), then close the connection
    without answering;
    {"delay_answer": s}: handle the request, then hold the answer s seconds."""


AUTH_FAILED = (
    "AuthenticationFailed: Server failed to authenticate the request. Make sure the value of "
    "Authorization header is formed correctly including the signature."
)
"""What Azure Storage answers for a URL whose path does not match what the SAS signed."""

_ENCODED = re.compile(r"(?:[A-Za-z0-9._~/-]|%[0-9A-Fa-f]{2})*")


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


def _etag(value: str | None) -> str:
    """An ETag without quotes (listings and downloads disagree on them)."""
    text = (value or "").strip()
    if text.startswith("W/"):
        text = text[2:]
    return text.strip('"')


class Emulator:
    """The emulator's state; the HTTP server is a thin layer over it."""

    def __init__(self, config: dict[str, Any], *, clock: Clock | None = None) -> None:
        self.clock = clock
        """With a clock, a job lasts `faults.job_seconds` of *its* time and finishes when a
        status request finds the time passed (no thread, no waiting): hours run in seconds."""
        self.account_key: str | None = config.get("account_key")
        self.services = {
            (s["workspace"], s["service"]): TrainingService(**s)
            for s in config.get("training_services", [])
        }
        self.endpoints: dict[tuple[str, str, str], Endpoint] = {}
        for e in config.get("endpoints", []):
            ep = Endpoint(**e)
            self.endpoints[(ep.workspace, ep.webservice, ep.name)] = ep
            default_key = (ep.workspace, ep.webservice, "default")
            if default_key not in self.endpoints:
                self.endpoints[default_key] = Endpoint(
                    ep.workspace, ep.webservice, "default", ep.api_key, ep.resource_name
                )
        self.web_services = {
            (w["subscription"], w["resource_group"], w["name"]): WebService(**w)
            for w in config.get("web_services", [])
        }
        self.jobs: dict[str, Job] = {}
        self.started: list[tuple[str, list[str]]] = []
        """Every job that was started, with its output locations (kept after DELETE)."""
        self.faults = Faults()
        self.calls: list[tuple[str, str, int]] = []
        self.lock = threading.RLock()
        self.violations: list[dict[str, Any]] = []
        """Contract breaches by the client: {"kind", "job", "detail"}; kinds: "second start",
        "poll under 1 s", "second job on blob version", "unencoded reference"."""
        self.trained: list[dict[str, Any]] = []
        """One per job that read its input: {"job", "version", "blob", "etag", "sha256"}."""
        self._polled: dict[str, float] = {}
        self._versions: dict[tuple[str, str], str] = {}

    # ---- faults and observation

    def take_fault(self, method: str, path: str) -> dict[str, Any] | None:
        """The next one-shot HTTP fault matching this request, removed from the list."""
        with self.lock:
            for i, fault in enumerate(self.faults.http):
                if fault.get("method", method) == method and fault.get("path", "") in path:
                    return self.faults.http.pop(i)
        return None

    def violation(self, kind: str, job: str | None, detail: str) -> None:
        """Record a breach of the contract by the client (never a secret in `detail`)."""
        with self.lock:
            self.violations.append({"kind": kind, "job": job, "detail": detail})
        log.warning("contract violation: %s (job %s): %s", kind, job, detail)

    def _seconds(self) -> float:
        """The emulator's own time in seconds: its clock if it has one, else monotonic."""
        if self.clock is not None:
            return self.clock.now().timestamp()
        return time.monotonic()

    def note_poll(self, job_id: str) -> None:
        """A status GET of a job arrived; two within 1 s of each other is a violation."""
        now = self._seconds()
        with self.lock:
            if job_id not in self.jobs:
                return
            last = self._polled.get(job_id)
            self._polled[job_id] = now
        if last is not None and now - last < 1.0:
            self.violation("poll under 1 s", job_id, f"status GETs {now - last:.3f} s apart")

    def count(self, method: str, pattern: str, status: int | None = None) -> int:
        """How many calls matched (method, regex on path, status)."""
        rx = re.compile(pattern)
        return sum(
            1
            for m, p, s in self.calls
            if m == method and rx.search(p) and (status is None or s == status)
        )

    # ---- BES

    def submit(self, service: TrainingService, body: dict[str, Any]) -> str:
        """Register a job in NotStarted; nothing runs until start."""
        for name, ref in (body.get("Outputs") or {}).items():
            if not isinstance(ref, dict) or not ref.get("RelativeLocation"):
                raise BadRequest(f"output {name!r}: missing RelativeLocation")
        if not isinstance(body.get("Inputs"), dict):
            raise BadRequest("Inputs must be an object keyed by web service input name")
        job = Job(uuid.uuid4().hex, service, body)
        with self.lock:
            self.jobs[job.id] = job
        for side in ("Inputs", "Outputs"):
            for name, ref in (body.get(side) or {}).items():
                relative = str((ref or {}).get("RelativeLocation") or "")
                if unencoded(relative):
                    # Accepted here; the job fails when Storage refuses the URL.
                    self.violation("unencoded reference", job.id, f"{side} {name!r}: {relative!r}")
        return job.id

    def slow(self, seconds: float) -> None:
        """Hold a request, as an overloaded service would."""
        threading.Event().wait(seconds)

    def start(self, job: Job) -> None:
        """Run the job in the background; a job that is not NotStarted cannot start again."""
        with self.lock:
            if job.state != "NotStarted":
                self.violation("second start", job.id, f"start of a job in state {job.state}")
                raise Conflict(
                    f"Job {job.id} is {job.state}; a job can be started only once.",
                    code="JobAlreadyStarted",
                )
            job.state = "Running"
            outputs = job.request.get("Outputs") or {}
            self.started.append(
                (
                    job.id,
                    sorted(
                        str(o.get("RelativeLocation"))
                        for o in outputs.values()
                        if isinstance(o, dict)
                    ),
                )
            )
        if self.clock is not None:
            job.started_at = self.clock.now()
            self._read_input(job)
            return
        threading.Thread(target=self._run, args=(job,), daemon=True).start()

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
        download = _blob(ref).download_blob()
        data: bytes = download.readall()
        path = blob_path(str(ref["RelativeLocation"]))
        etag = _etag(download.properties.etag)
        metadata = download.properties.metadata or {}
        source, source_etag = metadata.get("retrain_source"), metadata.get("retrain_source_etag")
        version = (source, _etag(source_etag)) if source and source_etag else (path, etag)
        with self.lock:
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
            self.violation(
                "second job on blob version",
                job.id,
                f"{version[0]} at {version[1]} was already trained by job {first}",
            )
        return data

    def status(self, job: Job) -> Job:
        """The job as a status request sees it (on a clock: finished once its time is up)."""
        if (
            self.clock is not None
            and job.state == "Running"
            and job.started_at is not None
            and not self.faults.hang_jobs
            and self.clock.now() >= job.started_at + timedelta(seconds=self.faults.job_seconds)
        ):
            self._finish(job)
        return job

    def _run(self, job: Job) -> None:
        self._read_input(job)
        wait = None if self.faults.hang_jobs else self.faults.job_seconds
        if job.cancel.wait(wait):
            return
        self._finish(job)

    def _finish(self, job: Job) -> None:
        with self.lock:
            fail = self.faults.fail_jobs > 0
            if fail:
                self.faults.fail_jobs -= 1
        try:
            results = self._fail(self.faults.fail_details) if fail else self._train(job)
        except JobError as exc:
            job.state, job.details = "Failed", str(exc)
        except Exception as exc:  # noqa: BLE001 - any failure of the job is reported, like BES
            job.state, job.details = "Failed", f"{type(exc).__name__}: {exc}"
        else:
            job.state, job.results = "Finished", results
        job.done.set()

    @staticmethod
    def _fail(details: str) -> dict[str, Any]:
        raise JobError(details)

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
        champion = self.endpoint_by_id(service.workspace, service.champion_endpoint)
        if (
            champion is not None
            and champion.model
            and (champion.model["features"] == model["features"])
        ):
            rows.append(learn.evaluate(champion.model, table, holdout))
        outputs = body.get("Outputs") or {}
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
            _blob(out).upload_blob(payload, overwrite=True)
            results[name] = self._result_ref(out)
        return results

    def _result_ref(self, out: dict[str, Any]) -> dict[str, Any]:
        base = out.get("BaseLocation") or ""
        relative = out["RelativeLocation"].lstrip("/")
        token = out.get("SasBlobToken")
        if self.account_key and base:
            account = (
                urlsplit(base).path.strip("/") or (urlsplit(base).hostname or "").split(".")[0]
            )
            container, _, name = relative.partition("/")
            token = "?" + generate_blob_sas(
                account,
                container,
                name,
                account_key=self.account_key,
                permission=BlobSasPermissions(read=True),
                expiry=datetime.now(UTC) + timedelta(hours=24, minutes=5),
            )
        return {
            "ConnectionString": None,
            "BaseLocation": base,
            "RelativeLocation": relative,
            "SasBlobToken": token,
        }

    def endpoint_by_id(self, workspace: str, service_id: str | None) -> Endpoint | None:
        """The endpoint with this RRS service id."""
        for ep in self.endpoints.values():
            if ep.workspace == workspace and ep.service_id == service_id:
                return ep
        return None

    # ---- Classic management

    def patch(self, ep: Endpoint, body: dict[str, Any]) -> None:
        """Swap the trained model of a non-default endpoint."""
        if ep.name == "default":
            raise BadRequest(
                "Default endpoints are kept in sync with the experiment; the "
                "trained model of the default endpoint cannot be replaced."
            )
        resources = body.get("Resources")
        if not isinstance(resources, list) or not resources:
            raise BadRequest("Resources must be a non-empty list")
        for resource in resources:
            if resource.get("Name") != ep.resource_name:
                raise BadRequest(f"Resource {resource.get('Name')!r} was not found")
            location = resource.get("Location") or {}
            relative = str(location.get("RelativeLocation", ""))
            if unencoded(relative):
                self.violation("unencoded reference", None, f"PATCH Location {relative!r}")
                raise BadRequest(f"The URL for the retraining model is invalid. {AUTH_FAILED}")
            if not relative.endswith(".ilearner"):
                raise BadRequest("The URL for the retraining model is invalid")
            try:
                model = json.loads(_blob(location).download_blob().readall())
            except Exception as exc:  # any read failure is a bad location
                raise BadRequest("The URL for the retraining model is invalid") from exc
            ep.model = model
            ep.patches.append(dict(location))
            ep.location = {
                "BaseLocation": location.get("BaseLocation"),
                "RelativeLocation": str(location["RelativeLocation"]).lstrip("/"),
                "SasBlobToken": None,
            }

    def describe(self, ep: Endpoint, host: str) -> dict[str, Any]:
        """The endpoint as GET returns it."""
        return {
            "Name": ep.name,
            "WebServiceId": ep.webservice,
            "WorkspaceId": ep.workspace,
            "ApiLocation": f"{host}/workspaces/{ep.workspace}/services/{ep.service_id}",
            "Resources": [
                {"Name": ep.resource_name, "Kind": "TrainedModel", "Location": ep.location}
            ],
        }

    def score(self, ep: Endpoint | WebService, body: dict[str, Any]) -> dict[str, Any]:
        """RRS: score rows with the endpoint's current model."""
        if ep.model is None:
            raise BadRequest("the endpoint has no trained model yet")
        table = (body.get("Inputs") or {}).get("input1") or {}
        names, values = table.get("ColumnNames") or [], table.get("Values") or []
        index = {n: i for i, n in enumerate(names)}
        missing = [f for f in ep.model["features"] if f not in index]
        if missing:
            raise BadRequest(f"missing feature(s): {missing}")
        scored = [
            [*row, learn.predict(ep.model, [float(row[index[f]]) for f in ep.model["features"]])]
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

    # ---- New (ARM) web services

    def arm_definition(self, ws: WebService) -> dict[str, Any]:
        """The web service as ARM GET returns it (keys and storage key never included)."""
        self._settle(ws)
        assets = ws.pending["assets"] if ws.pending else ws.assets
        return {
            "id": ws.arm_id,
            "name": ws.name,
            "location": ws.location,
            "type": "Microsoft.MachineLearning/webServices",
            "properties": {
                "title": ws.name,
                "packageType": "Graph",
                "provisioningState": ws.state,
                "readOnly": ws.read_only,
                "payloadsInBlobStorage": ws.payloads_in_blob,
                **({} if ws.payloads_in_blob else {"assets": assets}),
                "storageAccount": {"name": "devstoreaccount1"},
            },
        }

    def arm_patch(self, ws: WebService, body: dict[str, Any], host: str) -> str:
        """Start an update of the definition; returns the async operation URL."""
        self._settle(ws)
        if ws.read_only:
            raise BadRequest("The web service is read-only and cannot be updated.")
        props = body.get("properties")
        if not isinstance(props, dict) or props.get("packageType") != "Graph":
            raise BadRequest("properties.packageType must be 'Graph'")
        if "location" not in body:
            raise BadRequest("location is required")
        if ws.pending:
            raise Conflict("Another operation is in progress on this web service.")
        assets = props.get("assets", ws.assets)
        op = uuid.uuid4().hex
        with self.lock:
            fail = self.faults.fail_provisioning > 0
            if fail:
                self.faults.fail_provisioning -= 1
        ws.patches.append(copy.deepcopy(assets or {}))
        ws.pending = {
            "assets": assets,
            "op": op,
            "fail": fail,
            "until": datetime.now(UTC) + timedelta(seconds=self.faults.provisioning_seconds),
        }
        ws.state = "Provisioning"
        ws.operations[op] = {"id": op, "name": op, "status": "InProgress"}
        self._settle(ws)
        region = ws.location.replace(" ", "").lower()
        return (
            f"{host}/subscriptions/{ws.subscription}/providers/Microsoft.MachineLearning/"
            f"locations/{region}/operationsStatus/{op}?api-version=2017-01-01"
        )

    def _settle(self, ws: WebService) -> None:
        pending = ws.pending
        if not pending or datetime.now(UTC) < pending["until"]:
            return
        op = ws.operations[pending["op"]]
        ws.pending = None
        error = "injected provisioning failure" if pending["fail"] else None
        model = None
        if error is None:
            try:
                model = self._load_asset_model(pending["assets"], ws.asset_name)
            except Exception as exc:  # noqa: BLE001 - any failure to load fails provisioning
                error = f"cannot load the trained model: {type(exc).__name__}"
        if error:
            ws.state = "Failed"
            op.update(status="Failed", error={"code": "ProvisioningFailed", "message": error})
            return
        ws.assets, ws.model, ws.state = pending["assets"], model, "Succeeded"
        op.update(status="Succeeded")

    def _load_asset_model(self, assets: dict[str, Any], name: str) -> dict[str, Any] | None:
        for asset in assets.values():
            if asset.get("type") == "Resource" and asset.get("name") == name:
                uri = asset["locationInfo"]["uri"]
                if uri.startswith("https://example.invalid/"):
                    return None
                # The service reads its linked storage account with the account's key.
                credential = {
                    "account_name": "devstoreaccount1",
                    "account_key": self.account_key or "",
                }
                blob = BlobClient.from_blob_url(uri, credential=credential)
                loaded: dict[str, Any] = json.loads(blob.download_blob().readall())
                return loaded
        raise BadRequest(f"no Resource asset named {name!r}")

    def web_service_by_name(self, subscription: str, name: str) -> WebService | None:
        """The New web service, for RRS calls."""
        for ws in self.web_services.values():
            if ws.subscription == subscription and ws.name == name:
                return ws
        return None


class BadRequest(Exception):
    """A 400 with a message, as the service would answer."""


class Conflict(Exception):
    """A 409: another operation is in progress, or a job was started already."""

    def __init__(self, message: str, *, code: str = "Conflict") -> None:
        super().__init__(message)
        self.code = code


class JobError(Exception):
    """The job failed; the message becomes the status Details."""


def _blob(ref: dict[str, Any]) -> BlobClient:
    """The blob an (encoded) reference names. `from_blob_url` percent-decodes the container and
    the name (splitting at raw "/" first) and the client encodes them again on each request."""
    relative = str(ref["RelativeLocation"]).lstrip("/")
    if ref.get("ConnectionString"):
        container, _, name = blob_path(relative).partition("/")
        return BlobClient.from_connection_string(ref["ConnectionString"], container, name)
    sas = ref.get("SasBlobToken") or ""
    return BlobClient.from_blob_url(f"{ref['BaseLocation']}{relative}{sas}")


_BES = re.compile(r"^/workspaces/([^/]+)/services/([^/]+)/jobs(?:/([^/]+))?(/start)?/?$")
_EP = re.compile(r"^/workspaces/([^/]+)/webservices/([^/]+)/endpoints/([^/]+)/?$")
_RRS = re.compile(r"^/workspaces/([^/]+)/services/([^/]+)/execute/?$")
_ARM = re.compile(
    r"^/subscriptions/([^/]+)/resourceGroups/([^/]+)/providers/Microsoft\.MachineLearning/"
    r"webServices/([^/]+)/?$"
)
_ARM_OP = re.compile(
    r"^/subscriptions/([^/]+)/providers/Microsoft\.MachineLearning/locations/[^/]+/"
    r"operationsStatus/([^/]+)/?$"
)
_NEW_RRS = re.compile(r"^/subscriptions/([^/]+)/services/([^/]+)/execute/?$")


def make_handler(emu: Emulator) -> type[BaseHTTPRequestHandler]:
    """The request handler class bound to one emulator."""

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        _after: dict[str, Any] | None = None
        """This request's fault that acts after handling (lost or late answer)."""

        def log_message(self, format: str, *args: Any) -> None:
            log.debug("%s %s", self.command, urlsplit(self.path).path)

        def _send(
            self, status: int, body: Any = None, headers: dict[str, str] | None = None
        ) -> None:
            after = self._after or {}
            if after.get("lose_response"):
                # The service acted; the answer never reaches the client.
                emu.calls.append((self.command, urlsplit(self.path).path, status))
                self.close_connection = True
                self.connection.close()
                return
            if "delay_answer" in after:
                emu.slow(float(after["delay_answer"]))
            data = b"" if body is None else json.dumps(body).encode()
            self.send_response(status)
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            if body is not None:
                self.send_header("Content-Type", "application/json; charset=utf-8")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                self.wfile.write(data)  # the client may have timed out and gone
            emu.calls.append((self.command, urlsplit(self.path).path, status))

        def _body(self) -> Any:
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length) if length else b""
            if not raw:
                return None
            try:
                return json.loads(raw)
            except json.JSONDecodeError as exc:
                raise BadRequest(f"body is not JSON: {exc}") from exc

        def _authorized(self, key: str) -> bool:
            if self.headers.get("Authorization") == f"Bearer {key}":
                return True
            self._send(401, {"error": {"code": "Unauthorized", "message": "Invalid API key"}})
            return False

        def _handle(self) -> None:
            parts = urlsplit(self.path)
            path, query = parts.path, parse_qs(parts.query)
            body = self._body()
            if self.command == "GET" and (m := _BES.match(path)) and m.group(3) and not m.group(4):
                emu.note_poll(m.group(3))
            fault = emu.take_fault(self.command, path)
            if fault and ("lose_response" in fault or "delay_answer" in fault):
                # Handled in full below; only the answer is lost or late.
                self._after = fault
                fault = None
            if fault and fault.get("drop"):
                emu.calls.append((self.command, path, 0))
                self.close_connection = True
                self.connection.close()
                return
            if fault and "delay" in fault:
                # A slow answer: handled normally, after the client may have given up.
                emu.slow(float(fault["delay"]))
            elif fault:
                headers = (
                    {"Retry-After": str(fault["retry_after"])} if "retry_after" in fault else {}
                )
                self._send(int(fault["status"]), {"error": {"code": "Injected"}}, headers)
                return
            if path.startswith("/_emulator/"):
                self._control(path, body)
                return
            if m := _BES.match(path):
                self._bes(m, query, body)
            elif m := _EP.match(path):
                self._endpoint(m, body)
            elif m := _RRS.match(path):
                ep = emu.endpoint_by_id(m.group(1), m.group(2))
                if ep is None:
                    self._send(404, {"error": {"code": "NotFound"}})
                elif self._authorized(ep.api_key):
                    self._send(200, emu.score(ep, body or {}))
            elif m := _ARM.match(path):
                self._arm(m, query, body)
            elif m := _ARM_OP.match(path):
                self._arm_operation(m.group(1), m.group(2))
            elif m := _NEW_RRS.match(path):
                ws = emu.web_service_by_name(m.group(1), m.group(2))
                if ws is None:
                    self._send(404, {"error": {"code": "NotFound"}})
                elif self._authorized(ws.api_key):
                    self._send(200, emu.score(ws, body or {}))
            else:
                self._send(404, {"error": {"code": "NotFound", "message": path}})

        def _bes(self, m: re.Match[str], query: dict[str, list[str]], body: Any) -> None:
            service = emu.services.get((m.group(1), m.group(2)))
            if service is None:
                self._send(404, {"error": {"code": "WebServiceNotFound"}})
                return
            if not self._authorized(service.api_key):
                return
            if query.get("api-version") != ["2.0"]:
                self._send(
                    400,
                    {"error": {"code": "BadArgument", "message": "api-version=2.0 is required"}},
                )
                return
            job_id, start = m.group(3), m.group(4)
            if job_id is None:
                if self.command != "POST":
                    self._send(405, {"error": {"code": "MethodNotAllowed"}})
                    return
                self._send(200, emu.submit(service, body or {}))
                return
            job = emu.jobs.get(job_id)
            if job is None or job.service is not service:
                self._send(404, {"error": {"code": "JobNotFound"}})
            elif start and self.command == "POST":
                emu.start(job)
                self._send(200)
            elif self.command == "GET":
                job = emu.status(job)
                self._send(
                    200, {"StatusCode": job.state, "Results": job.results, "Details": job.details}
                )
            elif self.command == "DELETE":
                job.cancel.set()
                if job.state in ("NotStarted", "Running"):
                    job.state = "Cancelled"
                del emu.jobs[job_id]
                self._send(200)
            else:
                self._send(405, {"error": {"code": "MethodNotAllowed"}})

        def _endpoint(self, m: re.Match[str], body: Any) -> None:
            ep = emu.endpoints.get((m.group(1), m.group(2), m.group(3)))
            if ep is None:
                self._send(404, {"error": {"code": "EndpointNotFound"}})
                return
            if not self._authorized(ep.api_key):
                return
            if self.command == "GET":
                host = f"http://{self.headers.get('Host')}"
                self._send(200, emu.describe(ep, host))
            elif self.command == "PATCH":
                emu.patch(ep, body or {})
                self._send(200)
            else:
                self._send(405, {"error": {"code": "MethodNotAllowed"}})

        def _arm(self, m: re.Match[str], query: dict[str, list[str]], body: Any) -> None:
            ws = emu.web_services.get((m.group(1), m.group(2), m.group(3)))
            if ws is None:
                self._send(
                    404,
                    {
                        "error": {
                            "code": "ResourceNotFound",
                            "message": "The Resource was not found.",
                        }
                    },
                )
                return
            if not self._authorized(ws.arm_token):
                return
            if query.get("api-version", [""])[0] not in ("2016-05-01-preview", "2017-01-01"):
                self._send(400, {"error": {"code": "InvalidApiVersionParameter"}})
                return
            host = f"http://{self.headers.get('Host')}"
            if self.command == "GET":
                self._send(200, emu.arm_definition(ws))
            elif self.command == "PATCH":
                operation = emu.arm_patch(ws, body or {}, host)
                self._send(200, emu.arm_definition(ws), {"Azure-AsyncOperation": operation})
            elif self.command == "PUT":
                # PUT replaces the whole service; implemented so misuse is visible in tests.
                props = (body or {}).get("properties") or {}
                ws.assets = props.get("assets", ws.assets)
                self._send(200, emu.arm_definition(ws))
            else:
                self._send(405, {"error": {"code": "MethodNotAllowed"}})

        def _arm_operation(self, subscription: str, op: str) -> None:
            for ws in emu.web_services.values():
                if ws.subscription == subscription and op in ws.operations:
                    if not self._authorized(ws.arm_token):
                        return
                    emu._settle(ws)
                    self._send(200, ws.operations[op])
                    return
            self._send(404, {"error": {"code": "OperationNotFound"}})

        def _control(self, path: str, body: Any) -> None:
            if path == "/_emulator/faults" and self.command == "POST":
                for k, v in (body or {}).items():
                    setattr(emu.faults, k, v)
                self._send(200, {})
            elif path == "/_emulator/calls":
                self._send(200, [list(c) for c in emu.calls])
            elif path == "/_emulator/violations":
                with emu.lock:
                    violations = list(emu.violations)
                self._send(200, violations)
            elif path == "/_emulator/trained":
                with emu.lock:
                    trained = [{**t, "version": list(t["version"])} for t in emu.trained]
                self._send(200, trained)
            else:
                self._send(404, {"error": {"code": "NotFound"}})

        def _dispatch(self) -> None:
            self._after = None
            try:
                self._handle()
            except BadRequest as exc:
                self._send(400, {"error": {"code": "BadArgument", "message": str(exc)}})
            except Conflict as exc:
                self._send(409, {"error": {"code": exc.code, "message": str(exc)}})

        do_GET = do_POST = do_PATCH = do_DELETE = do_PUT = _dispatch

    return Handler


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client that timed out or dropped the connection is part of the tests, not a bug.
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


class EmulatorServer:
    """The emulator on a loopback port, served from a background thread."""

    def __init__(self, emulator: Emulator, port: int = 0) -> None:
        self.emulator = emulator
        self.httpd = _Server(("127.0.0.1", port), make_handler(emulator))
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        """Base URL, e.g. http://127.0.0.1:8765."""
        return f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def __enter__(self) -> EmulatorServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        for job in self.emulator.jobs.values():
            job.cancel.set()


def main() -> None:
    """Serve the emulator until interrupted."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="JSON file with services and endpoints")
    parser.add_argument("--port", type=int, default=8765)
    args = parser.parse_args()
    with open(args.config, encoding="utf-8") as fh:
        config = json.load(fh)
    logging.basicConfig(level=logging.INFO)
    logging.getLogger("azure").setLevel(logging.WARNING)  # the SDK logs every request at INFO
    server = EmulatorServer(Emulator(config), args.port)
    log.info("Azure ML emulator on %s", server.url)
    with contextlib.suppress(KeyboardInterrupt):
        server.httpd.serve_forever()


if __name__ == "__main__":
    main()
