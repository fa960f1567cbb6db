"""The backend-neutral ports: model references, the BES adapter behind the training port, a
backend that is not BES, and documents written before references had a kind."""

from __future__ import annotations

import json
import typing
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from localdev.sample import housing_csv
from retrain import wiring
from retrain.backends.bes import BesTraining
from retrain.bes import JobState
from retrain.deploy import DEPLOY_SAS_LIFETIME, sas_reader
from retrain.errors import EvaluationError, InputRejected, PermanentError
from retrain.ledger import model_key, run_key
from retrain.messages import EvaluateRun, TrackRun
from retrain.pipeline import Delivery
from retrain.ports import ModelRef, Phase, TrainingRequest
from retrain.settings import ModelSpec
from tests.fakes import FakeData, FakeJobs, FakeTraining, ManualClock
from tests.harness import World, spec

DEADLINE = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
REQUEST = TrainingRequest(
    model="housing",
    run_id="r1",
    input_container="artifacts",
    input_name="housing/r1/input.csv",
    output_container="artifacts",
    output_folder="housing/r1",
    deadline=DEADLINE,
)


class TestModelRef:
    def test_a_blob_is_stored_in_the_form_every_release_reads_and_read_back(self) -> None:
        ref = ModelRef("artifacts", "housing/r1/model.ilearner")
        stored = json.loads(json.dumps(ref.to_doc()))
        assert stored == "artifacts/housing/r1/model.ilearner"
        assert ModelRef.load(stored) == ref
        document = {"kind": "blob", "container": "artifacts", "name": "housing/r1/model.ilearner"}
        assert ModelRef.load(document) == ref

    def test_a_registered_model_is_stored_by_name_and_version(self) -> None:
        ref = ModelRef.registered("housing", "20261203100000000000000011259375")
        stored = json.loads(json.dumps(ref.to_doc()))
        assert stored == {
            "kind": "registered",
            "name": "housing",
            "version": "20261203100000000000000011259375",
        }
        assert ModelRef.load(stored) == ref
        assert str(ref) == "housing:20261203100000000000000011259375"
        assert ref != ModelRef.registered("housing", "2")

    def test_the_string_main_stored_reads_as_the_same_blob(self) -> None:
        old = "artifacts/housing/r1/model.ilearner"
        assert ModelRef.load(old) == ModelRef("artifacts", "housing/r1/model.ilearner")
        assert str(ModelRef.load(old)) == old

    @pytest.mark.parametrize(
        "value",
        [
            "no-slash",
            {"kind": "registered", "name": "m"},
            {"kind": "registered", "name": "m", "version": ""},
            {"kind": "blob", "name": 3},
            None,
        ],
    )
    def test_what_is_not_a_reference_is_refused_by_name(self, value: Any) -> None:
        with pytest.raises(PermanentError, match="model reference"):
            ModelRef.load(value)


class TestBesAdapter:
    def adapter(self, jobs: FakeJobs | None = None) -> tuple[BesTraining, FakeJobs, FakeData]:
        jobs, data = jobs or FakeJobs(), FakeData()
        return BesTraining(jobs, data, spec().training), jobs, data

    def test_submit_hands_the_job_scoped_sas_references_that_outlive_the_deadline(self) -> None:
        bes, jobs, _ = self.adapter()
        assert bes.submit(REQUEST) == "job1"
        (job,) = jobs.submitted
        source = job["inputs"]["input1"]
        assert source.relative_location == "artifacts/housing/r1/input.csv"
        assert "sp=r&" in source.sas_token
        model, evaluation = job["outputs"]["output1"], job["outputs"]["output2"]
        assert model.relative_location == "artifacts/housing/r1/model.ilearner"
        assert evaluation.relative_location == "artifacts/housing/r1/evaluation.csv"
        for ref in (model, evaluation):
            assert "sp=cw&" in ref.sas_token
        assert f"se={DEADLINE + timedelta(hours=1):%Y%m%dT%H%M%S}" in source.sas_token
        assert job["global_parameters"] == {"Label Column": "price"}

    @pytest.mark.parametrize(
        ("state", "phase"),
        [
            (JobState.NOT_STARTED, Phase.NOT_STARTED),
            (JobState.RUNNING, Phase.RUNNING),
            (JobState.FINISHED, Phase.FINISHED),
            (JobState.FAILED, Phase.FAILED),
            (JobState.CANCELLED, Phase.CANCELLED),
        ],
    )
    def test_every_bes_state_has_its_phase_and_keeps_its_name(
        self, state: JobState, phase: Phase
    ) -> None:
        bes, _, _ = self.adapter(FakeJobs([state], details="Error 0001"))
        job = bes.submit(REQUEST)
        if state is not JobState.NOT_STARTED:
            bes.start(job)
        status = bes.status(job)
        assert (status.phase, status.state) == (phase, state.value)
        assert status.details == ("Error 0001" if phase is Phase.FAILED else None)

    def test_the_result_is_the_evaluate_model_output_and_the_ilearner(self) -> None:
        bes, _, data = self.adapter()
        text = "Root Mean Squared Error,Mean Absolute Error\n2.0,1.5\n2.5,1.75\n"
        data.put("artifacts", "housing/r1/evaluation.csv", text)
        result = bes.result(REQUEST, "job1")
        assert result.challenger == {"Root Mean Squared Error": 2.0, "Mean Absolute Error": 1.5}
        assert result.champion == {"Root Mean Squared Error": 2.5, "Mean Absolute Error": 1.75}
        assert result.model == ModelRef("artifacts", "housing/r1/model.ilearner")

    def test_an_unreadable_evaluation_is_an_evaluation_error(self) -> None:
        bes, _, data = self.adapter()
        data.put("artifacts", "housing/r1/evaluation.csv", "Root Mean Squared Error\n")
        with pytest.raises(EvaluationError, match="no data row"):
            bes.result(REQUEST, "job1")


