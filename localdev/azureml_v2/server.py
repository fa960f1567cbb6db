"""The emulator on a local HTTP server: auth, api-version, fault injection, then the routes."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

from localdev.azureml_v2.core import API_VERSION, ArmError, Emulator
from localdev.azureml_v2.routes import Reply, Request, find

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


class Handler(BaseHTTPRequestHandler):
    """One request: faults, routing, access checks, the reply; `emu` is set per server."""

    emu: Emulator
    protocol_version = "HTTP/1.1"
    _after: dict[str, Any] | None = None

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s %s", self.command, urlsplit(self.path).path)

    def _send(self, reply: Reply) -> None:
        path = urlsplit(self.path).path
        after = self._after or {}
        if after.get("lose_response"):
            self.emu.calls.append((self.command, path, reply.status))
            self.close_connection = True
            self.connection.close()
            return
        if "delay_answer" in after:
            threading.Event().wait(float(after["delay_answer"]))
        data = b"" if reply.body is None else json.dumps(reply.body).encode()
        self.send_response(reply.status)
        for key, value in reply.headers.items():
            self.send_header(key, value)
        if reply.body is not None:
            self.send_header("Content-Type", "application/json; charset=utf-8")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            self.wfile.write(data)
        self.emu.calls.append((self.command, path, reply.status))

    def _body(self) -> Any:
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        if not raw:
            return None
        try:
            return json.loads(raw)
        except json.JSONDecodeError as exc:
            raise ArmError(400, "InvalidRequestContent", f"body is not JSON: {exc}") from exc

    def _fault(self, path: str) -> bool:
        """Apply a one-shot fault; True when it answered (or dropped) the request."""
        fault = self.emu.take_fault(self.command, path)
        if fault and ("lose_response" in fault or "delay_answer" in fault):
            self._after = fault
            return False
        if fault and fault.get("drop"):
            self.emu.calls.append((self.command, path, 0))
            self.close_connection = True
            self.connection.close()
            return True
        if fault and "delay" in fault:
            threading.Event().wait(float(fault["delay"]))
            return False
        if fault:
            headers = {"Retry-After": str(fault["retry_after"])} if "retry_after" in fault else {}
            error = {"error": {"code": "Injected", "message": "injected fault"}}
            self._send(Reply(int(fault["status"]), error, headers))
            return True
        return False

    def _handle(self) -> None:
        parts = urlsplit(self.path)
        path = parts.path
        body = self._body()
        if path.startswith("/_emulator/"):
            self._send(_control(self.emu, self.command, path, body))
            return
        if self._fault(path):
            return
        found = find(self.command, path)
        if found is None:
            raise ArmError(404, "NotFound", f"no route for {self.command} {path}")
        handler, kind, match = found
        request = Request(
            self.emu,
            self.command,
            match,
            parse_qs(parts.query),
            body,
            {k.casefold(): v for k, v in self.headers.items()},
            f"http://{self.headers.get('Host')}",
        )
        _check_access(self.emu, kind, request)
        self._send(handler(request))

    def _dispatch(self) -> None:
        self._after = None
        try:
            self._handle()
        except ArmError as exc:
            body: dict[str, Any]
            if "/api/2.0/mlflow/" in self.path:
                body = {"error_code": exc.code, "message": str(exc)}
            else:
                body = {"error": {"code": exc.code, "message": str(exc)}}
            self._send(Reply(exc.status, body))

    do_GET = do_POST = do_PATCH = do_DELETE = do_PUT = _dispatch


def make_handler(emu: Emulator) -> type[BaseHTTPRequestHandler]:
    """The request handler class bound to one emulator."""
    return type("BoundHandler", (Handler,), {"emu": emu})


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client that timed out or dropped the connection is part of the tests, not a bug.
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


class EmulatorServer:
    """The emulator on a loopback port, served from a background thread."""

    def __init__(self, emulator: Emulator, port: int = 0) -> None:
        self.emulator = emulator
        self.httpd = _Server(("127.0.0.1", port), make_handler(emulator))
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        """Base URL, e.g. http://127.0.0.1:8766: the ARM endpoint to configure."""
        return f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def __enter__(self) -> EmulatorServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def main() -> None:
    """Serve the emulator until interrupted."""
    parser = argparse.ArgumentParser(description="Azure ML v2 emulator")
    parser.add_argument(
        "--config", required=True, help="JSON file: workspace, datastores, endpoints"
    )
    parser.add_argument("--port", type=int, default=8766)
    args = parser.parse_args()
    with open(args.config, encoding="utf-8") as fh:
        config = json.load(fh)
    logging.basicConfig(level=logging.INFO)
    logging.getLogger("azure").setLevel(logging.WARNING)
    server = EmulatorServer(Emulator(config), args.port)
    log.info("Azure ML v2 emulator on %s", server.url)
    with contextlib.suppress(KeyboardInterrupt):
        server.httpd.serve_forever()
