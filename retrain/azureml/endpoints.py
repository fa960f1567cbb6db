"""Managed online endpoints and deployments (spec §7-8): blue/green without waiting."""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from retrain.azureml.lro import from_mutation, pending, poll
from retrain.azureml.workspace import ArmClient, object_of
from retrain.connection import is_loopback
from retrain.deploy import SUCCEEDED, Progress
from retrain.errors import PermanentRemoteError, TransientRemoteError, UsageError
from retrain.http import call, field_of, json_of

DEPLOYMENT_NAME = re.compile(r"[a-z0-9][a-z0-9-]{2,31}")
"""Lower case (the SDK lower-cases traffic keys) and 3-32 characters (azd's rule; the service's
exact rule is unconfirmed, §7.1, so the stricter one is kept)."""
READ_ONLY = ("scoringUri", "swaggerUri", "provisioningState", "keys")
BUSY = ("creating", "updating", "deleting", "scaling")
_ENVELOPE_READ_ONLY = ("id", "name", "type", "systemData")
_SECRET_CALLS = {"key": ("/listKeys", "primaryKey"), "amltoken": ("/token", "accessToken")}
"""Where the scoring secret of each authMode comes from (ListKeys / GetToken, spec §0.2)."""
ML_SCOPE = "https://ml.azure.com/.default"
"""Token audience for AADToken scoring: unconfirmed (§0.2), the data-plane audience is used."""


def check_traffic(traffic: dict[str, int]) -> dict[str, int]:
    """A valid traffic map without its zero entries: whole percents that total 0 or 100."""
    for name, share in traffic.items():
        if DEPLOYMENT_NAME.fullmatch(name) is None:
            raise UsageError(f"traffic: {name!r} is not a deployment name (3-32 of a-z 0-9 -)")
        if isinstance(share, bool) or not isinstance(share, int) or not 0 <= share <= 100:
            raise UsageError(f"traffic: {name} gets {share!r}; use a whole percent 0-100")
    total = sum(traffic.values())
    if total not in (0, 100):
        raise UsageError(f"traffic must total 0 or 100, got {total} ({traffic})")
    return {name: share for name, share in traffic.items() if share}


@dataclass(frozen=True)
class EndpointState:
    """An online endpoint as its GET shows it."""

    name: str
    provisioning_state: str
    traffic: dict[str, int]
    """Without zero entries."""
    scoring_uri: str | None
    auth_mode: str
    body: dict[str, Any]


@dataclass(frozen=True)
class DeploymentState:
    """An online deployment as its GET shows it."""

    name: str
    provisioning_state: str
    model: str | None


