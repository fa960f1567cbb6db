"""The Retrainer: what each trigger does, as steps of a per-run state machine."""

from __future__ import annotations

import functools
import hashlib
import logging
import secrets
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from pydantic import BaseModel

from retrain.bes import BatchJobs, BlobRef, JobState
from retrain.clock import Clock
from retrain.deploy import DeployTarget, Progress
from retrain.errors import (
    EvaluationError,
    InputRejected,
    MessageError,
    RemoteError,
    StateConflict,
)
from retrain.evaluation import decide, parse_evaluation_csv
from retrain.http import redact
from retrain.ingest import check_name, route, validate
from retrain.ledger import TERMINAL, Doc, Ledger, arrival_key, model_key, run_key
from retrain.messages import (
    CheckBatch,
    EvaluateRun,
    RunEvent,
    TrackRun,
    parse_evaluation,
    parse_jobs,
)
from retrain.settings import ModelSpec
from retrain.storage import (
    BlobHead,
    BlobUnreadable,
    BlobVersion,
    DataStore,
    Listed,
    Outbox,
    normalize_etag,
)

log = logging.getLogger(__name__)

MODEL_BLOB = "model.ilearner"
EVALUATION_BLOB = "evaluation.csv"
INPUT_BLOB = "input"
"""The run's copy of its training file (plus the file's own extension), what the job reads."""
MAX_EVALUATION_BYTES = 1024 * 1024
SAS_MARGIN = timedelta(hours=1)
DEPLOY_SAS_LIFETIME = timedelta(hours=2)
MAX_REJOINS = 10
"""How often an arrival may find its claimed batch closed before it gives up (and is retried)."""
_EPOCH = "1970-01-01T00:00:00+00:00"


MAX_RETRY_AFTER = 5
"""How often a promotion follows a service's Retry-After before its message fails for good
(then the host's own retries and the poison queue take over, as for any other error)."""
MIN_POLL_GAP = timedelta(seconds=1)
DEPLOY_CALLS = 2
"""HTTP calls one `DeployTarget.deploy` makes at most: a GET of what is served, then the update."""
"""The least time between two status calls of one job (the spec's clients poll at 1 s or slower)."""


@dataclass(frozen=True)
class Delivery:
    """Which queue message is being handled: its id, and how often it was dequeued.

    A redelivery after a failure has the same id and a higher attempt; a duplicate or a stale
    copy has another id. Handlers use it to let a redelivery finish what its first attempt began.
    """

    id: str
    attempt: int = 1


def _delivery_doc(delivery: Delivery | None) -> Doc | None:
    return {"id": delivery.id, "attempt": delivery.attempt} if delivery else None


@dataclass(frozen=True)
class Places:
    """Names of the containers and queues the pipeline uses."""

    data_container: str
    artifacts_container: str
    quarantine_container: str
    jobs_queue: str
    evaluations_queue: str
    events_queue: str | None = None


@dataclass(frozen=True)
class Timing:
    """Poll backoff: the first delay doubles per poll up to the maximum."""

    first_delay: timedelta
    max_delay: timedelta
    stall: timedelta = timedelta(minutes=15)
    """Beyond its poll delay, how long a step may stand still before the sweep re-drives it."""
    call_bound: timedelta = timedelta(seconds=80)
    """The longest one HTTP call to a service can take: (connect + read timeout) per attempt,
    times attempts, plus the waits between them (see `retrain.http.worst_call`)."""

    @property
    def deploy_lease(self) -> timedelta:
        """How long a delivery holds the right to deploy: a first promotion's preflight (one
        call) and the deploy (DEPLOY_CALLS calls) fit in it, with one call and 10 s to spare."""
        return self.call_bound * (DEPLOY_CALLS + 2) + timedelta(seconds=10)

    @property
    def deploy_reserve(self) -> timedelta:
        """What must be left of the lease to start the deploy: its calls' worst case."""
        return self.call_bound * DEPLOY_CALLS

    def delay(self, poll: int) -> timedelta:
        """The wait before poll number `poll` (1-based)."""
        factor = 2 ** min(max(poll - 1, 0), 30)
        delay: timedelta = min(self.first_delay * factor, self.max_delay)
        return delay


def _iso(moment: datetime) -> str:
    return moment.isoformat()


def _parse(moment: str) -> datetime:
    return datetime.fromisoformat(moment)


@dataclass
class _Step:
    """What a handler did before an error interrupted it."""

    polled: bool = False
    """It claimed its message's poll number, so a retry must use the next one."""
    starting: bool = False
    """It was starting a job: a start with no answer may still be acted on by the service."""


