"""Queue messages are versioned contracts."""

from __future__ import annotations

import json

import pytest

from retrain.errors import MessageError
from retrain.messages import CheckBatch, TrackRun, parse_evaluation, parse_event, parse_jobs


def test_round_trip() -> None:
    msg = TrackRun(model="housing", run_id="r1", poll=3)
    assert parse_jobs(msg.model_dump_json()) == msg
    check = CheckBatch(model="housing", batch_id="b", arrivals=2)
    assert parse_jobs(check.model_dump_json().encode()) == check


def test_evaluation_queue_rejects_a_jobs_message() -> None:
    with pytest.raises(MessageError, match="not an evaluations-queue message"):
        parse_evaluation(TrackRun(model="m", run_id="r").model_dump_json())


def test_ids_the_app_makes_are_accepted() -> None:
    from datetime import UTC, datetime

    from retrain.pipeline.records import batch_id as _batch_id

    now = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    for run_id in (_batch_id(now), f"rollback-{_batch_id(now)}"):
        assert parse_jobs(TrackRun(model="housing", run_id=run_id).model_dump_json()).run_id == (
            run_id
        )
        check = CheckBatch(model="housing", batch_id=run_id, arrivals=3)
        assert parse_jobs(check.model_dump_json()) == check


@pytest.mark.parametrize(
    "run_id",
    [
        "../../models/housing",
        "..",
        "a/b",
        "a..b",
        ".hidden",
        "-leading-dash",
        "a b",
        "a\\nb",
        "x" * 65,
        "",
        "run%2F1",
    ],
)
def test_run_and_batch_ids_that_could_name_another_document_are_refused(run_id: str) -> None:
    for body in (
        {"version": 1, "kind": "track-run", "model": "housing", "run_id": run_id},
        {
            "version": 1,
            "kind": "check-batch",
            "model": "housing",
            "batch_id": run_id,
            "arrivals": 1,
        },
    ):
        with pytest.raises(MessageError, match=r"should match pattern"):
            parse_jobs(json.dumps(body))
    with pytest.raises(MessageError, match="run_id"):
        parse_evaluation(
            json.dumps({"version": 1, "kind": "evaluate-run", "model": "housing", "run_id": run_id})
        )


def test_counters_are_bounded() -> None:
    with pytest.raises(MessageError, match="poll: Input should be less than or equal"):
        parse_jobs('{"version":1,"kind":"track-run","model":"m","run_id":"r","poll":1e12}')
    with pytest.raises(MessageError, match="arrivals: Input should be less than or equal"):
        parse_jobs('{"version":1,"kind":"check-batch","model":"m","batch_id":"b","arrivals":1e12}')


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("run_id", "../x"),
        ("state", "Promoted; rm -rf"),
        ("at", "yesterday"),
        ("job_id", "../jobs"),
        ("reason", "x" * 2001),
    ],
)
def test_event_fields_have_patterns(field: str, value: str) -> None:
    event = {
        "version": 1,
        "kind": "run-event",
        "model": "housing",
        "run_id": "20260102T030405-abcdef",
        "state": "promoted",
        "reason": "better",
        "at": "2026-01-02T03:04:05.123456+00:00",
        "job_id": "0123abcd",
    }
    assert parse_event(json.dumps(event)).state == "promoted"
    with pytest.raises(MessageError, match=field):
        parse_event(json.dumps(event | {field: value}))


def test_a_track_message_without_a_start_claim_has_only_the_keys_an_older_release_reads() -> None:
    """Messages reject unknown fields, so during a rolling upgrade an older instance can read a
    track message from a newer one only if it carries no key the older release lacks."""
    plain = json.loads(TrackRun(model="housing", run_id="r1", poll=3).model_dump_json())
    assert set(plain) == {"version", "model", "kind", "run_id", "poll"}
    claimed = TrackRun(model="housing", run_id="r1", poll=3, start="0123456789abcdef")
    assert parse_jobs(claimed.model_dump_json()) == claimed
