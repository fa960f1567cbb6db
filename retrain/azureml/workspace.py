"""The workspace's ARM client: URLs, api-version, bearer token, and the ARM error shape."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import requests

from retrain.errors import PermanentRemoteError, RemoteError, TransientRemoteError
from retrain.http import BearerCalls, TokenCredential, field_of, json_of, redact, shape_error

API_VERSION = "2025-09-01"
"""The ARM api-version every control-plane call sends (spec §0.1: all contracts read from it)."""
ARM_ENDPOINT = "https://management.azure.com"
ROLE_HINT = (
    "the app's identity needs the 'AzureML Data Scientist' role (or Contributor) on the workspace"
)
PROVIDER = "Microsoft.MachineLearningServices"


@dataclass(frozen=True)
class WorkspaceRef:
    """Where a workspace lives in ARM."""

    subscription_id: str
    resource_group: str
    workspace: str
    arm_endpoint: str = ARM_ENDPOINT

    @property
    def path(self) -> str:
        """The workspace's ARM resource id (the `{WS}` prefix of spec §0.3)."""
        return (
            f"/subscriptions/{self.subscription_id}/resourceGroups/{self.resource_group}"
            f"/providers/{PROVIDER}/workspaces/{self.workspace}"
        )

    def url(self, suffix: str = "") -> str:
        """The control-plane URL of `{WS}{suffix}`, without the api-version."""
        return self.arm_endpoint.rstrip("/") + self.path + suffix

    def model_id(self, name: str, version: str) -> str:
        """A model version's ARM id, the form deployments and job inputs reference."""
        return f"{self.path}/models/{name}/versions/{version}"

    def long_datastore_uri(self, short: str) -> str:
        """`azureml://datastores/<ds>/paths/<p>` in the long form the registry is sent (§6)."""
        prefix = "azureml://datastores/"
        datastore, sep, path = short.removeprefix(prefix).partition("/paths/")
        if not short.startswith(prefix) or not sep or not datastore:
            raise PermanentRemoteError(
                f"{short!r} is not a datastore URI (azureml://datastores/<ds>/paths/<path>)"
            )
        return (
            f"azureml://subscriptions/{self.subscription_id}/resourceGroups/"
            f"{self.resource_group}/workspaces/{self.workspace}/datastores/{datastore}/paths/{path}"
        )


def arm_error_text(response: requests.Response) -> str:
    """The ARM error body (`{"error": {"code", "message", "details"}}`) as one line."""
    try:
        body = response.json()
    except ValueError:
        text = " ".join(response.text.split())
        return f"(not JSON: {text[:200]})" if text else ""
    error = body.get("error") if isinstance(body, dict) else None
    if not isinstance(error, dict):
        return json.dumps(body)[:300]
    text = f"{error.get('code') or 'error'}: {error.get('message') or ''}".strip()
    details = [d for d in error.get("details") or [] if isinstance(d, dict)]
    if details:
        parts = [f"{d.get('code') or 'detail'}: {d.get('message') or ''}" for d in details[:5]]
        text += " (" + "; ".join(parts) + ")"
    return text[:600]


@dataclass(frozen=True)
class WorkspaceInfo:
    """What the workspace GET tells the other clients (spec §2)."""

    location: str | None
    mlflow_tracking_uri: str
    discovery_url: str | None


