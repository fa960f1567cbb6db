"""Promotion targets: the DeployTarget protocol and the Classic endpoint adapter."""

from __future__ import annotations

import difflib
from typing import Any, Protocol

import requests

from retrain.bes import BlobRef
from retrain.errors import RemoteError
from retrain.http import call, json_of


class DeployTarget(Protocol):
    """Where a promoted model goes."""

    def deployed(self) -> str | None:
        """The 'container/blob' of the model the target serves now, when it tells."""
        ...

    def deploy(self, model: BlobRef) -> None:
        """Point the target at `model`; the target copies the blob through the SAS it is given."""
        ...


class ClassicEndpoint:
    """A non-default Classic web service endpoint, whose trained-model resource is PATCHed."""

    def __init__(
        self,
        endpoint_url: str,
        api_key: str,
        resource_name: str,
        *,
        session: requests.Session,
        timeout: tuple[float, float],
    ) -> None:
        if endpoint_url.rstrip("/").rsplit("/", 1)[-1].casefold() == "default":
            raise ValueError("the default endpoint cannot be patched")
        self._url = endpoint_url.rstrip("/")
        self._name = self._url.rsplit("/", 1)[-1]
        self._resource = resource_name
        self._headers = {
            "Authorization": f"Bearer {api_key}",
            "Content-Type": "application/json; charset=utf-8",
            "Accept": "application/json",
        }
        self._session = session
        self._timeout = timeout

    def get(self) -> dict[str, Any]:
        """GET the endpoint description."""
        what = f"Classic endpoint GET {self._name}"
        response = call(
            self._session, "GET", self._url, what=what, timeout=self._timeout, headers=self._headers
        )
        body = json_of(response, what=what)
        if not isinstance(body, dict):
            raise RemoteError(f"{what}: expected a JSON object")
        return body

    def _resource_entry(self, endpoint: dict[str, Any]) -> dict[str, Any]:
        resources = [r for r in endpoint.get("Resources") or [] if isinstance(r, dict)]
        names = [str(r.get("Name")) for r in resources]
        for resource in resources:
            if resource.get("Name") == self._resource:
                return resource
        if not names:
            raise RemoteError(
                f"endpoint {self._name} has no updatable resource; patch an endpoint of the "
                "predictive web service, not the training one"
            )
        close = difflib.get_close_matches(self._resource, names, n=3, cutoff=0.5)
        hint = f"; did you mean {close}?" if close else ""
        raise RemoteError(
            f"endpoint {self._name} has no resource named {self._resource!r} (it has {names}){hint}"
        )

    def deployed(self) -> str | None:
        location = self._resource_entry(self.get()).get("Location") or {}
        relative = location.get("RelativeLocation")
        return str(relative).lstrip("/") if relative else None

    def deploy(self, model: BlobRef) -> None:
        if not model.relative_location.endswith(".ilearner"):
            raise ValueError("a trained model's RelativeLocation must end in .ilearner")
        body = {
            "Resources": [
                {
                    "Name": self._resource,
                    "Location": {
                        "BaseLocation": model.base_location,
                        "RelativeLocation": model.relative_location,
                        "SasBlobToken": model.sas_token,
                    },
                }
            ]
        }
        call(
            self._session,
            "PATCH",
            self._url,
            what=f"Classic endpoint PATCH {self._name}",
            timeout=self._timeout,
            headers=self._headers,
            json_body=body,
            send_body=True,
        )
