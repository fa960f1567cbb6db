"""The backend-neutral ports of the pipeline: the training backend, and the model reference it
hands to a deploy target. The pipeline speaks only these; adapters (retrain/backends/, deploy.py,
arm.py) translate them to one service each."""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal, Protocol

from retrain.errors import PermanentError
from retrain.evaluation import Metrics


@dataclass(frozen=True)
class ModelRef:
    """A trained model, as a deploy target is told to serve it.

    `kind="blob"`: the model file `name` in storage `container` (what BES writes and Classic and
    New web services load). `kind="registered"`: version `version` of model `name` in an Azure
    ML workspace's registry (what the v2 backend registers and an online endpoint serves); use
    `ModelRef.registered(name, version)`.
    """

    container: str
    name: str
    kind: Literal["blob", "registered"] = "blob"
    version: str | None = None

    def __post_init__(self) -> None:
        if self.kind == "registered":
            if not self.name or not self.version or self.container:
                raise PermanentError(
                    f"a registered model reference needs a name and a version only: {self}"
                )
        elif not self.container or not self.name or self.version is not None:
            raise PermanentError(f"a blob model reference needs a container and a name: {self}")

    @classmethod
    def registered(cls, name: str, version: str) -> ModelRef:
        """Version `version` of registered model `name`."""
        return cls("", name, "registered", version)

    def __str__(self) -> str:
        if self.kind == "registered":
            return f"{self.name}:{self.version}"
        return f"{self.container}/{self.name}"

    def to_doc(self) -> str | dict[str, str]:
        """The reference as run and model documents store it. A blob as 'container/blob', the
        form every release reads (an instance of the previous release may still read documents
        this one writes, during a rolling upgrade or after a rollback of the release); a
        registered model as its kind, name and version."""
        if self.kind == "registered":
            return {"kind": self.kind, "name": self.name, "version": str(self.version)}
        return str(self)

    @classmethod
    def load(cls, value: Any) -> ModelRef:
        """A stored reference read back: the document form, or the 'container/blob' string
        that runs and champions recorded before references had a kind."""
        if isinstance(value, str):
            container, _, name = value.partition("/")
            return cls(container, name)
        kind = value.get("kind") if isinstance(value, Mapping) else None
        if kind == "blob":
            where, blob = value.get("container"), value.get("name")
            if isinstance(where, str) and isinstance(blob, str):
                return cls(where, blob)
        if kind == "registered":
            name, version = value.get("name"), value.get("version")
            if isinstance(name, str) and isinstance(version, str) and name and version:
                return cls.registered(name, version)
        raise PermanentError(f"not a model reference this app knows: {value!r}")


class Phase(enum.Enum):
    """Where a training job stands, whatever the backend calls it."""

    NOT_STARTED = "not started"
    RUNNING = "running"
    FINISHED = "finished"
    FAILED = "failed"
    CANCELLED = "cancelled"


@dataclass(frozen=True)
class TrainingStatus:
    """What the backend said about a job: its phase, its own word for the state (for the
    record), and the failure text it gave, if any (already free of secrets)."""

    phase: Phase
    state: str
    details: str | None = None


@dataclass(frozen=True)
class TrainingRequest:
    """What any backend needs to train one run's model.

    The input is the run's frozen copy of its training file (the pipeline made it: a blob
    overwritten after validation cannot reach the job); the job writes what it produces under
    `output_folder` in `output_container`; past `deadline` the job is cancelled.
    """

    model: str
    run_id: str
    input_container: str
    input_name: str
    output_container: str
    output_folder: str
    deadline: datetime
    champion: ModelRef | None = None
    """The champion's model when the job is given it to score on the same hold-out data (a
    backend that cannot use it ignores it)."""


@dataclass(frozen=True)
class TrainingResult:
    """A finished job's outcome: the new model's metrics, the champion's when the job scored it
    on the same hold-out data (None otherwise), and the model to deploy."""

    challenger: Metrics
    champion: Metrics | None
    model: ModelRef


class TrainingBackend(Protocol):
    """Submits, starts, watches and cancels one run's training job, and reports its result.

    `submit` of the same request may return the id of the job an earlier call created (a
    backend that names jobs after the request); the pipeline never cancels the job it
    persisted.
    """

    what: str
    """How messages name a job of this backend, e.g. 'BES job'."""

    def submit(self, request: TrainingRequest) -> str: ...

    def outputs(self, request: TrainingRequest) -> dict[str, str]:
        """Where the job's outputs will be, as the run records them when the job is submitted
        ('container/blob' by output name); may be empty."""
        ...

    def start(self, job_id: str) -> None:
        """Start a submitted job (a no-op for a backend whose submit starts it)."""
        ...

    def status(self, job_id: str) -> TrainingStatus: ...

    def cancel(self, job_id: str) -> None: ...

    def probe(self) -> str:
        """Check the service answers and accepts the credentials, starting nothing."""
        ...

    def result(self, request: TrainingRequest, job_id: str) -> TrainingResult:
        """A finished job's metrics and model; EvaluationError or PermanentRemoteError when
        they cannot be read (the run fails with the reason)."""
        ...
