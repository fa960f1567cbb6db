"""End-to-end harness: the function app under the local runner, the emulator, Azurite."""

from __future__ import annotations

import logging
import re
import threading
import uuid
from collections.abc import Iterator
from datetime import timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from azure.storage.blob import BlobServiceClient

from localdev import stack
from localdev.amlemu import Emulator, EmulatorServer
from localdev.runner import LocalRunner
from tests.stack_support import MakeStack, Stack

pytestmark = pytest.mark.e2e


SECRETS = (
    "local-bes-key",
    "local-endpoint-key",
    "local-arm-token",
    "local-new-key",
    "local-score-key",
    "s3cret",
    stack.DEV_KEY,
)
SIGNATURE = re.compile(r"sig=[A-Za-z0-9%+/=]{10,}")
# Threads of the emulator and test servers: stand-ins for other services, which were handed
# the SAS URLs on purpose. Everything else is the app.
SERVICE_THREADS = ("process_request_thread", "(_run)", "serve_forever")


class _Everything(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []
        self.formatter = logging.Formatter("%(name)s %(message)s")

    def emit(self, record: logging.LogRecord) -> None:
        if not any(marker in record.threadName for marker in SERVICE_THREADS):
            self.lines.append(self.format(record))


@pytest.fixture(scope="session", autouse=True)
def no_secret_in_any_log() -> Iterator[None]:
    """Every log line the app wrote during the whole end-to-end suite is free of secrets."""
    handler = _Everything()
    root = logging.getLogger()
    previous = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    yield
    root.removeHandler(handler)
    root.setLevel(previous)
    assert handler.lines, "no log line was captured"
    leaks = [
        line[:200]
        for line in handler.lines
        if any(secret in line for secret in SECRETS) or SIGNATURE.search(line)
    ]
    assert leaks == [], f"{len(leaks)} of {len(handler.lines)} log lines hold a secret"


@pytest.fixture
def make_stack(azurite_connection: str) -> Iterator[MakeStack]:
    """Build a stack with per-test model spec overrides and emulator options."""
    servers: list[EmulatorServer] = []
    logging.getLogger("azure").setLevel(logging.WARNING)

    def make(
        *,
        champion_endpoint: bool = False,
        web_service: dict[str, Any] | None = None,
        new: dict[str, Any] | None = None,
        classic: dict[str, Any] | None = None,
        **spec: Any,
    ) -> Stack:
        """`web_service` overrides the emulator's New service; `new` selects the New target;
        `classic` overrides fields of the Classic target."""
        config = stack.emulator_config(champion_endpoint=champion_endpoint)
        config["web_services"][0].update(web_service or {})
        emulator = Emulator(config)
        server = EmulatorServer(emulator).__enter__()
        servers.append(server)
        suffix = "-" + uuid.uuid4().hex[:8]
        if new is not None:
            spec["target"] = stack.new_target(server.url, **new)
        if classic is not None:
            spec["target"] = stack.model_spec(server.url)["target"] | classic
        settings = stack.app_settings(
            azurite_connection, [stack.model_spec(server.url, **spec)], suffix=suffix
        )
        app = stack.load_app(settings)
        runner = LocalRunner(app, env=settings, failure_visibility=timedelta(seconds=1))
        return Stack(
            runner,
            emulator,
            server.url,
            settings,
            BlobServiceClient.from_connection_string(azurite_connection),
        )

    yield make
    for server in servers:
        server.__exit__(None, None, None)


@pytest.fixture
def webhook() -> Iterator[tuple[str, list[tuple[dict[str, str], bytes]], list[int]]]:
    """A webhook receiver: its URL, the (headers, body) it received, and statuses to answer
    with (in order; 204 once they run out)."""
    received: list[tuple[dict[str, str], bytes]] = []
    statuses: list[int] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["Content-Length"]))
            received.append((dict(self.headers), body))
            status = statuses.pop(0) if statuses else 204
            self.send_response(status)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/hook", received, statuses
    server.shutdown()