class Retrainer:
    """Ingest → coalesce → train → evaluate → promote, each step idempotent."""

    def __init__(
        self,
        *,
        models: Mapping[str, ModelSpec],
        ledger: Ledger,
        data: DataStore,
        outbox: Outbox,
        jobs_for: Callable[[ModelSpec], BatchJobs],
        target_for: Callable[[ModelSpec], DeployTarget],
        places: Places,
        timing: Timing,
        clock: Clock,
    ) -> None:
        self._models = models
        self._ledger = ledger
        self._data = data
        self._outbox = outbox
        self._jobs_for = jobs_for
        self._target_for = target_for
        self._places = places
        self._timing = timing
        self._clock = clock

    # ------------------------------------------------------------------ ingest

    def on_blob(self, container: str, name: str) -> str:
        """Handle a blob arrival; returns what happened ('batched', 'rejected', 'duplicate', …).

        A new arrival on a warm instance costs three storage requests: read the blob's first
        bytes, create its arrival record, add it to the model's batch (one conditional write on
        the remembered ETag). Opening a batch adds one: its check is scheduled once per batch.
        The record names the batch *before* the file is added to it, so a redelivery can tell
        exactly whether the first delivery got the file in.
        """
        refused = _unreferenceable(name)
        try:
            head = self._data.head(container, name)
        except BlobUnreadable as exc:
            try:
                spec = route(name, self._models.values())
            except InputRejected:
                raise exc from None
            self._record_unreadable(spec, container, name, exc)
            return "rejected"
        except RemoteError:
            if refused is None:
                raise
            # A request signed for such a name may not authenticate: record the rejection
            # instead of failing (and being retried) forever.
            head = BlobHead("unreadable", 0, b"")
        if head is None:
            log.warning("arrival %s/%s: blob no longer exists; nothing to do", container, name)
            return "gone"
        key = arrival_key(container, name, head.etag)
        now = self._clock.now()
        record: Doc = {
            "container": container,
            "name": name,
            "etag": head.etag,
            "size": head.size,
            "arrived_at": _iso(now),
        }
        try:
            spec = route(name, self._models.values())
            record["model"] = spec.name
            if refused is not None:
                raise refused
            validate(spec, name, size=head.size, head=head.head)
        except InputRejected as exc:
            record.update(status="rejected", reason=str(exc))
            if self._record_arrival(key, record):
                self._data.quarantine(container, name, self._places.quarantine_container, str(exc))
                log.warning("arrival %s/%r rejected: %s", container, name, exc)
                return "rejected"
            return "duplicate"
        file = {"name": name, "etag": head.etag, "size": head.size, "arrived_at": _iso(now)}
        if head.last_modified is not None:
            file["modified_at"] = _iso(head.last_modified)
        mkey = model_key(spec.name)
        state = self._ledger.known(mkey) or self._ledger.get(mkey) or {}
        open_batch = state.get("batch")
        claim = open_batch["id"] if open_batch else _batch_id(now)
        record.update(status="accepted", batch_id=claim)
        if not self._record_arrival(key, record):
            return self._arrived_again(spec, key, file, now)
        batch, opened = self._join(spec, key, file, claim, fresh=open_batch is None, now=now)
        if opened:
            self._schedule_check(spec, batch, now)
        log.info(
            "arrival %s/%s: batch %s of %s now has %d file(s)",
            container,
            name,
            batch["id"],
            spec.name,
            len(batch["files"]),
            extra=_dims(spec.name, batch["id"]),
        )
        return "batched"

    def _record_arrival(self, key: str, record: Doc) -> bool:
        """Create the version's arrival record; False when one exists. A record made while the
        blob could not be read (archived) is replaced: rehydration keeps the ETag, and the
        version is judged on its content now."""
        if self._ledger.create(key, record):
            return True
        _, replaced = self._ledger.update(
            key, lambda d: dict(record) if d.get("unreadable") else None
        )
        return replaced

    def _join(
        self, spec: ModelSpec, key: str, file: Doc, claim: str, *, fresh: bool, now: datetime
    ) -> tuple[Doc, bool]:
        """Add `file` to batch `claim`, which its arrival record names; returns the batch and
        whether this call opened it.

        `fresh`: `claim` is a new id, to open a batch with when none is open. When the claimed
        batch is no longer open, the record is pointed at the open one (or a new one) first.
        """
        mkey = model_key(spec.name)
        for _ in range(MAX_REJOINS):
            opened = False

            def add(d: Doc, claim: str = claim, fresh: bool = fresh) -> Doc | None:
                nonlocal opened
                batch, sealed = d.get("batch"), d.get("sealed") or {}
                # A fresh id that was sealed meanwhile was opened by a concurrent delivery of
                # this same arrival: never open a second batch under it.
                opened = batch is None and fresh and sealed.get("id") != claim
                if opened or (batch is not None and batch["id"] == claim):
                    return _add_to_batch(d, file, now, claim)
                return None

            doc, _ = self._ledger.update(mkey, add, initial=_new_model(spec))
            batch, sealed = doc.get("batch"), doc.get("sealed") or {}
            if batch is not None and batch["id"] == claim:
                return batch, opened
            if sealed.get("id") == claim and _holds(sealed["files"], file):
                return sealed, False  # a concurrent delivery got it in before the seal
            # The claimed batch was sealed, or another arrival opened one first: claim anew.
            claim, fresh = (batch["id"], False) if batch else (_batch_id(now), True)
            self._ledger.update(key, functools.partial(_claim_batch, claim))
        raise StateConflict(f"{key}: batch of {spec.name} kept changing under the arrival")

    def _arrived_again(self, spec: ModelSpec, key: str, file: Doc, now: datetime) -> str:
        """A second delivery of a recorded arrival: finish what the first one may not have."""
        existing = self._ledger.get(key) or {}
        claim = existing.get("batch_id")
        if existing.get("status") == "rejected" or not claim:
            return "duplicate"
        state = self._ledger.get(model_key(spec.name)) or {}
        batch = state.get("batch")
        files = self._claimed_files(spec, state, claim, {})
        if files is not None and _holds(files, file):
            opener = files[0]["name"] == file["name"] and files[0]["etag"] == file["etag"]
            if opener and batch and batch["id"] == claim:
                # Opening a batch sends its check after the write; the first delivery may have
                # died in between. A second check is harmless (the first to act wins).
                self._schedule_check(spec, batch, now)
            log.info("arrival %s@%s: duplicate event ignored", file["name"], file["etag"])
            return "duplicate"
        # The first delivery died between recording the arrival and adding the file: add it.
        joined, _ = self._join(spec, key, file, claim, fresh=files is None, now=now)
        self._schedule_check(spec, joined, now)
        log.warning(
            "arrival %s@%s: redelivered before it reached a batch; added to %s",
            file["name"],
            file["etag"],
            joined["id"],
            extra=_dims(spec.name, joined["id"]),
        )
        return "batched"

    def _claimed_files(
        self, spec: ModelSpec, state: Doc, claim: str, runs: dict[str, list[Doc] | None]
    ) -> list[Doc] | None:
        """The files of batch `claim`: open, just sealed, or in its run; None if it never
        opened. `runs` caches run lookups across calls."""
        batch, sealed = state.get("batch"), state.get("sealed") or {}
        if batch and batch["id"] == claim:
            return list(batch["files"])
        if sealed.get("id") == claim:
            return list(sealed["files"])
        if claim not in runs:
            run = self._ledger.get(run_key(spec.name, claim), remember=False)
            runs[claim] = run.get("files") if run else None
        return runs[claim]

    def _schedule_check(self, spec: ModelSpec, batch: Doc, now: datetime) -> None:
        delay = max(_check_due(spec, batch) - now, timedelta(0))
        self._outbox.send(
            self._places.jobs_queue,
            CheckBatch(model=spec.name, batch_id=batch["id"], arrivals=len(batch["files"])),
            delay=delay,
        )

    # ---------------------------------------------------------------- coalesce

    def on_check_batch(self, msg: CheckBatch) -> str:
        """Seal the model's batch into a run once it has been quiet long enough."""
        spec = self._spec(msg.model)
        state = self._ledger.get(model_key(spec.name)) or {}
        batch = state.get("batch")
        now = self._clock.now()
        if not batch or batch["id"] != msg.batch_id:
            sealed = state.get("sealed") or {}
            if state.get("active_run") == msg.batch_id and sealed.get("id") == msg.batch_id:
                # Sealed by a delivery that may have died before it started the run.
                self._start_run(spec, sealed, now)
                return "resent"
            return "stale"
        due = _check_due(spec, batch)
        if now < due and not batch.get("force"):
            # Arrivals since this check was scheduled moved the batch's quiet end: look again
            # then. Of several checks waking early, the one that records the new time goes on.
            def later(d: Doc) -> Doc | None:
                b = d.get("batch")
                if not b or b["id"] != batch["id"] or _parse(b.get("check_at") or _EPOCH) >= due:
                    return None
                b["check_at"] = _iso(due)
                return d

            _, rescheduled = self._ledger.update(model_key(spec.name), later)
            if rescheduled:
                self._schedule_check(spec, batch, now)
            return "waiting"
        if state.get("active_run"):
            log.info(
                "batch %s of %s waits for run %s to end",
                batch["id"],
                spec.name,
                state["active_run"],
                extra=_dims(spec.name, state["active_run"]),
            )
            return "busy"
        run_id = batch["id"]

        def seal(d: Doc) -> Doc | None:
            if not d.get("batch") or d["batch"]["id"] != run_id or d.get("active_run"):
                return None
            d["sealed"], d["batch"], d["active_run"] = d["batch"], None, run_id
            d["active_since"] = _iso(now)
            return d

        state, _ = self._ledger.update(model_key(spec.name), seal)
        if state.get("active_run") != run_id:
            return "stale"
        self._start_run(spec, state["sealed"], now)
        return "sealed"

    def _start_run(self, spec: ModelSpec, batch: Doc, now: datetime) -> None:
        """Record the run of a sealed batch (once) and hand it to the train step."""
        run = _new_run(spec, batch, now)
        if self._ledger.create(run_key(spec.name, run["run_id"]), run):
            self._emit(spec, run, run["history"][0]["note"])
            log.info(
                "run %s of %s: sealed %d file(s)",
                run["run_id"],
                spec.name,
                len(batch["files"]),
                extra=_dims(spec.name, run["run_id"]),
            )
        self._outbox.send(self._places.jobs_queue, TrackRun(model=spec.name, run_id=run["run_id"]))

    # ------------------------------------------------------------------- train

    def on_track_run(self, msg: TrackRun, *, delivery: Delivery | None = None) -> str:
        """Submit, start or poll the run's BES job; never waits inside the invocation.

        One poll chain per run: poll number `n` is made by exactly one message (the first to
        claim it); a redelivery of that same message after a failure may make it again, any
        other copy is dropped.
        """
        spec = self._spec(msg.model)
        key = run_key(spec.name, msg.run_id)
        run = self._ledger.get(key)
        if run is None:
            log.warning("run %s of %s does not exist; message dropped", msg.run_id, spec.name)
            return "unknown"
        if run["state"] in TERMINAL:
            self._release(spec, msg.run_id)
            return str(run["state"])
        if run["state"] not in ("queued", "submitted", "running"):
            return str(run["state"])
        now = self._clock.now()
        jobs = self._jobs_for(spec)
        step = _Step()
        try:
            if run["state"] == "queued":
                if now >= _parse(run["deadline_at"]):
                    return self._fail(spec, run, "the job deadline passed before it was submitted")
                run, persisted = self._submit(spec, jobs, run, msg, delivery, now)
                if not persisted:
                    return "conflict"
                step.polled = True  # the job id's write took the chain's poll for this delivery
                return self._start(spec, jobs, run, now, delivery, step, known_unstarted=True)
            if run["state"] == "submitted":
                # Starting is part of the one chain: of several copies, one asks BES and starts.
                if not self._claim_poll(key, None, msg.poll, delivery):
                    return "duplicate"
                step.polled = True
                return self._start(spec, jobs, run, now, delivery, step, known_unstarted=False)
            poll_claim = self._claim_poll(key, None, msg.poll, delivery)
            if not poll_claim:
                return "duplicate"
            step.polled = True
            if poll_claim == "again":
                # The failed attempt may have polled and sent the next poll before it died:
                # polling now could come within a second of that one. Send the next poll
                # instead (of two copies of it, one claims it).
                self._poll_later(spec, msg.run_id, msg.poll + 1)
                return "resent"
            return self._poll(spec, jobs, run, msg, now)
        except RemoteError as exc:
            if exc.retryable:
                # A claimed poll number is spent: the retry is the chain's next poll.
                claimed = step.polled
                poll = msg.poll + 1 if claimed else msg.poll
                delay = max(
                    timedelta(seconds=exc.retry_after or 0),
                    self._timing.delay(poll) if claimed else MIN_POLL_GAP,
                    # A start that got no answer may reach BES late: look (status first) only
                    # once the service must have acted on it, so it is not started twice.
                    self._timing.call_bound
                    if step.starting and exc.status is None
                    else MIN_POLL_GAP,
                    MIN_POLL_GAP,
                )
                log.warning(
                    "run %s of %s: %s; trying again in %s",
                    msg.run_id,
                    spec.name,
                    exc,
                    delay,
                    extra=_dims(spec.name, msg.run_id, run.get("job_id")),
                )
                self._outbox.send(
                    self._places.jobs_queue,
                    TrackRun(model=spec.name, run_id=msg.run_id, poll=poll),
                    delay=delay,
                )
                return "retry"
            current = self._ledger.get(key) or run
            if current.get("job_id") and current["state"] in ("submitted", "running"):
                self._cancel_quietly(jobs, current["job_id"])
            return self._fail(spec, current, str(exc))

    def _start(
        self,
        spec: ModelSpec,
        jobs: BatchJobs,
        run: Doc,
        now: datetime,
        delivery: Delivery | None,
        step: _Step,
        *,
        known_unstarted: bool,
    ) -> str:
        """Start the persisted job once, then begin the run's one poll chain.

        A job id found persisted by an earlier delivery may have been started already (its
        answer lost): ask BES first and start only a NotStarted job; a 409 on start means
        another delivery started it.
        """
        job_id = run["job_id"]
        already = False
        if not known_unstarted:
            already = jobs.status(job_id).state is not JobState.NOT_STARTED
        if not already:
            step.starting = True
            try:
                jobs.start(job_id)
            except RemoteError as exc:
                if exc.status != 409:
                    raise
                log.info("job %s: already started (409 on start)", job_id)
            step.starting = False
        moved_run, moved = self._move(
            spec, run["run_id"], "submitted", "running", now, note=f"job {job_id} started"
        )
        if not moved:
            return "duplicate"  # another delivery started the job and owns the poll chain
        # The chain goes on from the poll this delivery claimed to start the job (polls and
        # starts share one count, so no copy of an earlier message can poll it again).
        self._poll_later(spec, run["run_id"], moved_run.get("polls", 0) + 1)
        return "started"

    def _submit(
        self,
        spec: ModelSpec,
        jobs: BatchJobs,
        run: Doc,
        msg: TrackRun,
        delivery: Delivery | None,
        now: datetime,
    ) -> tuple[Doc, bool]:
        """Submit, then persist the job id; only a persisted job is ever started.

        The job reads a copy of exactly the validated version of the training file, made in the
        artifacts container first: an overwrite of the data blob after validation cannot reach
        the job.
        """
        expires = _parse(run["deadline_at"]) + SAS_MARGIN
        folder = f"{spec.name}/{run['run_id']}"
        art = self._places.artifacts_container
        training = run["training_file"]
        suffix = ".tsv" if training["name"].lower().endswith(".tsv") else ".csv"
        frozen = f"{folder}/{INPUT_BLOB}{suffix}"
        source = BlobVersion(self._places.data_container, training["name"], training["etag"])
        try:
            copied = self._data.freeze(source, art, frozen)
        except InputRejected as exc:
            raise RemoteError(f"the validated training file is gone: {exc}") from exc
        if not copied:
            raise RemoteError(
                f"the copy of {training['name']} into {art}/{frozen} is still in progress",
                retryable=True,
                retry_after=5,
            )
        inputs = {
            spec.bes.input_name: self._data.reference(art, frozen, write=False, expires=expires)
        }
        outputs = {
            spec.bes.model_output: self._data.reference(
                art, f"{folder}/{MODEL_BLOB}", write=True, expires=expires
            ),
            spec.bes.evaluation_output: self._data.reference(
                art, f"{folder}/{EVALUATION_BLOB}", write=True, expires=expires
            ),
        }
        job_id = jobs.submit(
            inputs=inputs, outputs=outputs, global_parameters=spec.bes.global_parameters
        )
        run, persisted = self._move(
            spec,
            run["run_id"],
            "queued",
            "submitted",
            now,
            note=f"job {job_id} submitted",
            job_id=job_id,
            polls=msg.poll,
            poll_by=_delivery_doc(delivery),
            polled_at=_iso(now),
            outputs={
                "input": f"{art}/{frozen}",
                "model": f"{art}/{folder}/{MODEL_BLOB}",
                "evaluation": f"{art}/{folder}/{EVALUATION_BLOB}",
            },
        )
        if persisted:
            # The version's own record says which run trained it, whichever batch it was in
            # (a retrain-now puts a version in a batch other than its arrival's).
            self._ledger.update(
                arrival_key(source.container, source.name, source.etag),
                functools.partial(_note_trained, run["run_id"]),
            )
        else:
            # Another delivery submitted first; ours was never started, so it never runs.
            log.warning(
                "run %s: job %s lost the race and is deleted unstarted",
                run["run_id"],
                job_id,
                extra=_dims(spec.name, run["run_id"], job_id),
            )
            self._cancel_quietly(jobs, job_id)
        return run, persisted

    def _poll(
        self, spec: ModelSpec, jobs: BatchJobs, run: Doc, msg: TrackRun, now: datetime
    ) -> str:
        status = jobs.status(run["job_id"])
        if status.state is JobState.FINISHED:
            self._move(spec, msg.run_id, "running", "trained", now, note="BES job finished")
            self._outbox.send(
                self._places.evaluations_queue, EvaluateRun(model=spec.name, run_id=msg.run_id)
            )
            return "trained"
        if status.state in (JobState.FAILED, JobState.CANCELLED):
            return self._fail(
                spec,
                run,
                f"BES job {status.state.value.lower()}: {status.details or 'no details given'}",
            )
        if now >= _parse(run["deadline_at"]):
            jobs.cancel(run["job_id"])
            return self._fail(
                spec,
                run,
                f"the job outlived its deadline of {spec.job_deadline} "
                f"and was cancelled (last state {status.state.value})",
            )
        self._poll_later(spec, msg.run_id, msg.poll + 1)
        return "running"

    def _poll_later(self, spec: ModelSpec, run_id: str, poll: int) -> None:
        self._outbox.send(
            self._places.jobs_queue,
            TrackRun(model=spec.name, run_id=run_id, poll=poll),
            delay=self._timing.delay(poll),
        )

    @staticmethod
    def _cancel_quietly(jobs: BatchJobs, job_id: str) -> None:
        try:
            jobs.cancel(job_id)
        except RemoteError as exc:
            log.warning("job %s: cancel failed: %s", job_id, exc)

    # ------------------------------------------------------- evaluate, promote

    def on_evaluate(self, msg: EvaluateRun, *, delivery: Delivery | None = None) -> str:
        """Gate the trained model; promote it through the model's target when it is better."""
        spec = self._spec(msg.model)
        key = run_key(spec.name, msg.run_id)
        run = self._ledger.get(key)
        if run is None:
            log.warning("run %s of %s does not exist; message dropped", msg.run_id, spec.name)
            return "unknown"
        if run["state"] in TERMINAL:
            self._release(spec, msg.run_id)
            return str(run["state"])
        now = self._clock.now()
        if run["state"] == "trained":
            run = self._judge(spec, run, now)
        if run["state"] != "promoting":
            return str(run["state"])
        step = _Step()
        try:
            return self._promote(spec, run, msg, delivery, step)
        except RemoteError as exc:
            if not exc.retryable:
                return self._fail(spec, run, f"promotion failed: {exc}")
            if exc.retry_after is None or msg.retries >= MAX_RETRY_AFTER:
                raise  # the host retries the message, then keeps it as poison
            # Honour the service's Retry-After with a delayed copy of the message, instead of
            # failing the invocation and waiting out the queue's visibility timeout.
            poll = msg.poll + 1 if step.polled else msg.poll
            delay = max(timedelta(seconds=exc.retry_after or 0), MIN_POLL_GAP)
            log.warning(
                "run %s of %s: %s; trying again in %s",
                msg.run_id,
                spec.name,
                exc,
                delay,
                extra=_dims(spec.name, msg.run_id),
            )
            self._outbox.send(
                self._places.evaluations_queue,
                EvaluateRun(model=spec.name, run_id=msg.run_id, poll=poll, retries=msg.retries + 1),
                delay=delay,
            )
            return "retry"

    def _judge(self, spec: ModelSpec, run: Doc, now: datetime) -> Doc:
        key = run_key(spec.name, run["run_id"])
        container, _, blob = run["outputs"]["evaluation"].partition("/")
        try:
            text = self._data.read_text(container, blob, max_bytes=MAX_EVALUATION_BYTES)
            evaluation = parse_evaluation_csv(text)
        except (EvaluationError, RemoteError) as exc:
            if isinstance(exc, RemoteError) and exc.retryable:
                raise  # storage hiccup: the host re-delivers the message
            self._fail(spec, run, f"cannot read the evaluation: {exc}")
            return self._ledger.get(key) or run
        state = self._ledger.get(model_key(spec.name)) or {}
        champion = evaluation.champion
        source = "scored on the same hold-out data"
        if champion is None and state.get("champion"):
            champion = state["champion"].get("metrics")
            source = "recorded when it was promoted"
        try:
            decision = decide(spec.gate, evaluation.challenger, champion)
        except EvaluationError as exc:
            self._fail(spec, run, f"cannot read the evaluation: {exc}")
            return self._ledger.get(key) or run
        verdict = {
            "promote": decision.promote,
            "reason": decision.reason,
            "champion_source": source if champion is not None else None,
        }
        metrics = {"challenger": evaluation.challenger, "champion": champion}
        if not decision.promote:
            log.info(
                "run %s of %s rejected: %s",
                run["run_id"],
                spec.name,
                decision.reason,
                extra=_dims(spec.name, run["run_id"]),
            )
            run, _ = self._move(
                spec,
                run["run_id"],
                "trained",
                "rejected",
                now,
                note=decision.reason,
                decision=verdict,
                metrics=metrics,
            )
            self._release(spec, run["run_id"])
            return run
        log.info(
            "run %s of %s passes the gate: %s",
            run["run_id"],
            spec.name,
            decision.reason,
            extra=_dims(spec.name, run["run_id"]),
        )
        if spec.promotion == "manual":
            run, moved = self._move(
                spec,
                run["run_id"],
                "trained",
                "awaiting_approval",
                now,
                note=f"{decision.reason}; waiting for approval",
                decision=verdict,
                metrics=metrics,
            )
            if moved:
                self._await_approval(spec, run["run_id"], now)
            return run
        run, _ = self._move(
            spec,
            run["run_id"],
            "trained",
            "promoting",
            now,
            note=decision.reason,
            decision=verdict,
            metrics=metrics,
        )
        return run

    def _await_approval(self, spec: ModelSpec, run_id: str, now: datetime) -> None:
        """Park the run for approval, supersede an older parked run, free the model."""
        older: list[str] = []

        def park(d: Doc) -> Doc | None:
            previous = d.get("awaiting_approval")
            older[:] = [previous] if previous and previous != run_id else []
            d["awaiting_approval"] = run_id
            if d.get("active_run") == run_id:
                d["active_run"] = None
            return d

        state, _ = self._ledger.update(model_key(spec.name), park, initial=_new_model(spec))
        for old_id in older:
            self._move(
                spec,
                old_id,
                "awaiting_approval",
                "superseded",
                now,
                note=f"superseded by run {run_id}, which also passed the gate",
            )
        if state.get("batch") and not state.get("active_run"):
            self._schedule_check(spec, state["batch"], now)

    def approve(self, name: str, run_id: str, *, by: str) -> str:
        """Promote a run that waits for approval, through the same path as automatic ones."""
        spec = self._spec(name)
        run = self._ledger.get(run_key(name, run_id))
        if run is None:
            raise InputRejected(f"run {run_id} of {name} does not exist")
        if run["state"] != "awaiting_approval":
            raise InputRejected(f"run {run_id} is {run['state']}, not awaiting approval")
        self._lock(spec, run_id, "approve")
        now = self._clock.now()
        _, moved = self._move(
            spec,
            run_id,
            "awaiting_approval",
            "promoting",
            now,
            note=f"approved by {by}",
            approved_by=by,
        )
        if not moved:
            self._release(spec, run_id)
            raise InputRejected(f"run {run_id} changed state while being approved")
        self._unpark(name, run_id)
        self._outbox.send(self._places.evaluations_queue, EvaluateRun(model=name, run_id=run_id))
        return "promoting"

    def _unpark(self, name: str, run_id: str) -> None:
        """The model no longer has `run_id` waiting for approval."""
        self._ledger.update(
            model_key(name),
            lambda d: (
                {**d, "awaiting_approval": None} if d.get("awaiting_approval") == run_id else None
            ),
        )

    def reject(self, name: str, run_id: str, *, by: str, reason: str) -> str:
        """Turn down a run that waits for approval, recording who and why."""
        spec = self._spec(name)
        now = self._clock.now()
        run, moved = self._move(
            spec,
            run_id,
            "awaiting_approval",
            "rejected",
            now,
            note=f"rejected by {by}: {reason}",
            rejected_by=by,
            rejected_reason=reason,
        )
        if not moved:
            raise InputRejected(f"run {run_id} is {run['state']}, not awaiting approval")
        self._unpark(name, run_id)
        return "rejected"

    def _lock(
        self,
        spec: ModelSpec,
        run_id: str,
        action: str,
        *,
        replacing: str | None = None,
        champion: str | None = None,
    ) -> None:
        """Make `run_id` the model's active run, or explain why not. With `replacing`, only by
        taking it over from that run (never an idle model: a late check must not act after
        the model moved on); with `champion`, only while that run is the champion."""
        now = _iso(self._clock.now())
        allowed = (run_id, replacing) if replacing else (None, run_id)

        def lock(d: Doc) -> Doc | None:
            if champion is not None and (d.get("champion") or {}).get("run_id") != champion:
                return None
            if d.get("active_run") in allowed:
                d["active_run"], d["active_since"] = run_id, now
                return d
            return None

        state, _ = self._ledger.update(model_key(spec.name), lock, initial=_new_model(spec))
        if state.get("active_run") is None:
            raise InputRejected(
                f"cannot {action} now: the champion of {spec.name} changed, or the run it "
                "would take the model over from already let it go"
            )
        holder = str(state.get("active_run"))
        if holder != run_id:
            recorded = self._ledger.get(run_key(spec.name, holder), remember=False)
            if recorded is None:
                what = (
                    "holds the model but has no run record (its writer died between the two "
                    "writes); the sweep frees the model after RETRAIN_SWEEP_STALL"
                )
            elif recorded.get("restore_pending"):
                what = (
                    "failed after its deploy and keeps the model until the target is known to "
                    f"serve the champion ({recorded.get('target_after') or 'checking'}); "
                    "each sweep tries again"
                )
            else:
                what = "is in progress; try again when it has ended"
            raise InputRejected(f"cannot {action} now: run {holder} of {spec.name} {what}")

    def _promote(
        self,
        spec: ModelSpec,
        run: Doc,
        msg: EvaluateRun,
        delivery: Delivery | None,
        step: _Step,
    ) -> str:
        target = self._target_for(spec)
        path = run["outputs"]["model"]
        container, _, blob = path.partition("/")
        key = run_key(spec.name, run["run_id"])
        ref: BlobRef = self._data.reference(
            container, blob, write=False, expires=self._clock.now() + DEPLOY_SAS_LIFETIME
        )
        pending = run.get("deployment")
        if pending is None or not pending.get("deployed"):
            outcome = self._deploy(spec, target, run, ref, msg, delivery)
            if isinstance(outcome, str):
                return outcome
            run, progress = outcome
            step.polled = True  # the claim took the chain's poll: a retry must use the next
        else:
            if not self._claim_poll(key, "deployment", msg.poll, delivery):
                return "duplicate"
            step.polled = True
            progress = target.progress(pending["operation"])
        if progress.state == "failed":
            return self._fail(spec, run, f"the target refused the model: {progress.detail}")
        if progress.state == "pending":
            deployment = run["deployment"]
            timeout = getattr(spec.target, "provisioning_timeout", None)
            if timeout is not None and self._clock.now() >= (
                _parse(deployment["started_at"]) + timeout
            ):
                return self._fail(spec, run, f"provisioning did not finish within {timeout}")
            poll = max(msg.poll, deployment["polls"]) + 1
            self._outbox.send(
                self._places.evaluations_queue,
                EvaluateRun(model=spec.name, run_id=run["run_id"], poll=poll),
                delay=self._timing.delay(poll),
            )
            log.info(
                "run %s of %s: the target is provisioning (poll %d)",
                run["run_id"],
                spec.name,
                poll,
                extra=_dims(spec.name, run["run_id"]),
            )
            return "provisioning"
        if not target.serves(ref):
            raise RemoteError(
                f"promotion of run {run['run_id']}: the target still serves another model "
                "after the update",
                retryable=True,
            )
        return self._crown(spec, run, path)

    def _deploy(
        self,
        spec: ModelSpec,
        target: DeployTarget,
        run: Doc,
        ref: BlobRef,
        msg: EvaluateRun,
        delivery: Delivery | None,
    ) -> tuple[Doc, Progress] | str:
        """Claim the run's deploy lease, call the target once, record it under the lease.

        The lease's token fences every write after the call: a holder that lost the lease
        cannot record a deployment or crown a model. Expiry is never read off a clock another
        instance wrote: a waiter re-sends itself with the lease's duration as the queue delay
        and takes over only if the very claim it saw is still there, undeployed, when it wakes
        (the queue service times the wait). The holder measures on its own clock and starts the
        target call only while the call's worst case still fits in its lease.
        """
        key = run_key(spec.name, run["run_id"])
        lease = self._timing.deploy_lease
        started = self._clock.now()
        # The holder times its own lease on a clock no one can set: wall-clock jumps (or an
        # instance whose clock is off) cannot make it think it has more lease left than it has.
        began = self._clock.monotonic()
        token = secrets.token_hex(8)
        mine = _delivery_doc(delivery)

        def claim(d: Doc) -> Doc | None:
            held = d.get("deployment")
            if d["state"] != "promoting" or (held and held.get("deployed")):
                return None
            if held:
                by = held.get("by")
                redelivery = bool(
                    mine and by and by["id"] == mine["id"] and mine["attempt"] > by["attempt"]
                )
                if not redelivery and msg.lease != held["claim"]:
                    return None
            d["deployment"] = {
                "claim": token,
                "by": mine,
                "poll_by": mine,
                "lease_seconds": lease.total_seconds(),
                "started_at": _iso(started),
                "polls": 0,
                "operation": None,
                "deployed": False,
            }
            return d

        run, claimed = self._ledger.update(key, claim)
        if not claimed:
            held = run.get("deployment") or {}
            if run["state"] != "promoting" or held.get("deployed"):
                return "duplicate"
            # Another delivery holds the lease: look again after a whole lease, and take over
            # only if that same claim is still there then.
            self._outbox.send(
                self._places.evaluations_queue,
                EvaluateRun(
                    model=spec.name, run_id=run["run_id"], poll=msg.poll, lease=held["claim"]
                ),
                delay=lease,
            )
            return "waiting"

        def fenced(change: Callable[[Doc], None]) -> Callable[[Doc], Doc | None]:
            def apply(d: Doc) -> Doc | None:
                # The claim alone is not enough: a run that was failed (e.g. its message went
                # to poison) while this holder was calling the target keeps its claim.
                if d["state"] != "promoting" or (d.get("deployment") or {}).get("claim") != token:
                    return None
                change(d)
                return d

            return apply

        def give_back(d: Doc) -> None:
            d["deployment"], d["deploy_tried"] = None, True

        try:
            state = self._ledger.get(model_key(spec.name)) or {}
            if not state.get("champion"):
                target.preflight()  # a first promotion checks the target is set up right
            left = lease - timedelta(seconds=self._clock.monotonic() - began)
            if left < self._timing.deploy_reserve:
                # Too late in the lease to start the call safely: give it back, go again.
                self._ledger.update(key, fenced(give_back))
                self._outbox.send(self._places.evaluations_queue, msg, delay=MIN_POLL_GAP)
                return "retry"
            progress = target.deploy(ref)
        except Exception:
            # Give the claim back so the retry of this message need not wait out the lease.
            self._ledger.update(key, fenced(give_back))
            raise

        def deployed(d: Doc) -> None:
            d["deployment"].update(operation=progress.operation, deployed=True)

        run, recorded = self._ledger.update(key, fenced(deployed))
        if not recorded:
            log.error(
                "run %s of %s: the deploy lease was lost during the target call (run now %s); "
                "the holder that took it over finishes the promotion, or the restore check runs",
                run["run_id"],
                spec.name,
                run["state"],
                extra=_dims(spec.name, run["run_id"]),
            )
            if run["state"] in TERMINAL:
                # Failed while this call was changing the target: its restore check, if still
                # owed, runs now, after the change; if it already ran (before this call
                # landed) and the model is idle, the target is compared with the champion now.
                self._release(spec, run["run_id"])
                state = self._ledger.get(model_key(spec.name)) or {}
                if state.get("champion") and not state.get("active_run"):
                    self._reconcile(spec, state["champion"])
            return "lease lost"
        return run, progress

    def _crown(self, spec: ModelSpec, run: Doc, path: str) -> str:
        """End the verified run `promoted`, then make it the champion.

        The run's own move comes first and is conditional on it still being `promoting`, so a
        run failed meanwhile (e.g. by another copy's poison) is never crowned; a crash between
        the two writes is finished by `_release`, which seats a promoted run that still holds
        the model (the message's redelivery or the sweep get there)."""
        now = self._clock.now()
        run_id = run["run_id"]
        doc, moved = self._move(spec, run_id, "promoting", "promoted", now, note=f"deployed {path}")
        if not moved and doc["state"] != "promoted":
            log.error(
                "run %s of %s is %s now; its verified deploy is not crowned",
                run_id,
                spec.name,
                doc["state"],
                extra=_dims(spec.name, run_id),
            )
            self._release(spec, run_id)  # its owed restore check runs after this deploy
            return str(doc["state"])
        if not self._seat(spec, doc):
            state = self._ledger.get(model_key(spec.name)) or {}
            log.error(
                "run %s of %s is deployed but run %s holds the model; not crowned (the sweep "
                "compares target and champion once the model is idle)",
                run_id,
                spec.name,
                state.get("active_run"),
                extra=_dims(spec.name, run_id),
            )
            return "superseded"
        log.info(
            "run %s of %s promoted: the target serves %s",
            run_id,
            spec.name,
            path,
            extra=_dims(spec.name, run_id, run.get("job_id")),
        )
        self._release(spec, run_id)
        return "promoted"

    def _seat(self, spec: ModelSpec, run: Doc) -> bool:
        """Make promoted `run` the champion while it holds the model; True when it is."""
        run_id = run["run_id"]
        champion = {
            "run_id": run_id,
            "model": run["outputs"]["model"],
            "promoted_at": run.get("updated_at") or _iso(self._clock.now()),
            "metrics": (run.get("metrics") or {}).get("challenger"),
        }
        restore = run.get("kind") == "restore"

        def crown(d: Doc) -> Doc | None:
            if d.get("active_run") != run_id or (d.get("champion") or {}).get("run_id") == run_id:
                return None
            if not restore:
                d["previous_champion"] = d.get("champion")
            d["champion"] = champion
            return d

        state, _ = self._ledger.update(model_key(spec.name), crown)
        return bool((state.get("champion") or {}).get("run_id") == run_id)

    # -------------------------------------------------------------- operations

    def request(
        self, name: str, blob: str | None = None, *, reason: str, force: bool = False
    ) -> str:
        """Retrain `name` now on `blob` (default: its newest data file), through the batch path.

        The file is validated like any arrival and added to the model's batch, which is marked
        to be sealed without waiting for the quiet period. Returns the batch id. A file version
        some run already trained is refused (AlreadyTrained) unless `force`, which is recorded
        on the file's batch entry and so on the run.
        """
        spec = self._spec(name)
        container = self._places.data_container
        if blob is None:
            newest = self._data.newest(container, spec.prefix)
            if newest is None:
                raise InputRejected(f"no data under {container}/{spec.prefix} to retrain on")
            blob = newest
        if not blob.startswith(spec.prefix):
            raise InputRejected(f"{blob!r} is not under {name}'s data prefix {spec.prefix!r}")
        head = self._data.head(container, blob)
        if head is None:
            raise InputRejected(f"{container}/{blob} does not exist")
        try:
            validate(spec, blob, size=head.size, head=head.head)
        except InputRejected as exc:
            raise InputRejected(f"{blob}: {exc}") from exc
        # The version goes through the arrival path first, so it has exactly one arrival record
        # and one batch, whether or not its event ever came.
        self.on_blob(container, blob)
        record = self._ledger.get(arrival_key(container, blob, head.etag), remember=False) or {}
        if record.get("status") != "accepted":
            raise InputRejected(f"{blob}: {record.get('reason') or 'its arrival was not accepted'}")
        state = self._ledger.get(model_key(name)) or {}
        open_batch = state.get("batch") or {}
        version = {"name": blob, "etag": head.etag}
        now = self._clock.now()
        trained = None
        if open_batch.get("id") == record.get("batch_id") and _holds(
            open_batch.get("files") or [], version
        ):
            mark: Doc = {"requested": reason}  # it waits in the open batch: seal that now
        else:
            taken = str(record.get("batch_id") or "?")
            trained = self._trained_by(spec, container, blob, head.etag)
            holder = self._ledger.get(run_key(name, taken), remember=False)
            sealed = state.get("sealed") or {}
            if holder is None and taken in (state.get("active_run"), sealed.get("id")):
                # Sealed, its run not recorded yet: that run trains this version.
                raise InputRejected(
                    f"{blob} (version {head.etag}) is in batch {taken}, which was sealed and "
                    "whose run is starting; wait for it to end"
                )
            if trained and not force:
                raise AlreadyTrained(
                    f"{blob} (version {head.etag}) was already trained by run {trained}; "
                    "training the same data again can only repeat that run's result. Upload "
                    "new data, or retrain with --force if that run failed for a reason other "
                    "than its data (e.g. BES was down); a forced retrain is recorded on the run",
                    run_id=trained,
                )
            if holder is not None and holder["state"] not in TERMINAL:
                # Even with --force: the run still holds (and may be training on) this version.
                raise InputRejected(
                    f"{blob} (version {head.etag}) is in run {taken}, which is "
                    f"{holder['state']}; wait for it to end"
                )
            # Not trained (its run ended before a job started), or forced: a new entry.
            mark = {"requested": reason}
            if force:
                mark.update(forced=True)
                if trained:
                    mark.update(trained_before_by=trained)
        file = {
            "name": blob,
            "etag": head.etag,
            "size": head.size,
            "arrived_at": _iso(now),
            **mark,
        }
        if head.last_modified is not None:
            file["modified_at"] = _iso(head.last_modified)

        def add(d: Doc) -> Doc | None:
            changed = _add_to_batch(d, file, now, _batch_id(now)) or d
            for entry in changed["batch"]["files"]:
                if _holds([entry], version):
                    entry.update(mark)
            changed["batch"]["force"] = True
            return changed

        doc, _ = self._ledger.update(model_key(name), add, initial=_new_model(spec))
        if record.get("batch_id") != doc["batch"]["id"]:
            # The version's record follows it into this batch, so a second request sees it in
            # flight (and, once a job has trained it, by whom).
            self._ledger.update(
                arrival_key(container, blob, head.etag),
                functools.partial(_claim_batch, doc["batch"]["id"]),
            )
        self._outbox.send(
            self._places.jobs_queue,
            CheckBatch(
                model=name, batch_id=doc["batch"]["id"], arrivals=len(doc["batch"]["files"])
            ),
        )
        log.info(
            "retrain of %s requested on %s (%s%s)",
            name,
            blob,
            reason,
            f"; forced, already trained by run {trained}" if trained and force else "",
            extra=_dims(name),
        )
        return str(doc["batch"]["id"])

    def _trained_by(self, spec: ModelSpec, container: str, name: str, etag: str) -> str | None:
        """The run that trained this version of the file, if any: the last run its arrival
        record names as having trained it, else the run of its arrival batch when that run
        submitted a BES job with this version as its training file."""
        record = self._ledger.get(arrival_key(container, name, etag), remember=False)
        if record and record.get("trained_by"):
            return str(record["trained_by"][-1])
        if not record or record.get("status") != "accepted" or not record.get("batch_id"):
            return None
        run = self._ledger.get(run_key(spec.name, record["batch_id"]), remember=False)
        trained = (run or {}).get("training_file")
        if run is None or not run.get("job_id") or not trained:
            return None
        return str(run["run_id"]) if _holds([trained], {"name": name, "etag": etag}) else None

    def rollback(self, name: str, to: str | None = None, *, by: str) -> str:
        """Re-deploy an earlier promoted run's model (default: the previous champion).

        A rollback is a run of its own, promoted through the model's target with a freshly
        minted SAS for the model blob in the app's artifacts container. Whether the target
        already serves that model is asked of the target itself, not of the champion pointer.
        Returns the rollback run's id.
        """
        spec = self._spec(name)
        state = self._ledger.get(model_key(name)) or {}
        if to is None:
            previous = state.get("previous_champion")
            if not previous:
                raise InputRejected(f"{name} has no previous champion to roll back to")
            to = str(previous["run_id"])
        source = self._ledger.get(run_key(name, to))
        if source is None:
            raise InputRejected(f"run {to} of {name} does not exist")
        if source["state"] != "promoted":
            raise InputRejected(
                f"run {to} is {source['state']}; only a promoted run's model can be restored"
            )
        if self._target_for(spec).serves(self._model_ref(source["outputs"]["model"])):
            raise InputRejected(f"{name} already serves the model of run {to} (its target says so)")
        return self._redeploy(spec, source, kind="rollback", by=by)

    def _redeploy(
        self,
        spec: ModelSpec,
        source: Doc,
        *,
        kind: str,
        by: str,
        replacing: str | None = None,
        run_id: str | None = None,
        champion: str | None = None,
    ) -> str:
        """A run that deploys promoted run `source`'s model again (a rollback or a restore).

        With a given `run_id` it is idempotent: the lock, the record and the message are made
        again only where missing (a restore owed by a failed run is re-tried under one id)."""
        now = self._clock.now()
        run_id = run_id or f"{kind}-{now:%Y%m%dT%H%M%S}-{secrets.token_hex(3)}"
        self._lock(
            spec,
            run_id,
            f"deploy run {source['run_id']}'s model",
            replacing=replacing,
            champion=champion,
        )
        note = f"{kind} to run {source['run_id']} requested by {by}"
        run = {
            "run_id": run_id,
            "model": spec.name,
            "kind": kind,
            "restores": source["run_id"],
            "state": "promoting",
            "created_at": _iso(now),
            "updated_at": _iso(now),
            "files": source.get("files", []),
            "training_file": source.get("training_file"),
            "job_id": source.get("job_id"),
            "polls": 0,
            "outputs": {"model": source["outputs"]["model"]},
            "metrics": source.get("metrics"),
            "decision": {"promote": True, "reason": note},
            "error": None,
            "requested_by": by,
            "history": [{"state": "promoting", "at": _iso(now), "note": note}],
        }
        if self._ledger.create(run_key(spec.name, run_id), run):
            self._emit(spec, run, note)
        self._outbox.send(
            self._places.evaluations_queue, EvaluateRun(model=spec.name, run_id=run_id)
        )
        return run_id

    def _model_ref(self, path: str) -> BlobRef:
        container, _, blob = path.partition("/")
        return self._data.reference(
            container, blob, write=False, expires=self._clock.now() + DEPLOY_SAS_LIFETIME
        )

    def _restore(self, spec: ModelSpec, run: Doc) -> None:
        """The restore check a failed promotion owes: make the target serve the champion again
        (through a restore run, one id per failed run), or record what it serves when there is
        nothing to restore. A definite outcome is recorded on the failed run and clears its
        `restore_pending`; while the target cannot say what it serves, the check stays owed and
        a retryable RemoteError goes to the caller (the message's retry or the next sweep)."""
        run_id = run["run_id"]
        key = run_key(spec.name, run_id)
        state = self._ledger.get(model_key(spec.name)) or {}
        champion = state.get("champion")
        target = self._target_for(spec)
        unknown: RemoteError | None = None
        try:
            if champion is None or run.get("kind") == "restore":
                mine = target.serves(self._model_ref(run["outputs"]["model"]))
                outcome = (
                    "the target serves this run's model and there is no champion to restore; "
                    "roll back or retrain"
                    if mine
                    else "the target does not serve this run's model"
                )
            elif target.serves(self._model_ref(champion["model"])):
                outcome = f"the target still serves the champion (run {champion['run_id']})"
            else:
                source = self._ledger.get(run_key(spec.name, champion["run_id"])) or {
                    "run_id": champion["run_id"],
                    "outputs": {"model": champion["model"]},
                }
                restore = self._redeploy(
                    spec,
                    source,
                    kind="restore",
                    by="retrain",
                    replacing=run_id,
                    run_id=f"restore-{run_id}",
                    champion=champion["run_id"],
                )
                outcome = (
                    f"the target may serve this run's model: restoring the champion "
                    f"(run {champion['run_id']}) through run {restore}"
                )
        except RemoteError as exc:
            outcome = f"what the target serves is unknown ({exc}); the check is tried again"
            unknown = exc
        except InputRejected as exc:
            # Another run holds the model: the sweep compares target and champion once idle.
            outcome = f"not restored here ({exc}); the sweep compares target and champion"
        log.warning(
            "run %s of %s failed after its deploy claim: %s",
            run_id,
            spec.name,
            outcome,
            extra=_dims(spec.name, run_id),
        )
        if unknown is not None:
            self._ledger.update(key, lambda d: {**d, "target_after": outcome})
            raise RemoteError(
                f"run {run_id} of {spec.name}: restore check: {unknown}", retryable=True
            ) from unknown

        def settle(d: Doc) -> Doc | None:
            d.pop("restore_pending", None)
            d["target_after"] = outcome
            return d

        self._ledger.update(key, settle)

    def on_poison(self, queue: str, body: bytes) -> str:
        """A message failed every delivery: keep it for replay and fail its run with the reason."""
        text = body.decode("utf-8", errors="replace")
        digest = hashlib.sha256(f"{queue}\n{text}".encode()).hexdigest()
        key = f"poison/{digest}.json"
        now = self._clock.now()
        record: Doc = {
            "queue": queue,
            "body": text,
            "poisoned_at": _iso(now),
            "replayed": False,
            "model": None,
            "run_id": None,
            "state_before": None,
        }
        message: CheckBatch | TrackRun | EvaluateRun | None = None
        try:
            message = (
                parse_evaluation(body)
                if queue == self._places.evaluations_queue
                else parse_jobs(body)
            )
        except MessageError as exc:
            record["reason"] = f"the message cannot be parsed: {exc}"
        else:
            record["model"] = message.model
            record["run_id"] = getattr(message, "run_id", None)
            record["reason"] = (
                f"a {message.kind} message failed on every delivery and was moved "
                f"to {queue}-poison (the function's log has each error)"
            )
            if message.model not in self._models:
                record["reason"] += f"; model {message.model!r} is not configured"
        # Only a parsed message names a run, and its fields matched their patterns: no ledger
        # key is ever built from text that did not.
        run: Doc | None = None
        if message is not None and record["run_id"] and message.model in self._models:
            found = self._ledger.get(run_key(message.model, record["run_id"]))
            if found is not None and found.get("run_id") == record["run_id"]:
                run = found
        if run is not None and run.get("state") not in TERMINAL:
            record["state_before"] = run["state"]
        self._ledger.update(
            key,
            lambda d: {**record} if d.get("replayed", True) else None,
            initial={"replayed": True},
        )
        log.error(
            "poison message on %s: %s",
            queue,
            record["reason"],
            extra=_dims(record["model"] or "-", record["run_id"]),
        )
        if run is not None and record["state_before"] and message is not None:
            self._fail(self._spec(message.model), run, record["reason"], poisoned=key)
            return "failed"
        return "recorded"

    def replay_poison(self) -> list[str]:
        """Send every poisoned message back to its queue, reviving the run it failed."""
        replayed = []
        for key in self._ledger.store.keys("poison/"):
            record = self._ledger.get(key)
            if record and not record.get("replayed"):
                try:
                    self._replay(key, record)
                except InputRejected as exc:
                    # Kept, with why; the other records are still replayed.
                    log.warning("poison %s not replayed: %s", key, exc)
                    self._ledger.update(key, functools.partial(_with, "replay_refused", str(exc)))
                    continue
                replayed.append(key)
        return replayed

    def _replay(self, key: str, record: Doc) -> None:
        if record.get("run_id") and record.get("state_before"):
            spec = self._spec(record["model"])
            now = self._clock.now()
            parked = record["state_before"] == "awaiting_approval"
            if parked:
                # A run waiting for approval does not hold the model: it waits again, unless
                # another run waits now.
                waiting = (self._ledger.get(model_key(spec.name)) or {}).get("awaiting_approval")
                if waiting not in (None, record["run_id"]):
                    raise InputRejected(
                        f"cannot replay {key}: run {waiting} of {spec.name} waits for approval "
                        "now; approve or reject it first"
                    )
            else:
                self._lock(spec, record["run_id"], f"replay {key}")

            def revive(d: Doc) -> Doc | None:
                if d.get("poisoned") != key:
                    return None
                return _advance(
                    d,
                    "failed",
                    record["state_before"],
                    now,
                    error=None,
                    poisoned=None,
                    note="revived to replay its poisoned message",
                )

            _, revived = self._ledger.update(run_key(spec.name, record["run_id"]), revive)
            if revived and parked:
                self._await_approval(spec, record["run_id"], now)
            elif not revived and not parked:
                self._release(spec, record["run_id"])
        self._outbox.send_raw(record["queue"], record["body"])
        self._ledger.update(
            key, lambda d: {**d, "replayed": True, "replayed_at": _iso(self._clock.now())}
        )

    def sweep(self) -> dict[str, int]:
        """Re-drive what a lost message or event left behind. Safe to run anywhere, any time.

        An error on one blob or one model is logged and counted (`errors`); the sweep goes on
        with the next blob and the next model.
        """
        counts = {"checks": 0, "runs": 0, "blobs": 0, "scheduled": 0, "restores": 0, "errors": 0}
        now = self._clock.now()
        for spec in self._models.values():
            try:
                self._sweep_model(spec, now, counts)
            except Exception:
                counts["errors"] += 1
                log.exception(
                    "sweep of %s stopped; the next sweep tries again",
                    spec.name,
                    extra=_dims(spec.name),
                )
        return counts

    def _sweep_model(self, spec: ModelSpec, now: datetime, counts: dict[str, int]) -> None:
        state = self._ledger.get(model_key(spec.name)) or {}
        if self._sweep_blobs(spec, state, now, counts):
            state = self._ledger.get(model_key(spec.name)) or {}
        batch = state.get("batch")
        if batch and not state.get("active_run"):
            due = _check_due(spec, batch)
            if now >= due + self._stall and self._claim_sweep(model_key(spec.name), now):
                self._schedule_check(spec, batch, now)
                counts["checks"] += 1
        active = state.get("active_run")
        if active:
            counts["runs"] += self._redrive(spec, active, now)
        champion = state.get("champion")
        if champion and not active:
            counts["restores"] += self._reconcile(spec, champion)
        if (
            spec.retrain_every
            and champion
            and not active
            and not batch
            and now >= _parse(champion["promoted_at"]) + spec.retrain_every
            and self._claim_sweep(model_key(spec.name), now)
        ):
            counts["scheduled"] += self._scheduled_retrain(spec, champion, now)

    def _reconcile(self, spec: ModelSpec, champion: Doc) -> int:
        """An idle model's target must serve its champion. When it does not (a deploy call that
        landed after its run was failed and checked, a change made outside the app), a restore
        run re-deploys the champion, taking the model only while that champion still holds."""
        try:
            if self._target_for(spec).serves(self._model_ref(champion["model"])):
                return 0
            if not self._claim_restore(spec):
                return 0
            source = self._ledger.get(run_key(spec.name, champion["run_id"])) or {
                "run_id": champion["run_id"],
                "outputs": {"model": champion["model"]},
            }
            restore = self._redeploy(
                spec, source, kind="restore", by="sweep", champion=champion["run_id"]
            )
        except InputRejected:
            return 0  # another run took the model, or the champion changed, meanwhile
        except RemoteError as exc:
            log.warning(
                "sweep: could not tell what the target of %s serves: %s",
                spec.name,
                exc,
                extra=_dims(spec.name),
            )
            return 0
        log.warning(
            "sweep: the target of %s does not serve its champion (run %s); restoring it "
            "through run %s",
            spec.name,
            champion["run_id"],
            restore,
            extra=_dims(spec.name, restore),
        )
        return 1

    def _claim_restore(self, spec: ModelSpec) -> bool:
        """At most one restore started by the sweep per model and stall period: a target that
        keeps refusing the champion gets a failed restore run now and then, not every sweep."""
        now = self._clock.now()

        def claim(d: Doc) -> Doc | None:
            last = d.get("restore_started_at")
            if last and now < _parse(last) + self._stall:
                return None
            d["restore_started_at"] = _iso(now)
            return d

        _, claimed = self._ledger.update(sweep_key(spec.name), claim, initial={"model": spec.name})
        if not claimed:
            log.warning(
                "sweep: the target of %s does not serve its champion; a restore was started "
                "less than RETRAIN_SWEEP_STALL ago",
                spec.name,
                extra=_dims(spec.name),
            )
        return claimed

    def _sweep_blobs(
        self, spec: ModelSpec, state: Doc, now: datetime, counts: dict[str, int]
    ) -> int:
        """Ingest the model's blobs that never reached a batch; returns how many it ingested.

        A blob with no arrival record never reached ingest; one whose record names a batch that
        does not hold it lost its delivery between the two writes (and the host's retries ran
        out). Either way, ingest it now. Only blobs modified after the model's listing mark are
        looked at: an idle sweep lists the prefix and reads the mark, whatever the number of
        blobs already ingested. The mark is the newest Last-Modified seen with every blob up to
        it settled, and never later than `stall` ago (a blob committed after the listing
        cannot carry an older time than that).
        """
        container = self._places.data_container
        key = sweep_key(spec.name)
        mark = (self._ledger.get(key) or {}).get("listed_through")
        since = _parse(mark) if mark else None
        listed = self._data.listing(container, spec.prefix)
        runs: dict[str, list[Doc] | None] = {}
        unsettled: list[datetime] = []
        ingested = 0
        for blob in listed:
            if since is not None and blob.last_modified <= since:
                continue
            try:
                ingested += self._sweep_blob(spec, state, blob, runs)
            except BlobUnreadable as exc:
                counts["errors"] += 1
                self._record_unreadable(spec, container, blob.name, exc)
            except Exception:
                counts["errors"] += 1
                unsettled.append(blob.last_modified)
                log.warning(
                    "sweep: %s/%s of %s could not be checked; the next sweep tries again",
                    container,
                    blob.name,
                    spec.name,
                    exc_info=True,
                    extra=_dims(spec.name),
                )
        counts["blobs"] += ingested
        settled = (
            min(unsettled) - timedelta(microseconds=1)
            if unsettled
            else max((b.last_modified for b in listed), default=None)
        )
        through = min(settled, now - self._timing.stall) if settled else None
        if through is not None and (mark is None or through > _parse(mark)):
            moved = _iso(through)
            self._ledger.update(
                key,
                lambda d: (
                    {**d, "listed_through": moved}
                    if not d.get("listed_through") or _parse(d["listed_through"]) < through
                    else None
                ),
                initial={"model": spec.name},
            )
        return ingested

    def _sweep_blob(
        self, spec: ModelSpec, state: Doc, blob: Listed, runs: dict[str, list[Doc] | None]
    ) -> int:
        container = self._places.data_container
        record = self._ledger.get(arrival_key(container, blob.name, blob.etag), remember=False)
        if record is not None and record.get("unreadable"):
            # Archived when it arrived: judged again while the listing mark has not passed it
            # (after that, `retrain --blob` or a new upload brings a rehydrated blob in).
            return 1 if self.on_blob(container, blob.name) == "batched" else 0
        if record is not None and (
            record.get("status") != "accepted"
            or _holds(
                self._claimed_files(spec, state, record["batch_id"], runs) or [],
                {"name": blob.name, "etag": blob.etag},
            )
        ):
            return 0
        self.on_blob(container, blob.name)
        return 1

    def _record_unreadable(
        self, spec: ModelSpec, container: str, name: str, exc: BlobUnreadable
    ) -> None:
        """A blob that cannot be read as it is gets a rejected arrival, with the reason."""
        record = {
            "container": container,
            "name": name,
            "etag": exc.etag,
            "size": exc.size,
            "arrived_at": _iso(self._clock.now()),
            "model": spec.name,
            "status": "rejected",
            "unreadable": True,
            "reason": str(exc),
        }
        self._ledger.create(arrival_key(container, name, exc.etag), record)
        log.warning(
            "arrival %s/%s of %s rejected: %s",
            container,
            name,
            spec.name,
            exc,
            extra=_dims(spec.name),
        )

    def _scheduled_retrain(self, spec: ModelSpec, champion: Doc, now: datetime) -> int:
        """Start the retrain `retrain_every` asks for when there is data no run has trained;
        otherwise say why not (a file that cannot be trained on is also an event)."""
        try:
            self.request(spec.name, reason=f"scheduled: champion older than {spec.retrain_every}")
        except AlreadyTrained as exc:
            log.info(
                "sweep: scheduled retrain of %s did not fire: no new data (the newest file was "
                "trained by run %s)",
                spec.name,
                exc.run_id,
                extra=_dims(spec.name, exc.run_id),
            )
            return 0
        except InputRejected as exc:
            reason = f"scheduled retrain skipped: {exc}"
            log.warning("sweep: %s: %s", spec.name, reason, extra=_dims(spec.name))
            _, changed = self._ledger.update(
                sweep_key(spec.name),
                lambda d: (
                    {**d, "schedule_skipped": reason}
                    if d.get("schedule_skipped") != reason
                    else None
                ),
                initial={"model": spec.name},
            )
            if changed:  # once per reason, not every sweep period
                skipped = {"run_id": champion["run_id"], "state": "schedule_skipped"}
                self._emit(spec, {**skipped, "updated_at": _iso(now)}, reason)
            return 0
        self._ledger.update(
            sweep_key(spec.name),
            lambda d: {**d, "schedule_skipped": None} if d.get("schedule_skipped") else None,
            initial={"model": spec.name},
        )
        return 1

    @property
    def _stall(self) -> timedelta:
        return self._timing.max_delay + self._timing.stall

    def _claim_sweep(self, key: str, now: datetime) -> bool:
        """Only one of several concurrent sweeps acts on a document per stall period."""

        def claim(d: Doc) -> Doc | None:
            last = d.get("swept_at")
            if last and now < _parse(last) + self._timing.stall:
                return None
            d["swept_at"] = _iso(now)
            return d

        _, claimed = self._ledger.update(key, claim)
        return claimed

    def _redrive(self, spec: ModelSpec, run_id: str, now: datetime) -> int:
        key = run_key(spec.name, run_id)
        run = self._ledger.get(key)
        if run is None:
            return self._repair_claim(spec, run_id, now)
        if run["state"] in TERMINAL or run["state"] == "awaiting_approval":
            self._release(spec, run_id)
            return 0
        deployment = run.get("deployment") or {}
        moments = [
            run.get("updated_at") or run["created_at"],
            run.get("polled_at"),
            deployment.get("polled_at"),
            deployment.get("started_at"),
            run.get("swept_at"),
        ]
        last = max(_parse(m) for m in moments if m)
        if now < last + self._stall or not self._claim_sweep(key, now):
            return 0
        if run["state"] in ("queued", "submitted", "running"):
            message: BaseModel = TrackRun(
                model=spec.name, run_id=run_id, poll=run.get("polls", 0) + 1
            )
            queue = self._places.jobs_queue
        else:
            message = EvaluateRun(
                model=spec.name,
                run_id=run_id,
                poll=deployment.get("polls", 0) + 1 if deployment else 0,
            )
            queue = self._places.evaluations_queue
        # "Stalled" is judged on this instance's clock against times others wrote: a chain
        # that is alive may have just polled, or a start may be on its way to BES. The re-sent
        # message keeps the chain's pace (its status call comes at least a second after any
        # other) and, for a job that may be starting, waits until that start must have landed.
        delay = max(self._timing.first_delay, 2 * MIN_POLL_GAP)
        if run["state"] == "submitted":
            delay = max(delay, self._timing.call_bound)
        log.warning(
            "sweep: run %s of %s stalled in %s since %s; re-driven in %s",
            run_id,
            spec.name,
            run["state"],
            last.isoformat(),
            delay,
            extra=_dims(spec.name, run_id),
        )
        self._outbox.send(queue, message, delay=delay)
        return 1

    def _repair_claim(self, spec: ModelSpec, run_id: str, now: datetime) -> int:
        """The model's active run has no record: its writer died between claiming the model
        and recording the run. A sealed batch gets its run recorded now; any other claim (a
        rollback's) is freed. Only after a stall, so a writer still at work is left alone."""
        state = self._ledger.get(model_key(spec.name)) or {}
        since = state.get("active_since")
        if state.get("active_run") != run_id or (since and now < _parse(since) + self._stall):
            return 0
        if not self._claim_sweep(model_key(spec.name), now):
            return 0
        sealed = state.get("sealed") or {}
        if sealed.get("id") == run_id:
            log.warning(
                "sweep: batch %s of %s was sealed but its run never recorded; recording it",
                run_id,
                spec.name,
                extra=_dims(spec.name, run_id),
            )
            self._start_run(spec, sealed, now)
            return 1
        owed = self._ledger.get(run_key(spec.name, run_id.removeprefix("restore-")), remember=False)
        if run_id.startswith("restore-") and owed is not None and owed.get("restore_pending"):
            log.warning(
                "sweep: restore run %s of %s was never recorded; making it again",
                run_id,
                spec.name,
                extra=_dims(spec.name, run_id),
            )
            self._restore(spec, owed)
            return 1
        log.warning(
            "sweep: %s held %s without a run record since %s; freed",
            run_id,
            spec.name,
            since or "before records kept the time",
            extra=_dims(spec.name, run_id),
        )
        self._release(spec, run_id)
        return 1

    def poisoned(self) -> list[Doc]:
        """Every kept poison message, oldest first."""
        docs = [d for k in self._ledger.store.keys("poison/") if (d := self._ledger.get(k))]
        return sorted(docs, key=lambda d: d.get("poisoned_at", ""))

    def runs(self, model: str | None = None) -> list[Doc]:
        """Every run record, oldest first (of one model, or all)."""
        prefix = f"runs/{model}/" if model else "runs/"
        return [
            doc for k in self._ledger.store.keys(prefix) if (doc := self._ledger.get(k)) is not None
        ]

    def find_run(self, run_id: str) -> Doc:
        """A run by id, whichever model it belongs to."""
        for name in self._models:
            run = self._ledger.get(run_key(name, run_id))
            if run is not None:
                return run
        raise InputRejected(f"no run {run_id!r}; list runs with `python -m retrain runs`")

    def model_state(self, name: str) -> Doc:
        """A model's document: open batch, active run, champion."""
        self._spec(name)
        return self._ledger.get(model_key(name)) or {}

    def probe(self, name: str) -> str:
        """Check a model's BES service answers and accepts its key, starting nothing."""
        return self._jobs_for(self._spec(name)).probe()

    def preflight(self, name: str) -> list[str]:
        """Check a model's target is reachable and updatable as configured."""
        return self._target_for(self._spec(name)).preflight()

    # ---------------------------------------------------------------- helpers

    def _claim_poll(
        self, key: str, section: str | None, poll: int, delivery: Delivery | None
    ) -> str:
        """Claim poll number `poll` of the run's chain for this delivery: "first", "again"
        (a redelivery, a later attempt of the very message that claimed it, after a failure),
        or "" (refused: a duplicate or stale copy; one chain per run, whatever the copies)."""
        mine = _delivery_doc(delivery)
        again = False

        def claim(d: Doc) -> Doc | None:
            nonlocal again
            holder = d.get(section) if section else d
            if holder is None:
                return None
            made = holder.get("polls", 0)
            if made > poll:
                return None
            again = made == poll
            if again:
                by = holder.get("poll_by")
                if not (mine and by and by["id"] == mine["id"] and mine["attempt"] > by["attempt"]):
                    return None
            holder["polls"] = poll
            holder["poll_by"] = mine
            holder["polled_at"] = _iso(self._clock.now())
            return d

        _, claimed = self._ledger.update(key, claim)
        return ("again" if again else "first") if claimed else ""

    def _spec(self, name: str) -> ModelSpec:
        try:
            return self._models[name]
        except KeyError:
            raise InputRejected(f"model {name!r} is not configured") from None

    def _fail(self, spec: ModelSpec, run: Doc, reason: str, **fields: Any) -> str:
        now = self._clock.now()
        reason = redact(reason)
        log.error(
            "run %s of %s failed: %s",
            run["run_id"],
            spec.name,
            reason,
            extra=_dims(spec.name, run["run_id"], run.get("job_id")),
        )

        def fail(d: Doc) -> Doc | None:
            if d["state"] in TERMINAL:
                return None
            # A promotion that got as far as its deploy claim may have changed the target: the
            # restore check is owed, recorded in this same write so no crash can lose it.
            owed = d["state"] == "promoting" and bool(d.get("deployment") or d.get("deploy_tried"))
            extra = {"restore_pending": True} if owed else {}
            return _advance(
                d, d["state"], "failed", now, note=reason, error=reason, **fields, **extra
            )

        doc, changed = self._ledger.update(run_key(spec.name, run["run_id"]), fail)
        if changed:
            self._emit(spec, doc, reason)
            if doc["history"][-2]["state"] == "awaiting_approval":
                self._unpark(spec.name, run["run_id"])  # it no longer waits for anyone
        self._release(spec, run["run_id"])
        return "failed"

    def _move(
        self,
        spec: ModelSpec,
        run_id: str,
        expected: str,
        state: str,
        now: datetime,
        *,
        note: str,
        **fields: Any,
    ) -> tuple[Doc, bool]:
        """One state transition, applied only from `expected`; announced as an event."""
        doc, changed = self._ledger.update(
            run_key(spec.name, run_id),
            lambda d: _advance(d, expected, state, now, note=note, **fields),
        )
        if changed:
            self._emit(spec, doc, note)
        return doc, changed

    def _emit(self, spec: ModelSpec, run: Doc, reason: str) -> None:
        if self._places.events_queue is None:
            return
        event = RunEvent(
            model=spec.name,
            run_id=run["run_id"],
            state=run["state"],
            reason=redact(reason)[:2000],
            at=run.get("updated_at") or _iso(self._clock.now()),
            job_id=run.get("job_id"),
            metrics=(run.get("metrics") or {}).get("challenger"),
        )
        try:
            self._outbox.send(self._places.events_queue, event)
        except Exception:
            log.warning(
                "run %s of %s: could not queue the %s event",
                run["run_id"],
                spec.name,
                run["state"],
                exc_info=True,
                extra=_dims(spec.name, run["run_id"]),
            )

    def _release(self, spec: ModelSpec, run_id: str) -> None:
        """End the model's active run and let a batch that waited for it go ahead.

        A run that still owes its restore check keeps the model until the check is definite
        (it raises a retryable RemoteError while the target cannot tell what it serves, so the
        message, or the next sweep, tries again)."""
        run = self._ledger.get(run_key(spec.name, run_id), remember=False)
        if run is not None and run.get("restore_pending"):
            self._restore(spec, run)
        if run is not None and run["state"] == "promoted":
            self._seat(spec, run)  # its crown write may have been lost with its writer

        def release(d: Doc) -> Doc | None:
            if d.get("active_run") != run_id:
                return None
            d["active_run"] = None
            return d

        state, _ = self._ledger.update(model_key(spec.name), release, initial=_new_model(spec))
        if state.get("batch") and not state.get("active_run"):
            self._schedule_check(spec, state["batch"], self._clock.now())


