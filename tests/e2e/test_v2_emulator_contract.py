"""The Azure ML v2 clients against the v2 emulator, and the emulator's strictness refusals."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import requests
from azure.storage.blob import BlobServiceClient

from localdev.azureml_v2 import Emulator, EmulatorServer
from localdev.sample import housing_csv
from retrain.arm import StaticToken
from retrain.azureml.endpoints import OnlineEndpoints
from retrain.azureml.jobs import Jobs, job_name
from retrain.azureml.lro import poll
from retrain.azureml.mlflow import MetricName, MlflowRuns
from retrain.azureml.registry import ModelRegistry, model_version
from retrain.azureml.template import build_job
from retrain.azureml.workspace import ArmClient, WorkspaceRef
from retrain.clock import ManualClock
from retrain.errors import PermanentRemoteError, TransientRemoteError
from retrain.http import make_session
from retrain.ports import Phase

pytestmark = pytest.mark.e2e

TOKEN = "local-arm-token"
WS = (
    "/subscriptions/sub1/resourceGroups/rg1/providers/Microsoft.MachineLearningServices"
    "/workspaces/ws1"
)
TEMPLATE: dict[str, Any] = {
    "properties": {
        "jobType": "Command",
        "experimentName": "retrain-{retrain.model}",
        "command": "python train.py --data ${{inputs.training_data}} --label ${{inputs.label}} "
        "$[[--champion ${{inputs.champion}}]] --out ${{outputs.model}}",
        "environmentId": WS + "/environments/train/versions/1",
        "computeId": WS + "/computes/cpu",
        "inputs": {
            "training_data": {"jobInputType": "uri_file", "uri": "{retrain.training_data}"},
            "label": {"jobInputType": "literal", "value": "price"},
            "champion": {"jobInputType": "custom_model", "uri": "{retrain.champion_model}"},
        },
        "outputs": {"model": {"jobOutputType": "uri_folder", "uri": "{retrain.model_output}"}},
    }
}
DEPLOYMENT = {
    "sku": {"name": "Default", "capacity": 1},
    "properties": {"endpointComputeType": "Managed", "instanceType": "Standard_DS3_v2"},
}
RMSE = [MetricName("Root Mean Squared Error", "rmse", "champion_rmse")]
ROWS = {"input_data": {"columns": ["rooms", "age", "distance"], "data": [[3.0, 20.0, 5.0]]}}


@dataclass
class World:
    emu: Emulator
    url: str
    clock: ManualClock
    arm: ArmClient
    jobs: Jobs
    registry: ModelRegistry
    endpoints: OnlineEndpoints
    blobs: BlobServiceClient
    data: str

    def upload(self, name: str, text: str) -> str:
        container = self.blobs.get_container_client(self.data)
        if not container.exists():
            container.create_container()
        container.upload_blob(name, text, overwrite=True)
        return f"azureml://datastores/retraindata/paths/{name}"

    def train(self, batch: str, *, champion: str | None = None, seed: int = 1) -> str:
        data = self.upload(f"housing/{batch}.csv", housing_csv(200, seed=seed))
        name = job_name("housing", batch)
        body = build_job(
            TEMPLATE,
            job_name=name,
            model="housing",
            batch=batch,
            training_data=data,
            model_output=f"azureml://datastores/models/paths/retrain/{name}/",
            champion_model=champion,
        )
        assert self.jobs.submit(name, body).state is Phase.NOT_STARTED
        return name

    def finish(self, name: str) -> Phase:
        self.jobs.status(name)  # the job starts: it reads its input now
        self.clock.advance(seconds=61)
        return self.jobs.status(name).state

    def register(self, name: str, run: str) -> str:
        model_uri = self.arm.workspace.long_datastore_uri(
            f"azureml://datastores/models/paths/retrain/{name}/"
        )
        tags = {"retrain.run": run, "retrain.job": name}
        version = self.registry.register(
            "housing", model_version(run), model_uri=model_uri, job_name=name, tags=tags
        )
        return version.id

    def settle(self, progress: Any) -> None:
        assert progress.state == "pending", progress
        assert self.endpoints.progress(progress.operation).state == "pending"
        self.clock.advance(seconds=31)
        done = self.endpoints.progress(progress.operation)
        assert done.state == "succeeded", done

    def raw(
        self, method: str, path: str, body: Any = None, version: str | None = "2025-09-01"
    ) -> requests.Response:
        query = f"?api-version={version}" if version else ""
        return requests.request(
            method,
            self.url + path + query,
            json=body,
            headers={"Authorization": f"Bearer {TOKEN}"},
            timeout=10,
        )


@pytest.fixture
def v2(azurite_connection: str) -> Iterator[World]:
    suffix = uuid.uuid4().hex[:8]
    data, models = f"v2data-{suffix}", f"v2models-{suffix}"
    clock = ManualClock()
    config = {
        "token": TOKEN,
        "datastores": {
            "retraindata": {"connection_string": azurite_connection, "container": data},
            "models": {"connection_string": azurite_connection, "container": models},
        },
        "endpoints": [{"name": "housing", "auth_mode": "Key", "key": "local-score-key"}],
    }
    emu = Emulator(config, clock=clock)
    emu.faults.job_seconds = 60
    emu.faults.provisioning_seconds = 30
    with EmulatorServer(emu) as server:
        arm = ArmClient(
            WorkspaceRef("sub1", "rg1", "ws1", server.url),
            credential=StaticToken(TOKEN),
            session=make_session(total_retries=1, backoff=0),
            timeout=(5, 10),
        )
        yield World(
            emu,
            server.url,
            clock,
            arm,
            Jobs(arm),
            ModelRegistry(arm),
            OnlineEndpoints(arm),
            BlobServiceClient.from_connection_string(azurite_connection),
            data,
        )


def kinds(world: World) -> list[str]:
    return [v["kind"] for v in world.emu.violations]


class TestJobs:
    def test_a_job_trains_on_the_csv_and_logs_its_metrics_to_mlflow(self, v2: World) -> None:
        name = v2.train("20261203T100000-aaaaaa")
        assert v2.jobs.status(name).state is Phase.RUNNING
        assert v2.finish(name) is Phase.FINISHED
        assert v2.emu.training.trained[0]["rows"] == 200
        runs = MlflowRuns(v2.arm, v2.arm.workspace_info().mlflow_tracking_uri)
        evaluation = runs.evaluation(name, RMSE)
        assert 0 < evaluation.challenger["Root Mean Squared Error"] < 5  # the fit, not step 0
        assert evaluation.champion is None
        assert runs.run(name)["info"]["status"] == "FINISHED"
        assert v2.emu.violations == []

    def test_the_last_value_is_found_across_history_pages(self, v2: World) -> None:
        v2.emu.faults.mlflow_page_size = 1
        name = v2.train("20261203T100000-a1a1a1")
        v2.finish(name)
        runs = MlflowRuns(v2.arm, v2.arm.workspace_info().mlflow_tracking_uri)
        assert len(runs.history(name, "rmse")) == 2  # step 0 (baseline) and step 1 (the fit)
        fitted = max(runs.history(name, "rmse"), key=lambda e: e["step"])["value"]
        assert runs.last(name, "rmse") == fitted < 5

    def test_a_503_on_a_status_get_is_retried_inside_the_call(self, v2: World) -> None:
        name = v2.train("20261203T100000-b2b2b2")
        v2.emu.faults.http.append(
            {"method": "GET", "path": "/jobs/", "status": 503, "retry_after": 0}
        )
        assert v2.jobs.status(name).state is Phase.RUNNING
        assert v2.emu.count("GET", r"/jobs/", 503) == 1

    def test_a_redelivered_put_is_the_same_job_and_a_changed_one_is_refused(
        self, v2: World
    ) -> None:
        name = v2.train("20261203T100000-bbbbbb")
        body = v2.emu.training.jobs[name].body
        assert v2.jobs.submit(name, body).state is Phase.NOT_STARTED
        assert len(v2.emu.training.jobs) == 1
        changed = {"properties": {**body["properties"], "command": "python other.py"}}
        with pytest.raises(PermanentRemoteError, match="already exists"):
            v2.jobs.submit(name, changed)
        assert kinds(v2) == ["job name reused"]

    def test_a_lost_answer_to_the_put_is_safe_to_send_again(self, v2: World) -> None:
        v2.emu.faults.http.append({"method": "PUT", "path": "/jobs/", "lose_response": True})
        with pytest.raises(TransientRemoteError):
            v2.train("20261203T100000-cccccc")
        name = v2.train("20261203T100000-cccccc")
        assert list(v2.emu.training.jobs) == [name]

    def test_429_on_submit_carries_retry_after(self, v2: World) -> None:
        v2.emu.faults.http.append({"method": "PUT", "status": 429, "retry_after": 7})
        with pytest.raises(TransientRemoteError) as info:
            v2.train("20261203T100000-dddddd")
        assert info.value.retry_after == 7
        assert v2.emu.training.jobs == {}

    def test_a_failed_job_says_why(self, v2: World) -> None:
        v2.emu.faults.fail_jobs = 1
        name = v2.train("20261203T100000-eeeeee")
        assert v2.finish(name) is Phase.FAILED
        text = v2.jobs.failure(name)
        assert "exited with code 1 (injected)" in text
        assert "ml.azure.com/runs/" in text

    def test_not_responding_is_not_final_and_the_job_recovers(self, v2: World) -> None:
        name = v2.train("20261203T100000-ffffff")
        v2.jobs.status(name)
        v2.emu.faults.not_responding = 1
        stalled = v2.jobs.status(name)
        assert (stalled.status, stalled.final) == ("NotResponding", False)
        assert v2.finish(name) is Phase.FINISHED

    def test_a_hung_job_is_cancelled_through_the_location(self, v2: World) -> None:
        v2.emu.faults.hang_jobs = True
        v2.emu.faults.cancel_seconds = 10
        name = v2.train("20261203T100000-abcdef")
        assert v2.finish(name) is Phase.RUNNING
        operation = str(v2.jobs.cancel(name).operation)
        assert operation.startswith("location ")
        assert v2.jobs.status(name).status == "CancelRequested"
        assert poll(v2.arm, operation, "cancel").state == "pending"
        v2.clock.advance(seconds=11)
        assert poll(v2.arm, operation, "cancel").state == "succeeded"
        assert v2.jobs.status(name).state is Phase.CANCELLED
        assert v2.jobs.cancel(name).state == "succeeded"  # nothing left to cancel


class TestPromotion:
    def test_train_register_deploy_smoke_canary_and_roll_back(self, v2: World) -> None:
        first = v2.train("20261203T100000-111111")
        v2.finish(first)
        blue_model = v2.register(first, "20261203T100000-111111")
        v2.settle(v2.endpoints.deploy("housing", "blue", model_id=blue_model, template=DEPLOYMENT))
        v2.settle(v2.endpoints.set_traffic("housing", {"blue": 100}))
        assert v2.endpoints.traffic_is("housing", {"blue": 100})

        second = v2.train("20261203T110000-222222", champion=blue_model, seed=2)
        v2.finish(second)
        evaluation = MlflowRuns(v2.arm, v2.arm.workspace_info().mlflow_tracking_uri).evaluation(
            second, RMSE
        )
        assert evaluation.champion is not None
        green_model = v2.register(second, "20261203T110000-222222")
        v2.settle(
            v2.endpoints.deploy("housing", "green", model_id=green_model, template=DEPLOYMENT)
        )
        assert (
            v2.endpoints.deploy("housing", "green", model_id=green_model, template=DEPLOYMENT).state
            == "succeeded"
        )

        [price] = v2.endpoints.score("housing", "green", ROWS)
        assert 100 < price < 200  # 30*3 - 0.8*20 - 4*5 + 50 = 104
        assert v2.emu.serving.scored[-1] == ("housing", "green")

        v2.emu.faults.stale_traffic_gets = 1
        v2.settle(v2.endpoints.set_traffic("housing", {"blue": 90, "green": 10}))
        assert not v2.endpoints.traffic_is("housing", {"blue": 90, "green": 10})  # not yet
        assert v2.endpoints.traffic_is("housing", {"blue": 90, "green": 10})
        v2.emu.faults.stale_traffic_gets = 0
        v2.settle(v2.endpoints.set_traffic("housing", {"blue": 0, "green": 100}))
        assert v2.endpoints.endpoint("housing").traffic == {"green": 100}

        v2.settle(v2.endpoints.set_traffic("housing", {"blue": 100}))  # rollback, blue kept at 0 %
        assert v2.endpoints.traffic_is("housing", {"blue": 100})
        assert v2.emu.violations == []

    def test_a_redelivered_registration_sends_nothing_new(self, v2: World) -> None:
        name = v2.train("20261203T100000-333333")
        v2.finish(name)
        first = v2.register(name, "20261203T100000-333333")
        assert v2.register(name, "20261203T100000-333333") == first
        assert v2.emu.count("PUT", r"/models/housing/versions/") == 1

    def test_a_provisioning_failure_leaves_the_traffic_and_says_why(self, v2: World) -> None:
        name = v2.train("20261203T100000-444444")
        v2.finish(name)
        model = v2.register(name, "20261203T100000-444444")
        v2.emu.faults.fail_provisioning = 1
        progress = v2.endpoints.deploy("housing", "green", model_id=model, template=DEPLOYMENT)
        v2.clock.advance(seconds=31)
        failed = v2.endpoints.progress(str(progress.operation))
        assert failed.state == "failed"
        assert "did not start (injected)" in (failed.detail or "")
        assert "did not start" in v2.endpoints.logs("housing", "green")
        green = v2.endpoints.deployment("housing", "green")
        assert green is not None
        assert green.provisioning_state == "Failed"
        assert v2.endpoints.endpoint("housing").traffic == {}


class TestStrictness:
    def test_a_wrong_or_missing_api_version_is_refused(self, v2: World) -> None:
        wrong = v2.raw("GET", WS, version="2022-05-01")
        assert (wrong.status_code, wrong.json()["error"]["code"]) == (
            400,
            "NoRegisteredProviderFound",
        )
        missing = v2.raw("GET", WS, version=None)
        assert missing.json()["error"]["code"] == "MissingApiVersionParameter"
        assert kinds(v2) == ["wrong api-version", "wrong api-version"]

    def test_traffic_cannot_be_patched(self, v2: World) -> None:
        answer = v2.raw("PATCH", WS + "/onlineEndpoints/housing", {"properties": {"traffic": {}}})
        assert answer.status_code == 400
        assert "PUT of the whole endpoint" in answer.json()["error"]["message"]
        assert kinds(v2) == ["traffic patch"]

    def test_traffic_must_total_0_or_100(self, v2: World) -> None:
        body = v2.raw("GET", WS + "/onlineEndpoints/housing").json()
        body["properties"]["traffic"] = {"blue": 50}
        answer = v2.raw("PUT", WS + "/onlineEndpoints/housing", body)
        assert answer.status_code == 400
        assert "sum to 100" in answer.json()["error"]["message"]
        assert kinds(v2) == ["traffic sum"]

    def test_a_deployment_with_traffic_cannot_be_deleted(self, v2: World) -> None:
        name = v2.train("20261203T100000-555555")
        v2.finish(name)
        model = v2.register(name, "20261203T100000-555555")
        v2.settle(v2.endpoints.deploy("housing", "blue", model_id=model, template=DEPLOYMENT))
        v2.settle(v2.endpoints.set_traffic("housing", {"blue": 100}))
        with pytest.raises(PermanentRemoteError, match="live traffic can't be deleted"):
            v2.endpoints.delete_deployment("housing", "blue")
        assert kinds(v2) == ["delete with traffic"]

    def test_a_second_mutation_while_one_runs_is_refused(self, v2: World) -> None:
        name = v2.train("20261203T100000-666666")
        v2.finish(name)
        model = v2.register(name, "20261203T100000-666666")
        v2.endpoints.deploy("housing", "blue", model_id=model, template=DEPLOYMENT)
        with pytest.raises(TransientRemoteError, match="another operation"):
            v2.endpoints.set_traffic("housing", {"blue": 100})
        v2.clock.advance(seconds=31)
        v2.endpoints.set_traffic("housing", {"blue": 100})
        body = dict(DEPLOYMENT, location="westeurope")
        body["properties"] = {**DEPLOYMENT["properties"], "model": model}
        answer = v2.raw("PUT", WS + "/onlineEndpoints/housing/deployments/green", body)
        assert answer.status_code == 409
        assert "Updating provisioning state" in answer.json()["error"]["message"]
        assert kinds(v2) == ["mutation in progress", "mutation in progress"]

    def test_a_model_version_cannot_change_its_path(self, v2: World) -> None:
        name = v2.train("20261203T100000-777777")
        v2.finish(name)
        v2.register(name, "20261203T100000-777777")
        version = model_version("20261203T100000-777777")
        other = {
            "properties": {
                "modelUri": v2.arm.workspace.long_datastore_uri(
                    "azureml://datastores/models/paths/x/"
                )
            }
        }
        answer = v2.raw("PUT", f"{WS}/models/housing/versions/{version}", other)
        assert answer.status_code == 400
        assert "Asset paths cannot be updated" in answer.json()["error"]["message"]

    def test_scoring_needs_the_endpoint_key(self, v2: World) -> None:
        answer = requests.post(
            f"{v2.url}/score/housing",
            json=ROWS,
            headers={"Authorization": "Bearer nope"},
            timeout=5,
        )
        assert answer.status_code == 401

    def test_a_wrong_token_is_refused_everywhere_but_scoring(self, v2: World) -> None:
        answer = requests.get(
            f"{v2.url}{WS}?api-version=2025-09-01", headers={"Authorization": "Bearer x"}, timeout=5
        )
        assert answer.status_code == 401
