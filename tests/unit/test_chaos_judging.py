"""The chaos harness judges an exception that escaped a function by its kind, not its name."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from localdev.chaos import Result, judge_exception
from localdev.chaosworker import FunctionErrors, Report, error_kind
from retrain.errors import (
    ConfigError,
    IllegalTransition,
    InputRejected,
    PermanentRemoteError,
    StateConflict,
    TransientRemoteError,
)
from retrain.storage import BlobUnreadable


@pytest.mark.parametrize(
    ("error", "kind"),
    [
        (TransientRemoteError("GET x: HTTP 503", status=503), "transient"),
        (StateConflict("runs/a changed since it was read"), "transient"),
        (PermanentRemoteError("PATCH x: HTTP 400", status=400), "permanent"),
        (BlobUnreadable("archived", etag="e", size=1), "permanent"),
        (IllegalTransition("trained -> queued"), "permanent"),
        (ConfigError("RETRAIN_MODELS is not set"), "usage"),
        (InputRejected("no such run"), "usage"),
        (KeyError("state"), "unexpected"),
        (RuntimeError("boom"), "unexpected"),
    ],
)
def test_the_worker_records_what_the_caller_must_do(error: Exception, kind: str) -> None:
    assert error_kind(error) == kind


def test_the_worker_reports_a_function_error_with_its_kind(tmp_path: Path) -> None:
    path = tmp_path / "worker.jsonl"
    error = StateConflict("runs/a changed since it was read")
    record = logging.LogRecord(
        "runner",
        logging.ERROR,
        __file__,
        1,
        "function %s failed on %s",
        ("on_track_run", "a message"),
        (StateConflict, error, None),
    )
    FunctionErrors(Report(path)).emit(record)
    (line,) = path.read_text(encoding="utf-8").splitlines()
    assert json.loads(line) == {
        "event": "exception",
        "function": "on_track_run",
        "type": "retrain.errors.StateConflict",
        "kind": "transient",
        "message": "runs/a changed since it was read",
    }


def event(kind: str, type_: str) -> dict[str, str]:
    return {
        "event": "exception",
        "function": "on_track_run",
        "type": type_,
        "kind": kind,
        "message": "what happened",
    }


def test_transient_errors_are_counted_not_violations() -> None:
    result = Result(seed=1, faults=[])
    judge_exception(result, event("transient", "retrain.errors.TransientRemoteError"))
    judge_exception(result, event("transient", "retrain.errors.StateConflict"))
    judge_exception(result, event("transient", "retrain.errors.StateConflict"))
    assert result.total == 0
    assert result.exceptions == {
        "transient TransientRemoteError": 1,
        "transient StateConflict": 2,
    }


@pytest.mark.parametrize(
    ("kind", "type_"),
    [
        ("permanent", "retrain.errors.PermanentRemoteError"),
        ("usage", "retrain.errors.ConfigError"),
        ("unexpected", "builtins.KeyError"),
    ],
)
def test_any_other_kind_that_escapes_a_function_is_a_violation(kind: str, type_: str) -> None:
    result = Result(seed=1, faults=[])
    judge_exception(result, event(kind, type_))
    assert result.violations == {f"{kind} exception escaped": 1}
    assert result.details == [f"{kind} exception escaped: on_track_run: {type_}: what happened"]
