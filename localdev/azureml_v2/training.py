"""Emulated jobs: validation as the service does it, real training, MLflow and run history."""

from __future__ import annotations

import copy
import hashlib
import json
import math
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from localdev import learn
from localdev.azureml_v2.core import ArmError

if TYPE_CHECKING:
    from localdev.azureml_v2.core import Emulator

INPUT_TYPES = {
    "literal",
    "uri_file",
    "uri_folder",
    "mltable",
    "custom_model",
    "mlflow_model",
    "triton_model",
}
OUTPUT_TYPES = {"uri_file", "uri_folder", "mltable", "custom_model", "mlflow_model", "triton_model"}
TERMINAL = ("Completed", "Failed", "Canceled")
MLFLOW_STATUS = {
    "NotStarted": "SCHEDULED",
    "Running": "RUNNING",
    "CancelRequested": "RUNNING",
    "Completed": "FINISHED",
    "Failed": "FAILED",
    "Canceled": "KILLED",
}
METRIC_KEYS = {
    "Root Mean Squared Error": "rmse",
    "Mean Absolute Error": "mae",
    "Relative Absolute Error": "rae",
    "Relative Squared Error": "rse",
    "Coefficient of Determination": "r2",
    "Accuracy": "accuracy",
    "Precision": "precision",
    "Recall": "recall",
    "F-Score": "f1",
    "AUC": "auc",
    "Average Log Loss": "log_loss",
}
"""The MLflow keys the emulated training script logs each Evaluate Model metric under; the
champion's value on the same hold-out rows is logged as `champion_<key>`."""
MODEL_FILE = "model.json"


@dataclass
class Job:
    """One ARM job and its MLflow run."""

    name: str
    body: dict[str, Any]
    created: float
    state: str = "NotStarted"
    started: float | None = None
    cancel_at: float | None = None
    error: str | None = None
    data: str | None = None
    metrics: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    operations: list[str] = field(default_factory=list)

    @property
    def props(self) -> dict[str, Any]:
        """The job's properties."""
        props: dict[str, Any] = self.body["properties"]
        return props


