"""The emulator's route table: (method, path regex, kind, handler), and the handlers."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from localdev.azureml_v2.core import API_VERSION, PROVIDER, ArmError, Emulator
from localdev.emuhttp import Reply as Reply


@dataclass
class Request:
    """What a handler sees of one request."""

    emu: Emulator
    method: str
    match: re.Match[str]
    query: dict[str, list[str]]
    body: Any
    headers: dict[str, str]
    base: str
    """The emulator's own base URL, as the client reached it."""

    def arg(self, name: str) -> str:
        """A path parameter."""
        return self.match.group(name)

    def param(self, name: str) -> str | None:
        """A query parameter."""
        values = self.query.get(name)
        return values[0] if values else None

    def op_url(self, op: str, kind: str = "mfeOperationsStatus") -> str:
        """Where to follow an operation."""
        emu = self.emu
        return (
            f"{self.base}/subscriptions/{emu.subscription}/providers/{PROVIDER}/locations/"
            f"{emu.location}/{kind}/{op}?api-version={API_VERSION}"
        )


Handler = Callable[[Request], Reply]


def _workspace(r: Request) -> Reply:
    emu = r.emu
    host = r.base.split("://", 1)[1]
    return Reply(
        200,
        {
            "id": emu.ws_path,
            "name": emu.workspace,
            "location": emu.location,
            "properties": {
                "mlFlowTrackingUri": f"azureml://{host}/mlflow/v1.0{emu.ws_path}",
                "discoveryUrl": f"{r.base}/discovery",
            },
        },
    )


def _asset(r: Request) -> Reply:
    path = r.match.group(0)
    return Reply(200, r.emu.asset_view(path[path.index("/subscriptions/") :]))


def _put_job(r: Request) -> Reply:
    status, view = r.emu.training.put(r.arg("job"), r.body)
    return Reply(status, view)


def _get_job(r: Request) -> Reply:
    return Reply(200, r.emu.training.status_view(r.arg("job")))


def _cancel_job(r: Request) -> Reply:
    op = r.emu.training.cancel(r.arg("job"))
    if op is None:
        return Reply(200)
    location = r.op_url(op, "mfeOperationResults")
    return Reply(202, None, {"Location": location, "Retry-After": "10"})


def _operation_result(r: Request) -> Reply:
    op = r.arg("op")
    done = r.emu.training.cancel_done(op)
    if done is None:
        view = r.emu.serving.deploying.operation_view(op)
        done = view["status"] != "InProgress"
    return Reply(200 if done else 202, None, {} if done else {"Retry-After": "10"})


def _operation_status(r: Request) -> Reply:
    return Reply(200, r.emu.serving.deploying.operation_view(r.arg("op")))


def _model_container(r: Request) -> Reply:
    return Reply(200, r.emu.serving.container_view(r.arg("model")))


def _model_version(r: Request) -> Reply:
    serving, name, version = r.emu.serving, r.arg("model"), r.arg("version")
    if r.method == "GET":
        return Reply(200, serving.model_view(name, version))
    status, view = serving.put_model(name, version, r.body)
    return Reply(status, view)


def _endpoint(r: Request) -> Reply:
    serving, name = r.emu.serving, r.arg("ep")
    if r.method == "GET":
        return Reply(200, serving.endpoint_view(name, r.base, read=True))
    if r.method == "PATCH":
        serving.patch_endpoint(name, r.body)
        return Reply(200, serving.endpoint_view(name, r.base))
    op = serving.put_endpoint(name, r.body)
    return _accepted(r, serving.endpoint_view(name, r.base), op.id)


def _accepted(r: Request, view: dict[str, Any], op: str) -> Reply:
    return Reply(
        201,
        view,
        {"Azure-AsyncOperation": r.op_url(op), "x-ms-async-operation-timeout": "PT1H"},
    )


def _deployment(r: Request) -> Reply:
    deploying, ep, name = r.emu.serving.deploying, r.arg("ep"), r.arg("dep")
    if r.method == "GET":
        return Reply(200, deploying.deployment_view(ep, name))
    if r.method == "PATCH":
        return Reply(200, deploying.patch_deployment(ep, name, r.body))
    if r.method == "DELETE":
        op = deploying.delete_deployment(ep, name)
        location = r.op_url(op.id, "mfeOperationResults")
        return Reply(202, None, {"Location": location, "Retry-After": "10"})
    op = deploying.put_deployment(ep, name, r.body)
    return _accepted(r, deploying.deployment_view(ep, name, r.op_url(op.id)), op.id)


def _logs(r: Request) -> Reply:
    dep = r.emu.serving.deploying.deployment(r.arg("ep"), r.arg("dep"))
    tail = int((r.body or {}).get("tail") or 100)
    return Reply(200, {"content": "\n".join(dep.logs[-tail:])})


def _secret(r: Request) -> Reply:
    return Reply(200, r.emu.serving.deploying.secret(r.arg("ep"), r.arg("secret")))


