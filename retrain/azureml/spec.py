"""The model spec sections of the Azure ML v2 path: `training: {kind: azureml}` and
`target: {kind: online_endpoint}`. Checked when the spec loads: a bad template or name is a
configuration error that names the field, not a failed run later."""

from __future__ import annotations

from datetime import timedelta
from itertools import pairwise
from typing import TYPE_CHECKING, Any, Literal

from pydantic import AnyHttpUrl, Field, TypeAdapter, field_validator, model_validator

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


_DURATION = TypeAdapter(timedelta)


def iso(duration: timedelta) -> str:
    """`duration` as the ISO 8601 text a spec gives it in (`PT5M`)."""
    return str(_DURATION.dump_python(duration, mode="json"))


class CanarySpec(Spec):
    """Traffic moves to the new deployment in steps, each held a while, before it takes all."""

    steps: tuple[int, ...] = Field(min_length=1)
    """Percentages of traffic the new deployment takes, in order (e.g. `[10, 50]`); 100 follows
    the last step."""
    hold: timedelta
    """How long each step stays before the next (an ISO 8601 duration, e.g. `PT5M`)."""
    smoke_each_step: bool = False
    """Send `smoke_request` to the new deployment again at the end of each hold."""

    @field_validator("steps")
    @classmethod
    def _increasing(cls, value: tuple[int, ...]) -> tuple[int, ...]:
        for share in value:
            if not 1 <= share <= 99:
                raise ValueError(
                    f"canary step {share} is not a share of traffic from 1 to 99 (100 follows "
                    "the last step by itself)"
                )
        if any(b <= a for a, b in pairwise(value)):
            raise ValueError(f"canary steps {list(value)} must be strictly increasing")
        return value

    @field_validator("hold")
    @classmethod
    def _positive(cls, value: timedelta) -> timedelta:
        if value < timedelta(seconds=1):
            raise ValueError(f"canary hold {iso(value)} must be at least 1 second (e.g. PT5M)")
        return value

    @property
    def holding(self) -> timedelta:
        """All holds together: the least time a canary promotion takes."""
        return self.hold * len(self.steps)


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
    """The promotion's deadline, from its deploy claim: provisioning, smoke requests, traffic
    moves and canary holds all end by then, or the promotion fails."""
    canary: CanarySpec | None = None
    """Unset: all traffic moves at once. Set: it moves in `canary.steps`, each held."""

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

    @model_validator(mode="after")
    def _canary_fits(self) -> OnlineEndpointSpec:
        canary = self.canary
        if canary is None:
            return self
        if canary.smoke_each_step and self.smoke_request is None:
            raise ValueError("canary.smoke_each_step needs a smoke_request to send; set one")
        if canary.holding * 2 > self.provisioning_timeout:
            raise ValueError(
                f"canary: {len(canary.steps)} steps held {iso(canary.hold)} each take "
                f"{iso(canary.holding)}, more than half of provisioning_timeout "
                f"({iso(self.provisioning_timeout)}), the promotion's deadline, which also "
                "covers provisioning the deployment and moving traffic: set "
                f"provisioning_timeout to at least {iso(canary.holding * 2)}, or shorten "
                "canary.hold or canary.steps"
            )
        return self
