"""The emulator's shared state: configuration, time, faults, refusals and blob access."""

from __future__ import annotations

import logging
import re
import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from azure.storage.blob import ContainerClient

from localdev.emuhttp import Faults as BaseFaults
from localdev.emuhttp import HttpError, Recording
from retrain.clock import Clock

if TYPE_CHECKING:
    from azure.core.credentials import TokenCredential

log = logging.getLogger("amlemu.v2")

API_VERSION = "2025-09-01"
PROVIDER = "Microsoft.MachineLearningServices"


class ArmError(HttpError):
    """A refusal in the ARM error shape: `{"error": {"code", "message"}}`."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(status, code, message)


@dataclass
class Faults(BaseFaults):
    """Faults to inject (see `localdev.emuhttp.Faults`), and the v2 services' own."""

    fail_details: str = "UserError: the training script exited with code 1 (injected)"
    not_responding: int = 0
    """The next n status GETs of a running job answer NotResponding (the job goes on)."""
    cancel_seconds: float = 0.0
    """How long CancelRequested lasts before Canceled."""
    stale_traffic_gets: int = 0
    """After a traffic change succeeds, the next n endpoint GETs still show the old map."""
    mlflow_page_size: int = 100
    """Entries per page of metrics/get-history."""


@dataclass(frozen=True)
class Datastore:
    """A blob datastore: a container of an Azurite account, reached with the account's
    connection string or, for an identity-based datastore (no key), its blob service URL and
    the workspace's token credential."""

    container: str
    connection_string: str | None = None
    account_url: str | None = None
    credential: TokenCredential | None = field(default=None, repr=False)

    def client(self) -> ContainerClient:
        """The container."""
        if self.connection_string is not None:
            return ContainerClient.from_connection_string(self.connection_string, self.container)
        return ContainerClient(str(self.account_url), self.container, credential=self.credential)


def _datastore(name: str, config: dict[str, Any], credential: TokenCredential | None) -> Datastore:
    if config.get("connection_string"):
        return Datastore(config["container"], connection_string=config["connection_string"])
    if not config.get("account_url") or credential is None:
        raise ValueError(
            f"datastore {name!r}: give a connection_string, or an account_url and a credential"
        )
    return Datastore(config["container"], account_url=config["account_url"], credential=credential)


_SHORT = re.compile(r"azureml://datastores/([^/]+)/paths/(.*)")
_LONG = re.compile(
    r"azureml://subscriptions/([^/]+)/resource[gG]roups/([^/]+)/workspaces/([^/]+)"
    r"/datastores/([^/]+)/paths/(.*)"
)


class Emulator(Recording):
    """The emulator's state; the HTTP server is a thin layer over it.

    Config: {"subscription", "resource_group", "workspace", "location", "token",
    "datastores": {name: {"connection_string" or "account_url", "container"}} (a datastore
    with an account_url is identity-based: it is reached with `credential`),
    "endpoints": [{"name", "auth_mode": "Key"|"AMLToken", "key"}],
    "assets": [ARM id of a code, environment or component version, or of a compute]}.
    """

    def __init__(
        self,
        config: dict[str, Any],
        *,
        clock: Clock | None = None,
        credential: TokenCredential | None = None,
    ) -> None:
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
            name: _datastore(name, d, credential)
            for name, d in (config.get("datastores") or {}).items()
        }
        self.faults: Faults = Faults()
        self.lock = threading.RLock()
        self.calls: list[tuple[str, str, int]] = []
        self.violations: list[dict[str, Any]] = []
        """Client requests the service would refuse: {"kind", "detail"}."""
        self.assets: dict[str, dict[str, Any]] = {}
        """The workspace's code, environment and component versions and computes, by ARM id
        (case-folded): their `properties` as GET shows them."""
        for asset in config.get("assets") or []:
            self.add_asset(asset)
        self.training = Training(self)
        self.serving = Serving(self, config.get("endpoints") or [])

    @property
    def ws_path(self) -> str:
        """The workspace's ARM id."""
        return (
            f"/subscriptions/{self.subscription}/resourceGroups/{self.resource_group}"
            f"/providers/{PROVIDER}/workspaces/{self.workspace}"
        )

    def add_asset(self, arm_id: str, **properties: Any) -> None:
        """Make an asset exist (a compute is `Succeeded` unless `provisioningState` says)."""
        with self.lock:
            self.assets[arm_id.rstrip("/").casefold()] = {
                "provisioningState": "Succeeded",
                **properties,
            }

    def asset_view(self, arm_id: str) -> dict[str, Any]:
        """GET of a code/environment/component version or a compute: the resource, or 404 in
        the ARM error shape (spec §1.1) when the workspace has no such asset."""
        with self.lock:
            properties = self.assets.get(arm_id.rstrip("/").casefold())
        parts = arm_id.strip("/").split("/")
        kind = parts[-4] if parts[-2] == "versions" else parts[-2]
        if properties is None:
            name = "/".join(parts[parts.index("workspaces") :])
            raise ArmError(
                404,
                "ResourceNotFound",
                f"The Resource '{PROVIDER}/{name}' under resource group "
                f"'{self.resource_group}' was not found.",
            )
        resource_type = f"{PROVIDER}/workspaces/{kind}" + (
            "/versions" if kind != "computes" else ""
        )
        view: dict[str, Any] = {
            "id": arm_id,
            "name": parts[-1],
            "type": resource_type,
            "properties": dict(properties),
        }
        if kind == "computes":
            view["location"] = self.location
        return view

    def refuse(self, status: int, code: str, kind: str, message: str) -> ArmError:
        """Record a refusal of a client's request and return the error to raise."""
        with self.lock:
            self.violations.append({"kind": kind, "detail": message})
        log.warning("refused (%s): %s", kind, message)
        return ArmError(status, code, message)

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
