"""The BES training backend: a Classic training web service run through BES v2.0.

Owns what is BES-shaped: the SAS references the job reads and writes, the names of its outputs
(`model.ilearner`, `evaluation.csv`), and reading the Evaluate Model CSV it writes.
"""

from __future__ import annotations

from retrain.bes import BatchJobs, JobState
from retrain.classic_spec import BesSpec
from retrain.evaluation import parse_evaluation_csv
from retrain.ports import ModelRef, Phase, TrainingRequest, TrainingResult, TrainingStatus
from retrain.sas import SAS_MARGIN
from retrain.storage import DataStore

MODEL_BLOB = "model.ilearner"
EVALUATION_BLOB = "evaluation.csv"
MAX_EVALUATION_BYTES = 1024 * 1024

_PHASES = {
    JobState.NOT_STARTED: Phase.NOT_STARTED,
    JobState.RUNNING: Phase.RUNNING,
    JobState.FINISHED: Phase.FINISHED,
    JobState.FAILED: Phase.FAILED,
    JobState.CANCELLED: Phase.CANCELLED,
}


class BesTraining:
    """`TrainingBackend` over a BES client; SAS tokens minted by `data` for each job."""

    what = "BES job"

    def __init__(self, jobs: BatchJobs, data: DataStore, spec: BesSpec) -> None:
        self._jobs = jobs
        self._data = data
        self._spec = spec

    def submit(self, request: TrainingRequest) -> str:
        """Create the job with a read reference to the input and write references to the
        model and the evaluation, valid until an hour past the deadline."""
        data, spec = self._data, self._spec
        expires = request.deadline + SAS_MARGIN
        out = request.output_container
        inputs = {
            spec.input_name: data.reference(
                request.input_container, request.input_name, write=False, expires=expires
            )
        }
        outputs = {
            spec.model_output: data.reference(
                out, self._model(request).name, write=True, expires=expires
            ),
            spec.evaluation_output: data.reference(
                out, _evaluation(request), write=True, expires=expires
            ),
        }
        return self._jobs.submit(
            inputs=inputs, outputs=outputs, global_parameters=spec.global_parameters
        )

    def outputs(self, request: TrainingRequest) -> dict[str, str]:
        """The model and the evaluation, recorded on the run at submit as earlier releases
        did (an instance of the previous release gates and deploys the run by them)."""
        out = request.output_container
        return {
            "model": f"{out}/{self._model(request).name}",
            "evaluation": f"{out}/{_evaluation(request)}",
        }

    def start(self, job_id: str) -> None:
        self._jobs.start(job_id)

    def status(self, job_id: str) -> TrainingStatus:
        found = self._jobs.status(job_id)
        return TrainingStatus(_PHASES[found.state], found.state.value, found.details)

    def cancel(self, job_id: str) -> None:
        self._jobs.cancel(job_id)

    def probe(self) -> str:
        return self._jobs.probe()

    def result(self, request: TrainingRequest, job_id: str) -> TrainingResult:
        """The Evaluate Model output the job wrote: its first row scores the new model, a
        second the champion on the same hold-out data."""
        text = self._data.read_text(
            request.output_container, _evaluation(request), max_bytes=MAX_EVALUATION_BYTES
        )
        evaluation = parse_evaluation_csv(text)
        return TrainingResult(evaluation.challenger, evaluation.champion, self._model(request))

    @staticmethod
    def _model(request: TrainingRequest) -> ModelRef:
        return ModelRef(request.output_container, f"{request.output_folder}/{MODEL_BLOB}")


def _evaluation(request: TrainingRequest) -> str:
    return f"{request.output_folder}/{EVALUATION_BLOB}"
