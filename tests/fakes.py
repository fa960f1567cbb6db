"""Honest in-memory implementations of the pipeline's ports."""

from __future__ import annotations

import copy
import itertools
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

from pydantic import BaseModel

from retrain.bes import BlobRef, JobState, JobStatus
from retrain.clock import ManualClock as ManualClock  # re-exported for the tests
from retrain.deploy import Progress
from retrain.errors import (
    InputRejected,
    PermanentRemoteError,
    RemoteError,
    StateConflict,
)
from retrain.ports import (
    ModelRef,
    Phase,
    TrainingRequest,
    TrainingResult,
    TrainingStatus,
)
from retrain.storage import (
    HEAD_BYTES,
    LOG_BLOCKS,
    Appended,
    BlobHead,
    BlobUnreadable,
    BlobVersion,
    Listed,
    Log,
    Versioned,
)


class MemoryDocumentStore:
    """Documents in a dict, with ETags that change on every write."""

    def __init__(self) -> None:
        self.docs: dict[str, tuple[dict[str, Any], str]] = {}
        self.logs: dict[str, tuple[list[dict[str, Any]], bool]] = {}
        """Each log's entries and whether it is sealed."""
        self.log_blocks = LOG_BLOCKS
        """How many entries a log holds before an append to it is refused as full."""
        self._etags = itertools.count(1)
        self.calls: list[tuple[str, str]] = []
        """Every request as (operation, key), as a storage account would count them."""
        self.crash_before: tuple[str, str] | None = None
        """(operation, key prefix): the next such request raises, as if the process died."""
        self.lose_answer: tuple[str, str] | None = None
        """(operation, key prefix): the next such write is stored and then refused as
        conflicting, as the storage SDK's retry of a conditional write whose answer was lost
        is (412 or 409)."""
        self.lose_answer_of: int | None = None
        """The same for the n-th document write (create or replace, counted from 0)."""
        self.writes = 0

    def _call(self, op: str, key: str) -> None:
        self.calls.append((op, key))
        crash = self.crash_before
        if crash and op == crash[0] and key.startswith(crash[1]):
            self.crash_before = None
            raise RuntimeError(f"crashed before {op} {key}")

    def read(self, key: str) -> Versioned | None:
        self._call("read", key)
        found = self.docs.get(key)
        return Versioned(copy.deepcopy(found[0]), found[1]) if found else None

    def create(self, key: str, doc: dict[str, Any]) -> str:
        self._call("create", key)
        if key in self.docs:
            raise StateConflict(key)
        etag = f"e{next(self._etags)}"
        self.docs[key] = (copy.deepcopy(doc), etag)
        self._answer("create", key)
        return etag

    def _answer(self, op: str, key: str) -> None:
        lose, nth = self.lose_answer, self.writes
        self.writes += 1
        if nth == self.lose_answer_of or (lose and op == lose[0] and key.startswith(lose[1])):
            if nth != self.lose_answer_of:
                self.lose_answer = None
            self.calls.append((op, key))  # the retry
            raise StateConflict(f"{key}: the retried {op} was refused")

    def replace(self, key: str, doc: dict[str, Any], etag: str) -> str:
        self._call("replace", key)
        if key not in self.docs or self.docs[key][1] != etag:
            raise StateConflict(key)
        new = f"e{next(self._etags)}"
        self.docs[key] = (copy.deepcopy(doc), new)
        self._answer("replace", key)
        return new

    def keys(self, prefix: str) -> list[str]:
        return sorted(k for k in self.docs if k.startswith(prefix))

    def put_entry(self, key: str, entry: dict[str, Any], *, replace: bool) -> bool:
        self._call("put_entry", key)
        if key in self.docs and not replace:
            return False
        self.docs[key] = (copy.deepcopy(entry), f"e{next(self._etags)}")
        return True

    def entries(self, prefix: str) -> list[tuple[str, dict[str, Any]]]:
        self._call("entries", prefix)
        return [(k, copy.deepcopy(self.docs[k][0])) for k in self.keys(prefix)]

    def start_log(self, key: str) -> bool:
        self._call("start_log", key)
        if key in self.logs:
            return False
        self.logs[key] = ([], False)
        return True

    def append(self, key: str, entry: dict[str, Any]) -> Appended:
        self._call("append", key)
        if key not in self.logs:
            return Appended.MISSING
        entries, sealed = self.logs[key]
        if sealed:
            return Appended.SEALED
        if len(entries) >= self.log_blocks:
            return Appended.FULL
        entries.append(copy.deepcopy(entry))
        return Appended.APPENDED

    def seal_log(self, key: str) -> bool:
        self._call("seal_log", key)
        if key not in self.logs:
            return False
        self.logs[key] = (self.logs[key][0], True)
        return True

    def read_log(self, key: str) -> Log | None:
        self._call("read_log", key)
        if key not in self.logs:
            return None
        entries = self.logs[key][0]
        return Log(copy.deepcopy(entries), len(entries) >= self.log_blocks)


