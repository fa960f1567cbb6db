"""The one place that moves a run: checks the state table, records the history, emits the event."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from retrain.http import redact
from retrain.ledger import Doc, run_key
from retrain.pipeline.context import Context, Delivery, delivery_doc, dims, is_redelivery
from retrain.pipeline.records import iso
from retrain.pipeline.slot import ModelSlot
from retrain.runstate import RunState, check_move, is_terminal
from retrain.settings import ModelSpec

log = logging.getLogger(__name__)


def advance(
    doc: Doc, expected: str, state: str, now: datetime, *, note: str, **fields: Any
) -> Doc | None:
    """Move run document `doc` from `expected` to `state`, a move the state table must allow;
    None when the run is no longer in `expected` (another delivery moved it first)."""
    goal = check_move(expected, state)
    if doc["state"] != expected:
        return None
    if isinstance(fields.get("error"), str):
        fields["error"] = redact(fields["error"])
    doc.update(fields)
    doc["state"] = goal.value
    doc["updated_at"] = iso(now)
    doc["history"].append({"state": goal.value, "at": iso(now), "note": redact(note)})
    return doc


class RunMover:
    """Moves runs between states with conditional writes, and fails them with a reason."""

    def __init__(self, ctx: Context, slot: ModelSlot) -> None:
        self._ctx = ctx
        self._slot = slot

    def move(
        self,
        spec: ModelSpec,
        run_id: str,
        expected: str,
        state: str,
        now: datetime,
        *,
        note: str,
        guard: Callable[[Doc], bool] | None = None,
        announce: bool = True,
        **fields: Any,
    ) -> tuple[Doc, bool]:
        """One state transition, applied only from `expected` (and only where `guard` holds);
        announced as an event unless `announce` is False. A move the state table does not
        allow raises IllegalTransition."""

        def apply(d: Doc) -> Doc | None:
            if guard is not None and not guard(d):
                return None
            return advance(d, expected, state, now, note=note, **fields)

        doc, changed = self._ctx.ledger.update(run_key(spec.name, run_id), apply)
        if changed and announce:
            self._ctx.emit(spec, doc, note)
        return doc, changed

    def fail(self, spec: ModelSpec, run: Doc, reason: str, **fields: Any) -> str:
        """Fail the run (from whatever live state it is in) with `reason`, then free the model."""
        ctx = self._ctx
        now = ctx.clock.now()
        reason = redact(reason)
        log.error(
            "run %s of %s failed: %s",
            run["run_id"],
            spec.name,
            reason,
            extra=dims(spec.name, run["run_id"], run.get("job_id")),
        )

        def fail(d: Doc) -> Doc | None:
            if is_terminal(d["state"]):
                return None
            # A promotion that got as far as its deploy claim may have changed the target: the
            # restore check is owed, recorded in this same write so no crash can lose it.
            owed = d["state"] == RunState.PROMOTING and bool(
                d.get("deployment") or d.get("deploy_tried")
            )
            extra = {"restore_pending": True} if owed else {}
            return advance(
                d, d["state"], RunState.FAILED, now, note=reason, error=reason, **fields, **extra
            )

        doc, changed = ctx.ledger.update(run_key(spec.name, run["run_id"]), fail)
        if changed:
            ctx.emit(spec, doc, reason)
            if doc["history"][-2]["state"] == RunState.AWAITING_APPROVAL:
                self._slot.unpark(spec.name, run["run_id"])  # it no longer waits for anyone
        self._slot.release(spec, run["run_id"])
        return RunState.FAILED.value

    def claim_poll(
        self,
        key: str,
        section: str | None,
        poll: int,
        delivery: Delivery | None,
        *,
        also: Callable[[Doc, bool], bool] | None = None,
    ) -> str:
        """Claim poll number `poll` of the run's chain for this delivery: "first", "again"
        (a redelivery, a later attempt of the very message that claimed it, after a failure),
        or "" (refused: a duplicate or stale copy; one chain per run, whatever the copies).

        `also`, given the run and whether the claim is a redelivery's, is a further condition
        checked in the same conditional write; it may add to the run what the claim takes."""
        mine = delivery_doc(delivery)
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
            # A claim of this very attempt whose answer was lost is known by the ledger (its
            # write id): here, the same delivery again is a copy, and a copy is refused.
            if again and not is_redelivery(mine, holder.get("poll_by")):
                return None
            if also is not None and not also(d, again):
                return None
            holder["polls"] = poll
            holder["poll_by"] = mine
            holder["polled_at"] = iso(self._ctx.clock.now())
            return d

        _, claimed = self._ctx.ledger.update(key, claim)
        return ("again" if again else "first") if claimed else ""


@dataclass(eq=False)
class RunStep:
    """A step that moves runs: it works with the shared context, the run mover and the model's
    slot. A step that needs more adds fields of its own, after these three."""

    _ctx: Context
    _runs: RunMover
    _slot: ModelSlot

    def live_run(self, spec: ModelSpec, run_id: str) -> Doc | str:
        """The run a message is about, or what the step answers when it has nothing to do:
        'unknown' for a run that does not exist, the state of one that ended (and the model
        is released: a run that ended holds it no longer)."""
        run = self._ctx.ledger.get(run_key(spec.name, run_id))
        if run is None:
            log.warning("run %s of %s does not exist; message dropped", run_id, spec.name)
            return "unknown"
        if is_terminal(run["state"]):
            self._slot.release(spec, run_id)
            return str(run["state"])
        return run
