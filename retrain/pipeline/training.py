"""Training: submit the run's job to its backend, start it once, and poll it by delayed messages."""

from __future__ import annotations

import functools
import logging
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta

from retrain.azureml.events import JobCompleted
from retrain.azureml.spec import AzureMLSpec
from retrain.errors import (
    InputRejected,
    PermanentError,
    PermanentRemoteError,
    RemoteError,
    TransientRemoteError,
)
from retrain.ledger import Doc, arrival_key, model_key, run_key
from retrain.messages import EvaluateRun, TrackRun
from retrain.pipeline.context import (
    MIN_POLL_GAP,
    Context,
    Delivery,
    Step,
    delivery_doc,
    dims,
    log_retry,
)
from retrain.pipeline.records import iso, note_trained, parse
from retrain.pipeline.runs import RunStep
from retrain.ports import ModelRef, Phase, TrainingBackend, TrainingRequest
from retrain.runstate import TRAINING, RunState
from retrain.settings import ModelSpec
from retrain.storage import BlobVersion

log = logging.getLogger(__name__)

INPUT_BLOB = "input"
"""The run's copy of its training file (plus the file's own extension), what the job reads."""


def training_request(ctx: Context, spec: ModelSpec, run: Doc) -> TrainingRequest:
    """What the run's backend is asked to train: the run's frozen input, its own folder in the
    artifacts container for the outputs, its deadline, the champion's model. The same for every
    delivery (one run holds the model at a time, so the champion does not change under it)."""
    state = ctx.ledger.get(model_key(spec.name)) or {}
    champion = state.get("champion")
    folder = f"{spec.name}/{run['run_id']}"
    suffix = ".tsv" if run["training_file"]["name"].lower().endswith(".tsv") else ".csv"
    art = ctx.places.artifacts_container
    return TrainingRequest(
        model=spec.name,
        run_id=run["run_id"],
        input_container=art,
        input_name=f"{folder}/{INPUT_BLOB}{suffix}",
        output_container=art,
        output_folder=folder,
        deadline=parse(run["deadline_at"]),
        champion=ModelRef.load(champion["model"]) if champion else None,
    )


@dataclass(frozen=True)
class _Track:
    """One track-run message in hand: its model, the model's training backend, the message and
    which delivery of it this is."""

    spec: ModelSpec
    jobs: TrainingBackend
    msg: TrackRun
    delivery: Delivery | None


