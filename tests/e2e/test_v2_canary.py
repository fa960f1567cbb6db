"""Canary steps on Azure ML v2 end to end: the function app under the local runner, the v2
emulator and Azurite, with a connection string and with an identity connection. A second model
takes 10 %, then 50 %, then all traffic, each step held by a delayed message; a step the
service refuses puts the saved map back."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from localdev import stack, v2stack
from localdev.azureml_v2 import EmulatorServer
from localdev.runner import LocalRunner
from localdev.sample import housing_csv
from tests.stack_support import STORAGE_MODES, Storage, V2Stack

pytestmark = pytest.mark.e2e

ENDPOINTS = "/onlineEndpoints/housing"
"""A fault's path matches by substring: the endpoint's PUTs and its deployments' PUTs."""


@dataclass
class CanaryStack(V2Stack):
    def champion(self) -> str:
        return str(self.doc("models/housing.json")["champion"]["run_id"])

    def puts(self) -> list[dict[str, int]]:
        """The traffic maps the endpoint was PUT with, in order."""
        return [
            traffic for name, traffic in self.emulator.serving.traffic_puts if name == "housing"
        ]


@pytest.fixture(params=STORAGE_MODES)
def storage_mode(request: pytest.FixtureRequest) -> str:
    """Every test here runs on a connection string and on an identity connection."""
    return str(request.param)


@pytest.fixture
def canary_stack(storage: Storage) -> Iterator[CanaryStack]:
    suffix = "-" + uuid.uuid4().hex[:8]
    emulator = storage.v2_emulator(f"retrain-artifacts{suffix}")
    emulator.faults.job_seconds = 1
    emulator.faults.provisioning_seconds = 1
    with EmulatorServer(emulator) as server:
        spec = v2stack.model_spec(server.url)
        spec["target"]["canary"] = {"steps": [10, 50], "hold": "PT2S", "smoke_each_step": True}
        settings = storage.app_settings([spec], suffix=suffix)
        settings["RETRAIN_POLL_FIRST_DELAY"] = "PT1S"
        settings["RETRAIN_POLL_MAX_DELAY"] = "PT2S"
        runner = LocalRunner(stack.load_app(settings), env=settings, credential=storage.credential)
        yield CanaryStack(runner, emulator, settings, storage.blobs())


def first_champion(s: CanaryStack) -> dict[str, Any]:
    s.upload("housing/2026-12-01.csv", housing_csv(60, seed=1, noise=40))
    s.runner.run_until_idle(timeout=120)
    (first,) = s.runs()
    assert first["state"] == "promoted", first.get("error")
    assert s.puts() == [{"blue": 100}]  # no traffic before: nothing to try the model against
    return first


class TestV2Canary:
    def test_a_better_model_takes_traffic_in_steps_then_all_of_it(
        self, canary_stack: CanaryStack
    ) -> None:
        s = canary_stack
        first_champion(s)
        s.upload("housing/2026-12-02.csv", housing_csv(400, seed=2, noise=1))
        s.runner.run_until_idle(timeout=120)
        _, second = s.runs()
        assert second["state"] == "promoted", second.get("error")
        assert s.puts() == [
            {"blue": 100},
            {"green": 10, "blue": 90},
            {"green": 50, "blue": 50},
            {"green": 100},
        ]
        assert s.traffic() == {"green": 100}
        assert s.champion() == second["run_id"]
        # The smoke request before the first step, then one at the end of each hold.
        assert s.emulator.serving.scored.count(("housing", "green")) == 3
        canary = second["deployment"]["canary"]
        assert (canary["saved"], canary["shares"]) == ({"blue": 100}, [10, 50, 100])
        assert s.emulator.violations == []

    def test_a_step_the_service_refuses_puts_the_saved_map_back(
        self, canary_stack: CanaryStack
    ) -> None:
        s = canary_stack
        first = first_champion(s)
        # The deployment PUT (green) and step 1 go through; step 2 is refused.
        s.emulator.faults.http += [
            {"method": "PUT", "path": ENDPOINTS, "delay": 0},
            {"method": "PUT", "path": ENDPOINTS, "delay": 0},
            {"method": "PUT", "path": ENDPOINTS, "status": 400},
        ]
        s.upload("housing/2026-12-02.csv", housing_csv(400, seed=2, noise=1))
        s.runner.run_until_idle(timeout=120)
        _, second = s.runs()
        assert second["state"] == "failed"
        assert "canary stopped at step 2 of 3 (50 % to green)" in second["error"]
        assert "traffic restored to {'blue': 100}" in second["error"]
        assert s.puts() == [{"blue": 100}, {"green": 10, "blue": 90}, {"blue": 100}]
        assert s.traffic() == {"blue": 100}
        assert s.champion() == first["run_id"]
        assert s.emulator.count("PUT", r"/deployments/green$") == 1
        assert s.emulator.count("PUT", r"/onlineEndpoints/housing$", 400) == 1
        assert s.emulator.violations == []
