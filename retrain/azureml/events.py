"""Azure ML's Event Grid events for jobs: which run's job a completion event announces.

Azure ML publishes `Microsoft.MachineLearningServices.RunCompleted` when a run completes
successfully and `RunStatusChanged` (with `data.runStatus`) on every status change. `topic` is
the workspace's ARM id, `data.runId` the run's id and `data.runTags` its tags. Unconfirmed: that
a v2 job's name is its `runId` and its `properties.tags` are its `runTags` (the event schema is
documented with an SDK v1 run). The safe reading: an event that does not name a job this app
submitted, with both of the tags it sets, is skipped, and the job's poll chain (kept as the
fallback) finds the end.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

RUN_COMPLETED = "Microsoft.MachineLearningServices.RunCompleted"
RUN_STATUS_CHANGED = "Microsoft.MachineLearningServices.RunStatusChanged"
MODEL_TAG = "retrain.model"
RUN_TAG = "retrain.batch"
"""The tags every job the app submits carries (see `retrain.azureml.template.build_job`)."""


@dataclass(frozen=True)
class JobCompleted:
    """A completion event of a job the app submitted."""

    workspace: str
    """The event's topic: the ARM id of the workspace that ran the job."""
    job: str
    model: str
    run_id: str


def job_completed(event_type: str, topic: str | None, data: Any) -> JobCompleted | None:
    """The job a completion event announces, or None when the event is something else (another
    type or status, not a job of this app, a shape this reader does not know)."""
    if event_type == RUN_STATUS_CHANGED:
        status = data.get("runStatus") if isinstance(data, dict) else None
        if not isinstance(status, str) or status.casefold() != "completed":
            return None
    elif event_type != RUN_COMPLETED:
        return None
    if not isinstance(data, dict) or not topic:
        return None
    job, tags = data.get("runId"), data.get("runTags")
    if not isinstance(job, str) or not job or not isinstance(tags, dict):
        return None
    model, run_id = tags.get(MODEL_TAG), tags.get(RUN_TAG)
    if not isinstance(model, str) or not isinstance(run_id, str) or not model or not run_id:
        return None
    return JobCompleted(workspace=topic, job=job, model=model, run_id=run_id)
