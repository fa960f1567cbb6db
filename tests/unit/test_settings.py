"""Settings and model specs: bad configuration names the setting and the fix."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from retrain.errors import ConfigError
from retrain.settings import get_settings, load_models, read_secret
from tests.harness import raw_spec


def models_error(items: Any) -> str:
    with pytest.raises(ConfigError) as info:
        load_models(json.dumps(items), None)
    return str(info.value)


def test_a_valid_spec_loads_with_defaults() -> None:
    (model,) = load_models(json.dumps([raw_spec()]), None).values()
    assert model.prefix == "housing/"
    assert model.training.kind == "bes"
    assert model.training.input_name == "input1"
    assert model.promotion == "auto"


def test_default_endpoint_is_refused_with_the_fix() -> None:
    target = raw_spec()["target"] | {
        "endpoint_url": "https://management.azureml.net/workspaces/w/webservices/p/endpoints/default"
    }
    message = models_error([raw_spec(target=target)])
    assert "model 'housing'" in message
    assert "endpoint_url" in message
    assert "default endpoint cannot be patched" in message


def test_plain_http_is_refused_off_loopback() -> None:
    bes = raw_spec()["training"] | {
        "jobs_url": "http://bes.example.com/workspaces/w/services/s/jobs"
    }
    assert "uses plain http" in models_error([raw_spec(training=bes)])


def test_jobs_url_must_be_the_jobs_url() -> None:
    bes = raw_spec()["training"] | {
        "jobs_url": "https://bes.example/workspaces/w/services/s/execute"
    }
    assert "'.../jobs' URL" in models_error([raw_spec(training=bes)])


OLD_SPEC = {
    "name": "housing",
    "bes": {
        "jobs_url": "https://bes.example/workspaces/w/services/s/jobs",
        "api_key_setting": "K",
        "model_output": "model",
        "evaluation_output": "scores",
        "global_parameters": {"Label Column": "price"},
    },
    "gate": {"metric": "AUC"},
    "target": {
        "kind": "classic",
        "endpoint_url": "https://management.azureml.net/workspaces/w/webservices/p/endpoints/prod",
        "api_key_setting": "E",
        "resource_name": "M [trained model]",
    },
}
"""A model spec as written before `training` had kinds: the BES fields under `bes`."""


def test_a_spec_with_the_older_bes_key_loads_as_bes_training() -> None:
    (model,) = load_models(json.dumps([OLD_SPEC]), None).values()
    assert model.training.kind == "bes"
    assert str(model.training.jobs_url) == "https://bes.example/workspaces/w/services/s/jobs"
    assert (model.training.model_output, model.training.evaluation_output) == ("model", "scores")
    assert model.training.global_parameters == {"Label Column": "price"}
    # The same spec written the new way is the same model.
    new = {k: v for k, v in OLD_SPEC.items() if k != "bes"}
    new["training"] = {"kind": "bes", **OLD_SPEC["bes"]}  # type: ignore[dict-item]
    assert load_models(json.dumps([new]), None)["housing"] == model


def test_the_older_bes_key_is_still_checked() -> None:
    old = OLD_SPEC | {"bes": OLD_SPEC["bes"] | {"jobs_url": "http://bes.example/w/s/jobs"}}  # type: ignore[operator]
    message = models_error([old])
    assert "model 'housing'" in message
    assert "uses plain http" in message


def test_a_spec_with_both_training_and_bes_is_refused() -> None:
    both = raw_spec(bes=OLD_SPEC["bes"])
    assert "not both training and bes" in models_error([both])


def test_a_training_kind_this_app_does_not_know_is_named() -> None:
    unknown = raw_spec(training=raw_spec()["training"] | {"kind": "sagemaker"})
    message = models_error([unknown])
    assert "training" in message
    assert "'sagemaker'" in message


def test_overlapping_prefixes_are_refused() -> None:
    message = models_error([raw_spec(), raw_spec(name="housing2", data_prefix="housing/eu")])
    assert "overlap" in message


def test_duplicate_names_and_unknown_fields() -> None:
    assert "configured twice" in models_error([raw_spec(), raw_spec()])
    assert "Extra inputs are not permitted" in models_error([raw_spec(colums=["x"])])


def test_empty_and_malformed_model_settings() -> None:
    with pytest.raises(ConfigError, match="no models configured"):
        load_models(None, None)
    with pytest.raises(ConfigError, match="RETRAIN_MODELS is not valid JSON"):
        load_models("[{", None)
    with pytest.raises(ConfigError, match="non-empty JSON list"):
        load_models("{}", None)


def test_models_file(tmp_path: Path) -> None:
    path = tmp_path / "models.json"
    path.write_text(json.dumps([raw_spec()]))
    assert list(load_models(None, path)) == ["housing"]
    with pytest.raises(ConfigError, match="cannot read the file"):
        load_models(None, tmp_path / "missing.json")


def test_missing_app_settings_are_named(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in (
        "AzureWebJobsStorage",
        "RETRAIN_DATA_CONTAINER",
        "RETRAIN_JOBS_QUEUE",
        "RETRAIN_EVALUATIONS_QUEUE",
        "RETRAIN_MODELS",
    ):
        monkeypatch.delenv(name, raising=False)
    get_settings.cache_clear()
    with pytest.raises(ConfigError) as info:
        get_settings()
    get_settings.cache_clear()
    for name in ("AzureWebJobsStorage", "RETRAIN_DATA_CONTAINER", "RETRAIN_JOBS_QUEUE"):
        assert name in str(info.value)


def test_missing_secret_names_the_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RETRAIN_BES_KEY_X", raising=False)
    with pytest.raises(ConfigError, match="RETRAIN_BES_KEY_X \\(BES key of x\\) is not set"):
        read_secret("RETRAIN_BES_KEY_X", purpose="BES key of x")


def test_polls_closer_than_a_second_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AzureWebJobsStorage", "UseDevelopmentStorage=true")
    monkeypatch.setenv("RETRAIN_DATA_CONTAINER", "data")
    monkeypatch.setenv("RETRAIN_JOBS_QUEUE", "jobs")
    monkeypatch.setenv("RETRAIN_EVALUATIONS_QUEUE", "evals")
    monkeypatch.setenv("RETRAIN_MODELS", json.dumps([raw_spec()]))
    monkeypatch.setenv("RETRAIN_POLL_FIRST_DELAY", "PT0.5S")
    get_settings.cache_clear()
    with pytest.raises(ConfigError, match="1 s <= RETRAIN_POLL_FIRST_DELAY"):
        get_settings()
    monkeypatch.setenv("RETRAIN_POLL_FIRST_DELAY", "PT1S")
    get_settings.cache_clear()
    assert get_settings().poll_first_delay.total_seconds() == 1
    get_settings.cache_clear()


@pytest.mark.parametrize("value", ["0", "61", "2.5"])
def test_a_retry_wait_outside_whole_seconds_1_to_60_is_refused(
    monkeypatch: pytest.MonkeyPatch, value: str
) -> None:
    """The call bound (and every lease derived from it) counts on this wait."""
    monkeypatch.setenv("AzureWebJobsStorage", "UseDevelopmentStorage=true")
    monkeypatch.setenv("RETRAIN_DATA_CONTAINER", "data")
    monkeypatch.setenv("RETRAIN_JOBS_QUEUE", "jobs")
    monkeypatch.setenv("RETRAIN_EVALUATIONS_QUEUE", "evals")
    monkeypatch.setenv("RETRAIN_MODELS", json.dumps([raw_spec()]))
    monkeypatch.setenv("RETRAIN_HTTP_MAX_RETRY_WAIT", value)
    get_settings.cache_clear()
    with pytest.raises(ConfigError, match="RETRAIN_HTTP_MAX_RETRY_WAIT"):
        get_settings()
    monkeypatch.setenv("RETRAIN_HTTP_MAX_RETRY_WAIT", "2")
    get_settings.cache_clear()
    assert get_settings().http_max_retry_wait == 2
    get_settings.cache_clear()


def test_training_log_loss_needs_its_direction_stated() -> None:
    """Whether Studio's Training Log Loss is a loss or a gain over random guessing is not
    documented, so the app does not guess which way is better."""
    message = models_error([raw_spec(gate={"metric": "Training Log Loss"})])
    assert "higher_is_better" in message
    (model,) = load_models(
        json.dumps([raw_spec(gate={"metric": "Training Log Loss", "higher_is_better": True})]),
        None,
    ).values()
    assert model.gate.higher_is_better is True


V2_TEMPLATE: dict[str, Any] = {
    "properties": {
        "jobType": "Command",
        "command": "python train.py",
        "environmentId": "/x/environments/e/versions/1",
        "inputs": {"data": {"jobInputType": "uri_file", "uri": "{retrain.training_data}"}},
        "outputs": {"model": {"jobOutputType": "uri_folder", "uri": "{retrain.model_output}"}},
    }
}
WORKSPACE = {"subscription_id": "s", "resource_group": "rg", "workspace": "ws"}


def v2_spec(training: dict[str, Any] | None = None, **overrides: Any) -> dict[str, Any]:
    return raw_spec(
        training={
            "kind": "azureml",
            **WORKSPACE,
            "job_template": V2_TEMPLATE,
            "datastore": "retrain",
            "model_name": "housing",
            "metrics": {"Root Mean Squared Error": {"challenger": "rmse"}},
            **(training or {}),
        },
        target={
            "kind": "online_endpoint",
            **WORKSPACE,
            "endpoint": "housing",
            "deployment_template": {"properties": {"instanceType": "Standard_DS3_v2"}},
        },
        **overrides,
    )


def test_a_v2_spec_loads_with_its_job_template_from_a_file(tmp_path: Path) -> None:
    template = tmp_path / "job.json"
    template.write_text(json.dumps(V2_TEMPLATE), encoding="utf-8")
    (model,) = load_models(json.dumps([v2_spec({"job_template": str(template)})]), None).values()
    assert model.training.kind == "azureml"
    assert model.training.job_template == V2_TEMPLATE
    assert model.target.kind == "online_endpoint"
    assert model.target.deployments == ("blue", "green")


def test_a_v2_job_template_without_its_placeholders_is_refused_by_name() -> None:
    broken = {"properties": {**V2_TEMPLATE["properties"], "outputs": {}}}
    message = models_error([v2_spec({"job_template": broken})])
    assert "training.azureml.job_template" in message
    assert '"uri": "{retrain.model_output}"' in message
    assert "cannot read the file 'nope.json'" in models_error(
        [v2_spec({"job_template": "nope.json"})]
    )


def test_a_gate_metric_without_an_mlflow_key_is_refused_with_the_fix() -> None:
    message = models_error([v2_spec(gate={"metric": "AUC"})])
    assert "no MLflow key for gate metric(s) ['AUC']" in message
    floors = {"metric": "Root Mean Squared Error", "floors": {"Mean Absolute Error": 5}}
    assert "['Mean Absolute Error']" in models_error([v2_spec(gate=floors)])


def test_a_v2_metric_the_app_does_not_know_needs_its_direction() -> None:
    metrics = {"pinball": {"challenger": "pinball_loss"}}
    assert "set its direction" in models_error(
        [v2_spec({"metrics": metrics}, gate={"metric": "pinball"})]
    )
    spec = v2_spec({"metrics": metrics}, gate={"metric": "pinball", "higher_is_better": False})
    (model,) = load_models(json.dumps([spec]), None).values()
    assert model.gate.higher("pinball") is False


def test_v2_target_mistakes_are_named() -> None:
    spec = v2_spec()
    spec["target"] = spec["target"] | {"arm_endpoint": "http://arm.example"}
    assert "uses plain http" in models_error([spec])
    spec = v2_spec()
    spec["target"]["deployment_template"]["properties"]["model"] = "x"
    assert "leave out properties.model" in models_error([spec])
    spec = v2_spec()
    spec["target"]["deployments"] = ["blue", "Blue"]
    assert "'Blue' is not a deployment name" in models_error([spec])