class ArmClient:
    """Control-plane calls on one workspace: api-version, token, errors sorted by what to do."""

    def __init__(
        self,
        workspace: WorkspaceRef,
        *,
        credential: TokenCredential,
        session: requests.Session,
        timeout: tuple[float, float],
    ) -> None:
        self.workspace = workspace
        self.base = workspace.arm_endpoint.rstrip("/")
        self.calls = BearerCalls(session, timeout, credential, f"{self.base}/.default")
        """Every call's session, timeouts and token (for the ARM audience)."""

    def url(self, suffix: str) -> str:
        """`{WS}{suffix}?api-version=...`."""
        return f"{self.workspace.url(suffix)}?api-version={API_VERSION}"

    def resource_url(self, resource_id: str) -> str:
        """`{resource_id}?api-version=...` on this client's ARM endpoint (for ids the user gave,
        which may name another workspace of the provider)."""
        return f"{self.base}{resource_id}?api-version={API_VERSION}"

    def check_own(self, url: str) -> str:
        """Refuse to send the ARM token anywhere but the ARM endpoint (an async URL is echoed
        by the service, so it is checked, not trusted)."""
        if not url.startswith(self.base + "/"):
            raise PermanentRemoteError(f"refusing to poll {redact(url)}: it is outside {self.base}")
        return url

    def request(
        self,
        method: str,
        url: str,
        what: str,
        body: Any = None,
        *,
        conflict_is_transient: bool = True,
    ) -> requests.Response:
        """One call; 401/403/404 become permanent errors that say what to fix, a 409 a
        transient one (another operation is running) unless the caller says otherwise."""
        try:
            return self.calls.send(method, url, what, body, describe=arm_error_text)
        except RemoteError as exc:
            raise _sorted(exc, what, conflict_is_transient) from exc

    def get_json(self, url: str, what: str) -> dict[str, Any]:
        """GET a JSON object."""
        return object_of(self.request("GET", url, what), what)

    def get_or_none(self, url: str, what: str) -> dict[str, Any] | None:
        """GET a JSON object, or None when it does not exist (404)."""
        try:
            return self.get_json(url, what)
        except PermanentRemoteError as exc:
            if exc.status == 404:
                return None
            raise

    def workspace_info(self) -> WorkspaceInfo:
        """GET the workspace: its MLflow tracking URI and discovery URL."""
        what = f"GET workspace {self.workspace.workspace}"
        body = self.get_json(self.url(""), what)
        props = field_of(body, "properties", dict, what=what, required=True)
        tracking = field_of(props, "mlFlowTrackingUri", str, what=what, required=True)
        discovery = field_of(props, "discoveryUrl", str, what=what)
        return WorkspaceInfo(field_of(body, "location", str, what=what), tracking, discovery)

    def data_plane_base(self, info: WorkspaceInfo) -> str:
        """The run-history data-plane base: `api` of the discovery document (spec §2)."""
        what = f"workspace {self.workspace.workspace} discovery"
        if not info.discovery_url:
            raise PermanentRemoteError(f"{what}: the workspace has no discoveryUrl")
        # Whether discovery needs a token is unconfirmed (§2); the ARM token is sent, as the
        # SDK's pipeline does.
        body = object_of(self.request("GET", info.discovery_url, what), what)
        api = field_of(body, "api", str, what=what, required=True)
        return str(api).rstrip("/")


def object_of(response: requests.Response, what: str) -> dict[str, Any]:
    """The JSON object of a response (a shape error otherwise)."""
    body = json_of(response, what=what)
    if not isinstance(body, dict):
        raise shape_error(what, "the reply", "a JSON object", body)
    return body


def _sorted(exc: RemoteError, what: str, conflict_is_transient: bool) -> RemoteError:
    status = exc.status
    if status == 401:
        return PermanentRemoteError(
            f"{exc} (the token was refused: wrong tenant, audience or expired)", status=401
        )
    if status == 403:
        return PermanentRemoteError(f"{exc} ({ROLE_HINT})", status=403)
    if status == 409 and conflict_is_transient:
        return TransientRemoteError(
            f"{exc} (another operation on the resource is in progress)",
            status=409,
            retry_after=exc.retry_after,
        )
    if status == 409:
        return PermanentRemoteError(str(exc), status=409)
    return exc


def host_of(url: str) -> str:
    """The host of a URL ('' when none)."""
    return urlsplit(url).hostname or ""


def as_object(value: Any) -> dict[str, Any]:
    """`value` if it is a JSON object, else an empty one (for optional nested fields)."""
    return value if isinstance(value, dict) else {}
