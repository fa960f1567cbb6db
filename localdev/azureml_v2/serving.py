"""Emulated model registry, online endpoints and deployments, long-running operations, scoring."""

from __future__ import annotations

import copy
import json
import random
import re
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from localdev.azureml_v2.core import ArmError
from localdev.azureml_v2.deploying import Deploying
from localdev.azureml_v2.training import MODEL_FILE

if TYPE_CHECKING:
    from localdev.azureml_v2.core import Emulator

MODEL_TYPES = ("custom_model", "mlflow_model", "triton_model")
_JOB_OUTPUT = re.compile(r"azureml://jobs/([^/]+)/outputs/([^/]+)/paths/(.*)")
CONFLICT = "Conflict of operation, another operation on same entity is already running"


@dataclass
class Deployment:
    """One deployment of an endpoint."""

    name: str
    body: dict[str, Any]
    state: str = "Creating"
    model_id: str | None = None
    """The model version it serves (after a successful operation)."""
    model: dict[str, Any] | None = None
    logs: list[str] = field(default_factory=list)


@dataclass
class Endpoint:
    """A managed online endpoint, created beforehand by the user."""

    name: str
    auth_mode: str = "Key"
    key: str = "local-score-key"
    state: str = "Succeeded"
    traffic: dict[str, int] = field(default_factory=dict)
    mirror: dict[str, int] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    deployments: dict[str, Deployment] = field(default_factory=dict)
    stale: tuple[dict[str, int], int] | None = None
    """(the map before a change, GETs left that still show it)."""


@dataclass
class Operation:
    """A long-running operation on an endpoint or one of its deployments."""

    id: str
    kind: str
    """"traffic", "deployment" or "delete"."""
    endpoint: str
    deployment: str | None
    started: float
    change: dict[str, Any]
    status: str = "InProgress"
    error: dict[str, str] | None = None


