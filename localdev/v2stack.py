"""The Azure ML v2 side of the local stack: the v2 emulator's configuration and a model spec
(`training.kind: azureml`, `target.kind: online_endpoint`) pointing at it, as the demo and the
end-to-end tests use them."""

from __future__ import annotations

from typing import Any

ARM_TOKEN = "local-arm-token"
SCORE_KEY = "local-score-key"
WORKSPACE_ID = (
    "/subscriptions/sub1/resourceGroups/rg1/providers/Microsoft.MachineLearningServices"
    "/workspaces/ws1"
)
COLUMNS = ["rooms", "age", "distance"]
JOB_TEMPLATE: dict[str, Any] = {
    "properties": {
        "jobType": "Command",
        "experimentName": "retrain-{retrain.model}",
        "displayName": "{retrain.job_name}",
        "command": "python train.py --data ${{inputs.training_data}} --label ${{inputs.label}} "
        "$[[--champion ${{inputs.champion}}]] --out ${{outputs.model}}",
        "environmentId": WORKSPACE_ID + "/environments/train/versions/1",
        "computeId": WORKSPACE_ID + "/computes/cpu",
        "inputs": {
            "training_data": {"jobInputType": "uri_file", "uri": "{retrain.training_data}"},
            "label": {"jobInputType": "literal", "value": "price"},
            "champion": {"jobInputType": "custom_model", "uri": "{retrain.champion_model}"},
        },
        "outputs": {"model": {"jobOutputType": "uri_folder", "uri": "{retrain.model_output}"}},
    }
}
DEPLOYMENT: dict[str, Any] = {
    "sku": {"name": "Default", "capacity": 1},
    "properties": {"endpointComputeType": "Managed", "instanceType": "Standard_DS3_v2"},
}


def score_request(rows: list[list[float]]) -> dict[str, Any]:
    """An online endpoint's scoring request for `rows` of the feature columns."""
    return {"input_data": {"columns": COLUMNS, "data": rows}}


def emulator_config(connection: str, container: str, endpoints: list[str]) -> dict[str, Any]:
    """The v2 emulator: a datastore 'retrain' over `container` of the Azurite at `connection`,
    one key-authenticated online endpoint per name in `endpoints`, and the environment and
    compute the job template references."""
    return {
        "token": ARM_TOKEN,
        "datastores": {"retrain": {"connection_string": connection, "container": container}},
        "endpoints": [{"name": name, "auth_mode": "Key", "key": SCORE_KEY} for name in endpoints],
        "assets": [
            JOB_TEMPLATE["properties"]["environmentId"],
            JOB_TEMPLATE["properties"]["computeId"],
        ],
    }


def model_spec(url: str, name: str = "housing", **overrides: Any) -> dict[str, Any]:
    """A v2 model spec on the emulator at `url`: model `name` is trained by an Azure ML job,
    registered under `name` and served by the online endpoint `name`."""
    workspace = {
        "subscription_id": "sub1",
        "resource_group": "rg1",
        "workspace": "ws1",
        "arm_endpoint": url,
        "token_setting": "RETRAIN_ARM_TOKEN",
    }
    spec: dict[str, Any] = {
        "name": name,
        "columns": [*COLUMNS, "price"],
        "training": {
            "kind": "azureml",
            **workspace,
            "job_template": JOB_TEMPLATE,
            "datastore": "retrain",
            "model_name": name,
            "metrics": {
                "Root Mean Squared Error": {"challenger": "rmse", "champion": "champion_rmse"}
            },
        },
        "gate": {"metric": "Root Mean Squared Error"},
        "target": {
            "kind": "online_endpoint",
            **workspace,
            "endpoint": name,
            "deployment_template": DEPLOYMENT,
            "smoke_request": score_request([[3.0, 20.0, 5.0]]),
        },
        "quiet_period": 1,
        "max_wait": 30,
        "job_deadline": 600,
    }
    spec.update(overrides)
    return spec
