"""The Azure ML v2 setup check: read-only GETs of what a model spec names, each problem named
with its setting and fix, reported by the CLI as configuration rather than as a failure."""

from __future__ import annotations

import copy
import json
from typing import Any

import pytest
import responses

from retrain import cli
from retrain.azureml.checks import check_endpoint, check_training
from retrain.azureml.spec import AzureMLSpec, OnlineEndpointSpec
from retrain.errors import (
    PermanentError,
    SetupError,
    TransientRemoteError,
)
from tests.azureml_support import ARM, WS, WS_PATH, arm

MLFLOW = "https://westeurope.api.azureml.ms/mlflow/v1.0" + WS_PATH + "/api/2.0/mlflow"
ENV = WS_PATH + "/environments/train/versions/7"
CODE = WS_PATH + "/codes/train/versions/3"
COMPUTE = WS_PATH + "/computes/cpu-cluster"
TEMPLATE: dict[str, Any] = {
    "properties": {
        "jobType": "Command",
        "command": "python train.py",
        "codeId": CODE,
        "environmentId": ENV,
        "computeId": COMPUTE,
        "inputs": {"data": {"jobInputType": "uri_file", "uri": "{retrain.training_data}"}},
        "outputs": {"model": {"jobOutputType": "uri_folder", "uri": "{retrain.model_output}"}},
    }
}


def training(template: dict[str, Any] | None = None) -> AzureMLSpec:
    return AzureMLSpec(
        kind="azureml",
        subscription_id="sub",
        resource_group="rg",
        workspace="ws",
        job_template=template or TEMPLATE,
        datastore="retrain",
        model_name="housing",
        metrics={"Root Mean Squared Error": {"challenger": "rmse"}},
    )


def target(deployment: dict[str, Any] | None = None) -> OnlineEndpointSpec:
    return OnlineEndpointSpec(
        kind="online_endpoint",
        subscription_id="sub",
        resource_group="rg",
        workspace="ws",
        endpoint="housing",
        deployment_template=deployment or {"properties": {"endpointComputeType": "Managed"}},
    )


def workspace(status: int = 200, **props: Any) -> None:
    body: Any = {
        "location": "westeurope",
        "properties": props
        or {"mlFlowTrackingUri": "azureml://westeurope.api.azureml.ms/mlflow/v1.0" + WS_PATH},
    }
    if status != 200:
        body = {"error": {"code": "ResourceNotFound", "message": "not found"}}
    responses.get(WS, json=body, status=status)


def mlflow(status: int = 404) -> None:
    body = {"error_code": "RESOURCE_DOES_NOT_EXIST", "message": "Run not found"}
    responses.get(MLFLOW + "/runs/get", json=body, status=status)


def asset(arm_id: str, status: int = 200, state: str = "Succeeded") -> None:
    body: Any = {"id": arm_id, "properties": {"provisioningState": state}}
    if status != 200:
        body = {"error": {"code": "ResourceNotFound", "message": f"{arm_id} was not found"}}
    responses.get(ARM + arm_id, json=body, status=status)


def gets() -> list[str]:
    return [str(c.request.url).split("?")[0] for c in responses.calls]


