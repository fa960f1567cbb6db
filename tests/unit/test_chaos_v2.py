"""The chaos harness's v2 side: the traffic map is judged against the champion, the kind of a
scenario is drawn apart from its faults, one-shot faults aim at the v2 calls, and the worker's
crash wrappers keep a v2 backend and an online endpoint whole."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pytest

from localdev import chaos_v2, v2stack
from localdev.azureml_v2 import Emulator
from localdev.azureml_v2.serving import Deployment
from localdev.chaos import FAULTS, KINDS, ODDS, Result, Scenario, _run_of, draw_kind
from localdev.chaos_v2 import Deployed, traffic_violations
from localdev.chaosworker import Crasher, CrashingTarget, CrashingTraining, crashing
from retrain.deploy import SUCCEEDED, Progress

WS = v2stack.WORKSPACE_ID
V1 = f"{WS}/models/housing/versions/1"
V2 = f"{WS}/models/housing/versions/2"


class TestTrafficAgainstTheChampion:
    def test_all_traffic_on_the_deployment_holding_the_champion_passes(self) -> None:
        deployments = {"blue": Deployed(V1, "Succeeded"), "green": Deployed(V2, "Succeeded")}
        assert traffic_violations({"green": 100}, "Succeeded", deployments, V2, {}) == []

    def test_no_champion_and_the_initial_map_passes(self) -> None:
        assert traffic_violations({}, "Succeeded", {}, None, {}) == []

    @pytest.mark.parametrize(
        ("traffic", "state", "deployments", "champion", "says"),
        [
            # The map still on the old model: the champion pointer moved, traffic did not.
            ({"blue": 100}, "Succeeded", {"blue": Deployed(V1, "Succeeded")}, V2, "serves"),
            # A canary left half way.
            (
                {"blue": 50, "green": 50},
                "Succeeded",
                {"blue": Deployed(V1, "Succeeded"), "green": Deployed(V2, "Succeeded")},
                V2,
                "not all on one deployment",
            ),
            # All traffic on a deployment whose update failed.
            ({"green": 100}, "Succeeded", {"green": Deployed(V2, "Failed")}, V2, "Failed"),
            ({"green": 100}, "Succeeded", {}, V2, "does not exist"),
            ({"green": 100}, "Updating", {"green": Deployed(V2, "Succeeded")}, V2, "Updating"),
            # Traffic moved although no model was ever crowned.
            ({"blue": 100}, "Succeeded", {"blue": Deployed(V1, "Succeeded")}, None, "no champion"),
        ],
    )
    def test_a_map_that_does_not_serve_the_champion_is_reported(
        self,
        traffic: dict[str, int],
        state: str,
        deployments: dict[str, Deployed],
        champion: str | None,
        says: str,
    ) -> None:
        (problem,) = traffic_violations(traffic, state, deployments, champion, {})
        assert says in problem

    def test_the_scenario_check_reports_a_broken_map_and_the_emulators_refusals(self) -> None:
        """The check reads the emulator's own endpoint: traffic on the deployment that holds
        version 1 while the champion pointer names version 2 is a violation."""
        emu = Emulator(v2stack.emulator_config("UseDevelopmentStorage=true", "art", ["housing"]))
        ep = emu.serving.endpoints["housing"]
        ep.deployments = {
            "blue": Deployment("blue", {}, state="Succeeded", model_id=V1),
            "green": Deployment("green", {}, state="Succeeded", model_id=V2),
        }
        ep.traffic = {"blue": 100}
        emu.refuse(400, "UserError", "traffic patch", "PATCH of an online endpoint ...")
        champion = {"kind": "registered", "name": "housing", "version": "2"}
        result = Result(seed=1, faults=[], kind="v2")
        chaos_v2.check(result, emu, champion, _run_of)
        assert result.violations == {
            "traffic differs from champion": 1,
            "emulator: traffic patch": 1,
        }
        assert any("serves " + V1 in d for d in result.details), result.details

        ep.traffic = {"green": 100}
        passing = Result(seed=1, faults=[], kind="v2")
        emu.violations.clear()
        chaos_v2.check(passing, emu, champion, _run_of)
        assert passing.total == 0, passing.details


class TestKinds:
    def test_one_kind_is_every_seed(self) -> None:
        assert {draw_kind(s, ("classic",)) for s in range(50)} == {"classic"}
        assert {draw_kind(s, ("v2",)) for s in range(50)} == {"v2"}

    def test_both_kinds_share_the_seeds_the_same_way_every_time(self) -> None:
        drawn = [draw_kind(s, KINDS) for s in range(300)]
        assert drawn == [draw_kind(s, KINDS) for s in range(300)]
        assert 60 < drawn.count("v2") < 140

    def test_a_seed_drawn_classic_runs_the_scenario_it_ran_before(self, tmp_path: Path) -> None:
        """The kind comes from its own stream: the classic faults and their details are what
        the seed gave before v2 scenarios existed."""
        seed = next(s for s in range(100) if draw_kind(s) == "classic")
        before = random.Random(seed)
        expected = sorted(f for f in FAULTS if before.random() < ODDS.get(f, 0.3))
        scenario = Scenario("UseDevelopmentStorage=true", seed, tmp_path, kind="classic")
        assert scenario.faults == expected
        skew = before.choice([30, 90, 180]) if "skew" in expected else 0
        assert scenario.skew_range == skew
        assert scenario.rng.random() == before.random()

    def test_unknown_kinds_are_refused(self) -> None:
        with pytest.raises(ValueError, match="unknown kinds"):
            draw_kind(1, ("classic", "v3"))


class TestV2Faults:
    def test_an_endpoint_fault_does_not_hit_its_deployments(self) -> None:
        emu = Emulator(v2stack.emulator_config("UseDevelopmentStorage=true", "art", ["housing"]))
        emu.faults.http = [{"lose_response": True, **chaos_v2.CALLS["endpoint PUT"]}]
        deployment = f"{WS}/onlineEndpoints/housing/deployments/blue"
        assert emu.take_fault("PUT", deployment) is None
        assert emu.take_fault("GET", f"{WS}/onlineEndpoints/housing") is None
        assert emu.take_fault("PUT", f"{WS}/onlineEndpoints/housing") is not None

    @pytest.mark.parametrize(
        ("method", "path", "kind"),
        [
            ("PUT", "/onlineEndpoints/housing", "endpoint PUT"),
            ("PUT", "/onlineEndpoints/housing/deployments/green", "deployment PUT"),
            ("GET", "/jobs/retrain-housing-x", "job GET"),
            ("PUT", "/models/housing/versions/3", "model version PUT"),
            ("GET", "/locations/westeurope/mfeOperationsStatus/abc", "LRO poll"),
        ],
    )
    def test_faults_are_counted_by_call(self, method: str, path: str, kind: str) -> None:
        assert chaos_v2.call_kind(method, WS + path) == kind

    def test_every_drawn_fault_aims_at_a_v2_call(self) -> None:
        rng = random.Random(3)
        faults = ["429", "5xx", "drop", "late act", "late answer", "lost response"]
        for _ in range(20):
            for fault in chaos_v2.http_faults(rng, faults):
                method, ends = fault["method"], fault.get("ends", "")
                assert any(
                    c["method"] == method
                    and c.get("path") == fault.get("path")
                    and c.get("ends", "") == ends
                    for c in chaos_v2.CALLS.values()
                ), fault


class FakeTarget:
    def __init__(self) -> None:
        self.calls: list[tuple[str, Any]] = []

    def serves(self, model: Any) -> bool:
        return False

    def deploy(self, model: Any) -> Progress:
        return SUCCEEDED

    def progress(self, operation: str | None) -> Progress:
        return SUCCEEDED

    def preflight(self) -> list[str]:
        return []

    def traffic(self) -> dict[str, int]:
        return {"blue": 100}

    def shift(self, traffic: dict[str, int], operation: str | None) -> Progress:
        self.calls.append(("shift", traffic))
        return Progress("pending", operation="op")

    def smoke(self, deployment: str) -> str | None:
        self.calls.append(("smoke", deployment))
        return None


class Points:
    def __init__(self) -> None:
        self.points: list[str] = []

    def after(self, point: str) -> None:
        self.points.append(point)


def test_a_crashing_online_endpoint_keeps_its_traffic_steps() -> None:
    inner, crasher = FakeTarget(), Points()
    target = CrashingTarget(inner, crasher)  # type: ignore[arg-type]
    assert target.traffic() == {"blue": 100}
    assert target.shift({"green": 10, "blue": 90}, None) == Progress("pending", operation="op")
    assert target.smoke("green") is None
    assert inner.calls == [("shift", {"green": 10, "blue": 90}), ("smoke", "green")]
    assert crasher.points == ["traffic shift"]


def test_an_azure_ml_backend_is_wrapped_and_bes_is_left_to_its_client() -> None:
    from retrain.backends.bes import BesTraining

    crasher = Crasher(random.Random(1), 0.0, None)  # type: ignore[arg-type]
    wrap = crashing(crasher).training
    bes = BesTraining.__new__(BesTraining)
    assert wrap(bes) is bes

    class V2Backend:
        what = "Azure ML job"

    wrapped = wrap(V2Backend())  # type: ignore[arg-type]
    assert isinstance(wrapped, CrashingTraining)
    assert wrapped.what == "Azure ML job"
