"""Queue messages are versioned contracts."""

from __future__ import annotations

import pytest

from retrain.errors import MessageError
from retrain.messages import CheckBatch, TrackRun, parse_evaluation, parse_jobs


def test_round_trip() -> None:
    msg = TrackRun(model="housing", run_id="r1", poll=3)
    assert parse_jobs(msg.model_dump_json()) == msg
    check = CheckBatch(model="housing", batch_id="b", arrivals=2)
    assert parse_jobs(check.model_dump_json().encode()) == check


def test_evaluation_queue_rejects_a_jobs_message() -> None:
    with pytest.raises(MessageError, match="not an evaluations-queue message"):
        parse_evaluation(TrackRun(model="m", run_id="r").model_dump_json())
