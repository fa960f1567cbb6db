"""The model spec sections of the Azure ML v2 path: `training: {kind: azureml}` and
`target: {kind: online_endpoint}`. Checked when the spec loads: a bad template or name is a
configuration error that names the field, not a failed run later."""

from __future__ import annotations

from datetime import timedelta
from typing import TYPE_CHECKING, Any, Literal

from pydantic import AnyHttpUrl, Field, field_validator, model_validator

from retrain.azureml.template import check_template
from retrain.azureml.workspace import ARM_ENDPOINT, WorkspaceRef
from retrain.errors import UsageError
from retrain.specbase import JsonDocument, SettingName, Spec, require_https

if TYPE_CHECKING:
    from retrain.azureml.mlflow import MetricName

# The checks of names and templates live with the clients, which import the ports (and through
# them these settings): they are imported when a spec is checked, not when this module loads.


class _Workspace(Spec):
    """Where the workspace is, and how the app authenticates to ARM."""

    subscription_id: str = Field(min_length=1)
    resource_group: str = Field(min_length=1)
    workspace: str = Field(min_length=1)
    arm_endpoint: AnyHttpUrl = AnyHttpUrl(ARM_ENDPOINT)
    """Public cloud by default; a sovereign cloud's ARM endpoint, or a local emulator."""
    token_setting: SettingName | None = None
    """For local emulators only: an app setting holding a fixed bearer token. Unset, the app
    authenticates with azure-identity's DefaultAzureCredential (managed identity in Azure)."""

    _https = field_validator("arm_endpoint")(require_https)

    @property
    def workspace_ref(self) -> WorkspaceRef:
        """The workspace's place in ARM."""
        return WorkspaceRef(
            self.subscription_id,
            self.resource_group,
            self.workspace,
            str(self.arm_endpoint).rstrip("/"),
        )


class MlflowKeys(Spec):
    """The MLflow metric keys one gate metric is logged under by the training job."""

    challenger: str = Field(min_length=1)
    """The trained model's value, e.g. `rmse`."""
    champion: str | None = Field(default=None, min_length=1)
    """The champion's value on the same hold-out data, e.g. `champion_rmse`."""


class AzureMLSpec(_Workspace):
    """Training as an Azure ML v2 job, the model registered in the workspace."""

    kind: Literal["azureml"]
    job_template: JsonDocument
    """The REST job body with `{retrain.*}` placeholders; inline, or a JSON file's path."""
    datastore: str = Field(min_length=1)
    """A blob datastore of the workspace over the app's artifacts container: the job reads the
    run's frozen input and writes the model there."""
    model_name: str
    """The registered model's name; every trained run registers one version of it."""
    model_type: Literal["custom_model", "mlflow_model"] = "custom_model"
    metrics: dict[str, MlflowKeys] = Field(min_length=1)
    """Gate metric name (e.g. 'Root Mean Squared Error') -> the MLflow keys it is logged under."""

    @field_validator("job_template")
    @classmethod
    def _template_shape(cls, value: dict[str, Any]) -> dict[str, Any]:
        try:
            check_template(value)
        except UsageError as exc:
            raise ValueError(str(exc)) from None
        return value

    @field_validator("model_name", "datastore")
    @classmethod
    def _asset_name(cls, value: str) -> str:
        from retrain.azureml.jobs import NAME_PATTERN

        if NAME_PATTERN.fullmatch(value) is None:
            raise ValueError(f"{value!r} is not a valid Azure ML name (letters, digits, - and _)")
        return value

    def metric_names(self) -> list[MetricName]:
        """The gate metrics and the MLflow keys to read them from."""
        from retrain.azureml.mlflow import MetricName

        return [MetricName(name, k.challenger, k.champion) for name, k in self.metrics.items()]


class OnlineEndpointSpec(_Workspace):
    """A managed online endpoint, promoted to blue/green: the new model goes on the deployment
    without traffic, then takes all of it; the other keeps the previous model at 0 %."""

    kind: Literal["online_endpoint"]
    endpoint: str = Field(min_length=1)
    deployment_template: JsonDocument
    """The deployment PUT body without `model` (the app fills it); inline, or a file's path."""
    deployments: tuple[str, str] = ("blue", "green")
    """The two deployment names the model alternates between."""
    smoke_request: Any = None
    """A scoring request body sent to the new deployment before it takes traffic; none sent
    when unset. Any answer but an error passes."""
    provisioning_timeout: timedelta = timedelta(hours=1)

    @field_validator("deployment_template")
    @classmethod
    def _template_shape(cls, value: dict[str, Any]) -> dict[str, Any]:
        if not isinstance(value.get("properties"), dict):
            raise ValueError('a deployment template is a JSON object with "properties"')  # noqa: TRY004 - pydantic reports ValueError
        if "model" in value["properties"]:
            raise ValueError("deployment_template: leave out properties.model; the app sets it")
        return value

    @field_validator("deployments")
    @classmethod
    def _names(cls, value: tuple[str, str]) -> tuple[str, str]:
        from retrain.azureml.endpoints import DEPLOYMENT_NAME

        for name in value:
            if DEPLOYMENT_NAME.fullmatch(name) is None:
                raise ValueError(f"{name!r} is not a deployment name (3-32 of a-z 0-9 -)")
        if value[0] == value[1]:
            raise ValueError("the two deployments need different names")
        return value

    @model_validator(mode="after")
    def _endpoint_name(self) -> OnlineEndpointSpec:
        from retrain.azureml.jobs import NAME_PATTERN

        if NAME_PATTERN.fullmatch(self.endpoint) is None:
            raise ValueError(f"endpoint {self.endpoint!r} is not a valid Azure ML name")
        return self
