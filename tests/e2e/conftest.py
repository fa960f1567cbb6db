"""End-to-end harness: the function app under the local runner, the emulator, Azurite.

A stack connects to storage in one of two modes, the `storage_mode` fixture's value: "key"
(Azurite 3.35 through a connection string with the account key) or "identity" (Azurite 3.37
taking OAuth tokens over HTTPS: the app and the runner get the service endpoints and a token
credential, no connection string, and every SAS is signed with a user delegation key). A module
runs in both modes by overriding `storage_mode` with a parametrised fixture.
"""

from __future__ import annotations

import logging
import os
import re
import threading
import uuid
from collections.abc import Iterator
from datetime import timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from localdev import stack
from localdev.amlemu import Emulator, EmulatorServer
from localdev.oauth import TOKEN_HEADER, FakeTokenCredential, OAuthAzurite
from localdev.runner import LocalRunner
from retrain.connection import PREFIX, StorageConnection
from tests.stack_support import MakeStack, Stack, Storage

pytestmark = pytest.mark.e2e


SECRETS = (
    "local-bes-key",
    "local-endpoint-key",
    "local-arm-token",
    "local-new-key",
    "local-score-key",
    "s3cret",
    stack.DEV_KEY,
    TOKEN_HEADER,  # the start of every bearer token the identity mode's credential issues
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
def storage_mode() -> str:
    """How stacks connect to storage: "key" here; "identity" where a module overrides it."""
    return "key"


@pytest.fixture
def storage(
    request: pytest.FixtureRequest, storage_mode: str, monkeypatch: pytest.MonkeyPatch
) -> Storage:
    """The storage connection of `storage_mode`. Key: a connection string. Identity: the OAuth
    Azurite's endpoints, trusted through REQUESTS_CA_BUNDLE by everything in this process (the
    app, the runner and the emulators, which read and write blobs through the SAS URLs they are
    handed or, for an Azure ML datastore, with the credential), and a token credential in place
    of DefaultAzureCredential wherever the app connects."""
    for name in [k for k in os.environ if k.startswith(PREFIX)]:
        monkeypatch.delenv(name)  # a previous stack's connection must not linger
    if storage_mode == "key":
        return Storage("key", {PREFIX: request.getfixturevalue("azurite_connection")}, None)
    if storage_mode != "identity":
        raise AssertionError(f"storage_mode is 'key' or 'identity', not {storage_mode!r}")
    oauth: OAuthAzurite = request.getfixturevalue("oauth_storage")
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(oauth.cert))
    credential = FakeTokenCredential()
    # Every client the app builds on the identity connection (the Retrainer, `check`) gets this
    # credential in place of the one the settings name: no DefaultAzureCredential is ever built.
    monkeypatch.setattr(StorageConnection, "credential", lambda _: credential)
    return Storage("identity", oauth.identity_settings(), credential, oauth.account_key)


@pytest.fixture
def make_stack(storage: Storage) -> Iterator[MakeStack]:
    """Build a stack with per-test model spec overrides and emulator options, connected to
    storage as `storage_mode` says."""
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
        if storage.credential is not None:
            # The app holds no key. A New web service reads its model with the key of the
            # storage account linked to it (its definition's uri carries no SAS), as Azure ML
            # Studio (classic) does; BES keeps the app's SAS for its results.
            config["account_key"] = storage.service_key if new is not None else None
        config["web_services"][0].update(web_service or {})
        emulator = Emulator(config)
        server = EmulatorServer(emulator).__enter__()
        servers.append(server)
        suffix = "-" + uuid.uuid4().hex[:8]
        if new is not None:
            spec["target"] = stack.new_target(server.url, **new)
        if classic is not None:
            spec["target"] = stack.model_spec(server.url)["target"] | classic
        settings = storage.app_settings([stack.model_spec(server.url, **spec)], suffix=suffix)
        app = stack.load_app(settings)
        runner = LocalRunner(
            app,
            env=settings,
            failure_visibility=timedelta(seconds=1),
            credential=storage.credential,
        )
        return Stack(runner, emulator, server.url, settings, storage.blobs(), storage)

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