class FakeData:
    """Blobs in a dict; quarantine and SAS references recorded.

    Each put is one second after the previous one (its Last-Modified), unless `modified` says
    otherwise. `archived` blobs answer a read as the archive tier does.
    """

    EPOCH = datetime(2026, 1, 1, tzinfo=UTC)

    def __init__(self) -> None:
        self.blobs: dict[tuple[str, str], tuple[bytes, str]] = {}
        self.modified: dict[tuple[str, str], datetime] = {}
        self.archived: set[tuple[str, str]] = set()
        self.quarantined: list[tuple[str, str, str]] = []
        self.frozen: list[tuple[BlobVersion, str]] = []
        self.calls: list[tuple[str, str]] = []
        """Every request as (operation, container/name or prefix)."""
        self._etags = itertools.count(1)

    def put(
        self, container: str, name: str, data: bytes | str, *, modified: datetime | None = None
    ) -> None:
        raw = data.encode() if isinstance(data, str) else data
        n = next(self._etags)
        self.blobs[(container, name)] = (raw, f"0x{n}")
        self.modified[(container, name)] = modified or self.EPOCH + timedelta(seconds=n)

    def head(self, container: str, name: str) -> BlobHead | None:
        self.calls.append(("head", f"{container}/{name}"))
        found = self.blobs.get((container, name))
        if found is None:
            return None
        if (container, name) in self.archived:
            raise BlobUnreadable(
                f"{container}/{name} is in the archive tier", etag=found[1], size=len(found[0])
            )
        return BlobHead(
            found[1], len(found[0]), found[0][:HEAD_BYTES], self.modified[(container, name)]
        )

    def quarantine(self, container: str, name: str, target: str, reason: str) -> None:
        self.quarantined.append((f"{container}/{name}", target, reason))

    def read_text(self, container: str, name: str, *, max_bytes: int) -> str:
        found = self.blobs.get((container, name))
        if found is None:
            raise PermanentRemoteError(f"{container}/{name} does not exist")
        return found[0].decode()

    def listing(self, container: str, prefix: str) -> list[Listed]:
        self.calls.append(("list", f"{container}/{prefix}"))
        return [
            Listed(n, v[1], self.modified[(c, n)])
            for (c, n), v in sorted(self.blobs.items())
            if c == container and n.startswith(prefix)
        ]

    def newest(self, container: str, prefix: str) -> str | None:
        found = self.listing(container, prefix)
        return max(found, key=lambda b: (b.last_modified, b.name)).name if found else None

    def freeze(self, source: BlobVersion, container: str, name: str) -> bool:
        found = self.blobs.get((source.container, source.name))
        if found is None or found[1] != source.etag:
            raise InputRejected(f"{source.container}/{source.name} changed after it was validated")
        self.blobs[(container, name)] = found
        self.frozen.append((source, f"{container}/{name}"))
        return True

    def reference(self, container: str, name: str, *, write: bool, expires: datetime) -> BlobRef:
        perms = "cw" if write else "r"
        return BlobRef(
            "https://acct.blob.core.windows.net/",
            f"{container}/{name}",
            f"?sp={perms}&se={expires:%Y%m%dT%H%M%S}&sig=fake",
        )


ACCOUNT = "https://acct.blob.core.windows.net/"


def blob_reader(sas: str = "?sp=r&sig=S") -> Callable[[ModelRef], BlobRef]:
    """A target's reader of model blobs: a reference to the blob in ACCOUNT with `sas`."""
    return lambda model: BlobRef.to_blob(ACCOUNT, model.container, model.name, sas)


