"""The emulator's shared state: configuration, time, faults, refusals and blob access."""

from __future__ import annotations

import logging
import re
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from azure.storage.blob import ContainerClient

from retrain.clock import Clock

log = logging.getLogger("amlemu.v2")

API_VERSION = "2025-09-01"
PROVIDER = "Microsoft.MachineLearningServices"


class ArmError(Exception):
    """A refusal in the ARM error shape: `{"error": {"code", "message"}}`."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code


@dataclass
class Faults:
    """Faults to inject. One-shot HTTP faults are consumed in order by matching requests."""

    job_seconds: float = 0.0
    """How long a job runs before it finishes (on the emulator's time)."""
    hang_jobs: bool = False
    """Jobs never finish (until cancelled)."""
    fail_jobs: int = 0
    """The next n jobs fail with `fail_details` instead of training."""
    fail_details: str = "UserError: the training script exited with code 1 (injected)"
    not_responding: int = 0
    """The next n status GETs of a running job answer NotResponding (the job goes on)."""
    cancel_seconds: float = 0.0
    """How long CancelRequested lasts before Canceled."""
    provisioning_seconds: float = 0.0
    """How long an endpoint or deployment operation runs."""
    fail_provisioning: int = 0
    """The next n deployment operations fail."""
    stale_traffic_gets: int = 0
    """After a traffic change succeeds, the next n endpoint GETs still show the old map."""
    mlflow_page_size: int = 100
    """Entries per page of metrics/get-history."""
    http: list[dict[str, Any]] = field(default_factory=list)
    """One-shot faults, each matching an optional "method" and a "path" substring:
    {"status": 429, "retry_after": 1}: answer that instead, doing nothing;
    {"drop": true}: close the connection without answering, doing nothing;
    {"delay": s}: hold the request s seconds, then handle and answer it;
    {"lose_response": true}: handle the request (the service acts), then close the connection
    without answering;
    {"delay_answer": s}: handle the request, then hold the answer s seconds."""


@dataclass(frozen=True)
class Datastore:
    """A blob datastore: a container of an Azurite account."""

    connection_string: str
    container: str

    def client(self) -> ContainerClient:
        """The container."""
        return ContainerClient.from_connection_string(self.connection_string, self.container)


_SHORT = re.compile(r"azureml://datastores/([^/]+)/paths/(.*)")
_LONG = re.compile(
    r"azureml://subscriptions/([^/]+)/resource[gG]roups/([^/]+)/workspaces/([^/]+)"
    r"/datastores/([^/]+)/paths/(.*)"
)


class Emulator:
    """The emulator's state; the HTTP server is a thin layer over it.

    Config: {"subscription", "resource_group", "workspace", "location", "token",
    "datastores": {name: {"connection_string", "container"}},
    "endpoints": [{"name", "auth_mode": "Key"|"AMLToken", "key"}]}.
    """

    def __init__(self, config: dict[str, Any], *, clock: Clock | None = None) -> None:
        from localdev.azureml_v2.serving import Serving
        from localdev.azureml_v2.training import Training

        self.clock = clock
        """With a clock, every duration is on its time: hours of job run in no time."""
        self.subscription: str = config.get("subscription", "sub1")
        self.resource_group: str = config.get("resource_group", "rg1")
        self.workspace: str = config.get("workspace", "ws1")
        self.location: str = config.get("location", "westeurope")
        self.token: str = config.get("token", "local-arm-token")
        self.datastores = {
            name: Datastore(d["connection_string"], d["container"])
            for name, d in (config.get("datastores") or {}).items()
        }
        self.faults = Faults()
        self.lock = threading.RLock()
        self.calls: list[tuple[str, str, int]] = []
        self.violations: list[dict[str, Any]] = []
        """Client requests the service would refuse: {"kind", "detail"}."""
        self.training = Training(self)
        self.serving = Serving(self, config.get("endpoints") or [])

    @property
    def ws_path(self) -> str:
        """The workspace's ARM id."""
        return (
            f"/subscriptions/{self.subscription}/resourceGroups/{self.resource_group}"
            f"/providers/{PROVIDER}/workspaces/{self.workspace}"
        )

    def seconds(self) -> float:
        """The emulator's time in seconds: its clock if it has one, else monotonic."""
        if self.clock is not None:
            return self.clock.now().timestamp()
        return time.monotonic()

    def refuse(self, status: int, code: str, kind: str, message: str) -> ArmError:
        """Record a refusal of a client's request and return the error to raise."""
        with self.lock:
            self.violations.append({"kind": kind, "detail": message})
        log.warning("refused (%s): %s", kind, message)
        return ArmError(status, code, message)

    def take_fault(self, method: str, path: str) -> dict[str, Any] | None:
        """The next one-shot HTTP fault matching this request, removed from the list."""
        with self.lock:
            for i, fault in enumerate(self.faults.http):
                if fault.get("method", method) == method and fault.get("path", "") in path:
                    return self.faults.http.pop(i)
        return None

    def count(self, method: str, pattern: str, status: int | None = None) -> int:
        """How many calls matched (method, regex on path, status)."""
        rx = re.compile(pattern)
        return sum(
            1
            for m, p, s in list(self.calls)
            if m == method and rx.search(p) and (status is None or s == status)
        )

    def datastore_path(self, uri: str) -> tuple[Datastore, str]:
        """The datastore and blob path of a short or long datastore URI of this workspace."""
        short, long = _SHORT.fullmatch(uri), _LONG.fullmatch(uri)
        if long is not None:
            sub, rg, ws, name, path = long.groups()
            if (sub, rg.casefold(), ws) != (
                self.subscription,
                self.resource_group.casefold(),
                self.workspace,
            ):
                raise ArmError(400, "UserError", f"{uri} is not in workspace {self.workspace}")
        elif short is not None:
            name, path = short.groups()
        else:
            raise ArmError(400, "UserError", f"{uri!r} is not a datastore URI")
        store = self.datastores.get(name)
        if store is None:
            raise ArmError(400, "UserError", f"datastore {name!r} does not exist")
        return store, path

    def read_text(self, uri: str) -> str:
        """A uri_file's text, or every CSV under a uri_folder joined under one header."""
        store, path = self.datastore_path(uri)
        container = store.client()
        if not path.endswith("/"):
            return container.download_blob(path).readall().decode("utf-8-sig")
        parts = [
            container.download_blob(b.name).readall().decode("utf-8-sig")
            for b in container.list_blobs(name_starts_with=path)
            if b.name.endswith(".csv")
        ]
        if not parts:
            raise ArmError(400, "UserError", f"no CSV under {uri}")
        head, *rest = parts
        lines = [head.rstrip("\r\n")]
        lines += ["\n".join(p.splitlines()[1:]) for p in rest]
        return "\n".join(line for line in lines if line) + "\n"

    def write_blob(self, uri: str, name: str, data: bytes) -> None:
        """Write `name` under a datastore folder URI."""
        store, path = self.datastore_path(uri)
        container = store.client()
        if not container.exists():
            container.create_container()
        container.upload_blob(path.rstrip("/") + "/" + name, data, overwrite=True)

    def read_blob(self, uri: str, name: str) -> bytes:
        """Read `name` under a datastore folder URI."""
        store, path = self.datastore_path(uri)
        blob = store.client().download_blob(path.rstrip("/") + "/" + name)
        data: bytes = blob.readall()
        return data
