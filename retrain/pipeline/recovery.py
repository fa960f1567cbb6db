"""Recovery: the sweep re-drives what a lost message or event left behind.

It ingests blobs that never reached a batch, sends the check of a batch nobody looked at,
re-drives stalled runs, repairs a claim whose run was never recorded, restores an idle model's
target that does not serve its champion, and starts the retrain `retrain_every` asks for.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import Enum

from pydantic import BaseModel

from retrain.errors import InputRejected
from retrain.ledger import Doc, arrival_key, model_key, run_key
from retrain.messages import EvaluateRun, TrackRun
from retrain.pipeline.arrivals import Arrival, Arrivals
from retrain.pipeline.batches import Batches
from retrain.pipeline.context import MIN_POLL_GAP, Context, dims
from retrain.pipeline.operations import AlreadyTrained, Operations
from retrain.pipeline.records import check_due, iso, parse, sweep_key
from retrain.pipeline.slot import ModelSlot
from retrain.runstate import SCHEDULE_SKIPPED, TRAINING, RunState, is_terminal
from retrain.settings import ModelSpec
from retrain.storage import BlobUnreadable, Listed, normalize_etag

log = logging.getLogger(__name__)

Counts = dict[str, int]


@dataclass(frozen=True)
class Held:
    """The file versions of one batch, and whether they are its run's (else its members')."""

    versions: frozenset[tuple[str, str]]
    recorded: bool


class Holders:
    """The batches of one model as one sweep finds them, each read at most once."""

    def __init__(self, arrivals: Arrivals, spec: ModelSpec, state: Doc) -> None:
        self._arrivals, self._spec, self._state = arrivals, spec, state
        self._read: dict[str, Held | None] = {}
        self._waiting: frozenset[tuple[str, str]] | None = None

    def of(self, batch_id: str | None) -> Held | None:
        """Batch `batch_id`'s files; None if it never opened."""
        if not batch_id:
            return None
        if batch_id not in self._read:
            files, recorded = self._arrivals.claimed_files(self._spec, self._state, batch_id)
            self._read[batch_id] = (
                None
                if files is None
                else Held(
                    frozenset((f["name"], normalize_etag(f["etag"])) for f in files), recorded
                )
            )
        return self._read[batch_id]

    def waiting(self) -> frozenset[tuple[str, str]]:
        """The file versions of the open batch and of a sealed one whose run is not recorded."""
        if self._waiting is None:
            pointers = (self._state.get("batch"), self._state.get("sealed"))
            held = [self.of(p.get("id")) for p in pointers if p]
            self._waiting = frozenset().union(
                *(h.versions for h in held if h is not None and not h.recorded)
            )
        return self._waiting


class Swept(Enum):
    """What the sweep made of one listed blob."""

    INGESTED = "ingested"
    """It had not reached a batch (or its batch's run lacks it): ingested now, and looked at
    again by the next sweep."""
    SETTLED = "settled"
    """Its arrival is settled: the listing mark may pass it."""
    PENDING = "pending"
    """Held by a batch that is not a run yet: looked at again by the next sweep."""