class TestTraining:
    @responses.activate
    def test_a_healthy_setup_reads_the_workspace_mlflow_and_every_asset(self) -> None:
        workspace()
        mlflow()
        for arm_id in (CODE, ENV, COMPUTE):
            asset(arm_id)
        facts = check_training(arm(), training())
        assert facts == [
            "workspace ws in westeurope answers with its mlFlowTrackingUri",
            f"MLflow tracking answers at {MLFLOW}",
            "training.job_template properties.codeId: code train version 3 exists (Succeeded)",
            "training.job_template properties.environmentId: environment train version 7 "
            "exists (Succeeded)",
            "training.job_template properties.computeId: compute cpu-cluster exists (Succeeded)",
        ]
        assert all(c.request.method == "GET" for c in responses.calls)  # read-only

    @responses.activate
    def test_a_missing_asset_and_a_refused_one_are_each_named_with_the_fix(self) -> None:
        workspace()
        mlflow()
        asset(CODE)
        asset(ENV, status=404)
        asset(COMPUTE, status=403)
        with pytest.raises(SetupError) as caught:
            check_training(arm(), training())
        missing, refused = str(caught.value).splitlines()
        assert missing.startswith(
            "training.job_template properties.environmentId: environment train version 7 "
            "does not exist in workspace ws (resource group rg) (HTTP 404)"
        )
        assert (
            "`az ml environment show --name train --version 7 --workspace-name ws "
            "--resource-group rg --query id` gives it" in missing
        )
        assert refused.startswith("training.job_template properties.computeId: compute")
        assert "'AzureML Data Scientist' role (or Contributor) on workspace ws" in refused
        assert isinstance(caught.value, PermanentError)  # a run meeting it fails, not retries

    @responses.activate
    def test_a_short_form_reference_is_refused_without_a_request(self) -> None:
        workspace()
        mlflow()
        template = copy.deepcopy(TEMPLATE)
        del template["properties"]["codeId"], template["properties"]["computeId"]
        template["properties"]["environmentId"] = "azureml:train:7"
        with pytest.raises(SetupError, match="not an ARM id") as caught:
            check_training(arm(), training(template))
        assert "`az ml environment show --name train --version 7" in str(caught.value)
        assert not any("/environments/" in url for url in gets())

    @responses.activate
    def test_the_components_of_a_pipelines_steps_are_checked(self) -> None:
        workspace()
        mlflow()
        component = WS_PATH + "/components/train/versions/2"
        asset(component, status=404)
        template: dict[str, Any] = {
            "properties": {
                "jobType": "Pipeline",
                "inputs": {"data": {"jobInputType": "uri_file", "uri": "{retrain.training_data}"}},
                "outputs": {
                    "model": {"jobOutputType": "uri_folder", "uri": "{retrain.model_output}"}
                },
                "jobs": {"train": {"type": "command", "componentId": component}},
            }
        }
        with pytest.raises(SetupError) as caught:
            check_training(arm(), training(template))
        assert str(caught.value).startswith(
            "training.job_template properties.jobs.train.componentId: component train version 2 "
            "does not exist"
        )
        assert "`az ml component show --name train --version 2" in str(caught.value)

    @responses.activate
    def test_a_wrong_workspace_names_the_three_settings_and_stops_there(self) -> None:
        workspace(status=404)
        with pytest.raises(SetupError) as caught:
            check_training(arm(), training())
        text = str(caught.value)
        assert (
            "training: workspace ws does not exist in resource group rg of subscription sub" in text
        )
        assert "training.subscription_id, resource_group, workspace" in text
        assert gets() == [WS]

    @responses.activate
    def test_a_workspace_without_mlflow_tracking_is_a_setup_problem(self) -> None:
        workspace(discoveryUrl="https://x")
        with pytest.raises(SetupError, match=r"without properties\.mlFlowTrackingUri"):
            check_training(arm(), training())

    @responses.activate
    def test_mlflow_refusing_the_identity_names_the_role(self) -> None:
        workspace()
        mlflow(status=403)
        for arm_id in (CODE, ENV, COMPUTE):
            asset(arm_id)
        with pytest.raises(SetupError, match="AzureML Data Scientist") as caught:
            check_training(arm(), training())
        assert str(caught.value).startswith("MLflow tracking at azureml://")

    @responses.activate
    def test_a_failed_compute_cannot_run_jobs(self) -> None:
        workspace()
        mlflow()
        asset(CODE)
        asset(ENV)
        asset(COMPUTE, state="Failed")
        with pytest.raises(SetupError, match="compute cpu-cluster is Failed, so jobs cannot run"):
            check_training(arm(), training())

    @responses.activate
    def test_a_service_that_does_not_answer_is_not_a_setup_problem(self) -> None:
        workspace()
        mlflow()
        asset(CODE)
        asset(ENV, status=503)
        with pytest.raises(TransientRemoteError):
            check_training(arm(), training())


EP = WS + "/onlineEndpoints/housing"


def endpoint(state: str = "Succeeded", status: int = 200) -> None:
    body: Any = {
        "location": "westeurope",
        "properties": {"provisioningState": state, "authMode": "Key", "traffic": {"blue": 100}},
    }
    if status != 200:
        body = {"error": {"code": "ResourceNotFound", "message": "not found"}}
    responses.get(EP, json=body, status=status)