def test_targets_are_given_a_read_only_sas_for_a_while_from_now() -> None:
    clock, data = ManualClock(), FakeData()
    ref = sas_reader(data, clock)(ModelRef("artifacts", "housing/r1/model.ilearner"))
    assert ref.relative_location == "artifacts/housing/r1/model.ilearner"
    assert "sp=r&" in ref.sas_token
    assert f"se={clock.now() + DEPLOY_SAS_LIFETIME:%Y%m%dT%H%M%S}" in ref.sas_token


class TestABackendThatIsNotBes:
    """The pipeline through the port alone: a backend whose model is not an .ilearner and
    whose jobs are named after their request."""

    def world(self, *script: Phase) -> tuple[World, FakeTraining]:
        training = FakeTraining(list(script) or [Phase.RUNNING, Phase.FINISHED], named=True)
        w = World(training=training)
        w.drop("housing/a.csv", housing_csv(10, seed=1))
        assert w.deliver() == ["sealed"]
        return w, training

    def test_metrics_and_model_come_from_the_backend(self) -> None:
        w, training = self.world()
        assert w.deliver() == ["started"]
        job = w.run()["job_id"]
        assert job == f"housing-{w.run()['run_id']}"
        training.metrics[job] = ({"Root Mean Squared Error": 2.0}, None)
        assert w.deliver() == ["running"]
        assert w.deliver() == ["trained"]
        assert w.run()["history"][-1]["note"] == "fake job finished"
        assert w.deliver() == ["promoted"]
        model = ModelRef("artifacts", f"housing/{w.run()['run_id']}/model.bin")
        assert w.target.serving == model
        assert ModelRef.load(w.run()["outputs"]["model"]) == model
        assert w.run()["metrics"]["challenger"] == {"Root Mean Squared Error": 2.0}

    def test_a_backend_failure_names_the_backend_and_its_state(self) -> None:
        w, _ = self.world(Phase.FAILED)
        w.deliver()
        assert w.deliver() == ["failed"]
        assert w.run()["error"] == "fake job failed: no details given"

    def test_metrics_the_backend_cannot_report_fail_the_run(self) -> None:
        w, _ = self.world(Phase.FINISHED)
        for _ in range(2):
            w.deliver()
        assert w.deliver() == ["failed"]
        assert w.run()["error"].startswith("cannot read the evaluation: job housing-")
        assert w.target.deploys == []

    def test_a_losing_delivery_does_not_cancel_the_job_named_like_its_own(self) -> None:
        """Two copies of the first track message: the second submits and persists the job while
        the first is submitting. With a backend that names jobs after the request, the first
        copy's submit answers the very job that won: it must not be cancelled."""
        w, training = self.world()
        ((_, msg, _),) = w.outbox.take()
        assert isinstance(msg, TrackRun)
        submit = training.submit

        def racing_submit(request: TrainingRequest) -> str:
            training.submit = submit  # type: ignore[method-assign]
            assert w.retrainer.on_track_run(msg, delivery=Delivery("copy-2")) == "started"
            return submit(request)

        training.submit = racing_submit  # type: ignore[method-assign]
        assert w.retrainer.on_track_run(msg, delivery=Delivery("copy-1")) == "conflict"
        run = w.run()
        assert run["state"] == "running"
        assert training.submits == [run["job_id"]] * 2
        assert training.started == [run["job_id"]]
        assert training.cancelled == []


