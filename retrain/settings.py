"""Settings: one validated object built on first use, plus the per-model specs it carries."""

from __future__ import annotations

import functools
import itertools
import json
import os
from datetime import timedelta
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AnyHttpUrl,
    Field,
    SecretStr,
    StringConstraints,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import SettingsConfigDict

from retrain.azureml.spec import AzureMLSpec, OnlineEndpointSpec
from retrain.classic_spec import BesSpec, ClassicTarget, NewTarget
from retrain.connection import StorageSettings
from retrain.errors import ConfigError
from retrain.http import MAX_RETRY_WAIT
from retrain.specbase import Spec as _Spec
from retrain.specbase import require_https as _require_https

ModelName = Annotated[str, StringConstraints(pattern=r"^[a-z0-9][a-z0-9-]{0,62}$")]

_HIGHER_IS_BETTER = {
    "accuracy": True,
    "precision": True,
    "recall": True,
    "f-score": True,
    "auc": True,
    "coefficient of determination": True,
    "mean absolute error": False,
    "root mean squared error": False,
    "relative absolute error": False,
    "relative squared error": False,
    "negative log likelihood": False,
    "average log loss": False,
    "mean zero one error": False,
}


KNOWN_METRICS = tuple(sorted(_HIGHER_IS_BETTER))
"""The Evaluate Model metrics whose direction this app knows (normalised names)."""


def metric_key(name: str) -> str:
    """Normalise an Evaluate Model column name for comparison (case, BOM, spaces)."""
    return " ".join(name.replace("\ufeff", "").split()).casefold()


def known_direction(metric: str) -> bool | None:
    """True when higher is better for a known Evaluate Model metric, False when lower is."""
    return _HIGHER_IS_BETTER.get(metric_key(metric))


Training = Annotated[BesSpec | AzureMLSpec, Field(discriminator="kind")]
"""The training backend of a model, by `kind` (each kind's adapter is picked in wiring.py)."""


class GateSpec(_Spec):
    """When a retrained model is good enough to replace the champion."""

    metric: str
    """The Evaluate Model column that decides (e.g. 'AUC', 'Root Mean Squared Error')."""
    higher_is_better: bool | None = None
    """Needed only for a metric this app does not know."""
    min_improvement: float = Field(default=0.0, ge=0)
    """The challenger must beat the champion's metric by more than this (absolute)."""
    floors: dict[str, float] = Field(default_factory=dict)
    """Absolute bounds: at least this for higher-is-better metrics, at most for the others."""
    max_regression: dict[str, float] = Field(default_factory=dict)
    """Other metrics may get worse than the champion's by at most this much (absolute)."""
    directions: dict[str, bool] = Field(default_factory=dict)
    """Higher-is-better flags for floor or regression metrics this app does not know."""

    def higher(self, metric: str) -> bool:
        """Direction of a gate metric; validated at load so every gate metric has one."""
        if metric_key(metric) == metric_key(self.metric) and self.higher_is_better is not None:
            return self.higher_is_better
        for name, flag in self.directions.items():
            if metric_key(name) == metric_key(metric):
                return flag
        known = known_direction(metric)
        if known is None:
            raise ValueError(
                f"metric {metric!r} is not a known Evaluate Model metric; set its direction "
                "('higher_is_better' for the gate metric, 'directions' for the others)"
            )
        return known

    @model_validator(mode="after")
    def _directions_known(self) -> GateSpec:
        for metric in [self.metric, *self.floors, *self.max_regression]:
            self.higher(metric)
        for metric, margin in self.max_regression.items():
            if margin < 0:
                raise ValueError(f"max_regression[{metric!r}] must be >= 0")
        return self


Target = Annotated[ClassicTarget | NewTarget | OnlineEndpointSpec, Field(discriminator="kind")]


