"""What both Azure ML emulators (`localdev.amlemu`, `localdev.azureml_v2`) share: the faults
they inject, the record of calls, their error and reply shapes, and the loopback HTTP server
that applies one-shot faults before a request reaches the emulator's routes."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import re
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, ClassVar, Protocol, Self
from urllib.parse import urlsplit

from retrain.clock import Clock

log = logging.getLogger("amlemu")


@dataclass
class Faults:
    """Faults to inject. One-shot HTTP faults are consumed in order by matching requests."""

    job_seconds: float = 0.0
    """How long a job runs before it finishes (on the emulator's time)."""
    hang_jobs: bool = False
    """Jobs never finish (until cancelled)."""
    fail_jobs: int = 0
    """The next n jobs fail with `fail_details` instead of training."""
    fail_details: str = "the job failed (injected)"
    provisioning_seconds: float = 0.0
    """How long an endpoint or deployment operation runs."""
    fail_provisioning: int = 0
    """The next n provisioning operations fail."""
    http: list[dict[str, Any]] = field(default_factory=list)
    """One-shot faults, each matching an optional "method", a "path" substring and an "ends"
    (the path ends with it, e.g. an endpoint but not its deployments):
    {"status": 429, "retry_after": 1}: answer that instead, doing nothing;
    {"drop": true}: close the connection without answering, doing nothing;
    {"delay": s}: hold the request s seconds, then handle and answer it;
    {"lose_response": true}: handle the request (the service acts), then close the connection
    without answering;
    {"delay_answer": s}: handle the request, then hold the answer s seconds."""


class HttpError(Exception):
    """An error answer: `{"error": {"code": ..., "message": ...}}` with this status."""

    def __init__(self, status: int, code: str, message: str | None = None) -> None:
        super().__init__(message or code)
        self.status = status
        self.code = code
        self.message = message

    @property
    def body(self) -> dict[str, Any]:
        """The answer's JSON body (no "message" when there is none)."""
        error: dict[str, Any] = {"code": self.code}
        if self.message is not None:
            error["message"] = self.message
        return {"error": error}


@dataclass(frozen=True)
class Reply:
    """An answer: status, JSON body (None: no body) and extra headers."""

    status: int
    body: Any = None
    headers: dict[str, str] = field(default_factory=dict)


DROPPED = Reply(0)
"""A fault's "answer" that is none: the connection was closed."""


class Recording:
    """Time, one-shot faults and the call record, over the `faults`, `lock`, `calls` and
    `clock` of the emulator state that mixes this in."""

    faults: Faults
    lock: threading.RLock
    calls: list[tuple[str, str, int]]
    """Every answered (or dropped, status 0) request: (method, path, status)."""
    clock: Clock | None

    def seconds(self) -> float:
        """The emulator's own time in seconds: its clock if it has one, else monotonic."""
        if self.clock is not None:
            return self.clock.now().timestamp()
        return time.monotonic()

    def count(self, method: str, pattern: str, status: int | None = None) -> int:
        """How many calls matched (method, regex on path, status)."""
        rx = re.compile(pattern)
        return sum(
            1
            for m, p, s in list(self.calls)
            if m == method and rx.search(p) and (status is None or s == status)
        )

    # ---- faults (the chaos harness wraps these two to count them)

    def take_fault(self, method: str, path: str) -> dict[str, Any] | None:
        """The next one-shot HTTP fault matching this request, removed from the list."""
        with self.lock:
            for i, fault in enumerate(self.faults.http):
                if (
                    fault.get("method", method) == method
                    and fault.get("path", "") in path
                    and path.endswith(fault.get("ends", ""))
                ):
                    return self.faults.http.pop(i)
        return None

    def slow(self, seconds: float) -> None:
        """Hold a request, as an overloaded service would."""
        threading.Event().wait(seconds)


class Served(Protocol):
    """What the HTTP layer asks of an emulator: its faults and its record of calls."""

    @property
    def calls(self) -> list[tuple[str, str, int]]: ...

    def take_fault(self, method: str, path: str) -> dict[str, Any] | None: ...

    def slow(self, seconds: float) -> None: ...


class FaultHandler(BaseHTTPRequestHandler):
    """HTTP for one emulator: the body, one-shot faults, the answer and the call record. A
    subclass binds `emulator`, says what a bad body and an error answer are, and routes in
    `_handle` (through `_answer`, which applies the faults)."""

    protocol_version = "HTTP/1.1"
    emulator: ClassVar[Served]
    injected: ClassVar[dict[str, Any]] = {"error": {"code": "Injected"}}
    """The body of an injected error status."""
    logger: ClassVar[logging.Logger] = log
    _after: dict[str, Any] | None = None
    """This request's fault that acts after handling (lost or late answer)."""

    def log_message(self, format: str, *args: Any) -> None:
        self.logger.debug("%s %s", self.command, urlsplit(self.path).path)

    def bad_body(self, problem: str) -> HttpError:
        """The error for a body that is not JSON."""
        return HttpError(400, "BadArgument", problem)

    def error_body(self, error: HttpError) -> Any:
        """The JSON body of an error answer."""
        return error.body

    def _handle(self) -> None:
        raise NotImplementedError

    def _record(self, path: str, status: int) -> None:
        self.emulator.calls.append((self.command, path, status))

    def _close(self) -> None:
        self.close_connection = True
        self.connection.close()

    def _send(self, reply: Reply) -> None:
        after, path = self._after or {}, urlsplit(self.path).path
        if after.get("lose_response"):
            # The service acted; the answer never reaches the client.
            self._record(path, reply.status)
            self._close()
            return
        if "delay_answer" in after:
            self.emulator.slow(float(after["delay_answer"]))
        data = b"" if reply.body is None else json.dumps(reply.body).encode()
        self.send_response(reply.status)
        for key, value in reply.headers.items():
            self.send_header(key, value)
        if reply.body is not None:
            self.send_header("Content-Type", "application/json; charset=utf-8")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            self.wfile.write(data)  # the client may have timed out and gone
        self._record(path, reply.status)

    def _body(self) -> Any:
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        if not raw:
            return None
        try:
            return json.loads(raw)
        except json.JSONDecodeError as exc:
            raise self.bad_body(f"body is not JSON: {exc}") from exc

    def _fault(self, path: str) -> Reply | None:
        """Apply this request's one-shot fault; a reply to answer instead, if it has one."""
        fault = self.emulator.take_fault(self.command, path)
        if fault is None:
            return None
        if "lose_response" in fault or "delay_answer" in fault:
            self._after = fault  # handled in full; only the answer is lost or late
            return None
        if fault.get("drop"):
            self._record(path, 0)
            self._close()
            return DROPPED
        if "delay" in fault:
            # A slow answer: handled normally, after the client may have given up.
            self.emulator.slow(float(fault["delay"]))
            return None
        headers = {"Retry-After": str(fault["retry_after"])} if "retry_after" in fault else {}
        return Reply(int(fault["status"]), self.injected, headers)

    def _answer(self, path: str, handle: Callable[[], Reply]) -> None:
        """Answer with `handle()` unless this request's fault answers (or drops) it."""
        instead = self._fault(path)
        if instead is None:
            self._send(handle())
        elif instead is not DROPPED:
            self._send(instead)

    def _dispatch(self) -> None:
        self._after = None
        try:
            self._handle()
        except HttpError as exc:
            self._send(Reply(exc.status, self.error_body(exc)))

    do_GET = do_POST = do_PATCH = do_DELETE = do_PUT = _dispatch


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client that timed out or dropped the connection is part of the tests, not a bug.
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


class LoopbackServer:
    """An emulator's handler on a loopback port, served from a background thread."""

    def __init__(self, handler: type[FaultHandler], port: int = 0) -> None:
        self.httpd = _Server(("127.0.0.1", port), handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        """Base URL, e.g. http://127.0.0.1:8765."""
        return f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def stop(self) -> None:
        """Stop serving and close the port."""
        self.httpd.shutdown()
        self.httpd.server_close()

    def __enter__(self) -> Self:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def serve(
    title: str,
    *,
    description: str,
    prog: str,
    config_help: str,
    port: int,
    server_for: Callable[[dict[str, Any], int], LoopbackServer],
    logger: logging.Logger = log,
) -> None:
    """`python -m ...`: read the JSON config and serve the emulator until interrupted."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--config", required=True, help=config_help)
    parser.add_argument("--port", type=int, default=port)
    args = parser.parse_args()
    with open(args.config, encoding="utf-8") as fh:
        config = json.load(fh)
    logging.basicConfig(level=logging.INFO)
    logging.getLogger("azure").setLevel(logging.WARNING)  # the SDK logs every request at INFO
    server = server_for(config, args.port)
    logger.info("%s on %s", title, server.url)
    with contextlib.suppress(KeyboardInterrupt):
        server.httpd.serve_forever()
