"""The emulator: the three services over one shared state, and the HTTP layer that injects
faults, parses requests and answers through the route tables."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import re
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

from localdev.amlemu.arm import Arm, WebService
from localdev.amlemu.bes import Bes, Job, TrainingService
from localdev.amlemu.classic import Classic, Endpoint
from localdev.amlemu.common import BadRequest, Faults, HttpError, Shared, log
from localdev.amlemu.routes import ANY, Reply, Request, Route, dispatch, route
from retrain.clock import Clock

DESCRIPTION = "A local emulator of Azure ML Studio (classic) BES v2.0 and endpoint management."


class Emulator:
    """The emulator's state and its route table; the HTTP server is a thin layer over it."""

    def __init__(self, config: dict[str, Any], *, clock: Clock | None = None) -> None:
        self.shared = Shared(account_key=config.get("account_key"), clock=clock)
        self.classic = Classic(self.shared, config.get("endpoints", []))
        self.arm = Arm(self.shared, config.get("web_services", []))
        self.bes = Bes(
            self.shared, config.get("training_services", []), champion_model=self.classic.model_of
        )
        self.routes: list[Route] = [
            route("POST", "/_emulator/faults", self._set_faults),
            route(ANY, "/_emulator/calls", self._calls),
            route(ANY, "/_emulator/violations", self._violations),
            route(ANY, "/_emulator/trained", self._trained),
            route(ANY, "/_emulator/.*", self._unknown),
            *self.bes.routes(),
            *self.classic.routes(),
            *self.arm.routes(),
        ]

    # ---- what tests and tools read and set

    @property
    def clock(self) -> Clock | None:
        """The clock jobs run on (None: real time, a thread per job)."""
        return self.shared.clock

    @property
    def faults(self) -> Faults:
        """The faults to inject; set their fields."""
        return self.shared.faults

    @property
    def calls(self) -> list[tuple[str, str, int]]:
        """Every answered request: (method, path, status); status 0 for a dropped one."""
        return self.shared.calls

    @property
    def violations(self) -> list[dict[str, Any]]:
        """Contract breaches by the client (see `Shared.violations`)."""
        return self.shared.violations

    @property
    def lock(self) -> threading.RLock:
        """Held while the services change what the properties here return."""
        return self.shared.lock

    @property
    def services(self) -> dict[tuple[str, str], TrainingService]:
        """BES training services by (workspace, service)."""
        return self.bes.services

    @property
    def jobs(self) -> dict[str, Job]:
        """BES jobs by id (a deleted job is gone)."""
        return self.bes.jobs

    @property
    def started(self) -> list[tuple[str, list[str]]]:
        """Every started job with its output locations (kept after DELETE)."""
        return self.bes.started

    @property
    def trained(self) -> list[dict[str, Any]]:
        """What each job read: {"job", "version", "blob", "etag", "sha256"}."""
        return self.bes.trained

    @property
    def endpoints(self) -> dict[tuple[str, str, str], Endpoint]:
        """Classic endpoints by (workspace, web service, endpoint)."""
        return self.classic.endpoints

    @property
    def web_services(self) -> dict[tuple[str, str, str], WebService]:
        """New web services by (subscription, resource group, name)."""
        return self.arm.web_services

    def count(self, method: str, pattern: str, status: int | None = None) -> int:
        """How many calls matched (method, regex on path, status)."""
        rx = re.compile(pattern)
        return sum(
            1
            for m, p, s in self.calls
            if m == method and rx.search(p) and (status is None or s == status)
        )

    def violation(self, kind: str, job: str | None, detail: str) -> None:
        """Record a breach of the contract by the client (never a secret in `detail`)."""
        self.shared.violation(kind, job, detail)

    # ---- faults (the chaos harness wraps these two to count them)

    def take_fault(self, method: str, path: str) -> dict[str, Any] | None:
        """The next one-shot HTTP fault matching this request, removed from the list."""
        with self.lock:
            for i, fault in enumerate(self.faults.http):
                if fault.get("method", method) == method and fault.get("path", "") in path:
                    return self.faults.http.pop(i)
        return None

    def slow(self, seconds: float) -> None:
        """Hold a request, as an overloaded service would."""
        threading.Event().wait(seconds)

    # ---- requests

    def arrived(self, method: str, path: str) -> None:
        """A request arrived, before any fault decides its answer (BES notes status polls)."""
        self.bes.observe(method, path)

    def handle(self, request: Request) -> Reply:
        """The answer of the route table."""
        return dispatch(self.routes, request)

    def _set_faults(self, request: Request) -> Reply:
        for k, v in (request.body or {}).items():
            setattr(self.faults, k, v)
        return Reply(200, {})

    def _calls(self, request: Request) -> Reply:
        return Reply(200, [list(c) for c in self.calls])

    def _violations(self, request: Request) -> Reply:
        with self.lock:
            return Reply(200, list(self.violations))

    def _trained(self, request: Request) -> Reply:
        with self.lock:
            return Reply(200, [{**t, "version": list(t["version"])} for t in self.trained])

    def _unknown(self, request: Request) -> Reply:
        raise HttpError(404, "NotFound")


