"""Evaluate Model CSV parsing and the gate."""

from __future__ import annotations

import math

import pytest

from retrain.errors import EvaluationError
from retrain.evaluation import decide, parse_evaluation_csv
from retrain.settings import GateSpec

REGRESSION = (
    "Negative Log Likelihood,Mean Absolute Error,Root Mean Squared Error,Relative Absolute Error,"
    "Relative Squared Error,Coefficient of Determination\r\n"
    "Infinity,0.0264,0.0352,0.1234,1.23406681461624E-06,0.9876\r\n"
)


class TestParse:
    def test_regression_row_from_a_real_bes_output(self) -> None:
        ev = parse_evaluation_csv(REGRESSION)
        assert ev.champion is None
        assert ev.challenger["Root Mean Squared Error"] == 0.0352
        assert math.isinf(ev.challenger["Negative Log Likelihood"])
        assert ev.challenger["Relative Squared Error"] == pytest.approx(1.234e-06, rel=1e-3)

    def test_two_rows_are_challenger_then_champion(self) -> None:
        ev = parse_evaluation_csv("\ufeffAUC, Accuracy\n0.91,0.88\n0.87,0.86\n")
        assert ev.challenger == {"AUC": 0.91, "Accuracy": 0.88}
        assert ev.champion == {"AUC": 0.87, "Accuracy": 0.86}

    def test_non_numeric_columns_are_ignored(self) -> None:
        ev = parse_evaluation_csv("Positive Label,AUC\nyes,0.9\n")
        assert ev.challenger == {"AUC": 0.9}


RMSE = GateSpec(metric="Root Mean Squared Error")
AUC = GateSpec(
    metric="auc",
    min_improvement=0.01,
    floors={"Accuracy": 0.7},
    max_regression={"Average Log Loss": 0.05},
)


@pytest.mark.parametrize(
    ("gate", "challenger", "champion", "promote", "reason"),
    [
        (RMSE, {"Root Mean Squared Error": 2.0}, None, True, "no champion"),
        (RMSE, {"Root Mean Squared Error": 2.0}, {"Root Mean Squared Error": 3.0}, True, "better"),
        (
            RMSE,
            {"Root Mean Squared Error": 3.0},
            {"Root Mean Squared Error": 2.0},
            False,
            "not better",
        ),
        (
            RMSE,
            {"Root Mean Squared Error": 2.0},
            {"Root Mean Squared Error": 2.0},
            False,
            "not better",
        ),
        (RMSE, {"Mean Absolute Error": 1.0}, None, False, "no 'Root Mean Squared Error' column"),
        (
            RMSE,
            {"Root Mean Squared Error": 1.0},
            {"Mean Absolute Error": 1.0},
            False,
            "champion's Root Mean Squared Error is unknown",
        ),
        (
            AUC,
            {"AUC": 0.9, "Accuracy": 0.8, "Average Log Loss": 0.3},
            {"AUC": 0.85, "Average Log Loss": 0.3},
            True,
            "better: auc",
        ),
        (
            AUC,
            {"AUC": 0.9, "Accuracy": 0.6, "Average Log Loss": 0.3},
            None,
            False,
            "Accuracy 0.6 is below the floor 0.7",
        ),
        (
            AUC,
            {"AUC": 0.855, "Accuracy": 0.8, "Average Log Loss": 0.3},
            {"AUC": 0.85, "Average Log Loss": 0.3},
            False,
            "needs an improvement above 0.01",
        ),
        (
            AUC,
            {"AUC": 0.9, "Accuracy": 0.8, "Average Log Loss": 0.4},
            {"AUC": 0.85, "Average Log Loss": 0.3},
            False,
            "Average Log Loss regressed",
        ),
        (AUC, {"AUC": 0.9, "Average Log Loss": 0.3}, None, False, "floor metric 'Accuracy'"),
    ],
)
def test_gate(
    gate: GateSpec,
    challenger: dict[str, float],
    champion: dict[str, float] | None,
    promote: bool,
    reason: str,
) -> None:
    decision = decide(gate, challenger, champion)
    assert decision.promote is promote
    assert reason in decision.reason


