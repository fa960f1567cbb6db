"""The model-spec sections of the Azure ML Studio (classic) services: training through BES, and
the Classic endpoint and New (ARM) web service targets."""

from __future__ import annotations

from datetime import timedelta
from typing import Literal

from pydantic import AnyHttpUrl, Field, field_validator, model_validator

from retrain.specbase import SettingName
from retrain.specbase import Spec as _Spec
from retrain.specbase import require_https as _require_https


class BesSpec(_Spec):
    """Where and how to run the training web service through BES v2.0."""

    kind: Literal["bes"]
    jobs_url: AnyHttpUrl
    """The `.../jobs` URL from the training service's API help page (no query string)."""
    api_key_setting: SettingName
    input_name: str = "input1"
    model_output: str = "output1"
    evaluation_output: str = "output2"
    global_parameters: dict[str, str] = Field(default_factory=dict)

    _https = field_validator("jobs_url")(_require_https)

    @field_validator("jobs_url")
    @classmethod
    def _jobs_path(cls, url: AnyHttpUrl) -> AnyHttpUrl:
        if not (url.path or "").rstrip("/").endswith("/jobs"):
            raise ValueError(f"{url} must be the BES '.../jobs' URL of the training web service")
        if url.query:
            raise ValueError(f"{url} must not carry a query string; api-version is added per call")
        return url

    @model_validator(mode="after")
    def _distinct_outputs(self) -> BesSpec:
        if self.model_output == self.evaluation_output:
            raise ValueError("model_output and evaluation_output must name different outputs")
        return self


class ClassicTarget(_Spec):
    """A non-default endpoint of a Classic predictive web service, updated by PATCH."""

    kind: Literal["classic"] = "classic"
    endpoint_url: AnyHttpUrl
    """`https://<region>management.azureml.net/workspaces/<ws>/webservices/<id>/endpoints/<name>`."""
    api_key_setting: SettingName
    resource_name: str = Field(min_length=1)
    """The trained model's Resource Name, e.g. 'Housing Model [trained model]'."""

    _https = field_validator("endpoint_url")(_require_https)

    @field_validator("endpoint_url")
    @classmethod
    def _endpoint_shape(cls, url: AnyHttpUrl) -> AnyHttpUrl:
        parts = [p for p in (url.path or "").split("/") if p]
        if (
            len(parts) != 6
            or parts[0] != "workspaces"
            or parts[2] != "webservices"
            or (parts[4] != "endpoints")
        ):
            raise ValueError(
                f"{url} is not an endpoint management URL "
                "(.../workspaces/<ws>/webservices/<id>/endpoints/<name>)"
            )
        if parts[5].casefold() == "default":
            raise ValueError(
                "the default endpoint cannot be patched; add a non-default endpoint to the "
                "predictive web service and point endpoint_url at it"
            )
        return url


class NewTarget(_Spec):
    """A New (ARM) web service whose trained-model asset is updated by an ARM PATCH."""

    kind: Literal["new"]
    subscription_id: str = Field(min_length=1)
    resource_group: str = Field(min_length=1)
    web_service: str = Field(min_length=1)
    asset_name: str | None = None
    """The trained model's asset name; by default the one asset ending in '[trained model]'."""
    api_version: str = "2017-01-01"
    arm_endpoint: AnyHttpUrl = AnyHttpUrl("https://management.azure.com")
    """Public cloud by default; a sovereign cloud's ARM endpoint, or a local emulator."""
    token_setting: SettingName | None = None
    """For local emulators only: an app setting holding a fixed bearer token. Unset, the app
    authenticates with azure-identity's DefaultAzureCredential (managed identity in Azure)."""
    provisioning_timeout: timedelta = timedelta(hours=1)

    _https = field_validator("arm_endpoint")(_require_https)