class Serving:
    """Model versions and online endpoints of the workspace."""

    def __init__(self, emu: Emulator, endpoints: list[dict[str, Any]]) -> None:
        self.emu = emu
        self.models: dict[tuple[str, str], dict[str, Any]] = {}
        self.endpoints = {e["name"]: Endpoint(**e) for e in endpoints}
        self.operations: dict[str, Operation] = {}
        self.scored: list[tuple[str, str]] = []
        """(endpoint, deployment) of every scoring request served."""
        self.traffic_puts: list[tuple[str, dict[str, int]]] = []
        """(endpoint, traffic map) of every endpoint PUT accepted, in order."""
        self.random = random.Random(7)
        self.deploying = Deploying(self)

    # ---- model registry

    def put_model(self, name: str, version: str, body: Any) -> tuple[int, dict[str, Any]]:
        """PUT models/{name}/versions/{version}: versions are immutable once they have a path."""
        props = body.get("properties") if isinstance(body, dict) else None
        if not isinstance(props, dict) or not props.get("modelUri"):
            raise ArmError(400, "UserError", "properties.modelUri is required")
        if props.get("modelType", "custom_model") not in MODEL_TYPES:
            raise ArmError(400, "UserError", f"modelType {props.get('modelType')!r} is not known")
        uri = str(props["modelUri"])
        if uri.startswith("azureml://datastores/"):
            raise self.emu.refuse(
                400, "UserError", "short datastore uri", f"send the long datastore form: {uri}"
            )
        with self.emu.lock:
            existing = self.models.get((name, version))
            if existing is not None and existing["modelUri"] != uri:
                raise self.emu.refuse(
                    400,
                    "UserError",
                    "model path changed",
                    "(UserError) Asset paths cannot be updated.",
                )
            self.models[(name, version)] = copy.deepcopy(props)
        return (200 if existing else 201), self.model_view(name, version)

    def model_view(self, name: str, version: str) -> dict[str, Any]:
        """GET models/{name}/versions/{version}."""
        props = self.models.get((name, version))
        if props is None:
            raise ArmError(404, "UserError", f"Model {name}:{version} not found.")
        return {
            "id": f"{self.emu.ws_path}/models/{name}/versions/{version}",
            "name": version,
            "properties": copy.deepcopy(props),
        }

    def container_view(self, name: str) -> dict[str, Any]:
        """GET models/{name}: latest and next version (numeric versions only)."""
        numbers = [int(v) for (n, v) in self.models if n == name and v.isdigit()]
        if not numbers and not any(n == name for n, _ in self.models):
            raise ArmError(404, "UserError", f"Model container {name} not found.")
        latest = max(numbers, default=0)
        return {
            "id": f"{self.emu.ws_path}/models/{name}",
            "name": name,
            "properties": {"latestVersion": str(latest), "nextVersion": str(latest + 1)},
        }

    def load_model(self, model_id: str) -> dict[str, Any]:
        """The learner of a registered version, read from where its modelUri points."""
        match = re.fullmatch(
            re.escape(self.emu.ws_path) + r"/models/([^/]+)/versions/([^/]+)",
            model_id,
            flags=re.IGNORECASE,
        )
        if match is None:
            raise ArmError(400, "UserError", f"model {model_id!r} is not a model version ARM id")
        props = self.models.get((match.group(1), match.group(2)))
        if props is None:
            raise ArmError(400, "UserError", f"model {model_id} is not registered")
        uri = str(props["modelUri"])
        if (job := _JOB_OUTPUT.fullmatch(uri)) is not None:
            found = self.emu.training.jobs.get(job.group(1))
            outputs = found.props.get("outputs") or {} if found else {}
            if job.group(2) not in outputs:
                raise ArmError(400, "UserError", f"{uri}: no such job output")
            uri = outputs[job.group(2)]["uri"].rstrip("/") + "/" + job.group(3)
        model: dict[str, Any] = json.loads(self.emu.read_blob(uri, MODEL_FILE))
        return model

    # ---- endpoints

    def endpoint(self, name: str) -> Endpoint:
        """The endpoint, with its due operations settled."""
        self.deploying.settle()
        found = self.endpoints.get(name)
        if found is None:
            raise ArmError(404, "ResourceNotFound", f"Online endpoint {name} was not found.")
        return found

    def endpoint_view(self, name: str, base: str, *, read: bool = False) -> dict[str, Any]:
        """The endpoint resource; a `read` GET may still show a stale traffic map."""
        ep = self.endpoint(name)
        traffic = ep.traffic
        with self.emu.lock:
            if read and ep.stale is not None:
                old, left = ep.stale
                traffic = old
                ep.stale = (old, left - 1) if left > 1 else None
        return {
            "id": f"{self.emu.ws_path}/onlineEndpoints/{name}",
            "name": name,
            "type": "Microsoft.MachineLearningServices/workspaces/onlineEndpoints",
            "location": self.emu.location,
            "kind": "Managed",
            "identity": {"type": "SystemAssigned", "principalId": "p-1", "tenantId": "t-1"},
            "tags": dict(ep.tags),
            "properties": {
                "authMode": ep.auth_mode,
                "provisioningState": ep.state,
                "scoringUri": f"{base}/score/{name}",
                "swaggerUri": f"{base}/score/{name}/swagger.json",
                "traffic": dict(traffic),
                "mirrorTraffic": dict(ep.mirror),
                "publicNetworkAccess": "Enabled",
                "keys": None,
            },
        }

    def _busy(self, ep: Endpoint) -> bool:
        return any(
            op.endpoint == ep.name and op.status == "InProgress" for op in self.operations.values()
        )

    def start(
        self, ep: Endpoint, kind: str, deployment: str | None, change: dict[str, Any]
    ) -> Operation:
        """Start an operation: one at a time per endpoint and its deployments (spec §7.3)."""
        if self._busy(ep) or ep.state != "Succeeded":
            what = (
                f"Cannot create a deployment in endpoint {ep.name} because it is in "
                f"{ep.state} provisioning state."
                if kind == "deployment" and ep.state != "Succeeded"
                else CONFLICT
            )
            raise self.emu.refuse(409, "Conflict", "mutation in progress", what)
        op = Operation(uuid.uuid4().hex, kind, ep.name, deployment, self.emu.seconds(), change)
        self.operations[op.id] = op
        return op

    def put_endpoint(self, name: str, body: Any) -> Operation:
        """PUT the whole endpoint: the only way to change traffic (spec §7.1)."""
        ep = self.endpoint(name)
        if not isinstance(body, dict) or not body.get("location"):
            raise ArmError(400, "UserError", "location is required")
        props = body.get("properties")
        if not isinstance(props, dict) or not props.get("authMode"):
            raise ArmError(400, "UserError", "properties.authMode is required")
        traffic = self._check_traffic(ep, props.get("traffic") or {})
        mirror = self._check_mirror(ep, props.get("mirrorTraffic") or {}, traffic)
        with self.emu.lock:
            op = self.start(
                ep,
                "traffic",
                None,
                {"traffic": traffic, "mirror": mirror, "tags": body.get("tags") or {}},
            )
            ep.state = "Updating"
            self.traffic_puts.append((name, dict(traffic)))
        return op

    def _check_traffic(self, ep: Endpoint, traffic: Any) -> dict[str, int]:
        if not isinstance(traffic, dict) or any(
            isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= 100
            for v in traffic.values()
        ):
            raise self.emu.refuse(400, "UserError", "traffic sum", f"invalid traffic {traffic}")
        if sum(traffic.values()) not in (0, 100):
            raise self.emu.refuse(
                400,
                "UserError",
                "traffic sum",
                f"Traffic values need to sum to 100 (or 0 to disable traffic); got {traffic}",
            )
        unknown = sorted(set(traffic) - set(ep.deployments))
        if unknown:
            raise self.emu.refuse(
                400,
                "UserError",
                "traffic to unknown deployment",
                f"Deployments {unknown} do not exist in endpoint {ep.name}",
            )
        return {k: v for k, v in traffic.items() if v}

    def _check_mirror(self, ep: Endpoint, mirror: Any, traffic: dict[str, int]) -> dict[str, int]:
        shares = {k: v for k, v in dict(mirror).items() if v}
        if len(shares) > 1 or sum(shares.values()) > 50 or set(shares) & set(traffic):
            raise self.emu.refuse(
                400,
                "UserError",
                "mirror traffic",
                "Mirror traffic goes to one deployment without live traffic, at most 50.",
            )
        return shares

    def patch_endpoint(self, name: str, body: Any) -> dict[str, Any]:
        """PATCH takes tags and identity only; traffic moves by PUT (spec §7.1)."""
        ep = self.endpoint(name)
        extra = sorted(set(body or {}) - {"tags", "identity"})
        if extra:
            kind = "traffic patch" if "traffic" in json.dumps(body) else "endpoint patch"
            raise self.emu.refuse(
                400,
                "UserError",
                kind,
                f"PATCH of an online endpoint takes tags and identity only, not {extra}; "
                "change traffic by a PUT of the whole endpoint",
            )
        ep.tags = dict((body or {}).get("tags") or ep.tags)
        return {}
