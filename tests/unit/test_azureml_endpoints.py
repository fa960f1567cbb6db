"""v2 online endpoints: traffic by GET + PUT, deployments as LROs, one poll at a time, scoring."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import responses
from responses import matchers

from retrain.azureml.endpoints import OnlineEndpoints, check_traffic, deployment_body, writable
from retrain.errors import PermanentRemoteError, TransientRemoteError, UsageError
from tests.azureml_support import API, ARM, TOKEN, WS, WS_PATH, arm

EP = WS + "/onlineEndpoints/housing"
GREEN = EP + "/deployments/green"
OP = (
    f"{ARM}/subscriptions/sub/providers/Microsoft.MachineLearningServices/locations/w"
    "/mfeOperationsStatus/op1"
)
MODEL_ID = WS_PATH + "/models/housing/versions/2"
TEMPLATE = {
    "sku": {"name": "Default", "capacity": 1},
    "properties": {"instanceType": "Standard_DS3_v2", "environmentId": "/x/env/versions/1"},
}


def endpoint(state: str = "Succeeded", traffic: dict[str, int] | None = None) -> dict[str, Any]:
    return {
        "id": WS_PATH + "/onlineEndpoints/housing",
        "name": "housing",
        "type": "Microsoft.MachineLearningServices/workspaces/onlineEndpoints",
        "location": "westeurope",
        "identity": {"type": "SystemAssigned", "principalId": "p", "tenantId": "t"},
        "kind": "Managed",
        "tags": {"team": "pricing"},
        "systemData": {"createdBy": "someone"},
        "properties": {
            "authMode": "Key",
            "description": "prices",
            "provisioningState": state,
            "scoringUri": "https://housing.westeurope.inference.ml.azure.com/score",
            "swaggerUri": "https://housing.westeurope.inference.ml.azure.com/swagger.json",
            "keys": None,
            "traffic": {"blue": 100} if traffic is None else traffic,
            "mirrorTraffic": {},
        },
    }


def deployment(state: str, model: str = MODEL_ID) -> dict[str, Any]:
    return {"name": "green", "properties": {"provisioningState": state, "model": model}}


class TestTraffic:
    @pytest.mark.parametrize(
        ("traffic", "expected"),
        [
            ({"blue": 90, "green": 10}, {"blue": 90, "green": 10}),
            ({"blue": 0, "green": 100}, {"green": 100}),
            ({}, {}),
        ],
    )
    def test_valid_maps_total_0_or_100_and_lose_their_zeros(
        self, traffic: dict[str, int], expected: dict[str, int]
    ) -> None:
        assert check_traffic(traffic) == expected

    @pytest.mark.parametrize(
        ("traffic", "message"),
        [
            ({"blue": 90}, "total 0 or 100"),
            ({"blue": 110, "green": -10}, "whole percent"),
            ({"Blue": 100}, "not a deployment name"),
            ({"blue": 50.0, "green": 50}, "whole percent"),
        ],
    )
    def test_invalid_maps_are_refused(self, traffic: dict[str, Any], message: str) -> None:
        with pytest.raises(UsageError, match=message):
            check_traffic(traffic)

    @responses.activate
    def test_traffic_moves_by_a_put_of_the_whole_endpoint_never_a_patch(self) -> None:
        current = endpoint()
        expected = writable(current)
        expected["properties"]["traffic"] = {"blue": 90, "green": 10}
        responses.get(EP, json=current, match=[matchers.query_param_matcher(API)])
        responses.put(
            EP,
            status=201,
            json=endpoint("Updating"),
            headers={"Azure-AsyncOperation": OP},
            match=[
                matchers.query_param_matcher(API),
                matchers.header_matcher(TOKEN),
                matchers.json_params_matcher(expected),
            ],
        )
        progress = OnlineEndpoints(arm()).set_traffic("housing", {"blue": 90, "green": 10})
        assert progress.state == "pending"
        assert progress.operation == f"async {OP}"
        assert [c.request.method for c in responses.calls] == ["GET", "PUT"]

    def test_the_put_body_echoes_writable_fields_and_drops_read_only_ones(self) -> None:
        body = writable(endpoint())
        assert set(body) == {"location", "identity", "kind", "tags", "properties"}
        assert body["identity"] == {"type": "SystemAssigned"}
        assert set(body["properties"]) == {"authMode", "description", "traffic", "mirrorTraffic"}

    @responses.activate
    def test_a_map_that_already_holds_sends_nothing(self) -> None:
        responses.get(EP, json=endpoint(traffic={"blue": 0, "green": 100}))
        progress = OnlineEndpoints(arm()).set_traffic("housing", {"green": 100})
        assert progress.state == "succeeded"
        assert len(responses.calls) == 1

    @pytest.mark.parametrize(
        ("state", "error"), [("Updating", TransientRemoteError), ("Failed", PermanentRemoteError)]
    )
    @responses.activate
    def test_an_endpoint_that_is_not_succeeded_is_not_changed(
        self, state: str, error: type[Exception]
    ) -> None:
        responses.get(EP, json=endpoint(state))
        with pytest.raises(error, match=state):
            OnlineEndpoints(arm()).set_traffic("housing", {"green": 100})
        assert len(responses.calls) == 1

    @responses.activate
    def test_the_re_get_compares_the_whole_map(self) -> None:
        responses.get(EP, json=endpoint(traffic={"blue": 100}))
        responses.get(EP, json=endpoint(traffic={"green": 100}))
        endpoints = OnlineEndpoints(arm())
        assert not endpoints.traffic_is("housing", {"green": 100})
        assert endpoints.traffic_is("housing", {"green": 100, "blue": 0})


class TestOperations:
    @pytest.mark.parametrize(
        ("answer", "state", "detail"),
        [
            ({"status": "InProgress"}, "pending", None),
            ({"status": "Succeeded"}, "succeeded", None),
            (
                {"status": "Failed", "error": {"code": "ImageBuildFailure", "message": "no image"}},
                "failed",
                "ImageBuildFailure: no image",
            ),
            ({"status": "Canceled"}, "failed", "Canceled"),
        ],
    )
    @responses.activate
    def test_one_poll_of_the_async_operation(
        self, answer: dict[str, Any], state: str, detail: str | None
    ) -> None:
        responses.get(OP, json=answer, match=[matchers.header_matcher(TOKEN)])
        progress = OnlineEndpoints(arm()).progress(f"async {OP}")
        assert progress.state == state
        if detail:
            assert detail in (progress.detail or "")
        assert len(responses.calls) == 1

    @responses.activate
    def test_a_location_answers_202_while_running_then_200(self) -> None:
        responses.get(OP, status=202)
        responses.get(OP, status=200)
        endpoints = OnlineEndpoints(arm())
        assert endpoints.progress(f"location {OP}").state == "pending"
        assert endpoints.progress(f"location {OP}").state == "succeeded"

    @responses.activate
    def test_without_an_async_url_the_resource_state_is_polled(self) -> None:
        responses.get(GREEN, json=deployment("Creating"), match=[matchers.query_param_matcher(API)])
        responses.get(GREEN, json=deployment("Failed"))
        endpoints = OnlineEndpoints(arm())
        url = f"{GREEN}?api-version=2025-09-01"
        assert endpoints.progress(f"resource {url}").state == "pending"
        assert endpoints.progress(f"resource {url}").state == "failed"

    def test_an_operation_outside_arm_is_refused(self) -> None:
        with pytest.raises(PermanentRemoteError, match="outside"):
            OnlineEndpoints(arm()).progress("async https://elsewhere.example/op")
        with pytest.raises(PermanentRemoteError, match="not an operation"):
            OnlineEndpoints(arm()).progress("whatever")


class TestDeploy:
    @responses.activate
    def test_a_new_deployment_is_put_with_the_model_version_id(self) -> None:
        responses.get(EP, json=endpoint())
        responses.get(GREEN, status=404, json={"error": {"code": "NotFound", "message": "x"}})
        expected = copy.deepcopy(TEMPLATE) | {"location": "westeurope"}
        expected["properties"] = TEMPLATE["properties"] | {
            "endpointComputeType": "Managed",
            "model": MODEL_ID,
        }
        responses.put(
            GREEN,
            status=201,
            json=deployment("Creating"),
            headers={"Azure-AsyncOperation": OP},
            match=[matchers.query_param_matcher(API), matchers.json_params_matcher(expected)],
        )
        progress = OnlineEndpoints(arm()).deploy(
            "housing", "green", model_id=MODEL_ID, template=TEMPLATE
        )
        assert progress.operation == f"async {OP}"

    @responses.activate
    def test_a_200_echoing_the_async_url_in_the_body_is_followed_there(self) -> None:
        responses.get(EP, json=endpoint())
        responses.get(GREEN, status=404)
        answer = deployment("Updating")
        answer["properties"]["properties"] = {"AzureAsyncOperationUri": OP}
        responses.put(GREEN, status=200, json=answer)
        progress = OnlineEndpoints(arm()).deploy(
            "housing", "green", model_id=MODEL_ID, template=TEMPLATE
        )
        assert progress.operation == f"async {OP}"

    @responses.activate
    def test_a_deployment_already_serving_the_model_is_left_alone(self) -> None:
        responses.get(EP, json=endpoint())
        responses.get(GREEN, json=deployment("Succeeded"))
        progress = OnlineEndpoints(arm()).deploy(
            "housing", "green", model_id=MODEL_ID, template=TEMPLATE
        )
        assert progress.state == "succeeded"
        assert [c.request.method for c in responses.calls] == ["GET", "GET"]

    @responses.activate
    def test_a_deployment_busy_with_another_model_is_a_transient_error(self) -> None:
        responses.get(EP, json=endpoint())
        responses.get(GREEN, json=deployment("Updating", model="other"))
        with pytest.raises(TransientRemoteError, match="Updating"):
            OnlineEndpoints(arm()).deploy("housing", "green", model_id=MODEL_ID, template=TEMPLATE)

    @responses.activate
    def test_a_conflict_from_the_service_is_transient(self) -> None:
        responses.get(EP, json=endpoint())
        responses.get(GREEN, status=404)
        responses.put(GREEN, status=409, json={"error": {"code": "Conflict", "message": "busy"}})
        with pytest.raises(TransientRemoteError, match="busy"):
            OnlineEndpoints(arm()).deploy("housing", "green", model_id=MODEL_ID, template=TEMPLATE)

    def test_a_template_without_sku_name_is_refused(self) -> None:
        bad = {"sku": {"capacity": 1}, "properties": {}}
        with pytest.raises(UsageError, match=r"sku\.name"):
            deployment_body(bad, MODEL_ID, "westeurope")

    @responses.activate
    def test_delete_follows_the_location(self) -> None:
        responses.delete(
            GREEN, status=202, headers={"Location": OP}, match=[matchers.query_param_matcher(API)]
        )
        assert (
            OnlineEndpoints(arm()).delete_deployment("housing", "green").operation
            == f"location {OP}"
        )

    @responses.activate
    def test_logs_ask_for_the_inference_server_tail(self) -> None:
        responses.post(
            GREEN + "/getLogs",
            json={"content": "boom"},
            match=[matchers.json_params_matcher({"containerType": "InferenceServer", "tail": 50})],
        )
        assert OnlineEndpoints(arm()).logs("housing", "green", tail=50) == "boom"


class TestScore:
    @responses.activate
    def test_a_key_endpoint_is_scored_on_the_named_deployment(self) -> None:
        responses.get(EP, json=endpoint())
        responses.post(
            EP + "/listKeys",
            json={"primaryKey": "k1", "secondaryKey": "k2"},
            match=[matchers.query_param_matcher(API)],
        )
        responses.post(
            "https://housing.westeurope.inference.ml.azure.com/score",
            json=[1.5],
            match=[
                matchers.header_matcher(
                    {"Authorization": "Bearer k1", "azureml-model-deployment": "green"}
                ),
                matchers.json_params_matcher({"input_data": {"columns": ["a"], "data": [[1]]}}),
            ],
        )
        answer = OnlineEndpoints(arm()).score(
            "housing", "green", {"input_data": {"columns": ["a"], "data": [[1]]}}
        )
        assert answer == [1.5]

    @responses.activate
    def test_an_aml_token_endpoint_uses_the_token_call(self) -> None:
        current = endpoint()
        current["properties"]["authMode"] = "AMLToken"
        responses.get(EP, json=current)
        responses.post(EP + "/token", json={"accessToken": "t1"})
        responses.post(
            "https://housing.westeurope.inference.ml.azure.com/score",
            json={},
            match=[matchers.header_matcher({"Authorization": "Bearer t1"})],
        )
        OnlineEndpoints(arm()).score("housing", "green", {})

    @responses.activate
    def test_a_plain_http_scoring_uri_is_refused(self) -> None:
        current = endpoint()
        current["properties"]["scoringUri"] = "http://housing.example/score"
        responses.get(EP, json=current)
        with pytest.raises(PermanentRemoteError, match="https"):
            OnlineEndpoints(arm()).score("housing", "green", {})