class Training:
    """The workspace's jobs."""

    def __init__(self, emu: Emulator) -> None:
        self.emu = emu
        self.jobs: dict[str, Job] = {}
        self.trained: list[dict[str, Any]] = []
        """One per job that read its input: {"job", "uri", "rows"}, and for a uri_file the blob
        read ("blob": its path in the datastore, "sha256" of its bytes) and the data version it
        holds ("version": (source, etag) from the copy's `retrain_source` metadata, else the
        blob's own (path, etag))."""
        self.events: list[dict[str, Any]] = []
        """The Event Grid events the workspace published, in order (EventGridEvent schema): a
        RunStatusChanged for every job that ended and a RunCompleted for each that completed."""

    # ---- ARM

    def put(self, name: str, body: Any) -> tuple[int, dict[str, Any]]:
        """PUT jobs/{name}: create (201), or re-PUT (200) where only tags may change."""
        props = _check_job(body)
        for out in (props.get("outputs") or {}).values():
            self.emu.datastore_path(out["uri"])
        with self.emu.lock:
            job = self.jobs.get(name)
            if job is None:
                self.jobs[name] = Job(name, copy.deepcopy(body), self.emu.seconds())
                return 201, self.view(self.jobs[name])
            if _without_tags(job.body) != _without_tags(body):
                raise self.emu.refuse(
                    400,
                    "UserError",
                    "job name reused",
                    f"A job named {name} already exists with other properties; only its tags "
                    "can be updated. Submit new work under a new name.",
                )
            job.props["tags"] = copy.deepcopy(props.get("tags") or {})
            return 200, self.view(job)

    def get(self, name: str) -> Job:
        """The job, advanced to now."""
        job = self.jobs.get(name)
        if job is None:
            raise ArmError(404, "UserError", f"Job {name} was not found.")
        self.advance(job)
        return job

    def view(self, job: Job, *, status: str | None = None) -> dict[str, Any]:
        """The job resource as GET shows it."""
        props = copy.deepcopy(job.props)
        props["status"] = status or job.state
        props["services"] = {
            "Studio": {"endpoint": f"https://ml.azure.com/runs/{job.name}?wsid={self.emu.ws_path}"}
        }
        return {
            "id": f"{self.emu.ws_path}/jobs/{job.name}",
            "name": job.name,
            "type": "Microsoft.MachineLearningServices/workspaces/jobs",
            "properties": props,
        }

    def status_view(self, name: str) -> dict[str, Any]:
        """GET jobs/{name}, with injected NotResponding answers while the job runs."""
        job = self.get(name)
        with self.emu.lock:
            stalled = job.state == "Running" and self.emu.faults.not_responding > 0
            if stalled:
                self.emu.faults.not_responding -= 1
        return self.view(job, status="NotResponding" if stalled else None)

    def cancel(self, name: str) -> str | None:
        """POST .../cancel: None when there is nothing to cancel, else an operation id."""
        job = self.get(name)
        if job.state in TERMINAL:
            return None
        with self.emu.lock:
            if job.cancel_at is None:
                job.cancel_at = self.emu.seconds()
                job.state = "CancelRequested"
            op = uuid.uuid4().hex
            job.operations.append(op)
        return op

    def cancel_done(self, op: str) -> bool | None:
        """Whether the cancel operation `op` is over; None if no job has it."""
        for job in list(self.jobs.values()):
            if op in job.operations:
                self.advance(job)
                return job.state in TERMINAL
        return None

    # ---- the job's life, on the emulator's time

    def advance(self, job: Job) -> None:
        """Move the job along: NotStarted, Running (input read), then trained and Completed.
        Under the lock throughout, so two status GETs never train one job twice."""
        emu = self.emu
        now = emu.seconds()
        with emu.lock:
            if job.state in TERMINAL:
                return
            if job.cancel_at is not None:
                if now >= job.cancel_at + emu.faults.cancel_seconds:
                    job.state, job.error = "Canceled", "Canceled by the user"
                    self._publish(job, "RunStatusChanged")
                return
            if job.state == "NotStarted":
                job.state, job.started = "Running", now
                self._read_input(job)
            due = (job.started or now) + emu.faults.job_seconds
            if emu.faults.hang_jobs or now < due:
                return
            if emu.faults.fail_jobs > 0:
                emu.faults.fail_jobs -= 1
                job.state, job.error = "Failed", emu.faults.fail_details
                self._publish(job, "RunStatusChanged")
                return
            self._finish(job)

    def _read_input(self, job: Job) -> None:
        record: dict[str, Any] = {"job": job.name}
        try:
            uri = _data_input(job.props)[1]
            record["uri"] = uri
            if uri.endswith("/"):
                job.data = self.emu.read_text(uri)
            else:
                job.data = self._read_file(uri, record)
        except ArmError as exc:
            job.error = f"{exc.code}: {exc}"
            return
        except Exception as exc:  # noqa: BLE001 - any read failure fails the job, as on Azure
            job.error = f"DataAccessError: cannot read {uri}: {type(exc).__name__}"
            return
        record["rows"] = job.data.count("\n") - 1
        self.trained.append(record)

    def _read_file(self, uri: str, record: dict[str, Any]) -> str:
        """A uri_file's text; which blob and which data version the job read go to `record`."""
        store, path = self.emu.datastore_path(uri)
        download = store.client().download_blob(path)
        data: bytes = download.readall()
        etag = str(download.properties.etag).strip('"')
        metadata = download.properties.metadata or {}
        source, source_etag = metadata.get("retrain_source"), metadata.get("retrain_source_etag")
        record["blob"] = path
        record["sha256"] = hashlib.sha256(data).hexdigest()
        record["version"] = (
            (source, source_etag.strip('"')) if source and source_etag else (path, etag)
        )
        return data.decode("utf-8-sig")

    def _finish(self, job: Job) -> None:
        try:
            self._train(job)
        except ArmError as exc:
            job.state, job.error = "Failed", f"{exc.code}: {exc}"
        except (ValueError, KeyError, StopIteration) as exc:
            job.state, job.error = "Failed", f"UserError: {exc}"
        else:
            job.state = "Completed"
            self._publish(job, "RunCompleted")
        self._publish(job, "RunStatusChanged")

    def _publish(self, job: Job, kind: str) -> None:
        """Record the event Azure ML would publish through Event Grid for `job` (§ Event Grid
        events of the README: a job's name as `runId`, its tags as `runTags`)."""
        data: dict[str, Any] = {
            "experimentId": str(uuid.uuid5(uuid.NAMESPACE_URL, self._experiment(job))),
            "experimentName": self._experiment(job),
            "runId": job.name,
            "runType": None,
            "runTags": dict(self._tags(job)),
            "runProperties": {},
        }
        if kind == "RunStatusChanged":
            data["runStatus"] = job.state
        self.events.append(
            {
                "id": uuid.uuid4().hex,
                "topic": self.emu.ws_path,
                "subject": f"experiments/{data['experimentId']}/runs/{job.name}",
                "eventType": f"Microsoft.MachineLearningServices.{kind}",
                "eventTime": datetime.fromtimestamp(self.emu.seconds(), UTC).isoformat(),
                "data": data,
                "dataVersion": "",
                "metadataVersion": "1",
            }
        )

    @staticmethod
    def _experiment(job: Job) -> str:
        name = job.props.get("experimentName")
        return name if isinstance(name, str) and name else "Default"

    @staticmethod
    def _tags(job: Job) -> dict[str, Any]:
        tags = job.props.get("tags")
        return tags if isinstance(tags, dict) else {}

    def _train(self, job: Job) -> None:
        if job.error is not None:
            raise ArmError(400, "UserError", job.error)
        props = job.props
        inputs = props.get("inputs") or {}
        label = (inputs.get("label") or {}).get("value")
        if not label:
            raise ArmError(400, "UserError", "the training script needs a literal input 'label'")
        table = learn.read_table(job.data or "", label)
        train_rows, holdout = learn.split(len(table.rows))
        model = learn.fit(table, train_rows)
        self._log(job, "", _baseline(model, table, train_rows), table, holdout, step=0)
        self._log(job, "", model, table, holdout, step=1)
        champion = self._champion(inputs)
        if champion is not None and champion["features"] == model["features"]:
            self._log(job, "champion_", champion, table, holdout, step=0)
        out = _model_output(props)
        self.emu.write_blob(out["uri"], MODEL_FILE, json.dumps(model).encode())

    def _champion(self, inputs: dict[str, Any]) -> dict[str, Any] | None:
        for value in inputs.values():
            if value.get("jobInputType") in ("custom_model", "mlflow_model"):
                return self.emu.serving.load_model(str(value.get("uri")))
        return None

    def _log(
        self,
        job: Job,
        prefix: str,
        model: dict[str, Any],
        table: learn.Table,
        rows: list[int],
        *,
        step: int,
    ) -> None:
        stamp = int(self.emu.seconds() * 1000)
        for name, value in learn.evaluate(model, table, rows).items():
            key = prefix + METRIC_KEYS[name]
            entry = {"key": key, "value": value, "timestamp": stamp, "step": step}
            job.metrics.setdefault(key, []).append(entry)

    # ---- MLflow and run history

    def mlflow_run(self, run_id: str) -> dict[str, Any]:
        """runs/get."""
        job = self._run(run_id)
        latest = [max(v, key=lambda e: (e["step"], e["timestamp"])) for v in job.metrics.values()]
        tags = [{"key": k, "value": v} for k, v in (job.props.get("tags") or {}).items()]
        return {
            "run": {
                "info": {
                    "run_id": job.name,
                    "run_uuid": job.name,
                    "experiment_id": "1",
                    "status": MLFLOW_STATUS.get(job.state, "RUNNING"),
                },
                "data": {"metrics": latest, "params": [], "tags": tags},
            }
        }

    def history(self, run_id: str, key: str, token: str | None) -> dict[str, Any]:
        """metrics/get-history, paged."""
        entries = self._run(run_id).metrics.get(key, [])
        size = max(1, self.emu.faults.mlflow_page_size)
        start = int(token or 0)
        page: dict[str, Any] = {"metrics": entries[start : start + size]}
        if start + size < len(entries):
            page["next_page_token"] = str(start + size)
        return page

    def _run(self, run_id: str) -> Job:
        job = self.jobs.get(run_id)
        if job is None:
            raise ArmError(404, "RESOURCE_DOES_NOT_EXIST", f"Run '{run_id}' not found")
        self.advance(job)
        return job

    def details(self, name: str) -> dict[str, Any]:
        """Run history's RunDetails: status, and the error of a failed run."""
        job = self.get(name)
        details: dict[str, Any] = {"runId": name, "status": job.state, "warnings": []}
        if job.state == "Failed" and job.error:
            code, _, message = job.error.partition(": ")
            details["error"] = {"error": {"code": code, "message": message or code}}
        return details


