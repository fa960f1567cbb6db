"""The run-state table, and the one function that moves a run document by it."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import pytest

from retrain.errors import IllegalTransition
from retrain.pipeline.runs import advance
from retrain.runstate import INITIAL, TERMINAL, TRANSITIONS, RunState, check_move, is_terminal

NOW = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)

# A run record as main wrote it before states were an enum (trimmed to the fields a move uses).
STORED_RUN = """{
  "run_id": "20260101T000000-abcdef", "model": "housing", "state": "trained",
  "created_at": "2026-01-01T00:00:00+00:00", "updated_at": "2026-01-01T00:10:00+00:00",
  "history": [
    {"state": "queued", "at": "2026-01-01T00:00:00+00:00", "note": "batch of 1 file(s)"},
    {"state": "submitted", "at": "2026-01-01T00:01:00+00:00", "note": "job j1 submitted"},
    {"state": "running", "at": "2026-01-01T00:01:00+00:00", "note": "job j1 started"},
    {"state": "trained", "at": "2026-01-01T00:10:00+00:00", "note": "BES job finished"}
  ]
}"""


class TestTable:
    def test_states_keep_the_strings_documents_were_written_with(self) -> None:
        assert [s.value for s in RunState] == [
            "queued",
            "submitted",
            "running",
            "trained",
            "awaiting_approval",
            "promoting",
            "promoted",
            "rejected",
            "failed",
            "superseded",
        ]
        assert json.dumps({"state": RunState.AWAITING_APPROVAL}) == '{"state": "awaiting_approval"}'
        assert f"{RunState.PROMOTED}" == "promoted"

    def test_every_state_has_a_row(self) -> None:
        assert set(TRANSITIONS) == set(RunState)

    def test_only_a_failed_run_leaves_an_end_state_and_only_to_a_live_one(self) -> None:
        """A replayed poison message revives its failed run; nothing else leaves an end."""
        for state in TERMINAL - {RunState.FAILED}:
            assert TRANSITIONS[state] == frozenset()
        assert not TRANSITIONS[RunState.FAILED] & TERMINAL
        assert TRANSITIONS[RunState.FAILED] == frozenset(RunState) - TERMINAL

    def test_every_live_state_can_fail(self) -> None:
        for state in frozenset(RunState) - TERMINAL:
            assert RunState.FAILED in TRANSITIONS[state]

    def test_every_state_is_reachable_from_a_new_record(self) -> None:
        seen, todo = set(INITIAL), list(INITIAL)
        while todo:
            for nxt in TRANSITIONS[todo.pop()]:
                if nxt not in seen:
                    seen.add(nxt)
                    todo.append(nxt)
        assert seen == set(RunState)

    @pytest.mark.parametrize(
        ("current", "target"),
        [
            ("queued", "promoted"),
            ("running", "promoting"),
            ("trained", "submitted"),
            ("promoted", "failed"),
            ("rejected", "promoting"),
            ("superseded", "promoted"),
            ("failed", "promoted"),
        ],
    )
    def test_a_move_outside_the_table_is_refused(self, current: str, target: str) -> None:
        with pytest.raises(IllegalTransition, match=f"from {current} to {target}"):
            check_move(current, target)

    def test_an_unknown_state_is_refused(self) -> None:
        with pytest.raises(IllegalTransition, match="no such run state"):
            check_move("queued", "paused")

    def test_terminal_is_answered_for_plain_strings(self) -> None:
        assert is_terminal("promoted")
        assert not is_terminal("promoting")


class TestAdvance:
    def test_a_run_written_before_the_enum_moves_and_stays_plain_json(self) -> None:
        doc = json.loads(STORED_RUN)
        assert doc["state"] == RunState.TRAINED
        moved = advance(doc, RunState.TRAINED, RunState.PROMOTING, NOW, note="passes the gate")
        assert moved is not None
        assert type(moved["state"]) is str
        assert moved["state"] == "promoting"
        assert moved["history"][-1] == {
            "state": "promoting",
            "at": NOW.isoformat(),
            "note": "passes the gate",
        }
        assert json.loads(json.dumps(moved)) == moved

    def test_a_run_no_longer_in_the_expected_state_is_left_alone(self) -> None:
        doc = json.loads(STORED_RUN)
        assert advance(doc, RunState.RUNNING, RunState.TRAINED, NOW, note="x") is None
        assert doc == json.loads(STORED_RUN)

    def test_a_move_the_table_refuses_raises_before_it_changes_anything(self) -> None:
        doc = json.loads(STORED_RUN)
        with pytest.raises(IllegalTransition):
            advance(doc, RunState.TRAINED, RunState.PROMOTED, NOW, note="skips promoting")
        assert doc == json.loads(STORED_RUN)


# The same words where they are not a run's state, each with what it is instead.
NOT_RUN_STATES = {
    ("retrain/pipeline/arrivals.py", "rejected"): "an arrival's status (Arrival.REJECTED)",
    ("retrain/pipeline/gate.py", "awaiting_approval"): "the model document's parked-run field",
    ("retrain/pipeline/slot.py", "awaiting_approval"): "the model document's parked-run field",
    ("retrain/pipeline/poison.py", "awaiting_approval"): "the model document's parked-run field",
    ("retrain/pipeline/promotion.py", "failed"): "a target's Progress.state",
    (
        "retrain/pipeline/promotion.py",
        "superseded",
    ): "on_evaluate's answer when another run's hold keeps a promoted run from the crown",
    ("retrain/deploy.py", "failed"): "a target's Progress.state",
    ("retrain/arm.py", "failed"): "an ARM provisioning state, and the Progress it maps to",
    ("retrain/ports.py", "running"): "a training job's Phase",
    ("retrain/ports.py", "failed"): "a training job's Phase",
    ("retrain/azureml/lro.py", "failed"): "an operation's Progress.state",
    ("retrain/targets/online_endpoint.py", "failed"): "a target's Progress.state",
    ("retrain/pipeline/canary.py", "failed"): "a target's Progress.state",
}


def test_no_run_state_is_spelled_outside_the_table() -> None:
    import ast
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    values = {s.value for s in RunState}
    found = set()
    for path in sorted((root / "retrain").rglob("*.py")):
        module = path.relative_to(root).as_posix()
        if module == "retrain/runstate.py":
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Constant) and node.value in values:
                found.add((module, node.value))
    assert found <= set(NOT_RUN_STATES), sorted(found - set(NOT_RUN_STATES))