class ModelSpec(_Spec):
    """One model this app keeps fresh."""

    name: ModelName
    data_prefix: str | None = None
    """Blob prefix in the data container; defaults to '<name>/'."""
    formats: tuple[Literal["csv", "tsv"], ...] = ("csv", "tsv")
    columns: list[str] | None = None
    """Header columns every training file must have (extra columns are allowed)."""
    max_bytes: int = Field(default=5 * 1024**3, gt=0)
    training: Training
    gate: GateSpec
    target: Target
    retrain_every: timedelta | None = None
    """If set, the sweep retrains on the newest data once the champion is this old."""
    promotion: Literal["auto", "manual"] = "auto"
    """'manual': a run that passes the gate waits for `python -m retrain approve`."""
    quiet_period: timedelta = timedelta(seconds=60)
    max_wait: timedelta = timedelta(minutes=15)
    job_deadline: timedelta = timedelta(hours=6)

    @property
    def prefix(self) -> str:
        """The data prefix, always ending in '/'."""
        prefix = self.data_prefix if self.data_prefix is not None else self.name
        return prefix.rstrip("/") + "/"

    @model_validator(mode="before")
    @classmethod
    def _bes_is_training(cls, data: Any) -> Any:
        """Specs written before `training` had kinds carry a top-level `bes`: the same fields,
        read as `training: {kind: bes, ...}`."""
        if not isinstance(data, dict) or "bes" not in data:
            return data
        if "training" in data:
            raise ValueError("set training (with kind 'bes'), not both training and bes")
        migrated = {k: v for k, v in data.items() if k != "bes"}
        bes = data["bes"]
        migrated["training"] = {"kind": "bes", **bes} if isinstance(bes, dict) else bes
        return migrated

    @model_validator(mode="after")
    def _gate_metrics_logged(self) -> ModelSpec:
        """An Azure ML job reports the metrics it logs to MLflow: each one the gate uses
        must say under which key."""
        if not isinstance(self.training, AzureMLSpec):
            return self
        mapped = {metric_key(name) for name in self.training.metrics}
        gate = self.gate
        missing = [
            m
            for m in [gate.metric, *gate.floors, *gate.max_regression]
            if metric_key(m) not in mapped
        ]
        if missing:
            raise ValueError(
                f"training.metrics has no MLflow key for gate metric(s) {missing}; add e.g. "
                f'"{missing[0]}": {{"challenger": "<key>", "champion": "champion_<key>"}}'
            )
        return self

    @model_validator(mode="after")
    def _windows(self) -> ModelSpec:
        if self.max_wait < self.quiet_period:
            raise ValueError("max_wait must be at least quiet_period")
        if self.job_deadline <= timedelta(0):
            raise ValueError("job_deadline must be positive")
        return self


class Settings(StorageSettings):
    """Every app setting the functions read, validated once (the storage connection's own
    settings, `AzureWebJobsStorage` and `AzureWebJobsStorage__*`, are in StorageSettings)."""

    model_config = SettingsConfigDict(case_sensitive=True, extra="ignore", frozen=True)

    data_container: str = Field(validation_alias="RETRAIN_DATA_CONTAINER")
    jobs_queue: str = Field(validation_alias="RETRAIN_JOBS_QUEUE")
    evaluations_queue: str = Field(validation_alias="RETRAIN_EVALUATIONS_QUEUE")
    artifacts_container: str = Field(
        default="retrain-artifacts", validation_alias="RETRAIN_ARTIFACTS_CONTAINER"
    )
    state_container: str = Field(
        default="retrain-state", validation_alias="RETRAIN_STATE_CONTAINER"
    )
    quarantine_container: str = Field(
        default="retrain-quarantine", validation_alias="RETRAIN_QUARANTINE_CONTAINER"
    )
    events_queue: str = Field(default="retrain-events", validation_alias="RETRAIN_EVENTS_QUEUE")
    webhook_url: AnyHttpUrl | None = Field(default=None, validation_alias="RETRAIN_WEBHOOK_URL")
    webhook_secret: SecretStr | None = Field(
        default=None, validation_alias="RETRAIN_WEBHOOK_SECRET"
    )
    sweep_stall: timedelta = Field(
        default=timedelta(minutes=15), validation_alias="RETRAIN_SWEEP_STALL"
    )
    """A run whose step has not moved for this long (beyond its poll delay) is re-driven."""
    models_json: str | None = Field(default=None, validation_alias="RETRAIN_MODELS")
    models_file: Path | None = Field(default=None, validation_alias="RETRAIN_MODELS_FILE")
    poll_first_delay: timedelta = Field(
        default=timedelta(seconds=30), validation_alias="RETRAIN_POLL_FIRST_DELAY"
    )
    poll_max_delay: timedelta = Field(
        default=timedelta(minutes=10), validation_alias="RETRAIN_POLL_MAX_DELAY"
    )
    http_connect_timeout: float = Field(
        default=5.0, gt=0, validation_alias="RETRAIN_HTTP_CONNECT_TIMEOUT"
    )
    http_read_timeout: float = Field(
        default=60.0, gt=0, validation_alias="RETRAIN_HTTP_READ_TIMEOUT"
    )
    http_max_retry_wait: int = Field(
        default=MAX_RETRY_WAIT,
        ge=1,
        le=60,
        validation_alias="RETRAIN_HTTP_MAX_RETRY_WAIT",
    )
    """Seconds one call waits between two attempts at most (backoff or a service's
    Retry-After); a longer Retry-After goes back to the queue as the message's delay."""

    @field_validator(
        "data_container", "artifacts_container", "state_container", "quarantine_container"
    )
    @classmethod
    def _container_name(cls, value: str) -> str:
        if not (3 <= len(value) <= 63) or not all(
            c.islower() or c.isdigit() or c == "-" for c in value
        ):
            raise ValueError(f"{value!r} is not a valid container name (3-63 of a-z, 0-9, -)")
        return value

    _webhook_https = field_validator("webhook_url")(
        lambda url: _require_https(url) if url is not None else None
    )

    @field_validator("models_json", "models_file", "webhook_url", mode="before")
    @classmethod
    def _blank_is_unset(cls, value: Any) -> Any:
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("webhook_secret", mode="before")
    @classmethod
    def _no_blank_secret(cls, value: Any) -> Any:
        if isinstance(value, str) and not value.strip():
            raise ValueError(
                "is set but blank, which would sign nothing; set a real secret or remove the "
                "setting"
            )
        return value

    @model_validator(mode="after")
    def _delays(self) -> Settings:
        # The service's own clients poll a job at most once a second.
        if self.poll_first_delay < timedelta(seconds=1) or (
            self.poll_max_delay < self.poll_first_delay
        ):
            raise ValueError("need 1 s <= RETRAIN_POLL_FIRST_DELAY <= RETRAIN_POLL_MAX_DELAY")
        return self

    @functools.cached_property
    def models(self) -> dict[str, ModelSpec]:
        """The model specs from RETRAIN_MODELS (JSON) or RETRAIN_MODELS_FILE, by name."""
        return load_models(self.models_json, self.models_file)