class Training(RunStep):
    """The track-run step: one submitted job per run, started once, polled without sleeping."""

    def on_track_run(self, msg: TrackRun, *, delivery: Delivery | None = None) -> str:
        """Submit, start or poll the run's training job; never waits inside the invocation.

        One poll chain per run: poll number `n` is made by exactly one message (the first to
        claim it); a redelivery of that same message after a failure may make it again, any
        other copy is dropped.
        """
        ctx = self._ctx
        spec = ctx.spec(msg.model)
        run = self.live_run(spec, msg.run_id)
        if isinstance(run, str):
            return run
        if run["state"] not in TRAINING:
            return str(run["state"])
        track = _Track(spec, ctx.training_for(spec), msg, delivery)
        step = Step()
        try:
            return self._step(track, run, step)
        except TransientRemoteError as exc:
            return self._retry(track, step.run or run, exc, step)
        except PermanentError as exc:  # a refused call, an unusable answer or reference
            current = ctx.ledger.get(run_key(spec.name, msg.run_id)) or step.run or run
            if current.get("job_id") and current["state"] in (
                RunState.SUBMITTED,
                RunState.RUNNING,
            ):
                self._cancel_quietly(track.jobs, current["job_id"])
            return self._runs.fail(spec, current, str(exc))

    def _step(self, track: _Track, run: Doc, step: Step) -> str:
        """Do what the run's state calls for: submit and start, start, or poll."""
        spec, msg = track.spec, track.msg
        now = self._ctx.clock.now()
        key = run_key(spec.name, msg.run_id)
        if run["state"] == RunState.QUEUED:
            if now >= parse(run["deadline_at"]):
                return self._runs.fail(spec, run, "the job deadline passed before it was submitted")
            began = self._ctx.clock.monotonic()
            token = secrets.token_hex(8)
            run, persisted = self._submit(track, run, now, token, step)
            if not persisted:
                return "conflict"
            return self._start(track, run, now, step, began, known_unstarted=True)
        if run["state"] == RunState.SUBMITTED:
            return self._claim_start(track, run, now, step)
        poll_claim = self._runs.claim_poll(key, None, msg.poll, track.delivery)
        if not poll_claim:
            return "duplicate"
        step.polled = True
        if poll_claim == "again":
            # The failed attempt may have polled and sent the next poll before it died:
            # polling now could come within a second of that one. Send the next poll
            # instead (of two copies of it, one claims it).
            self._poll_later(spec, msg.run_id, msg.poll + 1)
            return "resent"
        return self._poll(track, run, now)

    def _claim_start(self, track: _Track, run: Doc, now: datetime, step: Step) -> str:
        """Claim the chain's poll and the run's start claim, then look at the job and start it
        if it is not started yet.

        Starting is part of the one chain, and under a claim on the run: a process can stand
        still (paused, swapped out) anywhere between its status call and its start, so a copy
        that finds another delivery's claim never asks at once. It sends itself again one start
        lease later and takes over only if that very claim is still there then (the queue
        service times the wait: no clock another instance wrote is read). The holder sends its
        start only while the start's worst case still fits in its lease, timed on its own clock.
        """
        spec, msg = track.spec, track.msg
        mine = delivery_doc(track.delivery)
        began = self._ctx.clock.monotonic()
        token = secrets.token_hex(8)
        seen: str | None = None
        held_by_another = False

        def take(d: Doc, again: bool) -> bool:
            nonlocal seen, held_by_another
            held_by_another = False  # the ledger may call this again on a fresher copy
            seen = (d.get("start") or {}).get("claim")
            if again:
                return True  # the failed attempt's claim stands: see below
            if seen and seen not in (msg.start, token):  # token: this write landed, answer lost
                held_by_another = True
                return False
            d["start"] = {"claim": token, "by": mine}
            return True

        key = run_key(spec.name, msg.run_id)
        claim = self._runs.claim_poll(key, None, msg.poll, track.delivery, also=take)
        lease = self._ctx.timing.start_lease
        if held_by_another:
            self._ctx.outbox.send(
                self._ctx.places.jobs_queue,
                TrackRun(model=spec.name, run_id=msg.run_id, poll=msg.poll, start=seen),
                delay=lease,
            )
            return "waiting"
        if not claim:
            return "duplicate"
        step.polled = True
        if claim == "again":
            # The failed attempt may have asked for the job's status, or started it with the
            # answer still on its way, and may not even be gone (a process that stood still):
            # the chain's next poll takes over from its claim once that claim's lease is over.
            self._poll_later(spec, msg.run_id, msg.poll + 1, lease, start=seen)
            return "resent"
        step.start_claim = token
        return self._start(track, run, now, step, began, known_unstarted=False)

    def _retry(self, track: _Track, run: Doc, exc: TransientRemoteError, step: Step) -> str:
        """Send the message again after the service's hint or the chain's backoff."""
        spec, msg = track.spec, track.msg
        # A claimed poll number is spent: the retry is the chain's next poll.
        claimed = step.polled
        poll = msg.poll + 1 if claimed else msg.poll
        delay = max(
            timedelta(seconds=exc.retry_after or 0),
            self._ctx.timing.delay(poll) if claimed else MIN_POLL_GAP,
            # A start that got no answer may reach the service late: look (status first) only once
            # the service must have acted on it, so it is not started twice.
            self._ctx.timing.call_bound if step.starting and exc.status is None else MIN_POLL_GAP,
            MIN_POLL_GAP,
        )
        log_retry(spec, msg.run_id, exc, delay, run.get("job_id"))
        self._ctx.outbox.send(
            self._ctx.places.jobs_queue,
            # A claim this delivery held goes with the retry: it starts nothing more itself.
            TrackRun(
                model=spec.name,
                run_id=msg.run_id,
                poll=poll,
                start=step.start_claim if claimed else msg.start,
            ),
            delay=delay,
        )
        return "retry"

    def _start(
        self,
        track: _Track,
        run: Doc,
        now: datetime,
        step: Step,
        began: float,
        *,
        known_unstarted: bool,
    ) -> str:
        """Start the persisted job once, then begin the run's one poll chain.

        A job id found persisted by an earlier delivery may have been started already (its
        answer lost): ask the backend first and start only a job not started yet; a 409 on start
        means another delivery started it. `began` is when this delivery's start claim was
        taken, on its own clock: a start that could land after the claim's lease is not sent.
        """
        spec, jobs = track.spec, track.jobs
        job_id = run["job_id"]
        already = False
        if not known_unstarted:
            # The status GET (and its retries) must also end before a copy may take over, or
            # it could come within a second of that copy's own.
            if self._stood_still(
                track, run, step, began, self._ctx.timing.call_bound + MIN_POLL_GAP
            ):
                return "resent"
            already = jobs.status(job_id).phase is not Phase.NOT_STARTED
        if not already:
            if self._stood_still(track, run, step, began):
                return "resent"
            step.starting = True
            try:
                jobs.start(job_id)
            except RemoteError as exc:
                if exc.status != 409:
                    raise
                log.info("job %s: already started (409 on start)", job_id)
            step.starting = False
        moved_run, moved = self._runs.move(
            spec,
            run["run_id"],
            RunState.SUBMITTED,
            RunState.RUNNING,
            now,
            note=f"job {job_id} started",
        )
        if not moved:
            return "duplicate"  # another delivery started the job and owns the poll chain
        # The chain goes on from the poll this delivery claimed to start the job (polls and
        # starts share one count, so no copy of an earlier message can poll it again).
        self._poll_later(spec, run["run_id"], moved_run.get("polls", 0) + 1)
        return "started"

    def _stood_still(
        self, track: _Track, run: Doc, step: Step, began: float, need: timedelta | None = None
    ) -> bool:
        """Whether too little of the start lease is left for the start's worst case: a copy may
        be taking over. The claim then goes to the chain's next poll, which looks again before
        it starts anything."""
        timing = self._ctx.timing
        left = timing.start_lease - timedelta(seconds=self._ctx.clock.monotonic() - began)
        if left >= (need or timing.call_bound):
            return False
        spec = track.spec
        log.warning(
            "run %s of %s: too little of the start lease left (%s); not starting job %s",
            run["run_id"],
            spec.name,
            left,
            run["job_id"],
            extra=dims(spec.name, run["run_id"], run["job_id"]),
        )
        self._poll_later(spec, run["run_id"], track.msg.poll + 1, start=step.start_claim)
        return True

    def _submit(
        self, track: _Track, run: Doc, now: datetime, token: str, step: Step
    ) -> tuple[Doc, bool]:
        """Submit, then persist the job id with this delivery's start claim `token`; only a
        persisted job is ever started. The write takes the chain's poll and the start claim for
        this delivery (`step` says so at once, so a retry after a later error goes on from them)."""
        spec, jobs = track.spec, track.jobs
        request = training_request(self._ctx, spec, run)
        self._freeze(run, request)
        job_id = jobs.submit(request)
        run, persisted = self._runs.move(
            spec,
            run["run_id"],
            RunState.QUEUED,
            RunState.SUBMITTED,
            now,
            note=f"job {job_id} submitted",
            job_id=job_id,
            polls=track.msg.poll,
            poll_by=delivery_doc(track.delivery),
            polled_at=iso(now),
            start={"claim": token, "by": delivery_doc(track.delivery)},
            outputs={
                **jobs.outputs(request),
                "input": f"{request.input_container}/{request.input_name}",
            },
        )
        # A write whose answer was lost (the store's retry then refused) landed all the same: the
        # claim on the run is this delivery's own token.
        persisted = persisted or (run.get("start") or {}).get("claim") == token
        step.run = run
        if persisted:
            step.polled = True
            step.start_claim = token
            # The version's own record says which run trained it, whichever batch it was in
            # (a retrain-now puts a version in a batch other than its arrival's).
            training = run["training_file"]
            self._ctx.ledger.update(
                arrival_key(self._ctx.places.data_container, training["name"], training["etag"]),
                functools.partial(note_trained, run["run_id"]),
            )
        elif run.get("job_id") == job_id:
            # The backend names jobs after the request: this submit found the job that won.
            log.info("run %s: job %s was already submitted", run["run_id"], job_id)
        else:
            # Another delivery submitted first; ours was never started, so it never runs.
            log.warning(
                "run %s: job %s lost the race and is deleted unstarted",
                run["run_id"],
                job_id,
                extra=dims(spec.name, run["run_id"], job_id),
            )
            self._cancel_quietly(jobs, job_id)
        return run, persisted

    def _freeze(self, run: Doc, request: TrainingRequest) -> None:
        """Copy exactly the validated version of the training file to the request's input.

        The job reads that copy: an overwrite of the data blob after validation cannot reach
        the job."""
        training = run["training_file"]
        source = BlobVersion(self._ctx.places.data_container, training["name"], training["etag"])
        frozen = f"{request.input_container}/{request.input_name}"
        try:
            copied = self._ctx.data.freeze(source, request.input_container, request.input_name)
        except InputRejected as exc:
            raise PermanentRemoteError(f"the validated training file is gone: {exc}") from exc
        if not copied:
            raise TransientRemoteError(
                f"the copy of {training['name']} into {frozen} is still in progress",
                retry_after=5,
            )

    def _poll(self, track: _Track, run: Doc, now: datetime) -> str:
        """Ask the backend how the job is doing; hand a finished run to the gate."""
        spec, jobs, msg = track.spec, track.jobs, track.msg
        status = jobs.status(run["job_id"])
        if status.phase is Phase.FINISHED:
            self._trained(spec, msg.run_id, now, f"{jobs.what} finished")
            return RunState.TRAINED.value
        if status.phase in (Phase.FAILED, Phase.CANCELLED):
            return self._runs.fail(
                spec,
                run,
                f"{jobs.what} {status.phase.value}: {status.details or 'no details given'}",
            )
        if now >= parse(run["deadline_at"]):
            jobs.cancel(run["job_id"])
            return self._runs.fail(
                spec,
                run,
                f"the job outlived its deadline of {spec.job_deadline} "
                f"and was cancelled (last state {status.state})",
            )
        self._poll_later(spec, msg.run_id, msg.poll + 1)
        return RunState.RUNNING.value

    def _trained(self, spec: ModelSpec, run_id: str, now: datetime, note: str) -> bool:
        """Move a running run whose job finished to `trained` and hand it to the gate; whether
        this call moved it (one of the poll and a completion event does)."""
        _, moved = self._runs.move(spec, run_id, RunState.RUNNING, RunState.TRAINED, now, note=note)
        if moved:
            self._ctx.outbox.send(
                self._ctx.places.evaluations_queue, EvaluateRun(model=spec.name, run_id=run_id)
            )
        return moved

    def on_job_completed(self, event: JobCompleted) -> str:
        """A job completion event (Azure ML through Event Grid): the run whose job it names
        goes to the gate now, without waiting for its next poll. Only a running run of a
        configured `azureml` model, in the workspace the event comes from, whose recorded job is
        the one completed; anything else is skipped and the poll chain stays the judge."""
        ctx = self._ctx
        spec = ctx.models.get(event.model)
        training = spec.training if spec is not None else None
        if spec is None or not isinstance(training, AzureMLSpec):
            return "skipped"
        if training.workspace_ref.path.casefold() != event.workspace.casefold():
            log.warning(
                "job event for %s of %s from workspace %s, not the model's: skipped",
                event.run_id,
                event.model,
                event.workspace,
            )
            return "skipped"
        run = ctx.ledger.get(run_key(spec.name, event.run_id))
        if run is None or run.get("job_id") != event.job:
            return "skipped"
        if run["state"] != RunState.RUNNING:
            return str(run["state"])  # polled already, or not started as far as it knows
        moved = self._trained(spec, event.run_id, ctx.clock.now(), "job completed (its event)")
        return RunState.TRAINED.value if moved else "duplicate"

    def _poll_later(
        self,
        spec: ModelSpec,
        run_id: str,
        poll: int,
        at_least: timedelta = MIN_POLL_GAP,
        *,
        start: str | None = None,
    ) -> None:
        self._ctx.outbox.send(
            self._ctx.places.jobs_queue,
            TrackRun(model=spec.name, run_id=run_id, poll=poll, start=start),
            delay=max(self._ctx.timing.delay(poll), at_least),
        )

    @staticmethod
    def _cancel_quietly(jobs: TrainingBackend, job_id: str) -> None:
        try:
            jobs.cancel(job_id)
        except RemoteError as exc:
            log.warning("job %s: cancel failed: %s", job_id, exc)