IMPOSSIBLE = [
    ({"AUC": 93.0}, "AUC is 93, outside its valid range (between 0 and 1)"),
    ({"AUC": 1.7}, "AUC is 1.7, outside its valid range (between 0 and 1)"),
    ({"AUC": -0.4}, "AUC is -0.4, outside its valid range (between 0 and 1)"),
    ({"Accuracy": 1.01}, "Accuracy is 1.01"),
    ({"Precision": -0.1}, "Precision is -0.1"),
    ({"Recall": 2.0}, "Recall is 2"),
    ({"F-Score": 1.5}, "F-Score is 1.5"),
    ({"Mean Zero One Error": 1.2}, "Mean Zero One Error is 1.2"),
    ({"Root Mean Squared Error": -5.0}, "Root Mean Squared Error is -5, outside its valid range"),
    ({"Mean Absolute Error": -0.1}, "(at least 0)"),
    ({"Relative Absolute Error": -1.0}, "Relative Absolute Error is -1"),
    ({"Relative Squared Error": -1.0}, "Relative Squared Error is -1"),
    ({"Average Log Loss": -0.2}, "Average Log Loss is -0.2"),
    (
        {"Coefficient of Determination": 7.5},
        "Coefficient of Determination is 7.5, outside its valid range (at most 1)",
    ),
    ({"AUC": math.nan}, "AUC is nan"),
    ({"Root Mean Squared Error": math.inf}, "Root Mean Squared Error is inf"),
    ({"Coefficient of Determination": -math.inf}, "is -inf"),
    ({"AUC": 0.9, "auc ": 0.8}, "columns 'AUC' and 'auc ' are the same metric"),
]


@pytest.mark.parametrize(("metrics", "message"), IMPOSSIBLE)
@pytest.mark.parametrize("row", ["challenger", "champion"])
def test_impossible_metrics_are_an_evaluation_error(
    metrics: dict[str, float], message: str, row: str
) -> None:
    good = {"AUC": 0.8, "Root Mean Squared Error": 1.0, "Coefficient of Determination": 0.5}
    gate = GateSpec(metric="AUC")
    bad = {**good, **metrics}
    challenger, champion = (bad, good) if row == "challenger" else (good, bad)
    with pytest.raises(EvaluationError) as info:
        decide(gate, challenger, champion)
    assert message in str(info.value)
    which = "the retrained model's row" if row == "challenger" else "the champion's row"
    assert str(info.value).startswith(which)


@pytest.mark.parametrize(("metrics", "message"), IMPOSSIBLE[:-1])
def test_impossible_metrics_in_the_csv_are_an_evaluation_error(
    metrics: dict[str, float], message: str
) -> None:
    header = ",".join(metrics)
    bad = ",".join(repr(v).replace("inf", "Infinity") for v in metrics.values())
    fine = ",".join("0.5" for _ in metrics)
    with pytest.raises(EvaluationError, match="the retrained model's row") as info:
        parse_evaluation_csv(f"{header}\n{bad}\n")
    assert message in str(info.value)
    with pytest.raises(EvaluationError, match="the champion's row"):
        parse_evaluation_csv(f"{header}\n{fine}\n{bad}\n")


def test_first_champion_with_an_impossible_metric_is_refused() -> None:
    with pytest.raises(EvaluationError, match=r"AUC is -0\.4"):
        decide(GateSpec(metric="AUC"), {"AUC": -0.4}, None)


def test_duplicate_gate_column_in_the_csv_is_ambiguous() -> None:
    with pytest.raises(EvaluationError, match="two columns named 'AUC' and 'auc'"):
        parse_evaluation_csv("AUC,Accuracy,auc\n0.6,0.8,0.9\n")


def test_infinite_negative_log_likelihood_is_accepted_unless_the_gate_uses_it() -> None:
    ev = parse_evaluation_csv(REGRESSION)
    assert decide(RMSE, ev.challenger, None).promote
    gate = GateSpec(metric="Negative Log Likelihood")
    with pytest.raises(EvaluationError, match="Negative Log Likelihood is inf"):
        decide(gate, ev.challenger, None)


def test_unknown_metric_needs_a_direction() -> None:
    with pytest.raises(ValueError, match="not a known Evaluate Model metric"):
        GateSpec(metric="Custom Score")
    assert GateSpec(metric="Custom Score", higher_is_better=False).higher("custom score") is False