def _unreferenceable(name: str) -> InputRejected | None:
    """Why a blob name cannot be referenced, or None."""
    try:
        check_name(name)
    except InputRejected as exc:
        return exc
    return None


def _new_model(spec: ModelSpec) -> Doc:
    return {
        "model": spec.name,
        "batch": None,
        "active_run": None,
        "champion": None,
        "previous_champion": None,
    }


def _holds(files: list[Doc], file: Doc) -> bool:
    """Whether `files` has this version of the file (ETags compared normalised: entries written
    before normalisation carry quoted ones)."""
    etag = normalize_etag(file["etag"])
    return any(f["name"] == file["name"] and normalize_etag(f["etag"]) == etag for f in files)


def _with(field: str, value: Any, doc: Doc) -> Doc:
    return {**doc, field: value}


def _note_trained(run_id: str, record: Doc) -> Doc | None:
    trained = record.setdefault("trained_by", [])
    if run_id in trained:
        return None
    trained.append(run_id)
    return record


def _claim_batch(batch_id: str, record: Doc) -> Doc:
    return {**record, "batch_id": batch_id}


def _batch_id(now: datetime) -> str:
    return f"{now:%Y%m%dT%H%M%S}-{secrets.token_hex(3)}"


def _check_due(spec: ModelSpec, batch: Doc) -> datetime:
    """When the batch may be sealed: quiet since its last arrival, or open for max_wait."""
    quiet_end = _parse(batch["last_at"]) + spec.quiet_period
    hard_end = _parse(batch["opened_at"]) + spec.max_wait
    return min(quiet_end, hard_end)


