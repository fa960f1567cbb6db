"""v2 training jobs: names, the body from the user's template, PUT, status, cancel, failure."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import responses
from responses import matchers

from retrain.azureml.jobs import JOB_STATES, NAME_PATTERN, Jobs, job_name
from retrain.azureml.template import build_job, check_template
from retrain.errors import PermanentRemoteError, UsageError
from retrain.ports import Phase
from tests.azureml_support import API, ARM, TOKEN, WS, arm

TEMPLATE: dict[str, Any] = {
    "properties": {
        "jobType": "Command",
        "displayName": "retrain {retrain.model} {retrain.batch}",
        "experimentName": "retrain-{retrain.model}",
        "command": "python train.py --data ${{inputs.training_data}} "
        "$[[--champion ${{inputs.champion}}]] --out ${{outputs.model}}",
        "environmentId": "/x/environments/train/versions/1",
        "inputs": {
            "training_data": {"jobInputType": "uri_file", "uri": "{retrain.training_data}"},
            "champion": {"jobInputType": "custom_model", "uri": "{retrain.champion_model}"},
            "label": {"jobInputType": "literal", "value": "price"},
        },
        "outputs": {"model": {"jobOutputType": "uri_folder", "uri": "{retrain.model_output}"}},
        "tags": {"team": "pricing"},
    }
}
DATA = "azureml://datastores/retraindata/paths/housing/batch.csv"
OUT = "azureml://datastores/workspaceblobstore/paths/retrain/j1/model/"
CHAMPION = "/subscriptions/sub/.../models/housing/versions/7"


def body(champion: str | None = CHAMPION, template: dict[str, Any] = TEMPLATE) -> dict[str, Any]:
    return build_job(
        template,
        job_name="j1",
        model="housing",
        batch="b1",
        training_data=DATA,
        model_output=OUT,
        champion_model=champion,
    )


def job(status: str, *, outputs: dict[str, Any] | None = None) -> dict[str, Any]:
    return {
        "name": "j1",
        "properties": {
            "jobType": "Command",
            "status": status,
            "services": {"Studio": {"endpoint": "https://ml.azure.com/runs/j1"}},
            "outputs": outputs if outputs is not None else {"model": {"uri": OUT}},
        },
    }


class TestNames:
    def test_the_same_model_and_batch_always_give_the_same_valid_name(self) -> None:
        name = job_name("Housing Prices", "20261203T172015-abc123")
        assert name == job_name("Housing Prices", "20261203T172015-abc123")
        assert NAME_PATTERN.fullmatch(name)
        assert name.startswith("retrain-housing-prices-20261203t172015-abc123-")

    def test_names_that_clean_to_the_same_text_stay_apart(self) -> None:
        assert job_name("a.b", "1") != job_name("a_b", "1") != job_name("a b", "1")

    def test_a_long_model_name_still_gives_a_valid_name(self) -> None:
        name = job_name("m" * 400, "20261203T172015-abc123")
        assert len(name) <= 255
        assert NAME_PATTERN.fullmatch(name)


class TestTemplate:
    def test_placeholders_are_filled_and_the_run_is_tagged(self) -> None:
        props = body()["properties"]
        assert props["inputs"]["training_data"] == {"jobInputType": "uri_file", "uri": DATA}
        assert props["inputs"]["champion"]["uri"] == CHAMPION
        assert props["outputs"]["model"]["uri"] == OUT
        assert props["displayName"] == "retrain housing b1"
        assert props["tags"] == {
            "team": "pricing",
            "retrain.model": "housing",
            "retrain.batch": "b1",
        }
        assert "${{inputs.training_data}}" in props["command"]  # Azure ML's own syntax kept

    def test_with_no_champion_the_champion_input_is_left_out(self) -> None:
        assert "champion" not in body(champion=None)["properties"]["inputs"]

    def test_the_template_itself_is_not_changed(self) -> None:
        before = copy.deepcopy(TEMPLATE)
        body()
        assert before == TEMPLATE

    def test_a_folder_input_needs_a_folder_uri(self) -> None:
        folder = copy.deepcopy(TEMPLATE)
        folder["properties"]["inputs"]["training_data"]["jobInputType"] = "uri_folder"
        assert check_template(folder).training_type == "uri_folder"
        with pytest.raises(UsageError, match="uri_folder"):
            body(template=folder)

    @pytest.mark.parametrize(
        ("change", "message"),
        [
            (lambda p: p["inputs"].pop("training_data"), "retrain.training_data"),
            (lambda p: p["outputs"].clear(), "retrain.model_output"),
            (
                lambda p: p["inputs"]["training_data"].update(jobInputType="mltable"),
                "jobInputType 'mltable'",
            ),
            (
                lambda p: p["inputs"]["champion"].update(jobInputType="uri_file"),
                "input 'champion'",
            ),
            (lambda p: p.update(displayName="{retrain.data}"), "unknown placeholder"),
            (lambda p: p.update(jobType="Sweep"), "jobType"),
        ],
    )
    def test_a_bad_template_is_refused_with_what_to_fix(self, change: Any, message: str) -> None:
        bad = copy.deepcopy(TEMPLATE)
        change(bad["properties"])
        with pytest.raises(UsageError, match=message):
            check_template(bad)

    def test_the_champion_placeholder_outside_its_input_needs_a_champion(self) -> None:
        odd = copy.deepcopy(TEMPLATE)
        odd["properties"]["description"] = "against {retrain.champion_model}"
        assert body(template=odd)["properties"]["description"] == "against " + CHAMPION
        with pytest.raises(UsageError, match="no champion"):
            body(champion=None, template=odd)


class TestSubmit:
    @responses.activate
    def test_put_sends_the_body_to_the_named_job(self) -> None:
        sent = body()
        responses.put(
            WS + "/jobs/j1",
            status=201,
            json=job("NotStarted"),
            match=[
                matchers.query_param_matcher(API),
                matchers.header_matcher(TOKEN),
                matchers.json_params_matcher(sent),
            ],
        )
        status = Jobs(arm()).submit("j1", sent)
        assert (status.status, status.state, status.final) == (
            "NotStarted",
            Phase.NOT_STARTED,
            False,
        )

    @responses.activate
    def test_a_redelivered_put_answered_200_is_the_same_job(self) -> None:
        responses.put(WS + "/jobs/j1", status=200, json=job("Running"))
        assert Jobs(arm()).submit("j1", body()).state is Phase.RUNNING

    @responses.activate
    def test_a_name_kept_by_a_job_with_other_outputs_is_an_error(self) -> None:
        other = {"model": {"uri": "azureml://datastores/x/paths/other/"}}
        responses.put(WS + "/jobs/j1", status=200, json=job("Completed", outputs=other))
        with pytest.raises(PermanentRemoteError, match="already exists"):
            Jobs(arm()).submit("j1", body())

    @responses.activate
    def test_a_refused_reuse_of_a_name_is_permanent_not_retried(self) -> None:
        responses.put(
            WS + "/jobs/j1",
            status=409,
            json={"error": {"code": "UserError", "message": "job j1 exists with other fields"}},
        )
        with pytest.raises(PermanentRemoteError, match="exists with other fields"):
            Jobs(arm()).submit("j1", body())

    def test_an_invalid_name_is_refused_before_any_call(self) -> None:
        with pytest.raises(UsageError, match="not a valid job name"):
            Jobs(arm()).submit("bad/name", body())


class TestStatus:
    @pytest.mark.parametrize("state", sorted(JOB_STATES))
    @responses.activate
    def test_only_completed_failed_and_canceled_are_final(self, state: str) -> None:
        responses.get(WS + "/jobs/j1", json=job(state), match=[matchers.query_param_matcher(API)])
        status = Jobs(arm()).status("j1")
        assert status.state is JOB_STATES[state]
        assert status.final == (state in ("Completed", "Failed", "Canceled"))

    @pytest.mark.parametrize(
        ("state", "neutral"),
        [
            ("Queued", Phase.NOT_STARTED),
            ("Finalizing", Phase.RUNNING),
            ("Completed", Phase.FINISHED),
            ("Failed", Phase.FAILED),
            ("Canceled", Phase.CANCELLED),
        ],
    )
    def test_the_table_speaks_the_pipelines_job_states(self, state: str, neutral: Phase) -> None:
        assert JOB_STATES[state] is neutral

    @responses.activate
    def test_not_responding_keeps_the_run_polling_and_says_it_stalled(self) -> None:
        responses.get(WS + "/jobs/j1", json=job("NotResponding"))
        status = Jobs(arm()).status("j1")
        assert (status.final, status.stalled) == (False, True)

    @responses.activate
    def test_a_state_the_spec_does_not_list_keeps_the_run_polling(self) -> None:
        responses.get(WS + "/jobs/j1", json=job("Hibernating"))
        status = Jobs(arm()).status("j1")
        assert (status.final, status.stalled) == (False, True)

    @responses.activate
    def test_a_job_without_status_is_a_shape_error(self) -> None:
        responses.get(WS + "/jobs/j1", json={"properties": {}})
        with pytest.raises(PermanentRemoteError, match="status"):
            Jobs(arm()).status("j1")


class TestCancel:
    @responses.activate
    def test_202_gives_the_location_to_follow(self) -> None:
        location = f"{ARM}/subscriptions/sub/providers/x/locations/w/mfeOperationResults/op1"
        responses.post(
            WS + "/jobs/j1/cancel",
            status=202,
            headers={"Location": location, "Retry-After": "10"},
            match=[matchers.query_param_matcher(API)],
        )
        progress = Jobs(arm()).cancel("j1")
        assert progress.state == "pending"
        assert progress.operation == f"location {location}"

    @responses.activate
    def test_200_means_done(self) -> None:
        responses.post(WS + "/jobs/j1/cancel", status=200)
        assert Jobs(arm()).cancel("j1").state == "succeeded"


class TestFailure:
    def _world(self, details: dict[str, Any]) -> None:
        responses.get(WS + "/jobs/j1", json=job("Failed"))
        responses.get(
            WS,
            json={
                "properties": {
                    "mlFlowTrackingUri": "azureml://h/x",
                    "discoveryUrl": "https://westeurope.api.azureml.ms/discovery",
                }
            },
        )
        responses.get(
            "https://westeurope.api.azureml.ms/discovery",
            json={"api": "https://westeurope.api.azureml.ms"},
        )
        responses.get(
            "https://westeurope.api.azureml.ms/history/v1.0/subscriptions/sub/resourceGroups/rg"
            "/providers/Microsoft.MachineLearningServices/workspaces/ws/runs/j1/details",
            json=details,
            match=[matchers.header_matcher(TOKEN)],
        )

    @responses.activate
    def test_the_text_comes_from_run_history(self) -> None:
        self._world({"status": "Failed", "error": {"error": {"code": "UserError", "message": "x"}}})
        text = Jobs(arm()).failure("j1")
        assert "UserError: x" in text
        assert "https://ml.azure.com/runs/j1" in text

    @responses.activate
    def test_without_an_error_text_the_studio_link_is_given(self) -> None:
        self._world({"status": "Failed"})
        text = Jobs(arm()).failure("j1")
        assert "without an error text" in text
        assert "https://ml.azure.com/runs/j1" in text

    @responses.activate
    def test_secrets_in_the_text_are_redacted(self) -> None:
        message = "cannot read https://a.blob.core.windows.net/c/d.csv?sv=2024&sig=SECRET"
        self._world({"error": {"code": "DataAccess", "message": message}})
        text = Jobs(arm()).failure("j1")
        assert "SECRET" not in text
        assert "d.csv" in text
