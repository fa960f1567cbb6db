"""Evaluate Model CSV parsing and the gate."""

from __future__ import annotations

import math

import pytest

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
        (
            RMSE,
            {"Root Mean Squared Error": 2.0},
            {"Root Mean Squared Error": math.inf},
            True,
            "better",
        ),
        (RMSE, {"Root Mean Squared Error": math.nan}, None, False, "not a number"),
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


def test_unknown_metric_needs_a_direction() -> None:
    with pytest.raises(ValueError, match="not a known Evaluate Model metric"):
        GateSpec(metric="Custom Score")
    assert GateSpec(metric="Custom Score", higher_is_better=False).higher("custom score") is False