# Documents as main wrote them before model references had a kind: `outputs.model` and the
# champion's `model` are "container/blob" strings (trimmed to the fields the steps read).
OLD_CHAMPION_RUN = """{
  "run_id": "20260101T000000-aaaaaa", "model": "housing", "state": "promoted",
  "created_at": "2026-01-01T00:00:00+00:00", "updated_at": "2026-01-01T00:20:00+00:00",
  "deadline_at": "2026-01-01T06:00:00+00:00", "job_id": "j1", "polls": 3,
  "training_file": {"name": "housing/a.csv", "etag": "0x1", "size": 10,
                    "arrived_at": "2026-01-01T00:00:00+00:00"},
  "outputs": {"input": "artifacts/housing/20260101T000000-aaaaaa/input.csv",
              "model": "artifacts/housing/20260101T000000-aaaaaa/model.ilearner",
              "evaluation": "artifacts/housing/20260101T000000-aaaaaa/evaluation.csv"},
  "metrics": {"challenger": {"Root Mean Squared Error": 2.5}, "champion": null},
  "decision": {"promote": true, "reason": "first model", "champion_source": null},
  "error": null,
  "history": [{"state": "promoted", "at": "2026-01-01T00:20:00+00:00",
               "note": "deployed artifacts/housing/20260101T000000-aaaaaa/model.ilearner"}]
}"""
OLD_PROMOTING_RUN = """{
  "run_id": "20260102T000000-bbbbbb", "model": "housing", "state": "promoting",
  "created_at": "2026-01-02T00:00:00+00:00", "updated_at": "2026-01-02T00:15:00+00:00",
  "deadline_at": "2026-01-02T06:00:00+00:00", "job_id": "j2", "polls": 3,
  "training_file": {"name": "housing/b.csv", "etag": "0x2", "size": 10,
                    "arrived_at": "2026-01-02T00:00:00+00:00"},
  "outputs": {"input": "artifacts/housing/20260102T000000-bbbbbb/input.csv",
              "model": "artifacts/housing/20260102T000000-bbbbbb/model.ilearner",
              "evaluation": "artifacts/housing/20260102T000000-bbbbbb/evaluation.csv"},
  "metrics": {"challenger": {"Root Mean Squared Error": 1.5},
              "champion": {"Root Mean Squared Error": 2.5}},
  "decision": {"promote": true, "reason": "better", "champion_source": "scored"},
  "error": null,
  "history": [{"state": "promoting", "at": "2026-01-02T00:15:00+00:00", "note": "better"}]
}"""
OLD_MODEL = """{
  "model": "housing", "batch": null, "active_run": "20260102T000000-bbbbbb",
  "active_since": "2026-01-02T00:15:00+00:00", "previous_champion": null,
  "champion": {"run_id": "20260101T000000-aaaaaa",
               "model": "artifacts/housing/20260101T000000-aaaaaa/model.ilearner",
               "promoted_at": "2026-01-01T00:20:00+00:00",
               "metrics": {"Root Mean Squared Error": 2.5}}
}"""


def test_documents_written_by_main_still_deploy_roll_back_and_restore() -> None:
    w = World()
    old, new = "20260101T000000-aaaaaa", "20260102T000000-bbbbbb"
    w.store.create(run_key("housing", old), json.loads(OLD_CHAMPION_RUN))
    w.store.create(run_key("housing", new), json.loads(OLD_PROMOTING_RUN))
    w.store.create(model_key("housing"), json.loads(OLD_MODEL))
    first = ModelRef("artifacts", f"housing/{old}/model.ilearner")
    second = ModelRef("artifacts", f"housing/{new}/model.ilearner")
    w.target.serving = first

    # The run that passed the gate under main is deployed and crowned.
    assert w.retrainer.on_evaluate(EvaluateRun(model="housing", run_id=new)) == "promoted"
    assert w.target.serving == second
    state = w.ledger.get(model_key("housing"))
    assert state is not None
    assert ModelRef.load(state["champion"]["model"]) == second
    assert ModelRef.load(state["previous_champion"]["model"]) == first

    # The champion main crowned is still a rollback target, by its string reference.
    with pytest.raises(InputRejected, match="already serves"):
        w.retrainer.rollback("housing", new, by="me")
    rollback = w.retrainer.rollback("housing", by="me")
    assert w.deliver() == ["promoted"]
    assert w.target.serving == first
    assert w.ledger.get(run_key("housing", rollback))["restores"] == old  # type: ignore[index]


def spec_kinds(field: str) -> set[str]:
    """The `kind`s model specs can give `field` (the members of its discriminated union)."""
    annotation = ModelSpec.model_fields[field].annotation
    members = typing.get_args(annotation) or (annotation,)
    return {typing.get_args(m.model_fields["kind"].annotation)[0] for m in members}


def test_every_kind_a_spec_can_name_has_an_adapter() -> None:
    assert spec_kinds("training") == set(wiring.TRAINING) == {"bes", "azureml"}
    assert spec_kinds("target") == set(wiring.TARGETS) == {"classic", "new", "online_endpoint"}
