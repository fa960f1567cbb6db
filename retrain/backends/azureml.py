"""The Azure ML v2 training backend: one ARM job per run, its metrics from MLflow, its model
registered as a version of the spec's model.

Owns what is v2-shaped: the job's deterministic name, the datastore URIs of the run's frozen
input and of the model output, the champion as a registered model input, and the version a
run registers.
"""

from __future__ import annotations

from retrain.azureml.checks import check_training
from retrain.azureml.jobs import Jobs, job_name
from retrain.azureml.mlflow import MlflowRuns
from retrain.azureml.registry import ModelRegistry, model_version
from retrain.azureml.spec import AzureMLSpec
from retrain.azureml.template import build_job
from retrain.azureml.workspace import ArmClient
from retrain.errors import PermanentError, RemoteError
from retrain.ports import ModelRef, TrainingRequest, TrainingResult, TrainingStatus

MODEL_FOLDER = "model"
"""The folder under the run's output folder the job writes the model to."""


class AzureMLTraining:
    """`TrainingBackend` over the workspace's ARM clients."""

    what = "Azure ML job"

    def __init__(self, arm: ArmClient, spec: AzureMLSpec) -> None:
        self._arm = arm
        self._spec = spec
        self._jobs = Jobs(arm)
        self._registry = ModelRegistry(arm)

    def submit(self, request: TrainingRequest) -> str:
        """PUT the job named after (model, run): a redelivery PUTs the same name and body, so
        the service creates nothing new."""
        name = job_name(request.model, request.run_id)
        if request.input_container != request.output_container:
            raise PermanentError(
                "the Azure ML backend reads and writes one datastore: the run's input and "
                "outputs must be in one container"
            )
        champion = request.champion
        body = build_job(
            self._spec.job_template,
            job_name=name,
            model=request.model,
            batch=request.run_id,
            training_data=self._uri(request.input_name),
            model_output=self._output(request),
            champion_model=(
                self._arm.workspace.model_id(champion.name, str(champion.version))
                if champion is not None and champion.kind == "registered"
                else None
            ),
        )
        return self._jobs.submit(name, body).name

    def outputs(self, request: TrainingRequest) -> dict[str, str]:
        """Nothing to record up front: the model is a registered version once the job ends."""
        return {}

    def start(self, job_id: str) -> None:
        """Nothing to do: a v2 job runs once it is PUT."""

    def status(self, job_id: str) -> TrainingStatus:
        found = self._jobs.status(job_id)
        details = None
        if found.status in ("Failed", "Canceled"):
            details = self._failure(job_id, found.studio_url)
        elif found.stalled:
            details = f"the service reports {found.status}; the job may recover"
        return TrainingStatus(found.state, found.status, details)

    def _failure(self, job_id: str, studio: str | None) -> str:
        try:
            return self._jobs.failure(job_id)
        except RemoteError as exc:
            where = f" (see {studio})" if studio else ""
            return f"the failure text could not be read: {exc}{where}"

    def cancel(self, job_id: str) -> None:
        """POST cancel; the job goes through CancelRequested to Canceled on its own."""
        self._jobs.cancel(job_id)

    def probe(self) -> str:
        """The setup check of the training side (retrain.azureml.checks): workspace, MLflow
        tracking and every asset the job template references; one fact a line."""
        return "\n".join(check_training(self._arm, self._spec))

    def result(self, request: TrainingRequest, job_id: str) -> TrainingResult:
        """The metrics the job logged to its MLflow run, and its model registered as the run's
        version (deterministic: a redelivery finds it registered and sends nothing)."""
        spec = self._spec
        runs = MlflowRuns(self._arm, self._arm.workspace_info().mlflow_tracking_uri)
        evaluation = runs.evaluation(job_id, spec.metric_names())
        version = model_version(request.run_id)
        self._registry.register(
            spec.model_name,
            version,
            model_uri=self._arm.workspace.long_datastore_uri(self._output(request)),
            job_name=job_id,
            tags={
                "retrain.model": request.model,
                "retrain.run": request.run_id,
                "retrain.job": job_id,
                "retrain.input": f"{request.input_container}/{request.input_name}",
            },
            model_type=spec.model_type,
            description=f"trained by retrain run {request.run_id} of {request.model}",
        )
        return TrainingResult(
            evaluation.challenger,
            evaluation.champion,
            ModelRef.registered(spec.model_name, version),
        )

    def _uri(self, path: str) -> str:
        return f"azureml://datastores/{self._spec.datastore}/paths/{path}"

    def _output(self, request: TrainingRequest) -> str:
        return self._uri(f"{request.output_folder}/{MODEL_FOLDER}/")
