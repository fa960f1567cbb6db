"""The Azure ML v2 training backend: the job it PUTs for a run, its states, its result."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

import pytest
import responses
from responses import matchers

from retrain.azureml.jobs import job_name
from retrain.azureml.registry import model_version
from retrain.azureml.spec import AzureMLSpec
from retrain.backends.azureml import AzureMLTraining
from retrain.errors import EvaluationError
from retrain.ports import ModelRef, Phase, TrainingRequest
from tests.azureml_support import API, WS, WS_PATH, arm

RUN = "20261203T100000-abc123"
JOB = job_name("housing", RUN)
TRACKING = "azureml://westeurope.api.azureml.ms/mlflow/v1.0" + WS_PATH
MLFLOW = "https://westeurope.api.azureml.ms/mlflow/v1.0" + WS_PATH + "/api/2.0/mlflow"
VERSION = model_version(RUN)
TEMPLATE: dict[str, Any] = {
    "properties": {
        "jobType": "Command",
        "command": "python train.py $[[--champion ${{inputs.champion}}]]",
        "environmentId": WS_PATH + "/environments/train/versions/1",
        "inputs": {
            "data": {"jobInputType": "uri_file", "uri": "{retrain.training_data}"},
            "champion": {"jobInputType": "custom_model", "uri": "{retrain.champion_model}"},
        },
        "outputs": {"model": {"jobOutputType": "uri_folder", "uri": "{retrain.model_output}"}},
    }
}
OUTPUT = f"azureml://datastores/retrain/paths/housing/{RUN}/model/"


def backend() -> AzureMLTraining:
    spec = AzureMLSpec(
        kind="azureml",
        subscription_id="sub",
        resource_group="rg",
        workspace="ws",
        job_template=TEMPLATE,
        datastore="retrain",
        model_name="housing",
        metrics={"Root Mean Squared Error": {"challenger": "rmse", "champion": "champion_rmse"}},
    )
    return AzureMLTraining(arm(), spec)


def request(champion: ModelRef | None = None) -> TrainingRequest:
    return TrainingRequest(
        model="housing",
        run_id=RUN,
        input_container="artifacts",
        input_name=f"housing/{RUN}/input.csv",
        output_container="artifacts",
        output_folder=f"housing/{RUN}",
        deadline=datetime(2026, 12, 3, 16, tzinfo=UTC),
        champion=champion,
    )


def job(status: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
    props = {**(body or {}).get("properties", {}), "status": status}
    return {"name": JOB, "properties": props}


def put_job() -> list[dict[str, Any]]:
    sent: list[dict[str, Any]] = []

    def answer(req: Any) -> tuple[int, dict[str, str], str]:
        body = json.loads(req.body)
        sent.append(body)
        return 201, {}, json.dumps(job("NotStarted", body))

    responses.add_callback("PUT", f"{WS}/jobs/{JOB}", callback=answer)
    return sent


class TestSubmit:
    @responses.activate
    def test_the_job_reads_the_frozen_input_and_scores_the_registered_champion(self) -> None:
        sent = put_job()
        champion = ModelRef.registered("housing", "7")
        assert backend().submit(request(champion)) == JOB
        inputs = sent[0]["properties"]["inputs"]
        assert (
            inputs["data"]["uri"] == f"azureml://datastores/retrain/paths/housing/{RUN}/input.csv"
        )
        assert inputs["champion"]["uri"] == WS_PATH + "/models/housing/versions/7"
        assert sent[0]["properties"]["outputs"]["model"]["uri"] == OUTPUT
        assert sent[0]["properties"]["tags"]["retrain.batch"] == RUN

    @responses.activate
    def test_without_a_registered_champion_the_champion_input_is_left_out(self) -> None:
        sent = put_job()
        backend().submit(request(ModelRef("artifacts", "old/model.ilearner")))
        backend().submit(request())
        assert all("champion" not in body["properties"]["inputs"] for body in sent)
        assert sent[0] == sent[1]  # the same name and body: a redelivery creates nothing new


class TestStatus:
    @responses.activate
    @pytest.mark.parametrize(
        ("status", "phase"),
        [
            ("Queued", Phase.NOT_STARTED),
            ("Running", Phase.RUNNING),
            ("Completed", Phase.FINISHED),
            ("NotResponding", Phase.RUNNING),
        ],
    )
    def test_v2_states_map_to_the_pipelines(self, status: str, phase: Phase) -> None:
        responses.get(f"{WS}/jobs/{JOB}", json=job(status))
        found = backend().status(JOB)
        assert (found.phase, found.state) == (phase, status)
        assert ("may recover" in (found.details or "")) == (status == "NotResponding")

    @responses.activate
    def test_a_failed_job_says_why_from_run_history(self) -> None:
        responses.get(f"{WS}/jobs/{JOB}", json=job("Failed"))
        responses.get(
            WS,
            json={
                "location": "westeurope",
                "properties": {
                    "mlFlowTrackingUri": TRACKING,
                    "discoveryUrl": "https://disc.example/d",
                },
            },
        )
        responses.get("https://disc.example/d", json={"api": "https://westeurope.api.azureml.ms"})
        responses.get(
            f"https://westeurope.api.azureml.ms/history/v1.0{WS_PATH}/runs/{JOB}/details",
            json={"error": {"error": {"code": "UserError", "message": "train.py exited with 1"}}},
        )
        found = backend().status(JOB)
        assert found.phase is Phase.FAILED
        assert "UserError: train.py exited with 1" in (found.details or "")


def metrics(key: str, value: float | None) -> None:
    entries = [] if value is None else [{"key": key, "value": value, "step": 1, "timestamp": 1}]
    responses.get(
        MLFLOW + "/metrics/get-history",
        json={"metrics": entries},
        match=[matchers.query_param_matcher({"run_id": JOB, "metric_key": key})],
    )


class TestResult:
    @responses.activate
    def test_metrics_by_the_configured_keys_and_the_run_registers_one_version(self) -> None:
        responses.get(WS, json={"properties": {"mlFlowTrackingUri": TRACKING}})
        metrics("rmse", 2.5)
        metrics("champion_rmse", 3.5)
        version_url = f"{WS}/models/housing/versions/{VERSION}"
        responses.get(version_url, status=404, json={"error": {"code": "NotFound"}})
        registered: list[dict[str, Any]] = []

        def answer(req: Any) -> tuple[int, dict[str, str], str]:
            registered.append(json.loads(req.body))
            return 201, {}, json.dumps({"id": WS_PATH + "/x", **registered[-1]})

        responses.add_callback("PUT", version_url, callback=answer)
        result = backend().result(request(), JOB)
        assert result.challenger == {"Root Mean Squared Error": 2.5}
        assert result.champion == {"Root Mean Squared Error": 3.5}
        assert result.model == ModelRef.registered("housing", VERSION)
        props = registered[0]["properties"]
        assert props["modelUri"] == (
            "azureml://subscriptions/sub/resourceGroups/rg/workspaces/ws/datastores/retrain"
            f"/paths/housing/{RUN}/model/"
        )
        assert (props["jobName"], props["tags"]["retrain.run"]) == (JOB, RUN)
        assert responses.calls[-1].request.params == API

    @responses.activate
    def test_a_missing_metric_is_an_evaluation_error_and_nothing_is_registered(self) -> None:
        responses.get(WS, json={"properties": {"mlFlowTrackingUri": TRACKING}})
        metrics("rmse", None)
        with pytest.raises(EvaluationError, match="logged no metric 'rmse'"):
            backend().result(request(), JOB)
        assert not any("/models/" in str(c.request.url) for c in responses.calls)
