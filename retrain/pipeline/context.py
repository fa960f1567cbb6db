"""What every step shares: the ports, the places and timing, and the event emitter."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Literal

from retrain.clock import Clock
from retrain.deploy import DeployTarget
from retrain.errors import InputRejected
from retrain.http import redact
from retrain.ledger import Doc, Ledger
from retrain.messages import CheckBatch, RunEvent
from retrain.pipeline.records import check_due, iso
from retrain.ports import TrainingBackend
from retrain.settings import ModelSpec
from retrain.storage import DataStore, Outbox

log = logging.getLogger(__name__)

MIN_POLL_GAP = timedelta(seconds=1)
"""The least time between two status calls of one job (the spec's clients poll at 1 s or slower)."""
DEPLOY_CALLS = 2
"""HTTP calls one `DeployTarget.deploy` makes at most: a GET of what is served, then the update."""


@dataclass(frozen=True)
class Delivery:
    """Which queue message is being handled: its id, and how often it was dequeued.

    A redelivery after a failure has the same id and a higher attempt; a duplicate or a stale
    copy has another id. Handlers use it to let a redelivery finish what its first attempt began.
    """

    id: str
    attempt: int = 1


def delivery_doc(delivery: Delivery | None) -> Doc | None:
    """The delivery as recorded on a run (who claimed a poll or a lease)."""
    return {"id": delivery.id, "attempt": delivery.attempt} if delivery else None


def is_redelivery(mine: Doc | None, by: Doc | None) -> bool:
    """Whether delivery `mine` is a later attempt of the very message recorded as `by`."""
    return bool(mine and by and by["id"] == mine["id"] and mine["attempt"] > by["attempt"])


QueueKind = Literal["jobs", "evaluations"]
"""The queues whose messages can end as poison."""


@dataclass(frozen=True)
class Places:
    """Names of the containers and queues the pipeline uses."""

    data_container: str
    artifacts_container: str
    quarantine_container: str
    jobs_queue: str
    evaluations_queue: str
    events_queue: str | None = None

    def queue(self, kind: QueueKind) -> str:
        """The name of the jobs or the evaluations queue."""
        return self.jobs_queue if kind == "jobs" else self.evaluations_queue


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
    def start_lease(self) -> timedelta:
        """How long a delivery holds the right to start a run's job: its status call, then the
        start sent within one call bound of its claim and landed within another, 10 s to spare."""
        return self.call_bound * 2 + timedelta(seconds=10)

    @property
    def deploy_reserve(self) -> timedelta:
        """What must be left of the lease to start the deploy: its calls' worst case."""
        return self.call_bound * DEPLOY_CALLS

    def delay(self, poll: int) -> timedelta:
        """The wait before poll number `poll` (1-based)."""
        factor = 2 ** min(max(poll - 1, 0), 30)
        delay: timedelta = min(self.first_delay * factor, self.max_delay)
        return delay


@dataclass
class Step:
    """What a handler did before an error interrupted it."""

    polled: bool = False
    """It claimed its message's poll number, so a retry must use the next one."""
    starting: bool = False
    """It was starting a job: a start with no answer may still be acted on by the service."""
    start_claim: str | None = None
    """The run's start claim it holds: a retry it sends carries it (the claim is given back)."""
    lease: str | None = None
    """The deploy lease it kept after a target call that got no answer: the retry it sends one
    call bound later carries it and takes over, and no other copy changes the target before."""
    run: Doc | None = None
    """The run record as it last wrote it, if it wrote one."""


def dims(model: str, run_id: str | None = None, job_id: str | None = None) -> dict[str, Any]:
    """Logging extras; Application Insights turns them into custom dimensions."""
    return {"model": model, "run_id": run_id, "job_id": job_id}


@dataclass
class Context:
    """The ports and settings each step works with; one per Retrainer, shared by its steps.

    Mutable on purpose: tests swap the ledger (a new instance that remembers nothing) and the
    places, and every step sees the change.
    """

    models: Mapping[str, ModelSpec]
    ledger: Ledger
    data: DataStore
    outbox: Outbox
    training_for: Callable[[ModelSpec], TrainingBackend]
    target_for: Callable[[ModelSpec], DeployTarget]
    places: Places
    timing: Timing
    clock: Clock

    def spec(self, name: str) -> ModelSpec:
        """The configured model `name`, or InputRejected."""
        try:
            return self.models[name]
        except KeyError:
            raise InputRejected(f"model {name!r} is not configured") from None

    @property
    def stall(self) -> timedelta:
        """How long a step may stand still, beyond its longest poll delay, before the sweep
        re-drives it."""
        return self.timing.max_delay + self.timing.stall

    def schedule_check(
        self, spec: ModelSpec, batch: Doc, now: datetime, *, due: datetime | None = None
    ) -> None:
        """Send the batch's check for `due`, by default the earliest its quiet period can end
        (a check that finds later arrivals reschedules itself once)."""
        delay = max((due or check_due(spec, batch)) - now, timedelta(0))
        self.outbox.send(
            self.places.jobs_queue,
            CheckBatch(model=spec.name, batch_id=batch["id"]),
            delay=delay,
        )

    def emit(self, spec: ModelSpec, run: Doc, reason: str) -> None:
        """Announce the run's state on the events queue, if one is configured; never raises."""
        if self.places.events_queue is None:
            return
        event = RunEvent(
            model=spec.name,
            run_id=run["run_id"],
            state=run["state"],
            reason=redact(reason)[:2000],
            at=run.get("updated_at") or iso(self.clock.now()),
            job_id=run.get("job_id"),
            metrics=(run.get("metrics") or {}).get("challenger"),
        )
        try:
            self.outbox.send(self.places.events_queue, event)
        except Exception:
            log.warning(
                "run %s of %s: could not queue the %s event",
                run["run_id"],
                spec.name,
                run["state"],
                exc_info=True,
                extra=dims(spec.name, run["run_id"]),
            )


def log_retry(
    spec: ModelSpec, run_id: str, problem: Exception, delay: timedelta, job_id: str | None = None
) -> None:
    """Say that a run's step met a transient problem and goes on after `delay`."""
    log.warning(
        "run %s of %s: %s; trying again in %s",
        run_id,
        spec.name,
        problem,
        delay,
        extra=dims(spec.name, run_id, job_id),
    )
