"""The workspace model registry (spec §6): one immutable version per promoted run."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from retrain.azureml.jobs import NAME_PATTERN
from retrain.azureml.workspace import ArmClient, object_of
from retrain.errors import PermanentRemoteError, UsageError
from retrain.http import field_of

_RUN_ID = re.compile(r"(\d{8})T(\d{6})-([0-9a-f]{1,12})")
MODEL_TYPES = ("custom_model", "mlflow_model", "triton_model")


def model_version(run_id: str) -> str:
    """The version a run registers: digits only, the same for every delivery of the run, later
    runs sorting higher (the run's UTC start, then its random suffix as a decimal number)."""
    match = _RUN_ID.fullmatch(run_id)
    if match is None:
        raise UsageError(f"run id {run_id!r} is not of the form YYYYMMDDTHHMMSS-<hex>")
    day, time, suffix = match.groups()
    return f"{day}{time}{int(suffix, 16):015d}"


@dataclass(frozen=True)
class ModelVersion:
    """A registered model version."""

    name: str
    version: str
    model_uri: str
    id: str
    """The ARM id deployments reference."""
    tags: dict[str, str]


class ModelRegistry:
    """`{WS}/models/{name}/versions/{v}`: register once, idempotently."""

    def __init__(self, arm: ArmClient) -> None:
        self._arm = arm

    def _url(self, name: str, version: str) -> str:
        if NAME_PATTERN.fullmatch(name) is None:
            raise UsageError(f"{name!r} is not a valid model name (letters, digits, - and _)")
        return self._arm.url(f"/models/{name}/versions/{version}")

    def get(self, name: str, version: str) -> ModelVersion | None:
        """The version, or None if it is not registered."""
        what = f"GET model {name} version {version}"
        body = self._arm.get_or_none(self._url(name, version), what)
        return None if body is None else self._version(name, version, body, what)

    def register(
        self,
        name: str,
        version: str,
        *,
        model_uri: str,
        job_name: str,
        tags: dict[str, str],
        model_type: str = "custom_model",
        description: str | None = None,
    ) -> ModelVersion:
        """Register `model_uri` as `name:version`. Versions are immutable: an existing one with
        the same modelUri and tags is this registration (a redelivery) and nothing is sent; one
        that differs is an error that says so (spec §6: "Asset paths cannot be updated")."""
        if model_type not in MODEL_TYPES:
            raise UsageError(f"modelType {model_type!r}: use one of {MODEL_TYPES}")
        existing = self.get(name, version)
        if existing is not None:
            return _same_or_refuse(existing, model_uri, tags)
        body: dict[str, Any] = {
            "properties": {
                "modelUri": model_uri,
                "modelType": model_type,
                "jobName": job_name,
                "tags": tags,
                "isArchived": False,
            }
        }
        if description:
            body["properties"]["description"] = description
        what = f"PUT model {name} version {version}"
        response = self._arm.request(
            "PUT", self._url(name, version), what, body, conflict_is_transient=False
        )
        registered = self._version(name, version, object_of(response, what), what)
        return _same_or_refuse(registered, model_uri, tags)

    def _version(self, name: str, version: str, body: dict[str, Any], what: str) -> ModelVersion:
        props = field_of(body, "properties", dict, what=what, required=True)
        uri = field_of(props, "modelUri", str, what=what, required=True)
        tags = field_of(props, "tags", dict, what=what) or {}
        arm_id = field_of(body, "id", str, what=what)
        return ModelVersion(
            name=name,
            version=version,
            model_uri=uri,
            id=arm_id or self._arm.workspace.model_id(name, version),
            tags={str(k): str(v) for k, v in tags.items()},
        )


def _same_or_refuse(found: ModelVersion, model_uri: str, tags: dict[str, str]) -> ModelVersion:
    differs = [
        f"modelUri {found.model_uri}" if found.model_uri != model_uri else "",
        *(f"tag {k}={found.tags.get(k)!r}" for k, v in tags.items() if found.tags.get(k) != v),
    ]
    differs = [d for d in differs if d]
    if differs:
        raise PermanentRemoteError(
            f"model {found.name} version {found.version} is already registered with "
            f"{', '.join(differs)}; versions are immutable and this run's version is taken"
        )
    return found
