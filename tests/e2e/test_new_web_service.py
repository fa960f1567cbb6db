"""Promotion to a New (ARM) web service, end to end through the emulator's ARM API."""

from __future__ import annotations

import pytest

from localdev.sample import housing_csv
from retrain.ports import ModelRef
from tests.stack_support import STORAGE_MODES, MakeStack

pytestmark = pytest.mark.e2e


@pytest.fixture(params=STORAGE_MODES)
def storage_mode(request: pytest.FixtureRequest) -> str:
    """Every test here runs on a connection string and on an identity connection."""
    return str(request.param)


ROWS = [[3.0, 20.0, 5.0]]


def assets(s) -> dict:  # type: ignore[no-untyped-def]
    (ws,) = s.emulator.web_services.values()
    return ws.assets


def test_better_model_is_promoted_and_only_its_asset_changes(make_stack: MakeStack) -> None:
    s = make_stack(new={})
    before = assets(s)
    s.upload("housing/a.csv", housing_csv(200, seed=21, noise=2))
    s.runner.run_until_idle()
    (run,) = s.runs()
    assert run["state"] == "promoted"
    after = assets(s)
    assert after["asset1"] == before["asset1"]
    assert after["asset2"]["outputPorts"] == before["asset2"]["outputPorts"]
    uri = after["asset2"]["locationInfo"]["uri"]
    assert uri.endswith(f"/{ModelRef.load(run['outputs']['model'])}")
    assert "sig=" not in uri
    assert s.emulator.count("PATCH", r"/webServices/housing-new$", 200) == 1
    assert s.emulator.count("PUT", r"/webServices/") == 0
    assert s.predict(ROWS, new=True)[0] == pytest.approx(30 * 3 - 0.8 * 20 - 4 * 5 + 50, abs=3)


def test_slow_provisioning_is_tracked_by_delayed_polls(make_stack: MakeStack) -> None:
    s = make_stack(new={})
    s.emulator.faults.provisioning_seconds = 2.5
    s.upload("housing/a.csv", housing_csv(100, seed=22))
    s.runner.run_until_idle()
    (run,) = s.runs()
    assert run["state"] == "promoted"
    assert run["deployment"]["polls"] >= 1
    assert s.emulator.count("GET", r"/operationsStatus/") >= 1


def test_failed_provisioning_is_recorded_and_champion_kept(make_stack: MakeStack) -> None:
    s = make_stack(new={})
    s.upload("housing/a.csv", housing_csv(200, seed=23, noise=2))
    s.runner.run_until_idle()
    champion_uri = assets(s)["asset2"]["locationInfo"]["uri"]
    s.emulator.faults.fail_provisioning = 1
    s.upload("housing/b.csv", housing_csv(400, seed=24, noise=1))
    s.runner.run_until_idle()
    runs = {r["run_id"]: r for r in s.runs()}
    (second,) = [r for r in runs.values() if r["state"] == "failed"]
    assert "ProvisioningFailed: injected provisioning failure" in second["error"]
    # The failed PATCH left the new uri in the definition: a restore run put the champion back.
    assert "restoring the champion" in second["target_after"]
    (restore,) = [r for r in runs.values() if r.get("kind") == "restore"]
    assert restore["state"] == "promoted"
    first = runs[restore["restores"]]
    assert s.model_state()["champion"]["model"] == first["outputs"]["model"]
    assert assets(s)["asset2"]["locationInfo"]["uri"] == champion_uri


@pytest.mark.parametrize(
    ("web_service", "new", "message"),
    [
        ({"read_only": True}, {}, "is read-only"),
        ({"payloads_in_blob": True}, {}, "keeps its definition in blob storage"),
        (
            {},
            {"asset_name": "Other Model [trained model]"},
            "no Resource asset named 'Other Model [trained model]'",
        ),
        (
            {
                "assets": {
                    "a": {
                        "name": "A [trained model]",
                        "type": "Resource",
                        "locationInfo": {"uri": "x"},
                    },
                    "b": {
                        "name": "B [Trained Model]",
                        "type": "Resource",
                        "locationInfo": {"uri": "y"},
                    },
                }
            },
            {},
            "2 Resource asset whose name ends in '[trained model]'",
        ),
    ],
)
def test_unusable_definitions_fail_the_run_clearly(
    make_stack: MakeStack, web_service: dict, new: dict, message: str
) -> None:
    s = make_stack(web_service=web_service, new=new)
    s.upload("housing/a.csv", housing_csv(100, seed=25))
    s.runner.run_until_idle()
    (run,) = s.runs()
    assert run["state"] == "failed"
    assert message in run["error"]
    assert s.emulator.count("PATCH", r"/webServices/") == 0


def test_wrong_token_names_the_role_needed(make_stack: MakeStack) -> None:
    s = make_stack(web_service={"arm_token": "another-token"}, new={})
    s.upload("housing/a.csv", housing_csv(100, seed=26))
    s.runner.run_until_idle()
    (run,) = s.runs()
    assert run["state"] == "failed"
    assert "HTTP 401" in run["error"]
    assert "Contributor role" in run["error"]
