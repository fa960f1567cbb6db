"""v2 metrics from the job's MLflow run, and the model registry's one version per run."""

from __future__ import annotations

from typing import Any

import pytest
import responses
from responses import matchers

from retrain.azureml.mlflow import MetricName, MlflowRuns, rest_base
from retrain.azureml.registry import ModelRegistry, model_version
from retrain.errors import EvaluationError, PermanentRemoteError, UsageError
from tests.azureml_support import API, TOKEN, WS, WS_PATH, arm

TRACKING = "azureml://westeurope.api.azureml.ms/mlflow/v1.0" + WS_PATH
BASE = "https://westeurope.api.azureml.ms/mlflow/v1.0" + WS_PATH + "/api/2.0/mlflow"
HISTORY = BASE + "/metrics/get-history"
NAMES = [MetricName("Root Mean Squared Error", "rmse", "champion_rmse")]


def history(key: str, *values: tuple[float | str, int], token: str | None = None) -> None:
    page: dict[str, Any] = {
        "metrics": [
            {"key": key, "value": v, "step": step, "timestamp": 1000 + step} for v, step in values
        ]
    }
    if token:
        page["next_page_token"] = token
    responses.get(
        HISTORY,
        json=page,
        match=[
            matchers.query_param_matcher({"run_id": "j1", "metric_key": key}, strict_match=False),
            matchers.header_matcher(TOKEN),
        ],
    )


class TestMlflow:
    def test_the_rest_base_follows_the_tracking_uri(self) -> None:
        assert rest_base(TRACKING) == BASE
        assert rest_base("azureml://127.0.0.1:8800/mlflow/v1.0/x") == (
            "http://127.0.0.1:8800/mlflow/v1.0/x/api/2.0/mlflow"
        )
        with pytest.raises(PermanentRemoteError, match="not an azureml"):
            rest_base("ftp://host/x")

    @responses.activate
    def test_runs_get_returns_the_run(self) -> None:
        responses.get(
            BASE + "/runs/get",
            json={"run": {"info": {"run_id": "j1", "status": "FINISHED"}, "data": {}}},
            match=[matchers.query_param_matcher({"run_id": "j1"})],
        )
        assert MlflowRuns(arm(), TRACKING).run("j1")["info"]["status"] == "FINISHED"

    @responses.activate
    def test_the_last_value_is_the_highest_step_across_pages(self) -> None:
        history("rmse", (9.0, 0), (3.0, 2), token="p2")
        history("rmse", (5.0, 1))
        assert MlflowRuns(arm(), TRACKING).last("j1", "rmse") == 3.0
        assert "page_token=p2" in (responses.calls[1].request.url or "")

    @responses.activate
    def test_challenger_and_champion_values_make_the_evaluation(self) -> None:
        history("rmse", (2.5, 0))
        history("champion_rmse", (3.5, 0))
        evaluation = MlflowRuns(arm(), TRACKING).evaluation("j1", NAMES)
        assert evaluation.challenger == {"Root Mean Squared Error": 2.5}
        assert evaluation.champion == {"Root Mean Squared Error": 3.5}

    @responses.activate
    def test_a_run_without_champion_metrics_has_no_champion_row(self) -> None:
        history("rmse", (2.5, 0))
        history("champion_rmse")
        assert MlflowRuns(arm(), TRACKING).evaluation("j1", NAMES).champion is None

    @responses.activate
    def test_a_missing_challenger_metric_names_the_key(self) -> None:
        history("rmse")
        with pytest.raises(EvaluationError, match="no metric 'rmse'"):
            MlflowRuns(arm(), TRACKING).evaluation("j1", NAMES)

    @pytest.mark.parametrize("value", ["NaN", "Infinity", -1.0])
    @responses.activate
    def test_impossible_values_are_refused_like_an_evaluate_model_output(
        self, value: float | str
    ) -> None:
        history("rmse", (value, 0))
        history("champion_rmse", (1.0, 0))
        with pytest.raises(EvaluationError, match="Root Mean Squared Error"):
            MlflowRuns(arm(), TRACKING).evaluation("j1", NAMES)

    @responses.activate
    def test_half_a_champion_row_is_an_error(self) -> None:
        names = [*NAMES, MetricName("Mean Absolute Error", "mae", "champion_mae")]
        history("rmse", (2.0, 0))
        history("champion_rmse", (2.0, 0))
        history("mae", (1.0, 0))
        history("champion_mae")
        with pytest.raises(EvaluationError, match="champion_mae"):
            MlflowRuns(arm(), TRACKING).evaluation("j1", names)

    @responses.activate
    def test_a_value_that_is_no_number_is_a_shape_error(self) -> None:
        history("rmse", ("fast", 0))
        with pytest.raises(PermanentRemoteError, match="value"):
            MlflowRuns(arm(), TRACKING).last("j1", "rmse")


