"""The pipeline on Azure ML v2 end to end: the function app under the local runner, the v2
emulator and Azurite, with a connection string and with an identity connection. Drop -> Azure
ML job -> registered version -> blue/green promotion on the online endpoint; a worse model
rejected; a rollback moving traffic back."""

from __future__ import annotations

import contextlib
import json
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import pytest
import requests

from localdev import stack, v2stack
from localdev.azureml_v2 import EmulatorServer
from localdev.runner import LocalRunner
from localdev.sample import housing_csv
from retrain.cli import main
from tests.stack_support import STORAGE_MODES, Storage, V2Stack

pytestmark = pytest.mark.e2e

WS = v2stack.WORKSPACE_ID
SCORE_KEY = v2stack.SCORE_KEY
ROWS = [[3.0, 20.0, 5.0], [6.0, 40.0, 12.0]]


@dataclass
class PipelineStack(V2Stack):
    def model_state(self) -> dict[str, Any]:
        return self.doc("models/housing.json")

    def deployed(self, name: str) -> str | None:
        found = self.emulator.serving.endpoints["housing"].deployments.get(name)
        return found.model_id if found else None

    def predict(self, rows: list[list[float]]) -> list[float]:
        """Score through the endpoint as a client does: traffic picks the deployment."""
        answer = requests.post(
            f"{self.url}/score/housing",
            json=v2stack.score_request(rows),
            headers={"Authorization": f"Bearer {SCORE_KEY}"},
            timeout=10,
        )
        answer.raise_for_status()
        prices: list[float] = answer.json()
        return prices


@contextlib.contextmanager
def open_v2_stack(
    storage: Storage,
    *,
    duplicates: float = 0.0,
    env: dict[str, str] | None = None,
    failure_visibility: timedelta | None = None,
    **overrides: Any,
) -> Iterator[PipelineStack]:
    """The app under the local runner on the v2 emulator; `overrides` change the model spec,
    `env` the app settings, `duplicates` is the chance the runner delivers a message twice."""
    suffix = "-" + uuid.uuid4().hex[:8]
    emulator = storage.v2_emulator(f"retrain-artifacts{suffix}")
    emulator.faults.job_seconds = 1
    emulator.faults.provisioning_seconds = 1
    with EmulatorServer(emulator) as server:
        settings = storage.app_settings(
            [v2stack.model_spec(server.url, **overrides)], suffix=suffix
        ) | (env or {})
        app = stack.load_app(settings)
        runner = LocalRunner(
            app,
            env=settings,
            duplicates=duplicates,
            credential=storage.credential,
            failure_visibility=failure_visibility,
        )
        yield PipelineStack(runner, emulator, settings, storage.blobs(), server.url)


@pytest.fixture(params=STORAGE_MODES)
def storage_mode(request: pytest.FixtureRequest) -> str:
    """Every test here runs on a connection string and on an identity connection."""
    return str(request.param)


@pytest.fixture
def v2_stack(storage: Storage) -> Iterator[PipelineStack]:
    with open_v2_stack(storage) as s:
        yield s


def version_id(run: dict[str, Any]) -> str:
    model = run["outputs"]["model"]
    assert model["kind"] == "registered"
    return f"{WS}/models/{model['name']}/versions/{model['version']}"


