"""Reading Azure ML's Event Grid events: which events announce a completed job of this app."""

from __future__ import annotations

from typing import Any

import pytest

from localdev.sample import housing_csv
from retrain.azureml.events import RUN_COMPLETED, RUN_STATUS_CHANGED, JobCompleted, job_completed
from tests.harness import World

WS = (
    "/subscriptions/sub1/resourceGroups/rg1"
    "/providers/Microsoft.MachineLearningServices/workspaces/ws1"
)
TAGS = {"retrain.model": "housing", "retrain.batch": "20261206T120000-abc123", "team": "x"}


def data(**changes: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "experimentId": "0fa9dfaa-cba3-4fa7-b590-23e48548f5c1",
        "experimentName": "retrain",
        "runId": "retrain-housing-20261206t120000-abc123-0a045e8cfe",
        "runType": None,
        "runTags": TAGS,
        "runProperties": {},
    }
    base.update(changes)
    return base


def test_a_run_completed_event_names_the_job_and_the_run_its_tags_name() -> None:
    assert job_completed(RUN_COMPLETED, WS, data()) == JobCompleted(
        workspace=WS,
        job="retrain-housing-20261206t120000-abc123-0a045e8cfe",
        model="housing",
        run_id="20261206T120000-abc123",
    )


@pytest.mark.parametrize("status", ["Completed", "completed"])
def test_a_status_change_to_completed_counts_too(status: str) -> None:
    found = job_completed(RUN_STATUS_CHANGED, WS, data(runStatus=status))
    assert found is not None
    assert found.run_id == "20261206T120000-abc123"


@pytest.mark.parametrize(
    ("event_type", "changes"),
    [
        (RUN_STATUS_CHANGED, {"runStatus": "Failed"}),  # the polls read why it failed
        (RUN_STATUS_CHANGED, {"runStatus": "Running"}),
        (RUN_STATUS_CHANGED, {}),
        ("Microsoft.MachineLearningServices.ModelRegistered", {}),
        ("Microsoft.Storage.BlobCreated", {}),
        (RUN_COMPLETED, {"runTags": {}}),  # not a job this app submitted
        (RUN_COMPLETED, {"runTags": {"retrain.model": "housing"}}),
        (RUN_COMPLETED, {"runTags": None}),
        (RUN_COMPLETED, {"runId": ""}),
        (RUN_COMPLETED, {"runId": 7}),
    ],
)
def test_anything_else_is_not_a_completion(event_type: str, changes: dict[str, Any]) -> None:
    assert job_completed(event_type, WS, data(**changes)) is None


def test_an_event_without_a_topic_or_data_object_is_not_a_completion() -> None:
    assert job_completed(RUN_COMPLETED, None, data()) is None
    assert job_completed(RUN_COMPLETED, WS, ["not", "an", "object"]) is None


def test_an_event_for_a_model_not_trained_on_azure_ml_changes_nothing() -> None:
    w = World()  # housing trains on BES
    w.drop("housing/a.csv", housing_csv(10, seed=1))
    for _ in range(2):
        w.deliver()
    run = w.run()
    assert run["state"] == "running"
    event = JobCompleted(workspace=WS, job=run["job_id"], model="housing", run_id=run["run_id"])
    assert w.retrainer.on_job_completed(event) == "skipped"
    unknown = JobCompleted(workspace=WS, job=run["job_id"], model="other", run_id=run["run_id"])
    assert w.retrainer.on_job_completed(unknown) == "skipped"
    assert w.run()["state"] == "running"
