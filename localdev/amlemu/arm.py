"""New (ARM) web services: the definition (GET, PATCH with provisioning, PUT), its async
operation status, and RRS scoring with the service's provisioned model."""

from __future__ import annotations

import copy
import json
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from azure.storage.blob import BlobClient

from localdev.amlemu.common import BadRequest, Conflict, HttpError, Shared, score
from localdev.amlemu.routes import ANY, Reply, Request, Route, not_allowed, route

_PROVIDER = r"/providers/Microsoft\.MachineLearning"
WEB_SERVICE = (
    r"/subscriptions/(?P<subscription>[^/]+)/resourceGroups/(?P<group>[^/]+)"
    + _PROVIDER
    + r"/webServices/(?P<name>[^/]+)/?"
)
OPERATION = (
    r"/subscriptions/(?P<subscription>[^/]+)"
    + _PROVIDER
    + r"/locations/[^/]+/operationsStatus/(?P<operation>[^/]+)/?"
)
EXECUTE = r"/subscriptions/(?P<subscription>[^/]+)/services/(?P<name>[^/]+)/execute/?"
API_VERSIONS = ("2016-05-01-preview", "2017-01-01")


@dataclass
class WebService:
    """A New (ARM) web service: a definition whose trained-model asset can be PATCHed."""

    subscription: str
    resource_group: str
    name: str
    arm_token: str
    api_key: str
    asset_name: str = "Housing Model [trained model]"
    location: str = "South Central US"
    read_only: bool = False
    payloads_in_blob: bool = False
    assets: dict[str, Any] | None = None
    state: str = "Succeeded"
    model: dict[str, Any] | None = None
    pending: dict[str, Any] | None = None
    operations: dict[str, dict[str, Any]] = field(default_factory=dict)
    patches: list[dict[str, Any]] = field(default_factory=list)
    """The assets of every accepted PATCH, for tests to inspect."""

    def __post_init__(self) -> None:
        if self.assets is None:
            self.assets = {
                "asset1": {
                    "name": "Score Model",
                    "type": "Module",
                    "locationInfo": {"uri": "aml://module/score-model"},
                },
                "asset2": {
                    "name": self.asset_name,
                    "type": "Resource",
                    "locationInfo": {"uri": "https://example.invalid/initial.ilearner"},
                    "outputPorts": {"Results dataset": {"type": "Dataset"}},
                },
            }

    @property
    def arm_id(self) -> str:
        """The resource id."""
        return (
            f"/subscriptions/{self.subscription}/resourceGroups/{self.resource_group}"
            "/providers/Microsoft.MachineLearning/webServices/" + self.name
        )


