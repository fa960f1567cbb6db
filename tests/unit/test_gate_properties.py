"""Properties of the gate, for every metric it knows: it never promotes a worse model."""

from __future__ import annotations

import math

from hypothesis import given
from hypothesis import strategies as st

from retrain.evaluation import decide
from retrain.settings import KNOWN_METRICS, GateSpec, known_direction

METRICS = list(KNOWN_METRICS)
finite = st.floats(min_value=-1e6, max_value=1e6, allow_nan=False, allow_infinity=False)
margin = st.floats(min_value=0, max_value=10, allow_nan=False, allow_infinity=False)
not_finite = st.sampled_from([math.nan, math.inf, -math.inf])


def test_directions_of_the_known_metrics() -> None:
    higher = {"accuracy", "precision", "recall", "f-score", "auc", "coefficient of determination"}
    for metric in METRICS:
        assert known_direction(metric.upper()) is (metric in higher)


@given(st.sampled_from(METRICS), finite, finite, margin)
def test_a_model_that_is_not_better_by_the_margin_is_never_promoted(
    metric: str, champion: float, challenger: float, min_improvement: float
) -> None:
    gate = GateSpec(metric=metric, min_improvement=min_improvement)
    decision = decide(gate, {metric: challenger}, {metric: champion})
    gain = challenger - champion if known_direction(metric) else champion - challenger
    assert decision.promote is (gain > min_improvement)


@given(st.sampled_from(METRICS), st.sampled_from(METRICS), finite, finite, finite, finite, margin)
def test_regression_beyond_the_allowed_margin_is_never_promoted(
    metric: str,
    other: str,
    new: float,
    old: float,
    new_other: float,
    old_other: float,
    allowed: float,
) -> None:
    gate = GateSpec(metric=metric, max_regression={other: allowed})
    challenger = {metric: new, other: new_other}
    champion = {metric: old, other: old_other}
    if other == metric:
        challenger, champion = {metric: new}, {metric: old}
        new_other, old_other = new, old
    decision = decide(gate, challenger, champion)
    loss = old_other - new_other if known_direction(other) else new_other - old_other
    if decision.promote:
        assert loss <= allowed


@given(st.sampled_from(METRICS), not_finite, finite)
def test_non_finite_challenger_metric_never_promotes(
    metric: str, value: float, champion: float
) -> None:
    gate = GateSpec(metric=metric)
    assert not decide(gate, {metric: value}, {metric: champion}).promote
    assert not decide(gate, {metric: value}, None).promote


@given(st.sampled_from(METRICS), st.sampled_from(METRICS), finite)
def test_missing_metric_never_promotes(metric: str, present: str, value: float) -> None:
    gate = GateSpec(metric=metric, floors={present: 0.0})
    assert not decide(gate, {}, None).promote
    if present != metric:
        assert not decide(gate, {metric: value}, None).promote


@given(st.sampled_from(METRICS), finite, finite)
def test_floors_are_direction_aware(metric: str, value: float, bound: float) -> None:
    decision = decide(GateSpec(metric=metric, floors={metric: bound}), {metric: value}, None)
    meets = value >= bound if known_direction(metric) else value <= bound
    assert decision.promote is meets