def _check_job(body: Any) -> dict[str, Any]:
    """The validation errors the service answers for a job body (spec §3.2-3.4)."""
    props = body.get("properties") if isinstance(body, dict) else None
    if not isinstance(props, dict):
        raise ArmError(400, "UserError", "The request body must have 'properties'.")
    problems = []
    job_type = props.get("jobType")
    if job_type not in ("Command", "Pipeline"):
        problems.append(f"jobType {job_type!r} is not supported here")
    if job_type == "Command":
        problems += [f"{k} is required" for k in ("command", "environmentId") if not props.get(k)]
    for name, value in (props.get("inputs") or {}).items():
        kind = value.get("jobInputType") if isinstance(value, dict) else None
        if kind not in INPUT_TYPES:
            problems.append(f"inputs.{name}: jobInputType {kind!r} is not one of the enum values")
        elif kind != "literal" and not value.get("uri"):
            problems.append(f"inputs.{name}: uri is required")
    for name, value in (props.get("outputs") or {}).items():
        kind = value.get("jobOutputType") if isinstance(value, dict) else None
        if kind not in OUTPUT_TYPES:
            problems.append(f"outputs.{name}: jobOutputType {kind!r} is not one of the enum values")
        elif not str(value.get("uri") or "").startswith("azureml://"):
            problems.append(f"outputs.{name}: only datastore paths are supported for outputs")
    if problems:
        raise ArmError(
            400,
            "UserError",
            "The Job request provided has the following validation errors: " + "; ".join(problems),
        )
    return props


