"""Classic web services: the management endpoint API (GET, and PATCH of a non-default
endpoint's trained model) and RRS scoring with each endpoint's current model."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from localdev.amlemu.common import (
    AUTH_FAILED,
    BadRequest,
    HttpError,
    Shared,
    blob,
    score,
    unencoded,
)
from localdev.amlemu.routes import ANY, Reply, Request, Route, not_allowed, route

ENDPOINT = (
    r"/workspaces/(?P<workspace>[^/]+)/webservices/(?P<webservice>[^/]+)"
    r"/endpoints/(?P<endpoint>[^/]+)/?"
)
EXECUTE = r"/workspaces/(?P<workspace>[^/]+)/services/(?P<service_id>[^/]+)/execute/?"


@dataclass
class Endpoint:
    """A Classic predictive web service endpoint with one updatable trained-model resource."""

    workspace: str
    webservice: str
    name: str
    api_key: str
    resource_name: str
    model: dict[str, Any] | None = None
    location: dict[str, Any] | None = None
    patches: list[dict[str, Any]] = field(default_factory=list)
    """Every accepted PATCH's Location, SAS included, for tests to inspect."""

    @property
    def service_id(self) -> str:
        """The id RRS calls use for this endpoint."""
        return f"{self.webservice}-{self.name}"


class Classic:
    """The Classic endpoints; each configured web service also has its `default` endpoint."""

    def __init__(self, shared: Shared, endpoints: list[dict[str, Any]]) -> None:
        self.shared = shared
        self.endpoints: dict[tuple[str, str, str], Endpoint] = {}
        for e in endpoints:
            ep = Endpoint(**e)
            self.endpoints[(ep.workspace, ep.webservice, ep.name)] = ep
            default_key = (ep.workspace, ep.webservice, "default")
            if default_key not in self.endpoints:
                self.endpoints[default_key] = Endpoint(
                    ep.workspace, ep.webservice, "default", ep.api_key, ep.resource_name
                )

    def routes(self) -> list[Route]:
        """The management and RRS route table (RRS answers every method)."""
        return [
            route("GET", ENDPOINT, self._get),
            route("PATCH", ENDPOINT, self._patch),
            route(ANY, ENDPOINT, self._other),
            route(ANY, EXECUTE, self._execute),
        ]

    def endpoint_by_id(self, workspace: str, service_id: str | None) -> Endpoint | None:
        """The endpoint with this RRS service id."""
        for ep in self.endpoints.values():
            if ep.workspace == workspace and ep.service_id == service_id:
                return ep
        return None

    def model_of(self, workspace: str, service_id: str | None) -> dict[str, Any] | None:
        """The current model of the endpoint with this RRS service id, if any."""
        ep = self.endpoint_by_id(workspace, service_id)
        return None if ep is None else ep.model

    # ---- HTTP

    def _endpoint(self, request: Request) -> Endpoint:
        p = request.params
        ep = self.endpoints.get((p["workspace"], p["webservice"], p["endpoint"]))
        if ep is None:
            raise HttpError(404, "EndpointNotFound")
        request.authorize(ep.api_key)
        return ep

    def _get(self, request: Request) -> Reply:
        return Reply(200, self.describe(self._endpoint(request), request.base_url))

    def _patch(self, request: Request) -> Reply:
        self.patch(self._endpoint(request), request.body or {})
        return Reply(200)

    def _other(self, request: Request) -> Reply:
        self._endpoint(request)
        raise not_allowed()

    def _execute(self, request: Request) -> Reply:
        ep = self.endpoint_by_id(request.params["workspace"], request.params["service_id"])
        if ep is None:
            raise HttpError(404, "NotFound")
        request.authorize(ep.api_key)
        return Reply(200, score(ep.model, request.body or {}))

    # ---- the service

    def patch(self, ep: Endpoint, body: dict[str, Any]) -> None:
        """Swap the trained model of a non-default endpoint."""
        if ep.name == "default":
            raise BadRequest(
                "Default endpoints are kept in sync with the experiment; the "
                "trained model of the default endpoint cannot be replaced."
            )
        resources = body.get("Resources")
        if not isinstance(resources, list) or not resources:
            raise BadRequest("Resources must be a non-empty list")
        for resource in resources:
            if resource.get("Name") != ep.resource_name:
                raise BadRequest(f"Resource {resource.get('Name')!r} was not found")
            location = resource.get("Location") or {}
            relative = str(location.get("RelativeLocation", ""))
            if unencoded(relative):
                self.shared.violation("unencoded reference", None, f"PATCH Location {relative!r}")
                raise BadRequest(f"The URL for the retraining model is invalid. {AUTH_FAILED}")
            if not relative.endswith(".ilearner"):
                raise BadRequest("The URL for the retraining model is invalid")
            try:
                model = json.loads(blob(location).download_blob().readall())
            except Exception as exc:  # any read failure is a bad location
                raise BadRequest("The URL for the retraining model is invalid") from exc
            ep.model = model
            ep.patches.append(dict(location))
            ep.location = {
                "BaseLocation": location.get("BaseLocation"),
                "RelativeLocation": str(location["RelativeLocation"]).lstrip("/"),
                "SasBlobToken": None,
            }

    def describe(self, ep: Endpoint, host: str) -> dict[str, Any]:
        """The endpoint as GET returns it."""
        return {
            "Name": ep.name,
            "WebServiceId": ep.webservice,
            "WorkspaceId": ep.workspace,
            "ApiLocation": f"{host}/workspaces/{ep.workspace}/services/{ep.service_id}",
            "Resources": [
                {"Name": ep.resource_name, "Kind": "TrainedModel", "Location": ep.location}
            ],
        }
