"""Emulated deployments: PUT as a long-running operation, settling, delete, logs, scoring."""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING, Any

from localdev import learn
from localdev.azureml_v2.core import ArmError

if TYPE_CHECKING:
    from localdev.azureml_v2.core import Emulator
    from localdev.azureml_v2.serving import Deployment, Endpoint, Operation, Serving


class Deploying:
    """The deployments of the workspace's endpoints; state lives in `Serving`."""

    def __init__(self, serving: Serving) -> None:
        self.serving = serving
        self.emu: Emulator = serving.emu

    def deployment(self, endpoint: str, name: str) -> Deployment:
        """The deployment, with due operations settled."""
        found = self.serving.endpoint(endpoint).deployments.get(name)
        if found is None:
            raise ArmError(404, "ResourceNotFound", f"Deployment {endpoint}/{name} was not found.")
        return found

    def deployment_view(self, endpoint: str, name: str, op: str | None = None) -> dict[str, Any]:
        """The deployment resource (its async URL echoed in properties.properties, §1.2)."""
        dep = self.deployment(endpoint, name)
        body = copy.deepcopy(dep.body)
        props = body.setdefault("properties", {})
        props["provisioningState"] = dep.state
        if op:
            props.setdefault("properties", {})["AzureAsyncOperationUri"] = op
        return {
            "id": f"{self.emu.ws_path}/onlineEndpoints/{endpoint}/deployments/{name}",
            "name": name,
            **body,
        }

    def put_deployment(self, endpoint: str, name: str, body: Any) -> Operation:
        """PUT a deployment: validated, then Creating/Updating until its operation settles."""
        from localdev.azureml_v2.serving import Deployment

        ep = self.serving.endpoint(endpoint)
        problems = _deployment_problems(body)
        if problems:
            raise ArmError(400, "UserError", "; ".join(problems))
        model_id = str(body["properties"]["model"])
        self.load_model_id_check(model_id)
        with self.emu.lock:
            op = self.serving.start(ep, "deployment", name, {"body": copy.deepcopy(body)})
            dep = ep.deployments.get(name)
            if dep is None:
                dep = ep.deployments[name] = Deployment(name, copy.deepcopy(body))
            else:
                dep.state = "Updating"
        return op

    def load_model_id_check(self, model_id: str) -> None:
        """Refuse a deployment whose model is not a registered version's ARM id."""
        name_version = model_id.rsplit("/models/", 1)[-1].split("/versions/")
        if len(name_version) != 2 or tuple(name_version) not in self.serving.models:
            raise ArmError(400, "UserError", f"model {model_id!r} is not a registered version")

    def patch_deployment(self, endpoint: str, name: str, body: Any) -> dict[str, Any]:
        """PATCH takes sku and tags only (spec §7.2)."""
        dep = self.deployment(endpoint, name)
        extra = sorted(set(body or {}) - {"tags", "sku"})
        if extra:
            raise self.emu.refuse(
                400,
                "UserError",
                "deployment patch",
                f"PATCH of a deployment takes sku and tags only, not {extra}",
            )
        dep.body.update(copy.deepcopy(body or {}))
        return self.deployment_view(endpoint, name)

    def delete_deployment(self, endpoint: str, name: str) -> Operation:
        """DELETE: never a deployment with live traffic (spec §7.1)."""
        ep = self.serving.endpoint(endpoint)
        self.deployment(endpoint, name)
        if ep.traffic.get(name):
            raise self.emu.refuse(
                400,
                "UserError",
                "delete with traffic",
                f"Deployment {name} has {ep.traffic[name]}% traffic; a deployment with live "
                "traffic can't be deleted. Set its traffic to 0 first.",
            )
        with self.emu.lock:
            op = self.serving.start(ep, "delete", name, {})
            ep.deployments[name].state = "Deleting"
        return op

    # ---- settling operations on the emulator's time

    def settle(self) -> None:
        """Finish every operation whose time is up."""
        now = self.emu.seconds()
        for op in list(self.serving.operations.values()):
            if (
                op.status == "InProgress"
                and now >= op.started + self.emu.faults.provisioning_seconds
            ):
                self._finish(op)

    def _finish(self, op: Operation) -> None:
        ep = self.serving.endpoints[op.endpoint]
        with self.emu.lock:
            if op.kind == "traffic":
                ep.stale = (dict(ep.traffic), self.emu.faults.stale_traffic_gets)
                if not ep.stale[1]:
                    ep.stale = None
                ep.traffic, ep.mirror = op.change["traffic"], op.change["mirror"]
                ep.tags = dict(op.change["tags"])
                ep.state, op.status = "Succeeded", "Succeeded"
            elif op.kind == "delete":
                ep.deployments.pop(str(op.deployment), None)
                op.status = "Succeeded"
            else:
                self._provision(ep.deployments[str(op.deployment)], op)

    def _provision(self, dep: Deployment, op: Operation) -> None:
        body = op.change["body"]
        model_id = str(body["properties"]["model"])
        failure = None
        if self.emu.faults.fail_provisioning > 0:
            self.emu.faults.fail_provisioning -= 1
            failure = "ResourceNotReady: the inference server did not start (injected)"
        else:
            try:
                model = self.serving.load_model(model_id)
            except Exception as exc:  # noqa: BLE001 - any load failure fails provisioning
                failure = f"ModelNotFound: cannot load {model_id}: {type(exc).__name__}"
        if failure is not None:
            code, _, message = failure.partition(": ")
            dep.state, op.status, op.error = "Failed", "Failed", {"code": code, "message": message}
            dep.logs.append(f"ERROR {message}")
            return
        dep.body, dep.model_id, dep.model = copy.deepcopy(body), model_id, model
        dep.state, op.status = "Succeeded", "Succeeded"
        dep.logs.append(f"INFO serving {model_id}")

    def operation_view(self, op_id: str) -> dict[str, Any]:
        """The Azure-AsyncOperation status body (spec §1.2)."""
        self.settle()
        op = self.serving.operations.get(op_id)
        if op is None:
            raise ArmError(404, "ResourceNotFound", f"Operation {op_id} was not found.")
        view: dict[str, Any] = {"id": op.id, "name": op.id, "status": op.status}
        if op.error:
            view["error"] = dict(op.error)
        return view

    # ---- data plane

    def secret(self, endpoint: str, kind: str) -> dict[str, Any]:
        """listKeys (Key endpoints) or token (AMLToken endpoints)."""
        ep = self.serving.endpoint(endpoint)
        if kind == "listKeys" and ep.auth_mode == "Key":
            return {"primaryKey": ep.key, "secondaryKey": ep.key + "-2"}
        if kind == "token" and ep.auth_mode == "AMLToken":
            return {"accessToken": ep.key, "tokenType": "Bearer", "expiryTimeUtc": 0}
        raise ArmError(400, "UserError", f"{kind} is not available for authMode {ep.auth_mode}")

    def score(self, endpoint: str, auth: str, pinned: str | None, body: Any) -> list[float]:
        """One scoring request, routed by header or by the traffic weights."""
        ep = self.serving.endpoint(endpoint)
        if auth not in (f"Bearer {ep.key}", f"Bearer {ep.key}-2"):
            raise ArmError(401, "Unauthorized", "Invalid authentication for this endpoint")
        name = pinned or self._route(ep)
        dep = ep.deployments.get(name)
        if dep is None or dep.model is None:
            raise ArmError(404, "DeploymentNotFound", f"No ready deployment {name!r} to route to")
        data = (body or {}).get("input_data") or {}
        columns, rows = data.get("columns") or [], data.get("data") or []
        index = {c: i for i, c in enumerate(columns)}
        missing = [f for f in dep.model["features"] if f not in index]
        if missing:
            raise ArmError(400, "UserError", f"input_data lacks columns {missing}")
        self.serving.scored.append((endpoint, name))
        return [
            learn.predict(dep.model, [float(row[index[f]]) for f in dep.model["features"]])
            for row in rows
        ]

    def _route(self, ep: Endpoint) -> str:
        if not ep.traffic:
            raise ArmError(
                404,
                "NoValidDeployments",
                "No valid deployments to route to. Please check that the endpoint has at least "
                "one deployment with positive weight values or use a deployment specific header.",
            )
        names = sorted(ep.traffic)
        return self.serving.random.choices(names, weights=[ep.traffic[n] for n in names])[0]


def _deployment_problems(body: Any) -> list[str]:
    if not isinstance(body, dict) or not isinstance(body.get("properties"), dict):
        return ["the body must have properties"]
    props = body["properties"]
    problems = []
    if not body.get("location"):
        problems.append("location is required")
    if not (body.get("sku") or {}).get("name"):
        problems.append("sku.name is required")
    if props.get("endpointComputeType") not in ("Managed", "Kubernetes", "AzureMLCompute"):
        problems.append("properties.endpointComputeType is required")
    if not props.get("model"):
        problems.append("properties.model is required")
    return problems