class Arm:
    """The New web services, updated through ARM."""

    def __init__(self, shared: Shared, web_services: list[dict[str, Any]]) -> None:
        self.shared = shared
        self.web_services = {
            (w["subscription"], w["resource_group"], w["name"]): WebService(**w)
            for w in web_services
        }

    def routes(self) -> list[Route]:
        """The ARM and RRS route table (operation status and RRS answer every method)."""
        return [
            route("GET", WEB_SERVICE, self._get),
            route("PATCH", WEB_SERVICE, self._patch),
            route("PUT", WEB_SERVICE, self._put),
            route(ANY, WEB_SERVICE, self._other),
            route(ANY, OPERATION, self._operation),
            route(ANY, EXECUTE, self._execute),
        ]

    def web_service_by_name(self, subscription: str, name: str) -> WebService | None:
        """The New web service, for RRS calls."""
        for ws in self.web_services.values():
            if ws.subscription == subscription and ws.name == name:
                return ws
        return None

    # ---- HTTP

    def _web_service(self, request: Request) -> WebService:
        p = request.params
        ws = self.web_services.get((p["subscription"], p["group"], p["name"]))
        if ws is None:
            raise HttpError(404, "ResourceNotFound", "The Resource was not found.")
        request.authorize(ws.arm_token)
        if request.query.get("api-version", [""])[0] not in API_VERSIONS:
            raise HttpError(400, "InvalidApiVersionParameter")
        return ws

    def _get(self, request: Request) -> Reply:
        return Reply(200, self.definition(self._web_service(request)))

    def _patch(self, request: Request) -> Reply:
        ws = self._web_service(request)
        operation = self.patch(ws, request.body or {}, request.base_url)
        return Reply(200, self.definition(ws), {"Azure-AsyncOperation": operation})

    def _put(self, request: Request) -> Reply:
        # PUT replaces the whole service; implemented so misuse is visible in tests.
        ws = self._web_service(request)
        props = (request.body or {}).get("properties") or {}
        ws.assets = props.get("assets", ws.assets)
        return Reply(200, self.definition(ws))

    def _other(self, request: Request) -> Reply:
        self._web_service(request)
        raise not_allowed()

    def _operation(self, request: Request) -> Reply:
        subscription, op = request.params["subscription"], request.params["operation"]
        for ws in self.web_services.values():
            if ws.subscription == subscription and op in ws.operations:
                request.authorize(ws.arm_token)
                self.settle(ws)
                return Reply(200, ws.operations[op])
        raise HttpError(404, "OperationNotFound")

    def _execute(self, request: Request) -> Reply:
        ws = self.web_service_by_name(request.params["subscription"], request.params["name"])
        if ws is None:
            raise HttpError(404, "NotFound")
        request.authorize(ws.api_key)
        return Reply(200, score(ws.model, request.body or {}))

    # ---- the service

    def definition(self, ws: WebService) -> dict[str, Any]:
        """The web service as ARM GET returns it (keys and storage key never included)."""
        self.settle(ws)
        assets = ws.pending["assets"] if ws.pending else ws.assets
        return {
            "id": ws.arm_id,
            "name": ws.name,
            "location": ws.location,
            "type": "Microsoft.MachineLearning/webServices",
            "properties": {
                "title": ws.name,
                "packageType": "Graph",
                "provisioningState": ws.state,
                "readOnly": ws.read_only,
                "payloadsInBlobStorage": ws.payloads_in_blob,
                **({} if ws.payloads_in_blob else {"assets": assets}),
                "storageAccount": {"name": "devstoreaccount1"},
            },
        }

    def patch(self, ws: WebService, body: dict[str, Any], host: str) -> str:
        """Start an update of the definition; returns the async operation URL."""
        self.settle(ws)
        if ws.read_only:
            raise BadRequest("The web service is read-only and cannot be updated.")
        props = body.get("properties")
        if not isinstance(props, dict) or props.get("packageType") != "Graph":
            raise BadRequest("properties.packageType must be 'Graph'")
        if "location" not in body:
            raise BadRequest("location is required")
        if ws.pending:
            raise Conflict("Another operation is in progress on this web service.")
        assets = props.get("assets", ws.assets)
        op = uuid.uuid4().hex
        faults = self.shared.faults
        with self.shared.lock:
            fail = faults.fail_provisioning > 0
            if fail:
                faults.fail_provisioning -= 1
        ws.patches.append(copy.deepcopy(assets or {}))
        ws.pending = {
            "assets": assets,
            "op": op,
            "fail": fail,
            "until": datetime.now(UTC) + timedelta(seconds=faults.provisioning_seconds),
        }
        ws.state = "Provisioning"
        ws.operations[op] = {"id": op, "name": op, "status": "InProgress"}
        self.settle(ws)
        region = ws.location.replace(" ", "").lower()
        return (
            f"{host}/subscriptions/{ws.subscription}/providers/Microsoft.MachineLearning/"
            f"locations/{region}/operationsStatus/{op}?api-version=2017-01-01"
        )

    def settle(self, ws: WebService) -> None:
        """Finish a pending update whose provisioning time is up: it succeeds with the asset's
        model loaded, or fails (injected, or the model cannot be read)."""
        pending = ws.pending
        if not pending or datetime.now(UTC) < pending["until"]:
            return
        op = ws.operations[pending["op"]]
        ws.pending = None
        error = "injected provisioning failure" if pending["fail"] else None
        model = None
        if error is None:
            try:
                model = self._load_asset_model(pending["assets"], ws.asset_name)
            except Exception as exc:  # noqa: BLE001 - any failure to load fails provisioning
                error = f"cannot load the trained model: {type(exc).__name__}"
        if error:
            ws.state = "Failed"
            op.update(status="Failed", error={"code": "ProvisioningFailed", "message": error})
            return
        ws.assets, ws.model, ws.state = pending["assets"], model, "Succeeded"
        op.update(status="Succeeded")

    def _load_asset_model(self, assets: dict[str, Any], name: str) -> dict[str, Any] | None:
        for asset in assets.values():
            if asset.get("type") == "Resource" and asset.get("name") == name:
                uri = asset["locationInfo"]["uri"]
                if uri.startswith("https://example.invalid/"):
                    return None
                # The service reads its linked storage account with the account's key.
                credential = {
                    "account_name": "devstoreaccount1",
                    "account_key": self.shared.account_key or "",
                }
                blob = BlobClient.from_blob_url(uri, credential=credential)
                loaded: dict[str, Any] = json.loads(blob.download_blob().readall())
                return loaded
        raise BadRequest(f"no Resource asset named {name!r}")
