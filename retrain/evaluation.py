"""Evaluate Model CSV parsing and the promotion gate. Pure: numbers in, a decision out."""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from retrain.errors import EvaluationError
from retrain.settings import GateSpec, metric_key

Metrics = dict[str, float]

_INF = math.inf
VALID_RANGES: dict[str, tuple[float, float]] = {
    "accuracy": (0.0, 1.0),
    "precision": (0.0, 1.0),
    "recall": (0.0, 1.0),
    "f-score": (0.0, 1.0),
    "auc": (0.0, 1.0),
    "mean zero one error": (0.0, 1.0),
    "coefficient of determination": (-_INF, 1.0),
    "mean absolute error": (0.0, _INF),
    "root mean squared error": (0.0, _INF),
    "relative absolute error": (0.0, _INF),
    "relative squared error": (0.0, _INF),
    "average log loss": (0.0, _INF),
    "negative log likelihood": (-_INF, _INF),
}
"""The values each known Evaluate Model metric can take (normalised names, closed intervals)."""

MAY_BE_INFINITE = frozenset({"negative log likelihood"})
"""Metrics Evaluate Model may write as `Infinity` (spec §4); only when the gate ignores them."""


def _show_range(low: float, high: float) -> str:
    if low == -_INF:
        return f"at most {_fmt(high)}"
    if high == _INF:
        return f"at least {_fmt(low)}"
    return f"between {_fmt(low)} and {_fmt(high)}"


def check_metrics(metrics: Mapping[str, float], row: str, *, used: Iterable[str] = ()) -> None:
    """Raise EvaluationError for an impossible row: a known metric out of its valid range or
    not a number, a metric the gate uses that is not finite, or two columns with one name."""
    needed = {metric_key(name) for name in used}
    seen: dict[str, str] = {}
    for name, value in metrics.items():
        key = metric_key(name)
        if key in seen:
            raise EvaluationError(
                f"{row}: columns {seen[key]!r} and {name!r} are the same metric; "
                "which one counts is ambiguous"
            )
        seen[key] = name
        bounds = VALID_RANGES.get(key)
        finite_needed = key in needed or (bounds is not None and key not in MAY_BE_INFINITE)
        if math.isnan(value) or (finite_needed and not math.isfinite(value)):
            wanted = _show_range(*bounds) if bounds else "a finite number"
            raise EvaluationError(f"{row}: {name} is {value}; it must be {wanted}")
        if bounds is not None and not bounds[0] <= value <= bounds[1]:
            raise EvaluationError(
                f"{row}: {name} is {_fmt(value)}, outside its valid range ({_show_range(*bounds)})"
            )


@dataclass(frozen=True)
class Evaluation:
    """The rows of an Evaluate Model output: the retrained model, and the champion if scored."""

    challenger: Metrics
    champion: Metrics | None = None


def parse_evaluation_csv(text: str) -> Evaluation:
    """Parse an Evaluate Model CSV by column name.

    One data row scores the retrained model; a second row (Evaluate Model's right input) scores
    the current model on the same hold-out data. Columns that are not numbers are ignored.
    """
    reader = csv.reader(io.StringIO(text.lstrip("\ufeff")))
    rows = [row for row in reader if any(cell.strip() for cell in row)]
    if not rows:
        raise EvaluationError("the evaluation output is empty")
    header = [" ".join(name.split()) for name in rows[0]]
    seen: dict[str, str] = {}
    for name in header:
        if metric_key(name) in seen:
            raise EvaluationError(
                f"the evaluation output has two columns named {seen[metric_key(name)]!r} and "
                f"{name!r}; which one counts is ambiguous"
            )
        seen[metric_key(name)] = name
    data = rows[1:]
    if not data:
        raise EvaluationError("the evaluation output has a header but no data row")
    if len(data) > 2:
        raise EvaluationError(
            f"the evaluation output has {len(data)} data rows; expected 1 (the retrained model) "
            "or 2 (retrained model, then the current model on the same data)"
        )
    parsed = [_row(header, row, number) for number, row in enumerate(data, start=2)]
    if not parsed[0]:
        raise EvaluationError(f"no numeric metric in the evaluation output (columns: {header})")
    for metrics, row in zip(parsed, _ROWS, strict=False):
        check_metrics(metrics, row)
    return Evaluation(challenger=parsed[0], champion=parsed[1] if len(parsed) > 1 else None)


