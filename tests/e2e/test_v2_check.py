"""`check` and `preflight` of an Azure ML v2 model against the v2 emulator: read-only GETs of
the workspace, MLflow tracking, every asset the job template references and the endpoint; a
missing asset is a configuration problem naming the setting and the command that gives the id."""

from __future__ import annotations

import copy
import json
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from localdev import stack, v2stack
from localdev.azureml_v2 import Emulator, EmulatorServer
from retrain.cli import main

pytestmark = pytest.mark.e2e

WS = v2stack.WORKSPACE_ID


@pytest.fixture
def emulator(azurite_connection: str) -> Iterator[tuple[Emulator, str]]:
    suffix = "-" + uuid.uuid4().hex[:8]
    emu = Emulator(
        v2stack.emulator_config(azurite_connection, f"retrain-artifacts{suffix}", ["housing"])
    )
    with EmulatorServer(emu) as server:
        yield emu, server.url


def configure(
    azurite_connection: str,
    url: str,
    template: dict[str, Any] | None = None,
    deployment: dict[str, Any] | None = None,
) -> None:
    spec = v2stack.model_spec(url)
    if template is not None:
        spec["training"]["job_template"] = template
    if deployment is not None:
        spec["target"]["deployment_template"] = deployment
    stack.load_app(
        stack.app_settings(azurite_connection, [spec], suffix="-" + uuid.uuid4().hex[:8])
    )


def test_a_healthy_v2_setup_passes_preflight_with_what_it_read(
    azurite_connection: str,
    emulator: tuple[Emulator, str],
    capsys: pytest.CaptureFixture[str],
) -> None:
    emu, url = emulator
    configure(azurite_connection, url)
    assert main(["preflight"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "housing: ok"
    assert (
        "  training.job_template properties.environmentId: environment train version 1 "
        "exists (Succeeded)" in out
    )
    assert "  training.job_template properties.computeId: compute cpu exists (Succeeded)" in out
    assert any(line.startswith("  MLflow tracking answers at http://") for line in out), out
    assert any(line.startswith("  online endpoint housing is Succeeded") for line in out), out
    methods = {c[0] for c in emu.calls}
    assert methods == {"GET"}  # read-only
    assert emu.violations == []


def test_missing_environments_are_configuration_problems_with_the_fix(
    azurite_connection: str,
    emulator: tuple[Emulator, str],
    capsys: pytest.CaptureFixture[str],
) -> None:
    emu, url = emulator
    template = copy.deepcopy(v2stack.JOB_TEMPLATE)
    template["properties"]["environmentId"] = WS + "/environments/train/versions/9"
    deployment = copy.deepcopy(v2stack.DEPLOYMENT)
    deployment["properties"]["environmentId"] = WS + "/environments/score/versions/1"
    configure(azurite_connection, url, template, deployment)

    assert main(["preflight"]) == 1
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "housing: configuration: FAILED"
    assert out[1] == (
        "  training.job_template properties.environmentId: environment train version 9 does not "
        "exist in workspace ws1 (resource group rg1) (HTTP 404); set the id of one that does: "
        "`az ml environment show --name train --version 9 --workspace-name ws1 --resource-group "
        "rg1 --query id` gives it"
    )
    assert out[2].startswith(
        "  target.deployment_template properties.environmentId: environment score version 1 "
        "does not exist"
    )
    assert emu.count("GET", r"/environments/train/versions/9$", status=404) == 1
    assert emu.count("GET", r"/deployments/") == 0  # the target's preflight waits for a fix

    assert main(["--json", "check"]) == 1
    rows = {row["check"]: row for row in json.loads(capsys.readouterr().out)}
    training = rows["Azure ML workspace of housing"]
    assert (training["ok"], training["problem"]) == (False, "configuration")
    assert "environment train version 9 does not exist" in training["detail"]
    target = rows["target of housing"]
    assert (target["ok"], target["problem"]) == (False, "configuration")
    assert "environment score version 1 does not exist" in target["detail"]