def _without_tags(body: Any) -> Any:
    trimmed = copy.deepcopy(body)
    trimmed.get("properties", {}).pop("tags", None)
    return trimmed


def _data_input(props: dict[str, Any]) -> tuple[str, str]:
    found = [
        (k, str(v["uri"]))
        for k, v in (props.get("inputs") or {}).items()
        if v.get("jobInputType") in ("uri_file", "uri_folder")
    ]
    if len(found) != 1:
        raise ArmError(400, "UserError", "the training script reads exactly one uri input")
    return found[0]


def _model_output(props: dict[str, Any]) -> dict[str, Any]:
    outputs = list((props.get("outputs") or {}).values())
    if len(outputs) != 1:
        raise ArmError(400, "UserError", "the training script writes exactly one output")
    output: dict[str, Any] = outputs[0]
    return output


def _baseline(model: dict[str, Any], table: learn.Table, rows: list[int]) -> dict[str, Any]:
    """The intercept-only model the script logs as step 0, before it fits."""
    mean = sum(table.labels[i] for i in rows) / len(rows)
    if model["family"] == "binary":
        mean = min(max(mean, 1e-6), 1 - 1e-6)
        mean = math.log(mean / (1 - mean))
    return {**model, "weights": [mean] + [0.0] * (len(model["weights"]) - 1)}