@dataclass(eq=False)
class Recovery:
    """The sweep: safe to run anywhere, any time, by several instances at once."""

    _ctx: Context
    _slot: ModelSlot
    _arrivals: Arrivals
    _batches: Batches
    _operations: Operations

    def sweep(self) -> Counts:
        """Re-drive what a lost message or event left behind. Safe to run anywhere, any time.

        An error on one blob or one model is logged and counted (`errors`); the sweep goes on
        with the next blob and the next model.
        """
        counts = {"checks": 0, "runs": 0, "blobs": 0, "scheduled": 0, "restores": 0, "errors": 0}
        now = self._ctx.clock.now()
        for spec in self._ctx.models.values():
            try:
                self._sweep_model(spec, now, counts)
            except Exception:
                counts["errors"] += 1
                log.exception(
                    "sweep of %s stopped; the next sweep tries again",
                    spec.name,
                    extra=dims(spec.name),
                )
        return counts

    def _sweep_model(self, spec: ModelSpec, now: datetime, counts: Counts) -> None:
        ctx = self._ctx
        mkey = model_key(spec.name)
        state = ctx.ledger.get(mkey) or {}
        if self._sweep_blobs(spec, state, now, counts):
            state = ctx.ledger.get(mkey) or {}
        batch = state.get("batch")
        active = state.get("active_run")
        if batch and not active:
            # The pointer alone gives the earliest end; a check that found later arrivals
            # recorded when it looks again.
            due = max(check_due(spec, batch), parse(batch.get("check_at") or batch["opened_at"]))
            if now >= due + ctx.stall and self._claim_sweep(mkey, now):
                ctx.schedule_check(spec, batch, now)
                counts["checks"] += 1
        if active:
            counts["runs"] += self._redrive(spec, active, now)
        champion = state.get("champion")
        if not champion or active:
            return
        counts["restores"] += self._slot.reconcile(spec, champion)
        if (
            spec.retrain_every
            and not batch
            and now >= parse(champion["promoted_at"]) + spec.retrain_every
            and self._claim_sweep(mkey, now)
        ):
            counts["scheduled"] += self._scheduled_retrain(spec, champion, now)

    def _sweep_blobs(self, spec: ModelSpec, state: Doc, now: datetime, counts: Counts) -> int:
        """Ingest the model's blobs that never reached a batch; returns how many it ingested.

        A blob with no arrival record never reached ingest; one whose record names a batch that
        does not hold it lost its delivery between the two writes (and the host's retries ran
        out), or was left out of its run by an instance of an earlier release that sealed the
        batch without reading its log. Either way, ingest it now. Only blobs modified after the
        model's listing mark are looked at: an idle sweep lists the prefix and reads the mark,
        whatever the number of blobs already ingested. The mark is the newest Last-Modified
        seen with every blob up to it settled (its batch is a run that holds it), and never
        later than `stall` ago (a blob committed after the listing cannot carry an older time
        than that). A blob of a batch that is not a run yet, the ones ingested now included,
        is left for a later sweep without a read of its own: the open and sealed batches' files
        are read once per sweep, before any blob (when they cannot be read, no blob is judged
        and the mark stays).
        """
        ctx = self._ctx
        container = ctx.places.data_container
        mark = (ctx.ledger.get(sweep_key(spec.name)) or {}).get("listed_through")
        since = parse(mark) if mark else None
        listed = [
            b
            for b in ctx.data.listing(container, spec.prefix)
            if not since or b.last_modified > since
        ]
        holders = Holders(self._arrivals, spec, state)
        if listed:
            try:
                holders.waiting()
            except Exception:
                counts["errors"] += 1
                log.warning(
                    "sweep: the open batch of %s could not be read; the next sweep tries again",
                    spec.name,
                    exc_info=True,
                    extra=dims(spec.name),
                )
                return 0
        unsettled: list[datetime] = []
        ingested = 0
        for blob in listed:
            try:
                swept = self._sweep_blob(spec, blob, holders)
            except BlobUnreadable as exc:
                counts["errors"] += 1
                self._arrivals.record_unreadable(spec, container, blob.name, exc)
            except Exception:
                counts["errors"] += 1
                unsettled.append(blob.last_modified)
                log.warning(
                    "sweep: %s/%s of %s could not be checked; the next sweep tries again",
                    container,
                    blob.name,
                    spec.name,
                    exc_info=True,
                    extra=dims(spec.name),
                )
            else:
                ingested += swept is Swept.INGESTED
                if swept is not Swept.SETTLED:
                    # Ingested now, or waiting: settled once the run of its batch holds it.
                    unsettled.append(blob.last_modified)
        counts["blobs"] += ingested
        settled = (
            min(unsettled) - timedelta(microseconds=1)
            if unsettled
            else max((b.last_modified for b in listed), default=None)
        )
        self._move_mark(spec, mark, settled, now)
        return ingested

    def _move_mark(
        self, spec: ModelSpec, mark: str | None, settled: datetime | None, now: datetime
    ) -> None:
        """Move the model's listing mark forward to `settled`, never later than `stall` ago."""
        through = min(settled, now - self._ctx.timing.stall) if settled else None
        if through is None or (mark is not None and through <= parse(mark)):
            return
        moved = iso(through)
        self._ctx.ledger.update(
            sweep_key(spec.name),
            lambda d: (
                {**d, "listed_through": moved}
                if not d.get("listed_through") or parse(d["listed_through"]) < through
                else None
            ),
            initial={"model": spec.name},
        )

    def _sweep_blob(self, spec: ModelSpec, blob: Listed, holders: Holders) -> Swept:
        container = self._ctx.places.data_container
        version = (blob.name, normalize_etag(blob.etag))
        if version in holders.waiting():
            return Swept.PENDING
        record = self._ctx.ledger.get(arrival_key(container, blob.name, blob.etag), remember=False)
        if record is not None and record.get("unreadable"):
            # Archived when it arrived: judged again while the listing mark has not passed it
            # (after that, `retrain --blob` or a new upload brings a rehydrated blob in).
            batched = self._arrivals.on_blob(container, blob.name) == "batched"
            return Swept.INGESTED if batched else Swept.SETTLED
        if record is not None and record.get("status") != Arrival.ACCEPTED:
            return Swept.SETTLED
        if record is not None:
            held = holders.of(record["batch_id"])
            if held is not None and version in held.versions:
                # Settled only once its batch is a run that holds it.
                return Swept.SETTLED if held.recorded else Swept.PENDING
        self._arrivals.on_blob(container, blob.name)
        return Swept.INGESTED

    def _scheduled_retrain(self, spec: ModelSpec, champion: Doc, now: datetime) -> int:
        """Start the retrain `retrain_every` asks for when there is data no run has trained;
        otherwise say why not (a file that cannot be trained on is also an event)."""
        ledger = self._ctx.ledger
        try:
            self._operations.request(
                spec.name, reason=f"scheduled: champion older than {spec.retrain_every}"
            )
        except AlreadyTrained as exc:
            log.info(
                "sweep: scheduled retrain of %s did not fire: no new data (the newest file was "
                "trained by run %s)",
                spec.name,
                exc.run_id,
                extra=dims(spec.name, exc.run_id),
            )
            return 0
        except InputRejected as exc:
            reason = f"scheduled retrain skipped: {exc}"
            log.warning("sweep: %s: %s", spec.name, reason, extra=dims(spec.name))
            _, changed = ledger.update(
                sweep_key(spec.name),
                lambda d: (
                    {**d, "schedule_skipped": reason}
                    if d.get("schedule_skipped") != reason
                    else None
                ),
                initial={"model": spec.name},
            )
            if changed:  # once per reason, not every sweep period
                skipped = {"run_id": champion["run_id"], "state": SCHEDULE_SKIPPED}
                self._ctx.emit(spec, {**skipped, "updated_at": iso(now)}, reason)
            return 0
        ledger.update(
            sweep_key(spec.name),
            lambda d: {**d, "schedule_skipped": None} if d.get("schedule_skipped") else None,
            initial={"model": spec.name},
        )
        return 1

    def _claim_sweep(self, key: str, now: datetime) -> bool:
        """Only one of several concurrent sweeps acts on a document per stall period."""
        stall = self._ctx.timing.stall

        def claim(d: Doc) -> Doc | None:
            last = d.get("swept_at")
            if last and now < parse(last) + stall:
                return None
            d["swept_at"] = iso(now)
            return d

        _, claimed = self._ctx.ledger.update(key, claim)
        return claimed

    def _redrive(self, spec: ModelSpec, run_id: str, now: datetime) -> int:
        """Send the message of the model's active run again when it stood still too long."""
        ctx = self._ctx
        key = run_key(spec.name, run_id)
        run = ctx.ledger.get(key)
        if run is None:
            return self._repair_claim(spec, run_id, now)
        if is_terminal(run["state"]) or run["state"] == RunState.AWAITING_APPROVAL:
            self._slot.release(spec, run_id)
            return 0
        deployment = run.get("deployment") or {}
        moments = [
            run.get("updated_at") or run["created_at"],
            run.get("polled_at"),
            deployment.get("polled_at"),
            deployment.get("started_at"),
            run.get("swept_at"),
        ]
        last = max(parse(m) for m in moments if m)
        if now < last + ctx.stall or not self._claim_sweep(key, now):
            return 0
        if run["state"] in TRAINING:
            message: BaseModel = TrackRun(
                model=spec.name,
                run_id=run_id,
                poll=run.get("polls", 0) + 1,
                start=(run.get("start") or {}).get("claim"),
            )
            queue = ctx.places.jobs_queue
        else:
            message = EvaluateRun(
                model=spec.name,
                run_id=run_id,
                poll=deployment.get("polls", 0) + 1 if deployment else 0,
            )
            queue = ctx.places.evaluations_queue
        # "Stalled" is judged on this instance's clock against times others wrote: a chain
        # that is alive may have just polled, or a start may be on its way to the service. The
        # re-sent message keeps the chain's pace (its status call comes at least a second after
        # any other) and, for a job that may be starting, waits until that start must have
        # landed: it carries the start claim it saw and takes over only if that claim is still
        # there one start lease later.
        delay = max(ctx.timing.first_delay, 2 * MIN_POLL_GAP)
        if run["state"] == RunState.SUBMITTED:
            delay = max(delay, ctx.timing.start_lease)
        log.warning(
            "sweep: run %s of %s stalled in %s since %s; re-driven in %s",
            run_id,
            spec.name,
            run["state"],
            last.isoformat(),
            delay,
            extra=dims(spec.name, run_id),
        )
        ctx.outbox.send(queue, message, delay=delay)
        return 1

    def _repair_claim(self, spec: ModelSpec, run_id: str, now: datetime) -> int:
        """The model's active run has no record: its writer died between claiming the model
        and recording the run. A sealed batch gets its run recorded now; any other claim (a
        rollback's) is freed. Only after a stall, so a writer still at work is left alone."""
        ctx = self._ctx
        state = ctx.ledger.get(model_key(spec.name)) or {}
        since = state.get("active_since")
        if state.get("active_run") != run_id or (since and now < parse(since) + ctx.stall):
            return 0
        if not self._claim_sweep(model_key(spec.name), now):
            return 0
        sealed = state.get("sealed") or {}
        if sealed.get("id") == run_id:
            log.warning(
                "sweep: batch %s of %s was sealed but its run never recorded; recording it",
                run_id,
                spec.name,
                extra=dims(spec.name, run_id),
            )
            self._batches.start_run(spec, sealed, now)
            return 1
        owed = ctx.ledger.get(run_key(spec.name, run_id.removeprefix("restore-")), remember=False)
        if run_id.startswith("restore-") and owed is not None and owed.get("restore_pending"):
            log.warning(
                "sweep: restore run %s of %s was never recorded; making it again",
                run_id,
                spec.name,
                extra=dims(spec.name, run_id),
            )
            self._slot.restore(spec, owed)
            return 1
        log.warning(
            "sweep: %s held %s without a run record since %s; freed",
            run_id,
            spec.name,
            since or "before records kept the time",
            extra=dims(spec.name, run_id),
        )
        self._slot.release(spec, run_id)
        return 1
