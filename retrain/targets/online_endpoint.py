"""The managed online endpoint target (Azure ML v2), blue/green.

A promotion puts the registered model version on the deployment that takes no traffic (created
when missing), smoke-scores it there when the spec gives a request, then moves all traffic to it
by GET + PUT of the whole endpoint and re-GETs until the map has settled. The other deployment
keeps the previous model at 0 %, so a restore or a rollback (`deploy` of an earlier model) only
moves traffic back to it while it still has that model.

Each step that the service runs as a long-running operation returns `pending` with an operation
this target reads back in `progress`: `deploy <deployment> <lro>`, `traffic <deployment> <lro>`
or `settle <deployment>`. One call per step, never a wait.

With `canary` in the spec, no traffic moves here: once the new deployment has provisioned and
passed its smoke request, `deploy`/`progress` answer `staged` (operation `staged <deployment>`)
and the promotion moves traffic in steps through `traffic`, `shift` and `smoke`.
"""

from __future__ import annotations

from retrain.azureml.endpoints import BUSY, EndpointState, OnlineEndpoints, check_traffic
from retrain.azureml.lro import TERMINAL_FAILURES
from retrain.azureml.spec import OnlineEndpointSpec
from retrain.azureml.workspace import ArmClient
from retrain.deploy import SUCCEEDED, Progress
from retrain.errors import PermanentError, PermanentRemoteError, RemoteError, TransientError
from retrain.http import CallTooLate
from retrain.ports import ModelRef

STEPS = ("deploy", "traffic", "settle", "staged")
SETTLE = "settle"
"""The operation `shift` answers after a traffic PUT that finished at once: look, do not PUT."""