class TestEndpoint:
    @responses.activate
    def test_a_missing_endpoint_names_the_setting_and_the_command(self) -> None:
        endpoint(status=404)
        with pytest.raises(SetupError) as caught:
            check_endpoint(arm(), target())
        text = str(caught.value)
        assert text.startswith("target.endpoint: online endpoint housing does not exist")
        assert "`az ml online-endpoint show --name housing --workspace-name ws" in text

    @responses.activate
    def test_a_failed_endpoint_is_a_setup_problem_a_busy_one_is_not(self) -> None:
        endpoint(state="Failed")
        with pytest.raises(SetupError, match="is Failed, not Succeeded"):
            check_endpoint(arm(), target())
        responses.replace(
            "GET", EP, json={"properties": {"provisioningState": "Updating", "authMode": "Key"}}
        )
        with pytest.raises(TransientRemoteError, match="Updating"):
            check_endpoint(arm(), target())

    @responses.activate
    def test_the_deployment_templates_assets_are_checked(self) -> None:
        endpoint()
        score_env = WS_PATH + "/environments/score/versions/1"
        score_code = WS_PATH + "/codes/score/versions/1"
        asset(score_env)
        asset(score_code, status=404)
        deployment = {
            "properties": {
                "endpointComputeType": "Managed",
                "codeConfiguration": {"codeId": score_code, "scoringScript": "score.py"},
                "environmentId": score_env,
            }
        }
        with pytest.raises(SetupError) as caught:
            check_endpoint(arm(), target(deployment))
        assert str(caught.value).startswith(
            "target.deployment_template properties.codeConfiguration.codeId: code score "
            "version 1 does not exist"
        )
        responses.replace("GET", ARM + score_code, json={"properties": {}})
        assert check_endpoint(arm(), target(deployment)) == [
            "target.deployment_template properties.codeConfiguration.codeId: code score "
            "version 1 exists",
            "target.deployment_template properties.environmentId: environment score version 1 "
            "exists (Succeeded)",
        ]


class FakeApp:
    def __init__(self, error: Exception | None) -> None:
        self.error = error
        self.preflights = 0

    def probe(self, name: str) -> str:
        if self.error is not None:
            raise self.error
        return "workspace ws answers"

    def preflight(self, name: str) -> list[str]:
        self.preflights += 1
        return ["online endpoint housing is Succeeded"]


@pytest.fixture(autouse=True)
def _no_target_setup(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cli, "_target_setup", lambda name: [])


def test_preflight_reports_a_setup_problem_as_configuration(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    problem = SetupError("first problem\nsecond problem")
    monkeypatch.setattr(cli, "_app", lambda: FakeApp(problem))
    assert cli.main(["preflight", "housing"]) == 1
    assert capsys.readouterr().out.splitlines() == [
        "housing: configuration: FAILED",
        "  first problem",
        "  second problem",
    ]
    assert cli.main(["--json", "preflight", "housing"]) == 1
    (result,) = json.loads(capsys.readouterr().out)
    assert (result["ok"], result["problem"]) == (False, "configuration")


def test_preflight_reports_a_service_that_does_not_answer_as_failed(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(cli, "_app", lambda: FakeApp(TransientRemoteError("GET workspace: 503")))
    assert cli.main(["preflight", "housing"]) == 1
    assert capsys.readouterr().out.splitlines() == ["housing: FAILED", "  GET workspace: 503"]


def test_a_target_setup_problem_is_reported_once_without_running_the_preflight(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    app = FakeApp(None)
    monkeypatch.setattr(cli, "_app", lambda: app)

    def missing(name: str) -> list[str]:
        raise SetupError("target.endpoint: online endpoint housing does not exist")

    monkeypatch.setattr(cli, "_target_setup", missing)
    assert cli.main(["preflight", "housing"]) == 1
    assert capsys.readouterr().out.splitlines() == [
        "housing: configuration: FAILED",
        "  target.endpoint: online endpoint housing does not exist",
    ]
    assert app.preflights == 0
