"""The Retrainer: what each trigger does, as steps of a per-run state machine."""

from __future__ import annotations

import contextlib
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
from retrain.deploy import DeployTarget
from retrain.errors import (
    EvaluationError,
    InputRejected,
    MessageError,
    RemoteError,
    StateConflict,
)
from retrain.evaluation import decide, parse_evaluation_csv
from retrain.ingest import route, validate
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
from retrain.storage import DataStore, Outbox

log = logging.getLogger(__name__)

MODEL_BLOB = "model.ilearner"
EVALUATION_BLOB = "evaluation.csv"
MAX_EVALUATION_BYTES = 1024 * 1024
SAS_MARGIN = timedelta(hours=1)
DEPLOY_SAS_LIFETIME = timedelta(hours=2)
MAX_REJOINS = 10
"""How often an arrival may find its claimed batch closed before it gives up (and is retried)."""
_EPOCH = "1970-01-01T00:00:00+00:00"
DEPLOY_LEASE = timedelta(minutes=2)
"""How long one delivery may hold the right to call the target's deploy (a PATCH is seconds)."""


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

    def delay(self, poll: int) -> timedelta:
        """The wait before poll number `poll` (1-based)."""
        factor = 2 ** min(max(poll - 1, 0), 30)
        delay: timedelta = min(self.first_delay * factor, self.max_delay)
        return delay


def _iso(moment: datetime) -> str:
    return moment.isoformat()


