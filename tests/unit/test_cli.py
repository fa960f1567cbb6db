"""The operator commands over a Retrainer with fakes."""

from __future__ import annotations

import json

import pytest

from localdev.sample import housing_csv
from retrain import cli
from tests.harness import World


def awaiting() -> World:
    w = World(promotion="manual")
    w.drop("housing/a.csv", housing_csv(10, seed=1))
    for _ in range(3):
        w.deliver()
    w.evaluation("Root Mean Squared Error\n2.5\n")
    w.deliver()
    assert w.run()["state"] == "awaiting_approval"
    return w


def test_runs_shows_who_rejected_a_run_and_why(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    w = awaiting()
    monkeypatch.setattr(cli, "_app", lambda: w.retrainer)
    run_id = w.run()["run_id"]
    assert cli.main(["reject", run_id, "--reason", "holiday freeze", "--by", "carol"]) == 0
    capsys.readouterr()

    assert cli.main(["runs"]) == 0
    (row,) = capsys.readouterr().out.splitlines()[1:]
    assert row.endswith("rejected by carol: holiday freeze")
    assert "no champion" not in row

    assert cli.main(["show", run_id]) == 0
    assert "  rejected by carol: holiday freeze" in capsys.readouterr().out.splitlines()

    assert cli.main(["--json", "runs"]) == 0
    (listed,) = json.loads(capsys.readouterr().out)
    assert (listed["rejected_by"], listed["rejected_reason"]) == ("carol", "holiday freeze")


CHAMPION = {
    "run_id": "c",
    "model": "artifacts/housing/c/model.ilearner",
    "metrics": {"Root Mean Squared Error": 1.0},
}


def test_runs_shows_the_gates_reason_for_a_run_the_gate_rejected(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    w = World()
    w.drop("housing/a.csv", housing_csv(10, seed=1))
    for _ in range(3):
        w.deliver()
    w.ledger.update(
        "models/housing.json",
        lambda d: {**d, "champion": CHAMPION},
    )
    w.evaluation("Root Mean Squared Error\n2.5\n")
    w.deliver()
    monkeypatch.setattr(cli, "_app", lambda: w.retrainer)
    assert cli.main(["runs"]) == 0
    (row,) = capsys.readouterr().out.splitlines()[1:]
    assert "not better: Root Mean Squared Error 2.5 vs champion 1" in row