class OnlineEndpoints:
    """`{WS}/onlineEndpoints`: read state, deploy a model, move traffic, smoke-score."""

    def __init__(self, arm: ArmClient) -> None:
        self._arm = arm

    def _url(self, endpoint: str, deployment: str | None = None, suffix: str = "") -> str:
        path = f"/onlineEndpoints/{endpoint}"
        if deployment is not None:
            path += f"/deployments/{deployment}"
        return self._arm.url(path + suffix)

    def endpoint(self, name: str) -> EndpointState:
        """GET the endpoint: provisioning state, traffic map, scoring URI, auth mode."""
        what = f"GET online endpoint {name}"
        body = self._arm.get_json(self._url(name), what)
        props = field_of(body, "properties", dict, what=what, required=True)
        traffic = field_of(props, "traffic", dict, what=what) or {}
        shares: dict[str, int] = {}
        for key, share in traffic.items():
            if isinstance(share, bool) or not isinstance(share, int):
                raise PermanentRemoteError(f"{what}: traffic of {key} is {share!r}")
            if share:
                shares[str(key)] = share
        return EndpointState(
            name=name,
            provisioning_state=str(field_of(props, "provisioningState", str, what=what) or ""),
            traffic=shares,
            scoring_uri=field_of(props, "scoringUri", str, what=what),
            auth_mode=str(field_of(props, "authMode", str, what=what, required=True)),
            body=body,
        )

    def ready(self, name: str) -> EndpointState:
        """The endpoint, if it may be changed now (spec §7.3 step 1: only when Succeeded)."""
        state = self.endpoint(name)
        current = state.provisioning_state
        if current.casefold() in BUSY:
            raise TransientRemoteError(f"online endpoint {name} is {current}; try again later")
        if current.casefold() != "succeeded":
            raise PermanentRemoteError(
                f"online endpoint {name} is {current or 'in no state'}, not Succeeded; "
                "fix it in Azure ML before promoting to it"
            )
        return state

    def deployment(self, endpoint: str, name: str) -> DeploymentState | None:
        """GET a deployment, None if it does not exist."""
        what = f"GET deployment {endpoint}/{name}"
        body = self._arm.get_or_none(self._url(endpoint, name), what)
        if body is None:
            return None
        props = field_of(body, "properties", dict, what=what, required=True)
        return DeploymentState(
            name=name,
            provisioning_state=str(field_of(props, "provisioningState", str, what=what) or ""),
            model=field_of(props, "model", str, what=what),
        )

    def deploy(
        self, endpoint: str, name: str, *, model_id: str, template: dict[str, Any]
    ) -> Progress:
        """PUT deployment `name` serving `model_id` (the model version's ARM id), built from
        the user's deployment template, unless it already does; safe to call again."""
        if DEPLOYMENT_NAME.fullmatch(name) is None:
            raise UsageError(f"{name!r} is not a deployment name (3-32 of a-z 0-9 -)")
        state = self.ready(endpoint)
        current = self.deployment(endpoint, name)
        if current is not None and current.provisioning_state.casefold() in BUSY:
            if current.model == model_id:
                return pending("resource", self._url(endpoint, name))
            raise TransientRemoteError(
                f"deployment {endpoint}/{name} is {current.provisioning_state}; try again later"
            )
        if (
            current is not None
            and current.model == model_id
            and current.provisioning_state.casefold() == "succeeded"
        ):
            return SUCCEEDED
        body = deployment_body(template, model_id, state.body.get("location"))
        what = f"PUT deployment {endpoint}/{name}"
        response = self._arm.request("PUT", self._url(endpoint, name), what, body)
        return from_mutation(response, self._url(endpoint, name), what)

    def set_traffic(self, endpoint: str, traffic: dict[str, int]) -> Progress:
        """Move traffic by GET + PUT of the whole endpoint (traffic cannot be PATCHed, §7.1);
        nothing is sent when the map already holds."""
        wanted = check_traffic(traffic)
        state = self.ready(endpoint)
        if state.traffic == wanted:
            return SUCCEEDED
        body = writable(state.body)
        body["properties"]["traffic"] = wanted
        what = f"PUT online endpoint {endpoint} traffic {wanted}"
        response = self._arm.request("PUT", self._url(endpoint), what, body)
        return from_mutation(response, self._url(endpoint), what)

    def traffic_is(self, endpoint: str, traffic: dict[str, int]) -> bool:
        """Whether a re-GET shows exactly this map (it may lag the operation, §7.1)."""
        wanted = check_traffic(traffic)
        state = self.endpoint(endpoint)
        return state.provisioning_state.casefold() == "succeeded" and state.traffic == wanted

    def delete_deployment(self, endpoint: str, name: str) -> Progress:
        """DELETE a deployment (only allowed at 0 % traffic)."""
        what = f"DELETE deployment {endpoint}/{name}"
        response = self._arm.request("DELETE", self._url(endpoint, name), what)
        return from_mutation(response, self._url(endpoint, name), what)

    def progress(self, operation: str) -> Progress:
        """Poll a pending operation once: pending, succeeded or failed."""
        return poll(self._arm, operation, "online endpoint operation")

    def logs(self, endpoint: str, name: str, *, tail: int = 100) -> str:
        """The inference server's last log lines (why a deployment failed)."""
        what = f"getLogs of deployment {endpoint}/{name}"
        body = {"containerType": "InferenceServer", "tail": tail}
        answer = object_of(
            self._arm.request("POST", self._url(endpoint, name, "/getLogs"), what, body), what
        )
        return str(field_of(answer, "content", str, what=what) or "")

    def score(self, endpoint: str, deployment: str, payload: Any) -> Any:
        """POST a request to one deployment (header `azureml-model-deployment`), whatever its
        traffic share: the smoke test of a new deployment before it takes traffic."""
        state = self.endpoint(endpoint)
        uri = state.scoring_uri
        parts = urlsplit(uri or "")
        if not uri or not (parts.scheme == "https" or is_loopback(parts.hostname or "")):
            raise PermanentRemoteError(f"online endpoint {endpoint}: no https scoringUri ({uri})")
        headers = {
            "Authorization": f"Bearer {self._scoring_secret(endpoint, state.auth_mode)}",
            "Content-Type": "application/json",
            "azureml-model-deployment": deployment,
        }
        what = f"score deployment {endpoint}/{deployment}"
        response = call(
            self._arm.calls.session,
            "POST",
            uri,
            what=what,
            timeout=self._arm.calls.timeout,
            headers=headers,
            json_body=payload,
            send_body=True,
        )
        return json_of(response, what=what)

    def _scoring_secret(self, endpoint: str, auth_mode: str) -> str:
        mode = auth_mode.casefold()
        if mode == "aadtoken":
            return str(self._arm.calls.credential.get_token(ML_SCOPE).token)
        found = _SECRET_CALLS.get(mode)
        if found is None:
            raise PermanentRemoteError(f"online endpoint {endpoint}: unknown authMode {auth_mode}")
        suffix, field = found
        what = f"{suffix.strip('/')} of online endpoint {endpoint}"
        body = object_of(self._arm.request("POST", self._url(endpoint, None, suffix), what), what)
        return str(field_of(body, field, str, what=what, required=True))


