"""Queue payloads. Every message is frozen, versioned and rejects unknown fields."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializationInfo,
    SerializerFunctionWrapHandler,
    StringConstraints,
    TypeAdapter,
    ValidationError,
    model_serializer,
)

from retrain.errors import MessageError
from retrain.settings import ModelName

MAX_MESSAGE_BYTES = 48 * 1024  # storage queues cap a message at 64 KiB, base64 costs a third

RunId = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")]
"""Run and batch ids as the app makes them (`20250101T120000-1a2b3c`, `rollback-…`): they name
ledger documents, so never a '/', a '.' or anything else a path could be built from."""
JobId = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_-]{1,128}$")]
State = Annotated[str, StringConstraints(pattern=r"^[a-z][a-z_]{0,31}$")]
Timestamp = Annotated[
    str,
    StringConstraints(
        pattern=r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d{1,6})?([+-]\d{2}:\d{2}|Z)?$"
    ),
]
MetricName = Annotated[str, StringConstraints(min_length=1, max_length=200)]
MAX_POLLS = 100_000
MAX_ARRIVALS = 1_000_000


class _Message(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    version: Literal[1] = 1
    model: ModelName


class CheckBatch(_Message):
    """Look at the model's open batch: seal it into a run once quiet, or wait."""

    kind: Literal["check-batch"] = "check-batch"
    batch_id: RunId
    arrivals: int = Field(default=0, ge=0, le=MAX_ARRIVALS)
    """Not read: checks sent by earlier releases carry the batch's size then."""


class TrackRun(_Message):
    """Advance a run's training: submit, start, or poll its BES job."""

    kind: Literal["track-run"] = "track-run"
    run_id: RunId
    poll: int = Field(default=0, ge=0, le=MAX_POLLS)
    start: str | None = Field(default=None, pattern=r"^[0-9a-f]{16}$")
    """The start claim this copy saw on the run, one start lease ago (or its own holder's, given
    back): if that same claim is still there with the job not started, this copy takes over."""

    @model_serializer(mode="wrap")
    def _without_empty_start(
        self, handler: SerializerFunctionWrapHandler, info: SerializationInfo
    ) -> dict[str, Any]:
        """No `start` key when there is no claim: the message an older release (which rejects
        unknown fields) can read, as long as none is carried."""
        data: dict[str, Any] = handler(self)
        if data.get("start") is None:
            data.pop("start", None)
        return data


class EvaluateRun(_Message):
    """Read a finished run's evaluation, apply the gate, promote or keep the champion."""

    kind: Literal["evaluate-run"] = "evaluate-run"
    run_id: RunId
    poll: int = Field(default=0, ge=0, le=MAX_POLLS)
    """Provisioning polls of an asynchronous promotion (New web services)."""
    retries: int = Field(default=0, ge=0, le=100)
    """How often this promotion step was re-sent after a service asked to retry later."""
    lease: str | None = Field(default=None, pattern=r"^[0-9a-f]{16}$")
    """The deploy lease this copy saw held by another delivery, one lease ago: if that same
    claim is still there, unfinished, the holder is gone and this copy takes over."""


class RunEvent(BaseModel):
    """A run changed state: what notifications and dashboards are told."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    version: Literal[1] = 1
    kind: Literal["run-event"] = "run-event"
    model: ModelName
    run_id: RunId
    state: State
    reason: str = Field(max_length=2000)
    at: Timestamp
    job_id: JobId | None = None
    metrics: dict[MetricName, float] | None = Field(default=None, max_length=100)


JobsMessage = Annotated[CheckBatch | TrackRun, Field(discriminator="kind")]
_jobs = TypeAdapter[CheckBatch | TrackRun](JobsMessage)


def _check_size(body: bytes | str) -> bytes:
    raw = body.encode("utf-8") if isinstance(body, str) else body
    if len(raw) > MAX_MESSAGE_BYTES:
        raise MessageError(f"message of {len(raw)} bytes exceeds {MAX_MESSAGE_BYTES}")
    return raw


def _parse(adapter: TypeAdapter[Any], body: bytes | str, queue: str) -> Any:
    raw = _check_size(body)
    try:
        return adapter.validate_json(raw)
    except ValidationError as exc:
        raise MessageError(f"not {queue} message: {_summary(exc)}") from exc


_evaluations = TypeAdapter(EvaluateRun)
_events = TypeAdapter(RunEvent)


def parse_jobs(body: bytes | str) -> CheckBatch | TrackRun:
    """Parse a message from the jobs queue."""
    message: CheckBatch | TrackRun = _parse(_jobs, body, "a jobs-queue")
    return message


def parse_evaluation(body: bytes | str) -> EvaluateRun:
    """Parse a message from the evaluations queue."""
    message: EvaluateRun = _parse(_evaluations, body, "an evaluations-queue")
    return message


def parse_event(body: bytes | str) -> RunEvent:
    """Parse a message from the events queue."""
    message: RunEvent = _parse(_events, body, "an events-queue")
    return message


def _summary(exc: ValidationError) -> str:
    return "; ".join(
        f"{'.'.join(str(p) for p in e['loc']) or 'body'}: {e['msg']}" for e in exc.errors()
    )