class OnlineEndpoint:
    """`DeployTarget` over one managed online endpoint and its two deployments."""

    def __init__(self, arm: ArmClient, spec: OnlineEndpointSpec) -> None:
        self._arm = arm
        self._spec = spec
        self._name = spec.endpoint
        self._endpoints = OnlineEndpoints(arm)

    def _model_id(self, model: ModelRef) -> str:
        if model.kind != "registered":
            raise PermanentError(
                f"an online endpoint serves registered models, not {model} (a {model.kind} "
                "model): use training kind 'azureml' with this target"
            )
        return self._arm.workspace.model_id(model.name, str(model.version))

    def _serving(self, state: EndpointState) -> str | None:
        """The deployment taking all traffic, if one does."""
        full = [name for name, share in state.traffic.items() if share == 100]
        return full[0] if full else None

    def _holding(self, model_id: str) -> str | None:
        """The configured deployment that has provisioned `model_id`, if any."""
        for name in self._spec.deployments:
            found = self._endpoints.deployment(self._name, name)
            if (
                found is not None
                and found.model == model_id
                and found.provisioning_state.casefold() == "succeeded"
            ):
                return name
        return None

    def serves(self, model: ModelRef) -> bool:
        """All traffic is on a provisioned deployment whose model is `model`."""
        if model.kind != "registered":
            return False
        return self._serves_on(self._endpoints.endpoint(self._name), self._model_id(model))

    def _serves_on(self, state: EndpointState, model_id: str) -> bool:
        serving = self._serving(state)
        if serving is None or state.provisioning_state.casefold() != "succeeded":
            return False
        found = self._endpoints.deployment(self._name, serving)
        return (
            found is not None
            and found.model == model_id
            and found.provisioning_state.casefold() == "succeeded"
        )

    def deploy(self, model: ModelRef) -> Progress:
        """Serve `model`: move traffic to the deployment that already has it, or put it on the
        idle deployment first. Safe to call again."""
        model_id = self._model_id(model)
        state = self._endpoints.ready(self._name)
        if self._serves_on(state, model_id):
            return SUCCEEDED
        holder = self._holding(model_id)
        if holder is not None:
            return self._staged(holder) if self._spec.canary else self._move(holder, smoke=False)
        idle = self._idle(state)
        progress = self._endpoints.deploy(
            self._name, idle, model_id=model_id, template=self._spec.deployment_template
        )
        if progress.state == "pending":
            return Progress("pending", operation=f"deploy {idle} {progress.operation}")
        if progress.state == "failed":
            return self._failed(idle, progress.detail)
        return self._move(idle, smoke=True)

    def _idle(self, state: EndpointState) -> str:
        idle = [name for name in self._spec.deployments if not state.traffic.get(name)]
        if not idle:
            raise PermanentRemoteError(
                f"online endpoint {self._name}: both deployments {list(self._spec.deployments)} "
                f"take traffic ({state.traffic}); put it all on one before promoting"
            )
        return idle[0]

    def progress(self, operation: str | None) -> Progress:
        """Poll the pending step once; start the next when it is done."""
        if operation is None:
            return SUCCEEDED  # `deploy` answered succeeded: traffic had moved and settled
        step, _, rest = operation.partition(" ")
        deployment, _, lro = rest.partition(" ")
        if step not in STEPS or deployment not in self._spec.deployments:
            raise PermanentRemoteError(
                f"online endpoint {self._name}: not an operation of this target: "
                f"{(operation or '')[:60]!r}"
            )
        if step == "settle":
            return self._settled(deployment)
        if step == "staged":
            return self._staged(deployment)
        found = self._endpoints.progress(lro)
        if found.state == "pending":
            return Progress("pending", operation=f"{step} {deployment} {found.operation}")
        if found.state == "failed":
            return self._failed(deployment, found.detail) if step == "deploy" else found
        if step == "deploy":
            return self._move(deployment, smoke=True)
        return self._settled(deployment)

    def _move(self, deployment: str, *, smoke: bool) -> Progress:
        """Smoke-score `deployment` (when asked and configured), then give it all traffic."""
        if smoke and self._spec.smoke_request is not None:
            failed = self.smoke(deployment)
            if failed is not None:
                return Progress("failed", failed)
        if self._spec.canary:
            return self._staged(deployment)
        progress = self._endpoints.set_traffic(self._name, {deployment: 100})
        if progress.state == "pending":
            return Progress("pending", operation=f"traffic {deployment} {progress.operation}")
        if progress.state == "failed":
            return progress
        return self._settled(deployment)

    def _settled(self, deployment: str) -> Progress:
        """Done once a re-GET shows the map (it may lag the operation, spec §7.1)."""
        if self._endpoints.traffic_is(self._name, {deployment: 100}):
            return SUCCEEDED
        return Progress("pending", operation=f"settle {deployment}")

    def _staged(self, deployment: str) -> Progress:
        return Progress("staged", operation=f"staged {deployment}")

    def smoke(self, deployment: str) -> str | None:
        """Send `smoke_request` (if the spec has one) to `deployment`; why it failed, or None."""
        if self._spec.smoke_request is None:
            return None
        try:
            self._endpoints.score(self._name, deployment, self._spec.smoke_request)
        except RemoteError as exc:
            # Throttling, a busy or unreachable service: ask again at the next poll. A 500 is
            # the scoring script failing on the request: the model is not fit to serve.
            if isinstance(exc, TransientError) and exc.status != 500:
                raise
            return f"the smoke request to deployment {deployment} failed: {exc}"
        return None

    def traffic(self) -> dict[str, int]:
        """The endpoint's traffic map, once it may be changed (Succeeded)."""
        return self._endpoints.ready(self._name).traffic

    def shift(self, traffic: dict[str, int], operation: str | None) -> Progress:
        """Make the map `traffic` by GET + PUT of the whole endpoint, the endpoint read first:
        a PUT that landed before its operation was recorded is not sent again while the
        endpoint shows it or is still changing. Succeeded once a re-GET shows the map."""
        wanted = check_traffic(traffic)
        if operation and operation != SETTLE:
            found = self._endpoints.progress(operation)
            if found.state != "succeeded":
                return found
        state = self._endpoints.endpoint(self._name)
        current = state.provisioning_state.casefold()
        if current == "succeeded" and state.traffic == wanted:
            return SUCCEEDED
        if operation or current in BUSY:
            return Progress("pending", operation=operation)  # it lags the operation, §7.1
        if current != "succeeded":
            return Progress("failed", f"online endpoint {self._name} is {state.provisioning_state}")
        progress = self._endpoints.set_traffic(self._name, wanted)
        if progress.state == "succeeded":
            return Progress("pending", operation=SETTLE)
        return progress

    def _failed(self, deployment: str, detail: str | None) -> Progress:
        """A deployment that did not provision, with its inference server's last lines."""
        text = detail or f"deployment {deployment} did not provision"
        try:
            logs = self._endpoints.logs(self._name, deployment, tail=20).strip()
        except (RemoteError, CallTooLate):  # the logs only add to the reason: go on without
            logs = ""
        if logs:
            text += f"; its log ends: {' | '.join(logs.splitlines()[-3:])[:300]}"
        return Progress("failed", text)

    def preflight(self) -> list[str]:
        state = self._endpoints.ready(self._name)
        facts = [
            f"online endpoint {self._name} is {state.provisioning_state} "
            f"(auth {state.auth_mode}); traffic {state.traffic or 'none'}"
        ]
        for name in self._spec.deployments:
            found = self._endpoints.deployment(self._name, name)
            if found is None:
                facts.append(f"deployment {name} does not exist yet (created on first use)")
            elif found.provisioning_state.casefold() in TERMINAL_FAILURES:
                facts.append(f"deployment {name} is {found.provisioning_state}; it is replaced")
            else:
                facts.append(f"deployment {name} is {found.provisioning_state}: {found.model}")
        if not self._spec.deployment_template.get("location") and not state.body.get("location"):
            raise PermanentRemoteError(
                f"online endpoint {self._name} has no location and the deployment template "
                "sets none"
            )
        return facts
