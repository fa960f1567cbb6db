"""The online endpoint target: blue/green promotion one poll at a time, over a small stateful
fake of the endpoint's ARM routes."""

from __future__ import annotations

import itertools
import json
import re
from typing import Any

import pytest
import responses
from requests import PreparedRequest

from retrain.azureml.spec import OnlineEndpointSpec
from retrain.deploy import Progress
from retrain.errors import PermanentError
from retrain.http import calls_end_by
from retrain.ports import ModelRef
from retrain.targets.online_endpoint import OnlineEndpoint
from tests.azureml_support import ARM, WS, WS_PATH, arm

EP = WS + "/onlineEndpoints/housing"
OPS = ARM + "/subscriptions/sub/providers/Microsoft.MachineLearningServices/locations/w"
SCORING = "https://housing.westeurope.inference.ml.azure.com/score"
M1, M2, M3 = (ModelRef.registered("housing", v) for v in ("1", "2", "3"))


def model_id(ref: ModelRef) -> str:
    return f"{WS_PATH}/models/{ref.name}/versions/{ref.version}"


class FakeEndpoint:
    """An endpoint whose operations finish at their first poll (or fail when told to)."""

    def __init__(self, traffic: dict[str, int], deployments: dict[str, ModelRef]) -> None:
        self.traffic = traffic
        self.deployments = {
            n: {"model": model_id(m), "state": "Succeeded"} for n, m in deployments.items()
        }
        self.pending: dict[str, Any] = {}
        self.fail_next_deployment = False
        self.fail_next_traffic = False
        self.score_status = 200
        self.calls: list[str] = []
        url = re.compile(re.escape(EP) + r"(/deployments/([a-z0-9-]+))?(/[A-Za-z]+)?\?.*")
        for method in ("GET", "PUT", "POST"):
            responses.add_callback(method, url, callback=self._route)
        responses.add_callback("GET", re.compile(re.escape(OPS) + r"/op/(\w+)"), self._op)
        responses.add_callback("POST", SCORING, callback=self._score)

    def _route(self, request: PreparedRequest) -> tuple[int, dict[str, str], str]:
        match = re.match(
            re.escape(EP) + r"(/deployments/([a-z0-9-]+))?(/[A-Za-z]+)?\?", str(request.url)
        )
        assert match is not None
        _, name, action = match.groups()
        self.calls.append(f"{request.method} {name or 'endpoint'}{action or ''}")
        body = json.loads(request.body) if request.body else None
        if action == "/listKeys":
            return 200, {}, json.dumps({"primaryKey": "k"})
        if action == "/getLogs":
            return 200, {}, json.dumps({"content": "line 1\nmodel failed to load"})
        if name is None:
            return self._endpoint(request.method, body)
        return self._deployment(request.method, name, body)

    def _endpoint(self, method: str | None, body: Any) -> tuple[int, dict[str, str], str]:
        if method == "PUT":
            self.pending["t"] = ("traffic", body["properties"]["traffic"])
            return 201, {"Azure-AsyncOperation": OPS + "/op/t"}, json.dumps(body)
        props = {
            "authMode": "Key",
            "provisioningState": "Updating" if "t" in self.pending else "Succeeded",
            "scoringUri": SCORING,
            "traffic": self.traffic,
        }
        return 200, {}, json.dumps({"location": "westeurope", "properties": props})

    def _deployment(
        self, method: str | None, name: str, body: Any
    ) -> tuple[int, dict[str, str], str]:
        if method == "PUT":
            self.deployments[name] = {"model": body["properties"]["model"], "state": "Creating"}
            self.pending["d"] = ("deployment", name)
            return 201, {"Azure-AsyncOperation": OPS + "/op/d"}, json.dumps(body)
        found = self.deployments.get(name)
        if found is None:
            return 404, {}, json.dumps({"error": {"code": "NotFound", "message": "no"}})
        props = {"provisioningState": found["state"], "model": found["model"]}
        return 200, {}, json.dumps({"name": name, "properties": props})

    def _op(self, request: PreparedRequest) -> tuple[int, dict[str, str], str]:
        kind, value = self.pending.pop(str(request.url).rsplit("/", 1)[1].split("?")[0])
        if kind == "traffic" and self.fail_next_traffic:
            error = {"code": "BadRequest", "message": "traffic refused"}
            return 200, {}, json.dumps({"status": "Failed", "error": error})
        if kind == "traffic":
            self.traffic = {k: v for k, v in value.items() if v}
            return 200, {}, json.dumps({"status": "Succeeded"})
        if self.fail_next_deployment:
            self.deployments[value]["state"] = "Failed"
            error = {"code": "DeploymentFailed", "message": "the container crashed"}
            return 200, {}, json.dumps({"status": "Failed", "error": error})
        self.deployments[value]["state"] = "Succeeded"
        return 200, {}, json.dumps({"status": "Succeeded"})

    def _score(self, request: PreparedRequest) -> tuple[int, dict[str, str], str]:
        self.calls.append(f"score {request.headers['azureml-model-deployment']}")
        return self.score_status, {}, json.dumps([104.0])