_ROWS = ("the retrained model's row", "the champion's row")


def _row(header: list[str], row: list[str], line: int) -> Metrics:
    if len(row) != len(header):
        raise EvaluationError(
            f"line {line} of the evaluation output has {len(row)} cells, the header {len(header)}"
        )
    metrics: Metrics = {}
    for name, cell in zip(header, row, strict=True):
        try:
            metrics[name] = float(cell.strip())
        except ValueError:
            continue
    return metrics


def lookup(metrics: Mapping[str, float], name: str) -> float | None:
    """A metric by name, compared case-insensitively; None when absent."""
    wanted = metric_key(name)
    for key, value in metrics.items():
        if metric_key(key) == wanted:
            return value
    return None


@dataclass(frozen=True)
class Decision:
    """Whether to promote, and why, in words an on-call engineer can act on."""

    promote: bool
    reason: str


def _fmt(value: float) -> str:
    return f"{value:.6g}"


def decide(gate: GateSpec, challenger: Metrics, champion: Metrics | None) -> Decision:
    """Apply the gate: floors first, then improvement and allowed regression vs the champion.

    Impossible metrics (out of range, not finite, ambiguous) in either row raise EvaluationError:
    such an evaluation cannot be trusted to promote or to reject.
    """
    used = [gate.metric, *gate.floors, *gate.max_regression]
    check_metrics(challenger, _ROWS[0], used=used)
    if champion is not None:
        check_metrics(champion, _ROWS[1], used=used)
    primary = lookup(challenger, gate.metric)
    if primary is None:
        return Decision(False, f"the evaluation has no {gate.metric!r} column (the gate metric)")
    refused = _below_floor(gate, challenger)
    if refused is not None:
        return refused
    if champion is None:
        return Decision(
            True, f"no champion to beat; {gate.metric} {_fmt(primary)} meets the floors"
        )
    return _against_champion(gate, primary, challenger, champion)


def _below_floor(gate: GateSpec, challenger: Metrics) -> Decision | None:
    """The refusal for the first floor the challenger misses, or None when it meets them all."""
    for metric, bound in gate.floors.items():
        value = lookup(challenger, metric)
        if value is None or not math.isfinite(value):
            return Decision(False, f"floor metric {metric!r} is missing or not finite")
        higher = gate.higher(metric)
        if (value < bound) if higher else (value > bound):
            relation = "below the floor" if higher else "above the ceiling"
            return Decision(False, f"{metric} {_fmt(value)} is {relation} {_fmt(bound)}")
    return None


def _against_champion(
    gate: GateSpec, primary: float, challenger: Metrics, champion: Metrics
) -> Decision:
    """Improvement on the gate metric, then no regression past its margin on the others."""
    current = lookup(champion, gate.metric)
    if current is None or math.isnan(current):
        return Decision(
            False,
            f"the champion's {gate.metric} is unknown, so the retrained model cannot be "
            "shown to be better; promote it by hand if intended",
        )
    higher = gate.higher(gate.metric)
    gain = primary - current if higher else current - primary
    if not gain > gate.min_improvement:
        return Decision(
            False,
            f"not better: {gate.metric} {_fmt(primary)} vs champion {_fmt(current)} "
            f"(needs an improvement above {_fmt(gate.min_improvement)})",
        )
    regressed = _regressed(gate, challenger, champion)
    if regressed is not None:
        return regressed
    return Decision(True, f"better: {gate.metric} {_fmt(primary)} vs champion {_fmt(current)}")


def _regressed(gate: GateSpec, challenger: Metrics, champion: Metrics) -> Decision | None:
    """The refusal for the first metric that lost more than its margin, or None."""
    for metric, margin in gate.max_regression.items():
        new, old = lookup(challenger, metric), lookup(champion, metric)
        if new is None or not math.isfinite(new):
            return Decision(False, f"regression metric {metric!r} is missing or not finite")
        if old is None or math.isnan(old):
            continue
        loss = old - new if gate.higher(metric) else new - old
        if loss > margin:
            return Decision(
                False,
                f"{metric} regressed: {_fmt(new)} vs champion {_fmt(old)} (allowed {_fmt(margin)})",
            )
    return None