def _parse(moment: str) -> datetime:
    return datetime.fromisoformat(moment)


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
        head = self._data.head(container, name)
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
            validate(spec, name, size=head.size, head=head.head)
        except InputRejected as exc:
            record.update(status="rejected", reason=str(exc))
            if self._ledger.create(key, record):
                self._data.quarantine(container, name, self._places.quarantine_container, str(exc))
                log.warning("arrival %s/%s rejected: %s", container, name, exc)
                return "rejected"
            return "duplicate"
        file = {"name": name, "etag": head.etag, "size": head.size, "arrived_at": _iso(now)}
        mkey = model_key(spec.name)
        state = self._ledger.known(mkey) or self._ledger.get(mkey) or {}
        open_batch = state.get("batch")
        claim = open_batch["id"] if open_batch else _batch_id(now)
        record.update(status="accepted", batch_id=claim)
        if not self._ledger.create(key, record):
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

    def on_track_run(self, msg: TrackRun) -> str:
        """Submit, start or poll the run's BES job; never waits inside the invocation."""
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
        try:
            if run["state"] == "queued":
                if now >= _parse(run["deadline_at"]):
                    return self._fail(spec, run, "the job deadline passed before it was submitted")
                run, persisted = self._submit(spec, jobs, run, now)
                if not persisted:
                    return "conflict"
            if run["state"] == "submitted":
                jobs.start(run["job_id"])
                run, _ = self._move(
                    spec,
                    msg.run_id,
                    "submitted",
                    "running",
                    now,
                    note=f"job {run['job_id']} started",
                )
                self._poll_later(spec, msg.run_id, 1)
                return "started"
            return self._poll(spec, jobs, run, msg, now)
        except RemoteError as exc:
            if exc.retryable:
                delay = (
                    timedelta(seconds=exc.retry_after)
                    if exc.retry_after
                    else (self._timing.delay(msg.poll + 1))
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
                    TrackRun(model=spec.name, run_id=msg.run_id, poll=msg.poll),
                    delay=delay,
                )
                return "retry"
            current = self._ledger.get(key) or run
            if current.get("job_id") and current["state"] in ("submitted", "running"):
                self._cancel_quietly(jobs, current["job_id"])
            return self._fail(spec, current, str(exc))

    def _submit(
        self, spec: ModelSpec, jobs: BatchJobs, run: Doc, now: datetime
    ) -> tuple[Doc, bool]:
        """Submit, then persist the job id; only a persisted job is ever started."""
        expires = _parse(run["deadline_at"]) + SAS_MARGIN
        folder = f"{spec.name}/{run['run_id']}"
        art = self._places.artifacts_container
        inputs = {
            spec.bes.input_name: self._data.reference(
                self._places.data_container,
                run["training_file"]["name"],
                write=False,
                expires=expires,
            )
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
            outputs={
                "model": f"{art}/{folder}/{MODEL_BLOB}",
                "evaluation": f"{art}/{folder}/{EVALUATION_BLOB}",
            },
        )
        if not persisted:
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
        key = run_key(spec.name, msg.run_id)
        if not self._claim_poll(key, None, msg.poll):
            return "duplicate"
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

    def on_evaluate(self, msg: EvaluateRun, *, delivery: str | None = None) -> str:
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
        try:
            return self._promote(spec, run, msg, delivery)
        except RemoteError as exc:
            if exc.retryable:
                raise
            return self._fail(spec, run, f"promotion failed: {exc}")

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
        decision = decide(spec.gate, evaluation.challenger, champion)
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
        )
        if not moved:
            raise InputRejected(f"run {run_id} is {run['state']}, not awaiting approval")
        self._unpark(name, run_id)
        return "rejected"

    def _lock(self, spec: ModelSpec, run_id: str, action: str) -> None:
        """Make `run_id` the model's active run, or explain which run holds the model."""

        def lock(d: Doc) -> Doc | None:
            if d.get("active_run") in (None, run_id):
                d["active_run"] = run_id
                return d
            return None

        state, _ = self._ledger.update(model_key(spec.name), lock, initial=_new_model(spec))
        if state.get("active_run") != run_id:
            raise InputRejected(
                f"cannot {action} now: run {state['active_run']} of {spec.name} is in progress; "
                "try again when it has ended"
            )

    def _promote(
        self, spec: ModelSpec, run: Doc, msg: EvaluateRun, delivery: str | None = None
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
            now = self._clock.now()
            # The queue message's id: a re-delivery of the same message after a crash may take
            # the claim over at once; another copy of the message waits out the lease.
            token = delivery or secrets.token_hex(8)

            def claim(d: Doc) -> Doc | None:
                held = d.get("deployment")
                if held and (
                    held.get("deployed")
                    or (now < _parse(held["until"]) and held.get("claim") != token)
                ):
                    return None
                d["deployment"] = {
                    "claim": token,
                    "until": _iso(now + DEPLOY_LEASE),
                    "started_at": _iso(now),
                    "polls": 0,
                    "operation": None,
                    "deployed": False,
                }
                return d

            run, claimed = self._ledger.update(key, claim)
            if not claimed:
                held = run["deployment"]
                if held.get("deployed"):
                    return "duplicate"
                # Another delivery is deploying right now; look again when its lease ends.
                self._outbox.send(
                    self._places.evaluations_queue,
                    msg,
                    delay=max(_parse(held["until"]) - now, timedelta(seconds=1)),
                )
                return "waiting"
            state = self._ledger.get(model_key(spec.name)) or {}
            try:
                if not state.get("champion"):
                    target.preflight()  # a first promotion checks the target is set up right
                progress = target.deploy(ref)
            except Exception:
                # Give the claim back so the retry of this message need not wait out the lease.
                self._ledger.update(
                    key,
                    lambda d: (
                        {**d, "deployment": None}
                        if ((d.get("deployment") or {}).get("claim") == token)
                        else None
                    ),
                )
                raise
            run, _ = self._ledger.update(
                key,
                lambda d: {
                    **d,
                    "deployment": {
                        **d["deployment"],
                        "operation": progress.operation,
                        "deployed": True,
                    },
                },
            )
        else:
            if not self._claim_poll(key, "deployment", msg.poll):
                return "duplicate"
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
        now = self._clock.now()
        champion = {
            "run_id": run["run_id"],
            "model": path,
            "promoted_at": _iso(now),
            "metrics": (run.get("metrics") or {}).get("challenger"),
        }

        def crown(d: Doc) -> Doc | None:
            if (d.get("champion") or {}).get("run_id") == run["run_id"]:
                return None
            d["previous_champion"], d["champion"] = d.get("champion"), champion
            return d

        self._ledger.update(model_key(spec.name), crown)
        self._move(spec, run["run_id"], "promoting", "promoted", now, note=f"deployed {path}")
        log.info(
            "run %s of %s promoted: the target serves %s",
            run["run_id"],
            spec.name,
            path,
            extra=_dims(spec.name, run["run_id"], run.get("job_id")),
        )
        self._release(spec, run["run_id"])
        return "promoted"

    # -------------------------------------------------------------- operations

    def request(self, name: str, blob: str | None = None, *, reason: str) -> str:
        """Retrain `name` now on `blob` (default: its newest data file), through the batch path.

        The file is validated like any arrival and added to the model's batch, which is marked
        to be sealed without waiting for the quiet period. Returns the batch id.
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
        validate(spec, blob, size=head.size, head=head.head)
        now = self._clock.now()
        file = {
            "name": blob,
            "etag": head.etag,
            "size": head.size,
            "arrived_at": _iso(now),
            "requested": reason,
        }

        def add(d: Doc) -> Doc | None:
            changed = _add_to_batch(d, file, now, _batch_id(now)) or d
            changed["batch"]["force"] = True
            return changed

        doc, _ = self._ledger.update(model_key(name), add, initial=_new_model(spec))
        self._outbox.send(
            self._places.jobs_queue,
            CheckBatch(
                model=name, batch_id=doc["batch"]["id"], arrivals=len(doc["batch"]["files"])
            ),
        )
        log.info("retrain of %s requested on %s (%s)", name, blob, reason, extra=_dims(name))
        return str(doc["batch"]["id"])

    def rollback(self, name: str, to: str | None = None, *, by: str) -> str:
        """Re-deploy an earlier promoted run's model (default: the previous champion).

        A rollback is a run of its own, promoted through the model's target with a freshly
        minted SAS for the model blob in the app's artifacts container. Returns its id.
        """
        spec = self._spec(name)
        state = self._ledger.get(model_key(name)) or {}
        champion = state.get("champion") or {}
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
        if champion.get("model") == source["outputs"]["model"]:
            raise InputRejected(f"{name} already serves the model of run {to}")
        now = self._clock.now()
        run_id = f"rollback-{now:%Y%m%dT%H%M%S}-{secrets.token_hex(3)}"
        self._lock(spec, run_id, "roll back")
        note = f"rollback to run {to} requested by {by}"
        run = {
            "run_id": run_id,
            "model": name,
            "kind": "rollback",
            "restores": to,
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
        self._ledger.create(run_key(name, run_id), run)
        self._emit(spec, run, note)
        self._outbox.send(self._places.evaluations_queue, EvaluateRun(model=name, run_id=run_id))
        return run_id

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
        run = (
            self._ledger.get(run_key(record["model"], record["run_id"]))
            if record["run_id"]
            else None
        )
        if run is not None and run["state"] not in TERMINAL:
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
                self._replay(key, record)
                replayed.append(key)
        return replayed

    def _replay(self, key: str, record: Doc) -> None:
        if record.get("run_id") and record.get("state_before"):
            spec = self._spec(record["model"])
            now = self._clock.now()
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
            if not revived:
                self._release(spec, record["run_id"])
        self._outbox.send_raw(record["queue"], record["body"])
        self._ledger.update(
            key, lambda d: {**d, "replayed": True, "replayed_at": _iso(self._clock.now())}
        )

    def sweep(self) -> dict[str, int]:
        """Re-drive what a lost message or event left behind. Safe to run anywhere, any time."""
        counts = {"checks": 0, "runs": 0, "blobs": 0, "scheduled": 0}
        now = self._clock.now()
        container = self._places.data_container
        for spec in self._models.values():
            # A blob with no arrival record never reached ingest; one whose record names a
            # batch that does not hold it lost its delivery between the two writes (and the
            # host's retries ran out). Either way, ingest it now.
            state = self._ledger.get(model_key(spec.name)) or {}
            runs: dict[str, list[Doc] | None] = {}
            for name, etag in self._data.listing(container, spec.prefix):
                record = self._ledger.get(arrival_key(container, name, etag), remember=False)
                if record is None or (
                    record.get("status") == "accepted"
                    and not _holds(
                        self._claimed_files(spec, state, record["batch_id"], runs) or [],
                        {"name": name, "etag": etag},
                    )
                ):
                    self.on_blob(container, name)
                    counts["blobs"] += 1
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
            if (
                spec.retrain_every
                and champion
                and not active
                and not batch
                and now >= _parse(champion["promoted_at"]) + spec.retrain_every
                and self._claim_sweep(model_key(spec.name), now)
            ):
                with contextlib.suppress(InputRejected):
                    self.request(
                        spec.name, reason=f"scheduled: champion older than {spec.retrain_every}"
                    )
                    counts["scheduled"] += 1
        return counts

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
        if run is None or run["state"] in TERMINAL or run["state"] == "awaiting_approval":
            if run is not None:
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
        log.warning(
            "sweep: run %s of %s stalled in %s since %s; re-driven",
            run_id,
            spec.name,
            run["state"],
            last.isoformat(),
            extra=_dims(spec.name, run_id),
        )
        self._outbox.send(queue, message)
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

    def _claim_poll(self, key: str, section: str | None, poll: int) -> bool:
        """Record poll number `poll`; False when a later poll was already made (a stale copy).

        The same number again is a re-delivery after a failure, and goes ahead: losing the
        poll chain would strand the run, while a duplicated chain only costs extra polls.
        """

        def claim(d: Doc) -> Doc | None:
            holder = d[section] if section else d
            if holder.get("polls", 0) >= poll:
                return None
            holder["polls"] = poll
            holder["polled_at"] = _iso(self._clock.now())
            return d

        doc, _ = self._ledger.update(key, claim)
        holder = doc[section] if section else doc
        return bool(holder.get("polls", 0) <= poll)

    def _spec(self, name: str) -> ModelSpec:
        try:
            return self._models[name]
        except KeyError:
            raise InputRejected(f"model {name!r} is not configured") from None

    def _fail(self, spec: ModelSpec, run: Doc, reason: str, **fields: Any) -> str:
        now = self._clock.now()
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
            return _advance(d, d["state"], "failed", now, note=reason, error=reason, **fields)

        doc, changed = self._ledger.update(run_key(spec.name, run["run_id"]), fail)
        if changed:
            self._emit(spec, doc, reason)
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
            reason=reason[:2000],
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
        """End the model's active run and let a batch that waited for it go ahead."""

        def release(d: Doc) -> Doc | None:
            if d.get("active_run") != run_id:
                return None
            d["active_run"] = None
            return d

        state, _ = self._ledger.update(model_key(spec.name), release, initial=_new_model(spec))
        if state.get("batch") and not state.get("active_run"):
            self._schedule_check(spec, state["batch"], self._clock.now())


def _new_model(spec: ModelSpec) -> Doc:
    return {
        "model": spec.name,
        "batch": None,
        "active_run": None,
        "champion": None,
        "previous_champion": None,
    }


def _holds(files: list[Doc], file: Doc) -> bool:
    """Whether `files` has this version of the file."""
    return any(f["name"] == file["name"] and f["etag"] == file["etag"] for f in files)


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
    newest = batch["files"][-1]
    return {
        "run_id": batch["id"],
        "model": spec.name,
        "state": "queued",
        "created_at": _iso(now),
        "deadline_at": _iso(now + spec.job_deadline),
        "files": batch["files"],
        "training_file": newest,
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


def _advance(
    doc: Doc, expected: str, state: str, now: datetime, *, note: str, **fields: Any
) -> Doc | None:
    if doc["state"] != expected:
        return None
    doc.update(fields)
    doc["state"] = state
    doc["updated_at"] = _iso(now)
    doc["history"].append({"state": state, "at": _iso(now), "note": note})
    return doc


def _dims(model: str, run_id: str | None = None, job_id: str | None = None) -> dict[str, Any]:
    """Logging extras; Application Insights turns them into custom dimensions."""
    return {"model": model, "run_id": run_id, "job_id": job_id}
