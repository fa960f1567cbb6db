"""The emulator on a local HTTP server: auth, api-version, fault injection, then the routes."""

from __future__ import annotations

import logging
from typing import Any, ClassVar
from urllib.parse import parse_qs, urlsplit

from localdev.azureml_v2.core import API_VERSION, ArmError, Emulator
from localdev.azureml_v2.routes import Reply, Request, find
from localdev.emuhttp import FaultHandler, HttpError, LoopbackServer, serve

log = logging.getLogger("amlemu.v2")


def _check_access(emu: Emulator, kind: str, req: Request) -> None:
    """The token for every route but the open ones, and the spec's api-version on ARM."""
    if kind == "open":
        return
    if req.headers.get("authorization") != f"Bearer {emu.token}":
        raise ArmError(401, "AuthenticationFailed", "The access token is missing or invalid.")
    groups = req.match.groupdict()
    mine = {"sub": emu.subscription, "rg": emu.resource_group, "ws": emu.workspace}
    if any(groups[k].casefold() != v.casefold() for k, v in mine.items() if k in groups):
        raise ArmError(404, "ResourceNotFound", "The Resource was not found.")
    if kind != "arm":
        return
    version = req.param("api-version")
    if version is None:
        raise emu.refuse(
            400,
            "MissingApiVersionParameter",
            "wrong api-version",
            "The api-version query parameter (?api-version=) is required for all requests.",
        )
    if version != API_VERSION:
        raise emu.refuse(
            400,
            "NoRegisteredProviderFound",
            "wrong api-version",
            f"No registered resource provider found for API version '{version}'. The supported "
            f"api-versions are '{API_VERSION}'.",
        )


def _control(emu: Emulator, method: str, path: str, body: Any) -> Reply:
    if path == "/_emulator/faults" and method == "POST":
        for key, value in (body or {}).items():
            if not hasattr(emu.faults, key):
                raise ArmError(400, "UserError", f"no fault {key!r}")
            setattr(emu.faults, key, value)
        return Reply(200, {})
    with emu.lock:
        views = {
            "/_emulator/calls": [list(c) for c in emu.calls],
            "/_emulator/violations": list(emu.violations),
            "/_emulator/trained": list(emu.training.trained),
        }
    if path in views:
        return Reply(200, views[path])
    raise ArmError(404, "NotFound", path)


class Handler(FaultHandler):
    """One request: faults, routing, access checks, the reply; `emulator` is set per server."""

    emulator: ClassVar[Emulator]
    logger = log
    injected: ClassVar[dict[str, Any]] = {
        "error": {"code": "Injected", "message": "injected fault"}
    }

    def bad_body(self, problem: str) -> HttpError:
        return ArmError(400, "InvalidRequestContent", problem)

    def error_body(self, error: HttpError) -> Any:
        if "/api/2.0/mlflow/" in self.path:
            return {"error_code": error.code, "message": str(error)}
        return {"error": {"code": error.code, "message": str(error)}}

    def _handle(self) -> None:
        parts = urlsplit(self.path)
        path = parts.path
        body = self._body()
        if path.startswith("/_emulator/"):
            self._send(_control(self.emulator, self.command, path, body))
            return
        self._answer(path, lambda: self._route(parts.path, parts.query, body))

    def _route(self, path: str, query: str, body: Any) -> Reply:
        found = find(self.command, path)
        if found is None:
            raise ArmError(404, "NotFound", f"no route for {self.command} {path}")
        handler, kind, match = found
        request = Request(
            self.emulator,
            self.command,
            match,
            parse_qs(query),
            body,
            {k.casefold(): v for k, v in self.headers.items()},
            f"http://{self.headers.get('Host')}",
        )
        _check_access(self.emulator, kind, request)
        return handler(request)


def make_handler(emu: Emulator) -> type[FaultHandler]:
    """The request handler class bound to one emulator."""
    return type("BoundHandler", (Handler,), {"emulator": emu})


class EmulatorServer(LoopbackServer):
    """The emulator on a loopback port, served from a background thread; its `url` is the ARM
    endpoint to configure."""

    def __init__(self, emulator: Emulator, port: int = 0) -> None:
        super().__init__(make_handler(emulator), port)
        self.emulator = emulator


def main() -> None:
    """Serve the emulator until interrupted."""
    serve(
        "Azure ML v2 emulator",
        description="Azure ML v2 emulator",
        prog="python -m localdev.azureml_v2",
        config_help="JSON file: workspace, datastores, endpoints",
        port=8766,
        server_for=lambda config, port: EmulatorServer(Emulator(config), port),
        logger=log,
    )