def writable(endpoint: dict[str, Any]) -> dict[str, Any]:
    """An endpoint GET turned into its PUT body: every writable field echoed back (what PUT
    resets when a field is omitted is unconfirmed, §7.1), read-only ones dropped."""
    body = {k: copy.deepcopy(v) for k, v in endpoint.items() if k not in _ENVELOPE_READ_ONLY}
    body["properties"] = {k: v for k, v in body.get("properties", {}).items() if k not in READ_ONLY}
    identity = body.get("identity")
    if isinstance(identity, dict):
        # principalId/tenantId (and per-identity ids) are read-only; the type and the
        # user-assigned identities' resource ids are what PUT takes.
        kept: dict[str, Any] = {"type": identity.get("type")}
        if isinstance(identity.get("userAssignedIdentities"), dict):
            kept["userAssignedIdentities"] = {k: {} for k in identity["userAssignedIdentities"]}
        body["identity"] = kept
    return body


def deployment_body(
    template: dict[str, Any], model_id: str, location: str | None
) -> dict[str, Any]:
    """The deployment PUT body: the user's template with the model filled in (§7.2)."""
    if not isinstance(template, dict) or not isinstance(template.get("properties"), dict):
        raise UsageError('a deployment template is a JSON object with "properties"')
    body = copy.deepcopy(template)
    body.setdefault("location", location)
    if not body["location"]:
        raise UsageError("deployment template: location is missing and the endpoint has none")
    sku = body.setdefault("sku", {"name": "Default", "capacity": 1})
    if not isinstance(sku, dict) or not sku.get("name"):
        raise UsageError('deployment template: sku.name is required (the SDK sends "Default")')
    props = body["properties"]
    props.setdefault("endpointComputeType", "Managed")
    props["model"] = model_id
    return body
