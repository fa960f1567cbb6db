"""Properties of the gate, for every metric it knows: it never promotes a worse model.

The expected answers come from the tables below, written from the Evaluate Model columns of
the REST contract (spec §4), not from the code under test.
"""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from retrain.errors import EvaluationError
from retrain.evaluation import decide
from retrain.settings import KNOWN_METRICS, GateSpec, known_direction

HIGHER_IS_BETTER = {
    "accuracy",
    "precision",
    "recall",
    "f-score",
    "auc",
    "coefficient of determination",
}
RANGES = {
    "accuracy": (0.0, 1.0),
    "precision": (0.0, 1.0),
    "recall": (0.0, 1.0),
    "f-score": (0.0, 1.0),
    "auc": (0.0, 1.0),
    "mean zero one error": (0.0, 1.0),
    "coefficient of determination": (-1e6, 1.0),
    "mean absolute error": (0.0, 1e6),
    "root mean squared error": (0.0, 1e6),
    "relative absolute error": (0.0, 1e6),
    "relative squared error": (0.0, 1e6),
    "average log loss": (0.0, 1e6),
    "negative log likelihood": (-1e6, 1e6),
}
"""Finite values each metric can take (the unbounded sides cut at ±1e6 for the strategies)."""
BOUNDED_BELOW = {m for m, (low, _) in RANGES.items() if low == 0.0}
BOUNDED_ABOVE = {m for m, (_, high) in RANGES.items() if high == 1.0}

METRICS = list(KNOWN_METRICS)
margin = st.floats(min_value=0, max_value=10, allow_nan=False, allow_infinity=False)
not_finite = st.sampled_from([math.nan, math.inf, -math.inf])
any_finite = st.floats(min_value=-1e6, max_value=1e6, allow_nan=False, allow_infinity=False)


def higher(metric: str) -> bool:
    return metric in HIGHER_IS_BETTER


def valid(metric: str) -> st.SearchStrategy[float]:
    low, high = RANGES[metric]
    return st.floats(min_value=low, max_value=high, allow_nan=False, allow_infinity=False)


@st.composite
def metric_and_values(draw: st.DrawFn, n: int) -> tuple[str, list[float]]:
    metric = draw(st.sampled_from(METRICS))
    return metric, [draw(valid(metric)) for _ in range(n)]


def test_the_tables_cover_every_known_metric() -> None:
    assert set(RANGES) == set(METRICS)
    for metric in METRICS:
        assert known_direction(metric.upper()) is higher(metric)


@given(metric_and_values(2), margin)
def test_a_model_that_is_not_better_by_the_margin_is_never_promoted(
    drawn: tuple[str, list[float]], min_improvement: float
) -> None:
    metric, (champion, challenger) = drawn
    gate = GateSpec(metric=metric, min_improvement=min_improvement)
    decision = decide(gate, {metric: challenger}, {metric: champion})
    gain = challenger - champion if higher(metric) else champion - challenger
    assert decision.promote is (gain > min_improvement)


@given(metric_and_values(2), metric_and_values(2), margin)
def test_regression_beyond_the_allowed_margin_is_never_promoted(
    primary: tuple[str, list[float]], secondary: tuple[str, list[float]], allowed: float
) -> None:
    metric, (new, old) = primary
    other, (new_other, old_other) = secondary
    gate = GateSpec(metric=metric, max_regression={other: allowed})
    challenger = {metric: new, other: new_other}
    champion = {metric: old, other: old_other}
    if other == metric:
        challenger, champion = {metric: new}, {metric: old}
        new_other, old_other = new, old
    decision = decide(gate, challenger, champion)
    gain = new - old if higher(metric) else old - new
    loss = old_other - new_other if higher(other) else new_other - old_other
    assert decision.promote is (gain > 0 and loss <= allowed)
    if gain > 0 and loss > allowed:
        assert decision.reason.startswith(f"{other} regressed"), decision.reason


@given(metric_and_values(1), not_finite)
def test_non_finite_gate_metric_is_an_evaluation_error(
    drawn: tuple[str, list[float]], value: float
) -> None:
    metric, (good,) = drawn
    gate = GateSpec(metric=metric)
    for challenger, champion in (
        ({metric: value}, {metric: good}),
        ({metric: good}, {metric: value}),
        ({metric: value}, None),
    ):
        with pytest.raises(EvaluationError, match=metric):
            decide(gate, challenger, champion)


@given(st.sampled_from(METRICS), any_finite, st.booleans(), st.booleans())
def test_out_of_range_values_are_an_evaluation_error_in_either_row(
    metric: str, value: float, in_champion: bool, has_champion: bool
) -> None:
    low, high = RANGES[metric]
    out = value < low if metric in BOUNDED_BELOW else False
    out = out or (value > high if metric in BOUNDED_ABOVE else False)
    gate = GateSpec(metric=metric)
    fine = {metric: (low + high) / 2 if metric in BOUNDED_ABOVE else 0.5}
    challenger, champion = ({metric: value}, fine if has_champion else None)
    if in_champion:
        challenger, champion = fine, {metric: value}
    if out:
        with pytest.raises(EvaluationError, match=f"{metric} is"):
            decide(gate, challenger, champion)
    else:
        decide(gate, challenger, champion)


@given(st.sampled_from(METRICS), st.sampled_from(METRICS), st.data())
def test_missing_metric_never_promotes(metric: str, present: str, data: st.DataObject) -> None:
    gate = GateSpec(metric=metric, floors={present: RANGES[present][0]})
    assert not decide(gate, {}, None).promote
    if present != metric:
        assert not decide(gate, {metric: data.draw(valid(metric))}, None).promote


@given(metric_and_values(2))
def test_floors_are_direction_aware(drawn: tuple[str, list[float]]) -> None:
    metric, (value, bound) = drawn
    decision = decide(GateSpec(metric=metric, floors={metric: bound}), {metric: value}, None)
    meets = value >= bound if higher(metric) else value <= bound
    assert decision.promote is meets