_DROPPED = Reply(0)
"""A fault's "answer" that is none: the connection was closed."""


class _Handler(BaseHTTPRequestHandler):
    """HTTP for one emulator (`make_handler` binds it): one-shot faults, then the routes."""

    protocol_version = "HTTP/1.1"
    emulator: Emulator
    _after: dict[str, Any] | None = None
    """This request's fault that acts after handling (lost or late answer)."""

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s %s", self.command, urlsplit(self.path).path)

    def _send(self, reply: Reply) -> None:
        emu, after = self.emulator, self._after or {}
        path = urlsplit(self.path).path
        if after.get("lose_response"):
            # The service acted; the answer never reaches the client.
            emu.calls.append((self.command, path, reply.status))
            self.close_connection = True
            self.connection.close()
            return
        if "delay_answer" in after:
            emu.slow(float(after["delay_answer"]))
        data = b"" if reply.body is None else json.dumps(reply.body).encode()
        self.send_response(reply.status)
        for k, v in reply.headers.items():
            self.send_header(k, v)
        if reply.body is not None:
            self.send_header("Content-Type", "application/json; charset=utf-8")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            self.wfile.write(data)  # the client may have timed out and gone
        emu.calls.append((self.command, path, reply.status))

    def _body(self) -> Any:
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        if not raw:
            return None
        try:
            return json.loads(raw)
        except json.JSONDecodeError as exc:
            raise BadRequest(f"body is not JSON: {exc}") from exc

    def _fault(self, path: str) -> Reply | None:
        """Apply this request's one-shot fault; a reply to answer instead, if it has one."""
        emu = self.emulator
        fault = emu.take_fault(self.command, path)
        if fault is None:
            return None
        if "lose_response" in fault or "delay_answer" in fault:
            self._after = fault  # handled in full; only the answer is lost or late
            return None
        if fault.get("drop"):
            emu.calls.append((self.command, path, 0))
            self.close_connection = True
            self.connection.close()
            return _DROPPED
        if "delay" in fault:
            # A slow answer: handled normally, after the client may have given up.
            emu.slow(float(fault["delay"]))
            return None
        headers = {"Retry-After": str(fault["retry_after"])} if "retry_after" in fault else {}
        return Reply(int(fault["status"]), {"error": {"code": "Injected"}}, headers)

    def _handle(self) -> None:
        parts = urlsplit(self.path)
        request = Request(
            method=self.command,
            path=parts.path,
            query=parse_qs(parts.query),
            body=self._body(),
            authorization=self.headers.get("Authorization"),
            host=self.headers.get("Host"),
        )
        self.emulator.arrived(request.method, request.path)
        instead = self._fault(request.path)
        if instead is None:
            self._send(self.emulator.handle(request))
        elif instead is not _DROPPED:
            self._send(instead)

    def _dispatch(self) -> None:
        self._after = None
        try:
            self._handle()
        except HttpError as exc:
            self._send(Reply(exc.status, exc.body))

    do_GET = do_POST = do_PATCH = do_DELETE = do_PUT = _dispatch


def make_handler(emu: Emulator) -> type[BaseHTTPRequestHandler]:
    """The request handler class bound to one emulator."""

    class Handler(_Handler):
        emulator = emu

    return Handler


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
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        """Base URL, e.g. http://127.0.0.1:8765."""
        return f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def __enter__(self) -> EmulatorServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        for job in self.emulator.jobs.values():
            job.cancel.set()


def main() -> None:
    """Serve the emulator until interrupted."""
    parser = argparse.ArgumentParser(prog="python -m localdev.amlemu", description=DESCRIPTION)
    parser.add_argument("--config", required=True, help="JSON file with services and endpoints")
    parser.add_argument("--port", type=int, default=8765)
    args = parser.parse_args()
    with open(args.config, encoding="utf-8") as fh:
        config = json.load(fh)
    logging.basicConfig(level=logging.INFO)
    logging.getLogger("azure").setLevel(logging.WARNING)  # the SDK logs every request at INFO
    server = EmulatorServer(Emulator(config), args.port)
    log.info("Azure ML emulator on %s", server.url)
    with contextlib.suppress(KeyboardInterrupt):
        server.httpd.serve_forever()
