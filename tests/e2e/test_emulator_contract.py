"""The emulator holds the code to the documented contracts, so passing tests mean something."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import requests

from localdev import stack
from localdev.amlemu import Emulator, EmulatorServer

pytestmark = pytest.mark.e2e


@pytest.fixture
def url() -> Iterator[str]:
    with EmulatorServer(Emulator(stack.emulator_config())) as server:
        yield server.url


BES = "/workspaces/ws1/services/housing-train/jobs"
EP = "/workspaces/ws1/webservices/housing-predict/endpoints"
ARM = "/subscriptions/sub1/resourceGroups/rg1/providers/Microsoft.MachineLearning/webServices/"


def test_bes_needs_the_api_version_and_the_key(url: str) -> None:
    auth = {"Authorization": "Bearer local-bes-key"}
    assert requests.post(url + BES, json={}, headers=auth, timeout=5).status_code == 400
    wrong = {"Authorization": "Bearer nope"}
    assert (
        requests.post(
            url + BES + "?api-version=2.0", json={"Inputs": {}}, headers=wrong, timeout=5
        ).status_code
        == 401
    )
    response = requests.post(
        url + BES + "?api-version=2.0", json={"Inputs": {}}, headers=auth, timeout=5
    )
    job = response.json()
    assert isinstance(job, str)
    assert len(job) == 32
    status = requests.get(f"{url}{BES}/{job}?api-version=2.0", headers=auth, timeout=5).json()
    assert status == {"StatusCode": "NotStarted", "Results": None, "Details": None}


def test_classic_management_refuses_default_and_unknown_resources(url: str) -> None:
    auth = {"Authorization": "Bearer local-endpoint-key"}
    body = {
        "Resources": [
            {
                "Name": "Housing Model [trained model]",
                "Location": {
                    "BaseLocation": "http://x/",
                    "RelativeLocation": "c/m.ilearner",
                    "SasBlobToken": "?s",
                },
            }
        ]
    }
    default = requests.patch(f"{url}{EP}/default", json=body, headers=auth, timeout=5)
    assert default.status_code == 400
    assert "cannot be replaced" in default.text
    body["Resources"][0]["Name"] = "Other"
    unknown = requests.patch(f"{url}{EP}/prod", json=body, headers=auth, timeout=5)
    assert unknown.status_code == 400
    assert "was not found" in unknown.text


def test_arm_needs_a_bearer_token_and_a_known_api_version(url: str) -> None:
    auth = {"Authorization": "Bearer local-arm-token"}
    assert (
        requests.get(url + ARM + "housing-new?api-version=2017-01-01", timeout=5).status_code == 401
    )
    assert (
        requests.get(
            url + ARM + "housing-new?api-version=2099-01-01", headers=auth, timeout=5
        ).status_code
        == 400
    )
    body = requests.get(
        url + ARM + "housing-new?api-version=2017-01-01", headers=auth, timeout=5
    ).json()
    assert body["properties"]["provisioningState"] == "Succeeded"
    assert "keys" not in body["properties"]
    assert (
        requests.get(
            url + ARM + "missing?api-version=2017-01-01", headers=auth, timeout=5
        ).status_code
        == 404
    )