def target(smoke: Any = None) -> OnlineEndpoint:
    spec = OnlineEndpointSpec(
        kind="online_endpoint",
        subscription_id="sub",
        resource_group="rg",
        workspace="ws",
        endpoint="housing",
        deployment_template={"sku": {"name": "Default", "capacity": 1}, "properties": {}},
        smoke_request=smoke,
    )
    return OnlineEndpoint(arm(), spec)


def finish(t: OnlineEndpoint, model: ModelRef) -> list[str]:
    """Deploy, then poll until done; the operations seen along the way."""
    progress = t.deploy(model)
    seen = []
    while progress.state == "pending":
        seen.append(str(progress.operation).split(" ")[0])
        progress = t.progress(progress.operation)
    assert progress.state == "succeeded", progress
    return seen


@responses.activate
def test_a_new_model_goes_on_the_idle_deployment_is_smoke_scored_then_takes_all_traffic() -> None:
    fake = FakeEndpoint({"blue": 100}, {"blue": M1})
    t = target(smoke={"input_data": {"data": [[1, 2, 3]]}})
    assert t.serves(M1)
    assert not t.serves(M2)
    assert finish(t, M2) == ["deploy", "traffic"]
    assert fake.traffic == {"green": 100}
    assert fake.deployments["blue"]["model"] == model_id(M1)  # kept for a rollback
    assert fake.calls.index("score green") < fake.calls.index("PUT endpoint")
    assert t.serves(M2)
    assert not t.serves(M1)


@responses.activate
def test_a_rollback_moves_traffic_back_without_re_creating_the_deployment() -> None:
    fake = FakeEndpoint({"green": 100}, {"blue": M1, "green": M2})
    t = target(smoke={"x": 1})
    assert finish(target(), M1) == ["traffic"]
    assert fake.traffic == {"blue": 100}
    assert not any(c.startswith("PUT blue") or c.startswith("score") for c in fake.calls)
    assert t.deploy(M1).state == "succeeded"  # already served: nothing sent
    assert fake.calls.count("PUT endpoint") == 1


@responses.activate
def test_the_next_model_replaces_the_one_kept_at_zero() -> None:
    fake = FakeEndpoint({"green": 100}, {"blue": M1, "green": M2})
    finish(target(), M3)
    assert fake.traffic == {"blue": 100}
    assert fake.deployments["blue"]["model"] == model_id(M3)
    assert fake.deployments["green"]["model"] == model_id(M2)


@responses.activate
def test_a_deployment_that_fails_to_provision_fails_with_its_log_and_leaves_traffic() -> None:
    fake = FakeEndpoint({"blue": 100}, {"blue": M1})
    fake.fail_next_deployment = True
    t = target()
    progress = t.progress(t.deploy(M2).operation)
    assert progress.state == "failed"
    assert "the container crashed" in (progress.detail or "")
    assert "model failed to load" in (progress.detail or "")
    assert fake.traffic == {"blue": 100}
    assert t.serves(M1)


