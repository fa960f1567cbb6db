"""Run states and the one table of moves between them; no other module spells a state."""

from __future__ import annotations

from enum import StrEnum
from typing import Final

from retrain.errors import IllegalTransition


class RunState(StrEnum):
    """Where a run is. String-valued: documents and events carry the plain value."""

    QUEUED = "queued"
    SUBMITTED = "submitted"
    RUNNING = "running"
    TRAINED = "trained"
    AWAITING_APPROVAL = "awaiting_approval"
    PROMOTING = "promoting"
    PROMOTED = "promoted"
    REJECTED = "rejected"
    FAILED = "failed"
    SUPERSEDED = "superseded"


TERMINAL: Final = frozenset(
    {RunState.PROMOTED, RunState.REJECTED, RunState.FAILED, RunState.SUPERSEDED}
)
"""States a run never leaves on its own (only a replayed poison message revives a failed run)."""

TRAINING: Final = frozenset({RunState.QUEUED, RunState.SUBMITTED, RunState.RUNNING})
"""States the train step (the jobs queue) drives; the others belong to the evaluations queue."""

INITIAL: Final = frozenset({RunState.QUEUED, RunState.PROMOTING, RunState.SUPERSEDED})
"""What a new record starts in: a sealed batch's run queues; a rollback or restore promotes; a
batch sealed with no file (each arrival that claimed it joined another batch) ends at once."""

_LIVE = frozenset(RunState) - TERMINAL

TRANSITIONS: Final[dict[RunState, frozenset[RunState]]] = {
    RunState.QUEUED: frozenset({RunState.SUBMITTED, RunState.FAILED}),
    RunState.SUBMITTED: frozenset({RunState.RUNNING, RunState.FAILED}),
    RunState.RUNNING: frozenset({RunState.TRAINED, RunState.FAILED}),
    RunState.TRAINED: frozenset(
        {RunState.REJECTED, RunState.AWAITING_APPROVAL, RunState.PROMOTING, RunState.FAILED}
    ),
    RunState.AWAITING_APPROVAL: frozenset(
        {RunState.PROMOTING, RunState.REJECTED, RunState.SUPERSEDED, RunState.FAILED}
    ),
    RunState.PROMOTING: frozenset({RunState.PROMOTED, RunState.SUPERSEDED, RunState.FAILED}),
    RunState.PROMOTED: frozenset(),
    RunState.REJECTED: frozenset(),
    # Replaying a poisoned message puts its run back where the message found it.
    RunState.FAILED: _LIVE,
    RunState.SUPERSEDED: frozenset(),
}
"""Every allowed move: from a state to the states it may go to next."""

SCHEDULE_SKIPPED: Final = "schedule_skipped"
"""The state an event reports when a scheduled retrain did not start; no run is ever in it."""


def check_move(current: str, target: str) -> RunState:
    """The target state, if the table allows a run in `current` to go there; else raises."""
    try:
        source, goal = RunState(current), RunState(target)
    except ValueError as exc:
        raise IllegalTransition(f"no such run state: {exc}") from None
    if goal not in TRANSITIONS[source]:
        raise IllegalTransition(f"a run cannot move from {source.value} to {goal.value}")
    return goal


def is_terminal(state: str) -> bool:
    """Whether a run in `state` has ended."""
    return state in TERMINAL
