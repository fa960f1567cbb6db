"""End-to-end harness: the function app under the local runner, the emulator, Azurite."""

from __future__ import annotations

import json
import logging
import re
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import pytest
from azure.core.exceptions import ResourceNotFoundError
from azure.storage.blob import BlobServiceClient

from localdev import stack
from localdev.amlemu import Emulator, EmulatorServer
from localdev.runner import LocalRunner

pytestmark = pytest.mark.e2e


@dataclass
class Stack:
    """A running stack for one test, isolated by container and queue names."""

    runner: LocalRunner
    emulator: Emulator
    emulator_url: str
    settings: dict[str, str]
    blobs: BlobServiceClient

    def upload(self, name: str, data: str | bytes) -> None:
        """Drop a file into the data container (created if no blob trigger made it)."""
        container = self.blobs.get_container_client(self.settings["RETRAIN_DATA_CONTAINER"])
        if not container.exists():
            container.create_container()
        container.upload_blob(name, data, overwrite=True)

    def _doc(self, key: str) -> dict[str, Any] | None:
        client = self.blobs.get_blob_client(self.settings["RETRAIN_STATE_CONTAINER"], key)
        if not client.exists():
            return None
        result: dict[str, Any] = json.loads(client.download_blob().readall())
        return result

    def runs(self, model: str = "housing") -> list[dict[str, Any]]:
        """Every run record of the model, oldest first."""
        return [self._doc(n) or {} for n in sorted(self._keys(f"runs/{model}/"))]

    def _keys(self, prefix: str) -> list[str]:
        container = self.blobs.get_container_client(self.settings["RETRAIN_STATE_CONTAINER"])
        try:
            return [b.name for b in container.list_blobs(name_starts_with=prefix)]
        except ResourceNotFoundError:
            return []

    def step_until_running(self) -> None:
        """Poll like the host until the first run's BES job is running."""
        for _ in range(200):
            if self.runs() and self.runs()[0]["state"] == "running":
                return
            self.runner.step()
        raise AssertionError(f"no running run: {[r['state'] for r in self.runs()]}")

    def model_state(self, model: str = "housing") -> dict[str, Any]:
        """The model's document: batch, active run, champion."""
        return self._doc(f"models/{model}.json") or {}

    def arrivals(self) -> list[dict[str, Any]]:
        """Every arrival record."""
        return [self._doc(n) or {} for n in self._keys("arrivals/")]

    def jobs_submitted(self) -> int:
        """BES submits the emulator accepted."""
        return self.emulator.count("POST", r"/jobs$", 200)

    def predict(self, rows: list[list[float]], *, new: bool = False) -> list[float]:
        """Score rows through RRS on the Classic endpoint (or the New web service)."""
        import requests

        path = (
            "/subscriptions/sub1/services/housing-new"
            if new
            else "/workspaces/ws1/services/housing-predict-prod"
        )
        key = "local-new-key" if new else "local-endpoint-key"
        response = requests.post(
            f"{self.emulator_url}{path}/execute?api-version=2.0",
            json={
                "Inputs": {"input1": {"ColumnNames": ["rooms", "age", "distance"], "Values": rows}},
                "GlobalParameters": {},
            },
            headers={"Authorization": f"Bearer {key}"},
            timeout=10,
        )
        response.raise_for_status()
        return [r[-1] for r in response.json()["Results"]["output1"]["value"]["Values"]]


MakeStack = Callable[..., Stack]

SECRETS = (
    "local-bes-key",
    "local-endpoint-key",
    "local-arm-token",
    "local-new-key",
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
