"""A job's metrics from its MLflow run (spec §5.2-5.3): the run id is the job name."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, urlsplit

from retrain.azureml.workspace import ArmClient, object_of
from retrain.connection import is_loopback
from retrain.errors import EvaluationError, PermanentRemoteError
from retrain.evaluation import Evaluation, check_metrics
from retrain.http import field_of, shape_error

MAX_PAGES = 50
"""Pages of one metric's history read at most; a longer history is an error, not a hang."""


@dataclass(frozen=True)
class MetricName:
    """One gate metric and the MLflow keys the job logs it under."""

    name: str
    """The metric as the gate knows it, e.g. `Root Mean Squared Error`."""
    challenger: str
    """The key of the trained model's value, e.g. `rmse`."""
    champion: str | None = None
    """The key of the champion's value on the same hold-out data, e.g. `champion_rmse`."""


def rest_base(tracking_uri: str) -> str:
    """The MLflow REST base of a tracking URI: `azureml://` becomes `https://` (spec §2), plain
    http only for a loopback host (the local emulator)."""
    parts = urlsplit(tracking_uri)
    if parts.scheme not in ("azureml", "https") or not parts.hostname:
        raise PermanentRemoteError(
            f"mlFlowTrackingUri {tracking_uri!r} is not an azureml:// or https:// URI"
        )
    scheme = "http" if is_loopback(parts.hostname) else "https"
    rest = tracking_uri.split("://", 1)[1].rstrip("/")
    return f"{scheme}://{rest}/api/2.0/mlflow"


class MlflowRuns:
    """MLflow REST `runs/get` and `metrics/get-history`, with the ARM token."""

    def __init__(self, arm: ArmClient, tracking_uri: str) -> None:
        self._arm = arm
        self._base = rest_base(tracking_uri)

    def run(self, run_id: str) -> dict[str, Any]:
        """`runs/get`: the run's info and its latest metrics, params and tags."""
        what = f"MLflow runs/get {run_id}"
        url = f"{self._base}/runs/get?run_id={quote(run_id)}"
        body = object_of(self._arm.request("GET", url, what), what)
        return field_of(body, "run", dict, what=what, required=True)  # type: ignore[no-any-return]

    def history(self, run_id: str, key: str) -> list[dict[str, Any]]:
        """`metrics/get-history`: every logged value of one metric, all pages."""
        what = f"MLflow metrics/get-history {run_id} {key}"
        entries: list[dict[str, Any]] = []
        token: str | None = None
        for _ in range(MAX_PAGES):
            url = f"{self._base}/metrics/get-history?run_id={quote(run_id)}&metric_key={quote(key)}"
            if token:
                url += f"&page_token={quote(token)}"
            body = object_of(self._arm.request("GET", url, what), what)
            for entry in field_of(body, "metrics", list, what=what) or []:
                if not isinstance(entry, dict):
                    raise shape_error(what, "metrics[]", "a JSON object", entry)
                entries.append(entry)
            token = field_of(body, "next_page_token", str, what=what)
            if not token:
                return entries
        raise PermanentRemoteError(f"{what}: more than {MAX_PAGES} pages of history")

    def last(self, run_id: str, key: str) -> float | None:
        """The metric's last value (highest step, then latest timestamp), None if never logged."""
        what = f"MLflow metric {key} of run {run_id}"
        history = self.history(run_id, key)
        if not history:
            return None
        latest = max(
            history, key=lambda e: (_number(e, "step", what), _number(e, "timestamp", what))
        )
        return _value(latest, what)

    def evaluation(self, run_id: str, names: list[MetricName]) -> Evaluation:
        """The gate's numbers: the trained model's row, and the champion's when the job logged
        any of it. Checked like an Evaluate Model output (non-finite, out of range)."""
        if not names:
            raise EvaluationError("no metric names are configured for the gate")
        challenger: dict[str, float] = {}
        champion: dict[str, float] = {}
        missing_champion: list[str] = []
        for metric in names:
            value = self.last(run_id, metric.challenger)
            if value is None:
                raise EvaluationError(
                    f"run {run_id} logged no metric {metric.challenger!r} ({metric.name})"
                )
            challenger[metric.name] = value
            if metric.champion is not None:
                other = self.last(run_id, metric.champion)
                if other is None:
                    missing_champion.append(metric.champion)
                else:
                    champion[metric.name] = other
        used = [m.name for m in names]
        check_metrics(challenger, f"run {run_id} (trained model)", used=used)
        if champion and missing_champion:
            raise EvaluationError(
                f"run {run_id} logged some champion metrics but not {missing_champion}"
            )
        if not champion:
            return Evaluation(challenger)
        check_metrics(champion, f"run {run_id} (champion)", used=used)
        return Evaluation(challenger, champion)


def _number(entry: dict[str, Any], key: str, what: str) -> float:
    value = entry.get(key, 0)
    if isinstance(value, str) and value.lstrip("-").isdigit():
        return float(value)  # MLflow's JSON may carry int64 fields as strings
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise shape_error(what, key, "a number", value)
    return float(value)


def _value(entry: dict[str, Any], what: str) -> float:
    value = entry.get("value")
    if isinstance(value, str):
        # MLflow writes NaN and infinities as strings in JSON; they are kept as numbers so the
        # gate's check refuses them with its own message.
        try:
            return float(value)
        except ValueError:
            raise shape_error(what, "value", "a number", value) from None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise shape_error(what, "value", "a number", value)
    return float(value)