def _add_to_batch(doc: Doc, file: Doc, now: datetime, new_id: str) -> Doc | None:
    """Add `file` to the open batch, or open batch `new_id` with it; None if already there."""
    batch = doc.get("batch")
    if batch is None:
        batch = {
            "id": new_id,
            "opened_at": _iso(now),
            "last_at": _iso(now),
            "files": [],
        }
        doc["batch"] = batch
    if _holds(batch["files"], file):
        return None
    batch["files"].append(file)
    batch["last_at"] = _iso(now)
    return doc


def _new_run(spec: ModelSpec, batch: Doc, now: datetime) -> Doc:
    # Each file is a full dataset: the newest one of the batch is what the model trains on.
    newest, why = _training_file(batch["files"])
    return {
        "run_id": batch["id"],
        "model": spec.name,
        "state": "queued",
        "created_at": _iso(now),
        "deadline_at": _iso(now + spec.job_deadline),
        "files": batch["files"],
        "training_file": newest,
        "training_file_reason": why,
        "forced": any(f.get("forced") for f in batch["files"]),
        "job_id": None,
        "polls": 0,
        "outputs": None,
        "metrics": None,
        "decision": None,
        "error": None,
        "history": [
            {"state": "queued", "at": _iso(now), "note": f"batch of {len(batch['files'])} file(s)"}
        ],
    }