class TestV2Pipeline:
    def test_drop_train_promote_reject_and_roll_back(
        self, v2_stack: PipelineStack, capsys: pytest.CaptureFixture[str]
    ) -> None:
        s = v2_stack
        s.upload("housing/2026-12-01.csv", housing_csv(60, seed=1, noise=40))
        s.runner.run_until_idle()
        (first,) = s.runs()
        assert first["state"] == "promoted", first.get("error")
        assert s.traffic() == {"blue": 100}
        assert s.deployed("blue") == version_id(first)
        first_served = s.predict(ROWS)

        s.upload("housing/2026-12-02.csv", housing_csv(400, seed=2, noise=1))
        s.runner.run_until_idle()
        _, second = s.runs()
        assert second["state"] == "promoted", second.get("error")
        assert second["decision"]["champion_source"] == "scored on the same hold-out data"
        assert s.traffic() == {"green": 100}
        assert s.deployed("green") == version_id(second)
        assert s.deployed("blue") == version_id(first)  # kept at 0 % for a rollback
        assert ("housing", "green") in s.emulator.serving.scored  # smoke-scored before traffic
        assert s.predict(ROWS) != first_served
        assert s.model_state()["champion"]["model"] == second["outputs"]["model"]

        s.upload("housing/2026-12-03.csv", housing_csv(60, seed=3, noise=60))
        s.runner.run_until_idle()
        third = s.runs()[2]
        assert third["state"] == "rejected"
        assert "not better: Root Mean Squared Error" in third["decision"]["reason"]
        assert s.traffic() == {"green": 100}
        assert s.deployed("blue") == version_id(first)  # a rejected model is never deployed

        assert main(["--json", "rollback", "housing", "--by", "carol"]) == 0
        rollback_id = json.loads(capsys.readouterr().out)["run_id"]
        s.runner.run_until_idle()
        rollback = s.runs()[-1]
        assert (rollback["run_id"], rollback["kind"], rollback["state"]) == (
            rollback_id,
            "rollback",
            "promoted",
        )
        assert s.traffic() == {"blue": 100}
        assert s.predict(ROWS) == first_served
        deployment_puts = s.emulator.count("PUT", r"/deployments/(blue|green)$")
        assert deployment_puts == 2  # the rollback moved traffic; it re-created nothing
        assert s.emulator.count("PUT", r"/jobs/") == 3
        assert s.emulator.violations == []

    def test_a_deployment_that_fails_to_provision_leaves_the_champion_serving(
        self, v2_stack: PipelineStack
    ) -> None:
        s = v2_stack
        s.upload("housing/2026-12-01.csv", housing_csv(60, seed=11, noise=40))
        s.runner.run_until_idle()
        served = s.predict(ROWS)
        s.emulator.faults.fail_provisioning = 1
        s.upload("housing/2026-12-02.csv", housing_csv(400, seed=12, noise=1))
        s.runner.run_until_idle()
        first, second = s.runs()
        assert second["state"] == "failed"
        assert "the target refused the model" in second["error"]
        assert s.traffic() == {"blue": 100}
        assert s.predict(ROWS) == served
        assert s.model_state()["champion"]["run_id"] == first["run_id"]
        assert s.emulator.count("PUT", r"/onlineEndpoints/housing$") == 1  # traffic never moved

    def test_a_failed_job_fails_its_run_with_the_reason(self, v2_stack: PipelineStack) -> None:
        s = v2_stack
        s.emulator.faults.fail_jobs = 1
        s.upload("housing/2026-12-01.csv", housing_csv(60, seed=13))
        s.runner.run_until_idle()
        (run,) = s.runs()
        assert run["state"] == "failed"
        assert "exited with code 1 (injected)" in run["error"]
        assert s.traffic() == {}

    def test_a_job_past_its_deadline_is_cancelled_once_and_its_run_fails_saying_so(
        self, storage: Storage
    ) -> None:
        with open_v2_stack(storage, job_deadline=2) as s:
            s.emulator.faults.hang_jobs = True
            s.upload("housing/2026-12-01.csv", housing_csv(60, seed=14))
            s.runner.run_until_idle(timeout=30)
            (run,) = s.runs()
            assert run["state"] == "failed"
            assert "outlived its deadline" in run["error"], run["error"]
            assert "was cancelled" in run["error"]
            assert s.emulator.count("POST", rf"/jobs/{run['job_id']}/cancel$") == 1
            assert s.emulator.training.jobs[run["job_id"]].state in ("CancelRequested", "Canceled")
            assert s.traffic() == {}
            assert s.emulator.count("PUT", r"/models/") == 0  # nothing registered
            assert s.emulator.violations == []

    def test_every_message_delivered_twice_still_makes_one_job_one_version_one_promotion(
        self, storage: Storage
    ) -> None:
        with open_v2_stack(storage, duplicates=1.0) as s:
            s.upload("housing/2026-12-01.csv", housing_csv(60, seed=15, noise=40))
            s.runner.run_until_idle()
            (run,) = s.runs()
            assert run["state"] == "promoted", run.get("error")
            job_puts = {p for m, p, _ in s.emulator.calls if m == "PUT" and "/jobs/" in p}
            assert job_puts == {f"{WS}/jobs/{run['job_id']}"}
            assert len(s.emulator.training.jobs) == 1
            assert list(s.emulator.serving.models) == [
                ("housing", run["outputs"]["model"]["version"])
            ]
            assert s.emulator.count("PUT", r"/models/housing/versions/[^/]+$") == 1
            assert s.emulator.count("PUT", r"/deployments/(blue|green)$") == 1
            assert s.emulator.count("PUT", r"/onlineEndpoints/housing$") == 1  # traffic moved once
            assert s.traffic() == {"blue": 100}
            assert s.deployed("blue") == version_id(run)
            assert s.emulator.violations == []

    def test_a_deployment_put_acted_on_after_its_timeout_is_followed_not_sent_again(
        self, storage: Storage
    ) -> None:
        """The service acts on the PUT after the client gave up on it (found by the
        fault-injection run, seed 6400026), and the host hands the failed message back sooner
        (here at once): the retry looks only once the call's worst case has passed and follows
        the operation. A second PUT before would meet the first one running (409)."""
        fast = {  # one call at most (0.5 + 0.5) x 5 + 1 x 4 = 9 s
            "RETRAIN_HTTP_CONNECT_TIMEOUT": "0.5",
            "RETRAIN_HTTP_READ_TIMEOUT": "0.5",
            "RETRAIN_HTTP_MAX_RETRY_WAIT": "1",
        }
        with open_v2_stack(storage, env=fast, failure_visibility=timedelta(0)) as s:
            s.emulator.faults.http = [{"delay": 2.0, "method": "PUT", "path": "/deployments/"}]
            s.emulator.faults.provisioning_seconds = 4  # a PUT sent again is still running
            s.upload("housing/2026-12-01.csv", housing_csv(60, seed=16, noise=40))
            s.runner.run_until_idle(timeout=90)
            (run,) = s.runs()
            assert run["state"] == "promoted", run.get("error")
            assert s.emulator.violations == []
            assert s.emulator.count("PUT", r"/deployments/blue$") == 1
            assert s.traffic() == {"blue": 100}

    def test_a_job_completion_event_takes_the_run_to_the_gate_before_any_poll(
        self, storage: Storage
    ) -> None:
        """Azure ML's RunCompleted event (Event Grid, the `job_events` function): the run is
        judged at once, with the job never polled; its first poll, due a minute later, finds
        the run moved on. Events from elsewhere, or of other runs, change nothing."""
        import azure.functions as func

        def deliver(event: dict[str, Any], **changes: Any) -> bool:
            event = {**event, **changes}
            return s.runner.deliver_event(
                "job_events",
                func.EventGridEvent(
                    id=event["id"],
                    data=event["data"],
                    topic=event["topic"],
                    subject=event["subject"],
                    event_type=event["eventType"],
                    event_time=None,
                    data_version=event["dataVersion"],
                ),
            )

        slow_polls = {"RETRAIN_POLL_FIRST_DELAY": "PT60S", "RETRAIN_POLL_MAX_DELAY": "PT10M"}
        with open_v2_stack(storage, env=slow_polls) as s:
            s.emulator.faults.job_seconds = 0
            s.upload("housing/2026-12-01.csv", housing_csv(60, seed=17, noise=40))
            for _ in range(200):
                s.runner.step()  # the first ingests the file and makes the state container
                runs = s.runs()
                if runs and runs[0]["state"] == "running":
                    break
            (run,) = s.runs()
            assert run["state"] == "running"
            job = s.emulator.training.jobs[run["job_id"]]
            s.emulator.training.advance(job)  # the job ends in Azure ML, on its own
            completed, changed = s.emulator.training.events
            assert completed["eventType"].endswith("RunCompleted")

            other_ws = completed["topic"].replace("/workspaces/ws1", "/workspaces/other")
            assert deliver(completed, topic=other_ws)
            assert deliver(completed, data={**completed["data"], "runId": "someone-elses"})
            assert s.runs()[0]["state"] == "running"

            assert deliver(changed)  # RunStatusChanged to Completed
            assert deliver(completed)  # and the RunCompleted of the same job: one move
            trained = s.runs()[0]
            assert trained["state"] in ("trained", "promoting"), trained["state"]
            assert "job completed (its event)" in str(trained["history"])
            assert s.emulator.count("GET", rf"/jobs/{run['job_id']}$") == 0  # never polled
            for _ in range(200):  # the gate runs from the evaluations queue, undelayed
                if s.runs()[0]["state"] != "trained":
                    break
                s.runner.step()
            judged = s.runs()[0]
            assert judged["state"] == "promoting", judged.get("error")
            assert "no champion to beat" in str(judged["history"])
            assert s.emulator.count("GET", rf"/jobs/{run['job_id']}$") == 0