VERSION_URL = WS + "/models/housing/versions/20261203172015000000011256099"
URI = "azureml://subscriptions/sub/resourceGroups/rg/workspaces/ws/datastores/d/paths/m/"
TAGS = {"retrain.run": "20261203T172015-abc123", "retrain.batch": "b1", "retrain.manifest": "m"}


def version_body(uri: str = URI, tags: dict[str, str] = TAGS) -> dict[str, Any]:
    return {
        "id": WS_PATH + "/models/housing/versions/20261203172015000000011256099",
        "properties": {"modelUri": uri, "modelType": "custom_model", "tags": tags},
    }


class TestRegistry:
    def test_the_version_comes_from_the_run_and_sorts_by_time(self) -> None:
        first = model_version("20261203T172015-abc123")
        assert first == model_version("20261203T172015-abc123")
        assert first.isdigit()
        later = model_version("20261203T172016-000001")
        assert int(later) > int(first)
        with pytest.raises(UsageError, match="YYYYMMDD"):
            model_version("run-1")

    @responses.activate
    def test_a_new_version_is_put_with_uri_type_job_and_tags(self) -> None:
        responses.get(VERSION_URL, status=404, json={"error": {"code": "NotFound"}})
        responses.put(
            VERSION_URL,
            status=201,
            json=version_body(),
            match=[
                matchers.query_param_matcher(API),
                matchers.json_params_matcher(
                    {
                        "properties": {
                            "modelUri": URI,
                            "modelType": "custom_model",
                            "jobName": "j1",
                            "tags": TAGS,
                            "isArchived": False,
                        }
                    }
                ),
            ],
        )
        registered = ModelRegistry(arm()).register(
            "housing",
            model_version("20261203T172015-abc123"),
            model_uri=URI,
            job_name="j1",
            tags=TAGS,
        )
        assert registered.id.endswith("/models/housing/versions/20261203172015000000011256099")

    @responses.activate
    def test_a_redelivery_finds_its_version_and_sends_nothing(self) -> None:
        responses.get(VERSION_URL, json=version_body())
        ModelRegistry(arm()).register(
            "housing", "20261203172015000000011256099", model_uri=URI, job_name="j1", tags=TAGS
        )
        assert [c.request.method for c in responses.calls] == ["GET"]

    @responses.activate
    def test_a_version_taken_by_another_model_is_a_clear_error(self) -> None:
        responses.get(VERSION_URL, json=version_body(uri=URI.replace("/m/", "/other/")))
        with pytest.raises(PermanentRemoteError, match="immutable"):
            ModelRegistry(arm()).register(
                "housing", "20261203172015000000011256099", model_uri=URI, job_name="j1", tags=TAGS
            )

    @responses.activate
    def test_the_service_refusing_a_changed_path_is_permanent(self) -> None:
        responses.get(VERSION_URL, status=404)
        responses.put(
            VERSION_URL,
            status=409,
            json={"error": {"code": "UserError", "message": "Asset paths cannot be updated."}},
        )
        with pytest.raises(PermanentRemoteError, match="Asset paths cannot be updated"):
            ModelRegistry(arm()).register(
                "housing", "20261203172015000000011256099", model_uri=URI, job_name="j1", tags=TAGS
            )

    def test_an_unknown_model_type_is_refused(self) -> None:
        with pytest.raises(UsageError, match="modelType"):
            ModelRegistry(arm()).register(
                "housing", "1", model_uri=URI, job_name="j1", tags={}, model_type="CustomModel"
            )