def _training_file(files: list[Doc]) -> tuple[Doc, str]:
    """The file a batch trains on, and why: a requested one, else the newest by the blob's own
    Last-Modified (then by name); entries recorded without it fall back to delivery order."""
    count = f"{len(files)} file(s)"
    requested = [f for f in files if f.get("requested")]
    if requested:
        return requested[-1], f"requested ({requested[-1]['requested']}), of {count}"
    if all(f.get("modified_at") for f in files):
        newest = max(files, key=lambda f: (_parse(f["modified_at"]), f["name"]))
        return newest, f"newest by last-modified of {count}"
    return files[-1], f"last delivered of {count} (last-modified not recorded)"


def sweep_key(model: str) -> str:
    """The sweep's own notes on a model: its listing mark, the last schedule skip."""
    return f"sweeps/{model}.json"


class AlreadyTrained(InputRejected):
    """A retrain was asked for on a file version a run already trained."""

    def __init__(self, message: str, *, run_id: str) -> None:
        super().__init__(message)
        self.run_id = run_id


def _advance(
    doc: Doc, expected: str, state: str, now: datetime, *, note: str, **fields: Any
) -> Doc | None:
    if doc["state"] != expected:
        return None
    if isinstance(fields.get("error"), str):
        fields["error"] = redact(fields["error"])
    doc.update(fields)
    doc["state"] = state
    doc["updated_at"] = _iso(now)
    doc["history"].append({"state": state, "at": _iso(now), "note": redact(note)})
    return doc


def _dims(model: str, run_id: str | None = None, job_id: str | None = None) -> dict[str, Any]:
    """Logging extras; Application Insights turns them into custom dimensions."""
    return {"model": model, "run_id": run_id, "job_id": job_id}