def _describe(exc: ValidationError, *, source: str) -> str:
    lines = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err["loc"]) or source
        lines.append(f"{where}: {err['msg'].removeprefix('Value error, ')}")
    return "; ".join(lines)


def load_models(raw: str | None, path: Path | None) -> dict[str, ModelSpec]:
    """Parse the model specs; every problem names the setting and the field."""
    if raw and path:
        raise ConfigError("set RETRAIN_MODELS or RETRAIN_MODELS_FILE, not both")
    if path is not None:
        source = f"RETRAIN_MODELS_FILE ({path})"
        try:
            raw = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError(f"{source}: cannot read the file: {exc.strerror}") from exc
    else:
        source = "RETRAIN_MODELS"
    if not raw:
        raise ConfigError(
            "no models configured: set RETRAIN_MODELS to a JSON list of model specs "
            "or RETRAIN_MODELS_FILE to a file holding one (see README, Configuration)"
        )
    try:
        data: Any = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{source} is not valid JSON: {exc}") from exc
    if not isinstance(data, list) or not data:
        raise ConfigError(f"{source} must be a non-empty JSON list of model specs")
    models: dict[str, ModelSpec] = {}
    for index, item in enumerate(data):
        label = item.get("name", f"#{index}") if isinstance(item, dict) else f"#{index}"
        try:
            spec = ModelSpec.model_validate(item)
        except ValidationError as exc:
            raise ConfigError(
                f"{source}, model {label!r}: {_describe(exc, source=source)}"
            ) from exc
        if spec.name in models:
            raise ConfigError(f"{source}: model {spec.name!r} is configured twice")
        models[spec.name] = spec
    prefixes = sorted((m.prefix, m.name) for m in models.values())
    for (p1, n1), (p2, n2) in itertools.pairwise(prefixes):
        if p2.startswith(p1):
            raise ConfigError(
                f"{source}: data prefixes of {n1!r} ({p1}) and {n2!r} ({p2}) overlap; "
                "a blob must belong to exactly one model"
            )
    return models


def read_secret(setting: str, *, purpose: str) -> SecretStr:
    """Read a secret from the app setting a model spec names (Key Vault references work)."""
    value = os.environ.get(setting)
    if not value:
        raise ConfigError(f"app setting {setting} ({purpose}) is not set")
    return SecretStr(value)


@functools.cache
def get_settings() -> Settings:
    """The app's settings, validated on first use and then cached."""
    try:
        settings = Settings()
    except ValidationError as exc:
        problems = [_describe(exc, source="settings")]
        if all(err["loc"] for err in exc.errors()):  # the connection check did not run yet
            try:
                StorageSettings()
            except ValidationError as storage:
                problems.append(_describe(storage, source="storage connection"))
        raise ConfigError(
            f"invalid app settings: {'; '.join(problems)} (see local.settings.example.json)"
        ) from exc
    _ = settings.models
    if settings.storage.uses_identity:
        _check_deadlines(settings)
    return settings


def _check_deadlines(settings: Settings) -> None:
    """Without an account key, job SAS tokens are signed with user delegation keys, which
    storage gives for 7 days at most: a longer job deadline could never be signed for."""
    from retrain.sas import LONGEST_JOB_DEADLINE

    for spec in settings.models.values():
        if spec.job_deadline > LONGEST_JOB_DEADLINE:
            raise ConfigError(
                f"model {spec.name}: job_deadline {spec.job_deadline} is longer than storage "
                f"without keys can sign a job's SAS for ({LONGEST_JOB_DEADLINE} at most: user "
                "delegation keys last 7 days): shorten job_deadline"
            )