class MemoryOutbox:
    """Messages kept in order, with their delays."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, BaseModel, timedelta]] = []

    def send(self, queue: str, message: BaseModel, *, delay: timedelta = timedelta(0)) -> None:
        self.sent.append((queue, message, delay))

    def send_raw(self, queue: str, body: str) -> None:
        from retrain.messages import parse_evaluation, parse_jobs

        message = parse_evaluation(body) if queue == "evals" else parse_jobs(body)
        self.sent.append((queue, message, timedelta(0)))

    def take(self) -> list[tuple[str, BaseModel, timedelta]]:
        sent, self.sent = self.sent, []
        return sent


class FakeJobs:
    """A BES service stand-in (the client side of `retrain.bes.BatchJobs`) that follows a
    script of states, one per status call of a started job.

    As strict as the service: a job is NotStarted until started, and a second start is
    refused with 409.
    """

    def __init__(self, script: list[JobState] | None = None, details: str | None = None) -> None:
        self.script = list(script or [JobState.FINISHED])
        self.details = details
        self.submitted: list[dict[str, Any]] = []
        self.started: list[str] = []
        self.cancelled: list[str] = []
        self.polls: list[str] = []
        self.second_starts: list[str] = []
        """Starts of a job already started: refused (409), and a breach of the contract."""
        self.errors: dict[str, RemoteError] = {}

    def _maybe_fail(self, op: str) -> None:
        if op in self.errors:
            raise self.errors.pop(op)

    def submit(
        self,
        *,
        inputs: dict[str, BlobRef],
        outputs: dict[str, BlobRef],
        global_parameters: dict[str, str],
    ) -> str:
        self._maybe_fail("submit")
        job_id = f"job{len(self.submitted) + 1}"
        self.submitted.append(
            {
                "job_id": job_id,
                "inputs": inputs,
                "outputs": outputs,
                "global_parameters": global_parameters,
            }
        )
        return job_id

    def start(self, job_id: str) -> None:
        if job_id in self.started:
            self.second_starts.append(job_id)
            raise PermanentRemoteError(
                f"BES start {job_id}: HTTP 409: the job was started", status=409
            )
        self.started.append(job_id)
        self._maybe_fail("start")  # an answer lost after the job was started

    def status(self, job_id: str) -> JobStatus:
        self._maybe_fail("status")
        self.polls.append(job_id)
        if job_id not in self.started:
            return JobStatus(JobState.NOT_STARTED, None, {})
        state = self.script.pop(0) if len(self.script) > 1 else self.script[0]
        return JobStatus(state, self.details if state is JobState.FAILED else None, {})

    def cancel(self, job_id: str) -> None:
        self.cancelled.append(job_id)

    def probe(self) -> str:
        self._maybe_fail("probe")
        return "BES service answers and accepts the key"


class FakeTraining:
    """A training backend as the port describes it, with nothing of BES: a job per request,
    not started until `start` (a second start is refused with 409), one scripted phase per
    status call of a started job, and a result of the metrics set for the job.

    `named=True` names a job after its request, as a backend with deterministic job names
    does: submitting the same request again returns the job the first submit created.
    """

    what = "fake job"

    def __init__(self, script: list[Phase] | None = None, *, named: bool = False) -> None:
        self.script = list(script or [Phase.FINISHED])
        self.named = named
        self.jobs: dict[str, TrainingRequest] = {}
        self.submits: list[str] = []
        self.started: list[str] = []
        self.cancelled: list[str] = []
        self.metrics: dict[str, tuple[dict[str, float], dict[str, float] | None]] = {}
        """Per job id: the challenger's metrics and the champion's (None: not scored)."""

    def submit(self, request: TrainingRequest) -> str:
        job_id = (
            f"{request.model}-{request.run_id}" if self.named else f"job{len(self.submits) + 1}"
        )
        self.submits.append(job_id)
        self.jobs.setdefault(job_id, request)
        return job_id

    def outputs(self, request: TrainingRequest) -> dict[str, str]:
        return {}

    def start(self, job_id: str) -> None:
        if job_id in self.started:
            raise PermanentRemoteError(f"start {job_id}: HTTP 409: the job was started", status=409)
        self.started.append(job_id)

    def status(self, job_id: str) -> TrainingStatus:
        if job_id not in self.started:
            return TrainingStatus(Phase.NOT_STARTED, "NotStarted")
        phase = self.script.pop(0) if len(self.script) > 1 else self.script[0]
        return TrainingStatus(phase, phase.name.title())

    def cancel(self, job_id: str) -> None:
        self.cancelled.append(job_id)

    def probe(self) -> str:
        return "fake training service answers"

    def result(self, request: TrainingRequest, job_id: str) -> TrainingResult:
        if job_id not in self.metrics:
            raise PermanentRemoteError(f"job {job_id} reported no metrics")
        challenger, champion = self.metrics[job_id]
        model = ModelRef(request.output_container, f"{request.output_folder}/model.bin")
        return TrainingResult(challenger, champion, model)


class FakeTarget:
    """A deploy target that serves what was deployed once its scripted provisioning ends."""

    def __init__(self, provisioning: list[str] | None = None) -> None:
        self.serving: ModelRef | None = None
        self.requested: ModelRef | None = None
        self.deploys: list[ModelRef] = []
        self.provisioning = list(provisioning or [])
        """States reported by progress() before 'succeeded' (e.g. ['pending', 'failed'])."""

    def serves(self, model: ModelRef) -> bool:
        return self.serving == model

    def deploy(self, model: ModelRef) -> Progress:
        if self.serves(model):
            return Progress("succeeded")
        self.deploys.append(model)
        self.requested = model
        return self.progress("op-1" if self.provisioning else None)

    def progress(self, operation: str | None) -> Progress:
        state = self.provisioning.pop(0) if self.provisioning else "succeeded"
        if state == "succeeded":
            self.serving = self.requested
            return Progress("succeeded")
        if state == "failed":
            return Progress("failed", "ModuleError: cannot load the model (injected)")
        return Progress("pending", operation=operation)

    def preflight(self) -> list[str]:
        return ["fake target ok"]
