"""The Retrainer: what each trigger does, as steps of a per-run state machine."""

from __future__ import annotations

import logging
import secrets
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from retrain.bes import BatchJobs, BlobRef, JobState
from retrain.clock import Clock
from retrain.deploy import DeployTarget
from retrain.errors import EvaluationError, InputRejected, RemoteError
from retrain.evaluation import decide, parse_evaluation_csv
from retrain.ingest import route, validate
from retrain.ledger import TERMINAL, Doc, Ledger, arrival_key, model_key, run_key
from retrain.messages import CheckBatch, EvaluateRun, TrackRun
from retrain.settings import ModelSpec
from retrain.storage import DataStore, Outbox

log = logging.getLogger(__name__)

MODEL_BLOB = "model.ilearner"
EVALUATION_BLOB = "evaluation.csv"
MAX_EVALUATION_BYTES = 1024 * 1024
SAS_MARGIN = timedelta(hours=1)
DEPLOY_SAS_LIFETIME = timedelta(hours=2)


@dataclass(frozen=True)
class Places:
    """Names of the containers and queues the pipeline uses."""

    data_container: str
    artifacts_container: str
    quarantine_container: str
    jobs_queue: str
    evaluations_queue: str


@dataclass(frozen=True)
class Timing:
    """Poll backoff: the first delay doubles per poll up to the maximum."""

    first_delay: timedelta
    max_delay: timedelta

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
        """Handle a blob arrival; returns what happened ('batched', 'rejected', 'duplicate', …)."""
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
            "status": "received",
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
        if not self._ledger.create(key, record):
            existing = self._ledger.get(key) or {}
            if existing.get("status") != "received":
                log.info("arrival %s/%s@%s: duplicate event ignored", container, name, head.etag)
                return "duplicate"
        file = {"name": name, "etag": head.etag, "size": head.size, "arrived_at": _iso(now)}
        doc, _ = self._ledger.update(
            model_key(spec.name), lambda d: _add_to_batch(d, file, now), initial=_new_model(spec)
        )
        batch = doc["batch"]
        self._schedule_check(spec, batch, now)
        self._ledger.update(key, lambda d: {**d, "status": "batched", "batch_id": batch["id"]})
        log.info(
            "arrival %s/%s: batch %s of %s now has %d file(s)",
            container,
            name,
            batch["id"],
            spec.name,
            len(batch["files"]),
        )
        return "batched"

    def _schedule_check(self, spec: ModelSpec, batch: Doc, now: datetime) -> None:
        quiet_end = _parse(batch["last_at"]) + spec.quiet_period
        hard_end = _parse(batch["opened_at"]) + spec.max_wait
        delay = max(min(quiet_end, hard_end) - now, timedelta(0))
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
        if not batch or batch["id"] != msg.batch_id:
            if state.get("active_run") == msg.batch_id:
                # Sealed by a delivery that may have died before it enqueued the run.
                self._outbox.send(
                    self._places.jobs_queue, TrackRun(model=spec.name, run_id=msg.batch_id)
                )
                return "resent"
            return "stale"
        now = self._clock.now()
        quiet = now >= _parse(batch["last_at"]) + spec.quiet_period
        overdue = now >= _parse(batch["opened_at"]) + spec.max_wait
        if not (quiet or overdue):
            if msg.arrivals == len(batch["files"]):
                self._schedule_check(spec, batch, now)  # delivered early; look again later
            return "waiting"
        if state.get("active_run"):
            log.info(
                "batch %s of %s waits for run %s to end",
                batch["id"],
                spec.name,
                state["active_run"],
            )
            return "busy"
        run_id = batch["id"]
        self._ledger.create(run_key(spec.name, run_id), _new_run(spec, batch, now))

        def seal(d: Doc) -> Doc | None:
            if not d.get("batch") or d["batch"]["id"] != run_id or d.get("active_run"):
                return None
            d["batch"], d["active_run"] = None, run_id
            return d

        _, sealed = self._ledger.update(model_key(spec.name), seal)
        current = self._ledger.get(model_key(spec.name)) or {}
        if sealed or current.get("active_run") == run_id:
            self._outbox.send(self._places.jobs_queue, TrackRun(model=spec.name, run_id=run_id))
            log.info("run %s of %s: sealed %d file(s)", run_id, spec.name, len(batch["files"]))
            return "sealed"
        return "stale"

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
                run, _ = self._ledger.update(
                    key,
                    lambda d: _advance(
                        d, "submitted", "running", now, note=f"job {d['job_id']} started"
                    ),
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
                    "run %s of %s: %s; trying again in %s", msg.run_id, spec.name, exc, delay
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
        run, persisted = self._ledger.update(
            run_key(spec.name, run["run_id"]),
            lambda d: _advance(
                d,
                "queued",
                "submitted",
                now,
                note=f"job {job_id} submitted",
                job_id=job_id,
                outputs={
                    "model": f"{art}/{folder}/{MODEL_BLOB}",
                    "evaluation": f"{art}/{folder}/{EVALUATION_BLOB}",
                },
            ),
        )
        if not persisted:
            # Another delivery submitted first; ours was never started, so it never runs.
            log.warning(
                "run %s: job %s lost the race and is deleted unstarted", run["run_id"], job_id
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
            self._ledger.update(
                key, lambda d: _advance(d, "running", "trained", now, note="BES job finished")
            )
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

    def on_evaluate(self, msg: EvaluateRun) -> str:
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
            return self._promote(spec, run, msg)
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
            log.info("run %s of %s rejected: %s", run["run_id"], spec.name, decision.reason)
            run, _ = self._ledger.update(
                key,
                lambda d: _advance(
                    d,
                    "trained",
                    "rejected",
                    now,
                    note=decision.reason,
                    decision=verdict,
                    metrics=metrics,
                ),
            )
            self._release(spec, run["run_id"])
            return run
        log.info("run %s of %s passes the gate: %s", run["run_id"], spec.name, decision.reason)
        run, _ = self._ledger.update(
            key,
            lambda d: _advance(
                d,
                "trained",
                "promoting",
                now,
                note=decision.reason,
                decision=verdict,
                metrics=metrics,
            ),
        )
        return run

    def _promote(self, spec: ModelSpec, run: Doc, msg: EvaluateRun) -> str:
        target = self._target_for(spec)
        path = run["outputs"]["model"]
        container, _, blob = path.partition("/")
        key = run_key(spec.name, run["run_id"])
        ref: BlobRef = self._data.reference(
            container, blob, write=False, expires=self._clock.now() + DEPLOY_SAS_LIFETIME
        )
        pending = run.get("deployment")
        if pending is None:
            state = self._ledger.get(model_key(spec.name)) or {}
            if not state.get("champion"):
                target.preflight()  # a first promotion checks the target is set up right
            progress = target.deploy(ref)
            started = self._clock.now()
            run, _ = self._ledger.update(
                key,
                lambda d: {
                    **d,
                    "deployment": {
                        "operation": progress.operation,
                        "started_at": _iso(started),
                        "polls": 0,
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
                "run %s of %s: the target is provisioning (poll %d)", run["run_id"], spec.name, poll
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
        self._ledger.update(
            run_key(spec.name, run["run_id"]),
            lambda d: _advance(d, "promoting", "promoted", now, note=f"deployed {path}"),
        )
        log.info("run %s of %s promoted: the target serves %s", run["run_id"], spec.name, path)
        self._release(spec, run["run_id"])
        return "promoted"

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
            return d

        doc, _ = self._ledger.update(key, claim)
        holder = doc[section] if section else doc
        return bool(holder.get("polls", 0) <= poll)

    def _spec(self, name: str) -> ModelSpec:
        try:
            return self._models[name]
        except KeyError:
            raise InputRejected(f"model {name!r} is not configured") from None

    def _fail(self, spec: ModelSpec, run: Doc, reason: str) -> str:
        now = self._clock.now()
        log.error("run %s of %s failed: %s", run["run_id"], spec.name, reason)

        def fail(d: Doc) -> Doc | None:
            if d["state"] in TERMINAL:
                return None
            return _advance(d, d["state"], "failed", now, note=reason, error=reason)

        self._ledger.update(run_key(spec.name, run["run_id"]), fail)
        self._release(spec, run["run_id"])
        return "failed"

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


def _add_to_batch(doc: Doc, file: Doc, now: datetime) -> Doc | None:
    batch = doc.get("batch")
    if batch is None:
        batch = {
            "id": f"{now:%Y%m%dT%H%M%S}-{secrets.token_hex(3)}",
            "opened_at": _iso(now),
            "last_at": _iso(now),
            "files": [],
        }
        doc["batch"] = batch
    if any(f["name"] == file["name"] and f["etag"] == file["etag"] for f in batch["files"]):
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
    doc["history"].append({"state": state, "at": _iso(now), "note": note})
    return doc