def _runs_get(r: Request) -> Reply:
    return Reply(200, r.emu.training.mlflow_run(r.param("run_id") or ""))


def _history(r: Request) -> Reply:
    training = r.emu.training
    page = training.history(
        r.param("run_id") or "", r.param("metric_key") or "", r.param("page_token")
    )
    return Reply(200, page)


def _details(r: Request) -> Reply:
    return Reply(200, r.emu.training.details(r.arg("job")))


def _discovery(r: Request) -> Reply:
    return Reply(200, {"api": r.base, "history": r.base, "experimentation": r.base})


def _score(r: Request) -> Reply:
    auth = r.headers.get("authorization", "")
    pinned = r.headers.get("azureml-model-deployment")
    return Reply(200, r.emu.serving.deploying.score(r.arg("ep"), auth, pinned, r.body))


WS = (
    r"/subscriptions/(?P<sub>[^/]+)/resourceGroups/(?P<rg>[^/]+)/providers/"
    r"Microsoft\.MachineLearningServices/workspaces/(?P<ws>[^/]+)"
)
OPS = r"/subscriptions/(?P<sub>[^/]+)/providers/Microsoft\.MachineLearningServices/locations/[^/]+"
EP = WS + r"/onlineEndpoints/(?P<ep>[^/]+)"

ROUTES: list[tuple[frozenset[str], re.Pattern[str], str, Handler]] = [
    (frozenset({"GET"}), re.compile(WS), "arm", _workspace),
    (
        frozenset({"GET"}),
        re.compile(WS + r"/(codes|environments|components)/[^/]+/versions/[^/]+"),
        "arm",
        _asset,
    ),
    (frozenset({"GET"}), re.compile(WS + r"/computes/[^/]+"), "arm", _asset),
    (frozenset({"PUT"}), re.compile(WS + r"/jobs/(?P<job>[^/]+)"), "arm", _put_job),
    (frozenset({"GET"}), re.compile(WS + r"/jobs/(?P<job>[^/]+)"), "arm", _get_job),
    (frozenset({"POST"}), re.compile(WS + r"/jobs/(?P<job>[^/]+)/cancel"), "arm", _cancel_job),
    (frozenset({"GET"}), re.compile(WS + r"/models/(?P<model>[^/]+)"), "arm", _model_container),
    (
        frozenset({"GET", "PUT"}),
        re.compile(WS + r"/models/(?P<model>[^/]+)/versions/(?P<version>[^/]+)"),
        "arm",
        _model_version,
    ),
    (frozenset({"GET", "PUT", "PATCH"}), re.compile(EP), "arm", _endpoint),
    (frozenset({"POST"}), re.compile(EP + r"/(?P<secret>listKeys|token)"), "arm", _secret),
    (
        frozenset({"GET", "PUT", "PATCH", "DELETE"}),
        re.compile(EP + r"/deployments/(?P<dep>[^/]+)"),
        "arm",
        _deployment,
    ),
    (frozenset({"POST"}), re.compile(EP + r"/deployments/(?P<dep>[^/]+)/getLogs"), "arm", _logs),
    (
        frozenset({"GET"}),
        re.compile(OPS + r"/mfeOperationsStatus/(?P<op>[^/]+)"),
        "arm",
        _operation_status,
    ),
    (
        frozenset({"GET"}),
        re.compile(OPS + r"/mfeOperationResults/(?P<op>[^/]+)"),
        "arm",
        _operation_result,
    ),
    (
        frozenset({"GET"}),
        re.compile(r"/mlflow/v1\.0" + WS + r"/api/2\.0/mlflow/runs/get"),
        "mlflow",
        _runs_get,
    ),
    (
        frozenset({"GET"}),
        re.compile(r"/mlflow/v1\.0" + WS + r"/api/2\.0/mlflow/metrics/get-history"),
        "mlflow",
        _history,
    ),
    (
        frozenset({"GET"}),
        re.compile(r"/history/v1\.0" + WS + r"/runs/(?P<job>[^/]+)/details"),
        "data",
        _details,
    ),
    (frozenset({"GET"}), re.compile(r"/discovery"), "open", _discovery),
    (frozenset({"POST"}), re.compile(r"/score/(?P<ep>[^/]+)"), "open", _score),
]
"""Every route the emulator serves. `kind`: "arm" needs the token and the spec's api-version,
"mlflow" and "data" the token, "open" nothing (scoring checks the endpoint's own key)."""


def find(method: str, path: str) -> tuple[Handler, str, re.Match[str]] | None:
    """The handler for a request; ArmError 405 when the path exists for other methods."""
    allowed = False
    for methods, pattern, kind, handler in ROUTES:
        match = pattern.fullmatch(path.rstrip("/") or "/")
        if match is None:
            continue
        if method in methods:
            return handler, kind, match
        allowed = True
    if allowed:
        raise ArmError(405, "MethodNotAllowed", f"{method} is not supported on {path}")
    return None