@responses.activate
def test_a_failed_deployment_fails_even_when_its_log_cannot_be_asked_in_the_lease() -> None:
    """The log only adds to the reason: a call refused as too late for the deploy lease leaves
    it out, and the run still fails (not given back, to PUT the failed deployment again)."""
    fake = FakeEndpoint({"blue": 100}, {"blue": M1})
    fake.fail_next_deployment = True
    t = target()
    operation = t.deploy(M2).operation
    checks = itertools.count()
    with calls_end_by(lambda: float(next(checks)), 0.5, 0):  # the second call is too late
        progress = t.progress(operation)
    assert progress.state == "failed"
    assert "the container crashed" in (progress.detail or "")
    assert "model failed to load" not in (progress.detail or "")  # the log was not asked
    assert not any(c.endswith("/getLogs") for c in fake.calls)


@responses.activate
def test_a_failed_smoke_request_keeps_traffic_where_it_was() -> None:
    fake = FakeEndpoint({"blue": 100}, {"blue": M1})
    fake.score_status = 500
    t = target(smoke={"input_data": {}})
    progress = t.progress(t.deploy(M2).operation)
    assert progress.state == "failed"
    assert "smoke request to deployment green failed" in (progress.detail or "")
    assert "PUT endpoint" not in fake.calls
    assert fake.traffic == {"blue": 100}


@responses.activate
def test_a_blob_model_is_refused_and_never_served() -> None:
    FakeEndpoint({"blue": 100}, {"blue": M1})
    t = target()
    blob = ModelRef("artifacts", "housing/r1/model.ilearner")
    assert not t.serves(blob)
    with pytest.raises(PermanentError, match="serves registered models"):
        t.deploy(blob)


@responses.activate
def test_an_operation_it_did_not_make_is_refused() -> None:
    FakeEndpoint({"blue": 100}, {"blue": M1})
    with pytest.raises(PermanentError, match="not an operation of this target"):
        target().progress("deploy purple async https://elsewhere")


def canary_target(smoke: Any = None) -> OnlineEndpoint:
    spec = OnlineEndpointSpec(
        kind="online_endpoint",
        subscription_id="sub",
        resource_group="rg",
        workspace="ws",
        endpoint="housing",
        deployment_template={"sku": {"name": "Default", "capacity": 1}, "properties": {}},
        smoke_request=smoke,
        canary={"steps": [10, 50], "hold": "PT5M"},
    )
    return OnlineEndpoint(arm(), spec)


@responses.activate
def test_with_a_canary_the_new_deployment_is_staged_smoke_scored_and_takes_no_traffic() -> None:
    fake = FakeEndpoint({"blue": 100}, {"blue": M1})
    t = canary_target(smoke={"input_data": {}})
    progress = t.progress(t.deploy(M2).operation)
    assert (progress.state, progress.operation) == ("staged", "staged green")
    assert "score green" in fake.calls
    assert "PUT endpoint" not in fake.calls
    assert fake.traffic == {"blue": 100}
    assert t.progress("staged green").state == "staged"  # a redelivery asks again
    assert t.deploy(M2).state == "staged"  # already provisioned: not PUT again
    assert fake.calls.count("PUT green") == 1


@responses.activate
def test_a_traffic_step_is_put_followed_then_settled_and_never_put_twice() -> None:
    fake = FakeEndpoint({"blue": 100}, {"blue": M1, "green": M2})
    t = canary_target()
    step = {"green": 10, "blue": 90}
    progress = t.shift(step, None)
    assert progress.state == "pending"
    assert progress.operation is not None
    # Its operation lost with the instance that sent it: the endpoint, still updating, says
    # the change is on its way; nothing is sent again.
    assert t.shift(step, None) == Progress("pending")
    assert t.shift(step, progress.operation).state == "succeeded"
    assert fake.traffic == step
    assert t.shift(step, None).state == "succeeded"
    assert fake.calls.count("PUT endpoint") == 1


@responses.activate
def test_a_refused_traffic_operation_is_reported_failed() -> None:
    fake = FakeEndpoint({"blue": 100}, {"blue": M1, "green": M2})
    t = canary_target()
    progress = t.shift({"green": 10, "blue": 90}, None)
    fake.fail_next_traffic = True
    failed = t.shift({"green": 10, "blue": 90}, progress.operation)
    assert failed.state == "failed"
    assert "traffic refused" in (failed.detail or "")
    assert fake.traffic == {"blue": 100}
