"""Promotion targets: the DeployTarget protocol and the Classic endpoint adapter."""

from __future__ import annotations

import difflib
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Literal, Protocol

import requests

from retrain.bes import BlobRef, relative_location
from retrain.clock import Clock
from retrain.errors import ConfigError, PermanentError, PermanentRemoteError
from retrain.http import call, field_of, json_headers, json_of, shape_error
from retrain.ports import ModelRef
from retrain.storage import DataStore

DEPLOY_SAS_LIFETIME = timedelta(hours=2)
"""How long the read SAS a target is given for a model blob stays valid."""

ModelReader = Callable[[ModelRef], BlobRef]
"""Mints a fresh read reference (SAS) to a blob model, for a target that loads it from storage."""


def sas_reader(data: DataStore, clock: Clock) -> ModelReader:
    """Read references to model blobs minted by `data`, valid for DEPLOY_SAS_LIFETIME."""

    def read(model: ModelRef) -> BlobRef:
        expires = clock.now() + DEPLOY_SAS_LIFETIME
        return data.reference(model.container, model.name, write=False, expires=expires)

    return read


def trained_model(model: ModelRef) -> ModelRef:
    """`model`, checked to be what a Classic or New web service loads: an `.ilearner` blob
    (a bug upstream otherwise: a permanent error that no handler takes for the service's)."""
    if model.kind != "blob" or not model.name.endswith(".ilearner"):
        raise PermanentError(f"a trained model's blob must end in .ilearner, not {model}")
    return model


@dataclass(frozen=True)
class Progress:
    """Where a promotion stands: done, still provisioning (poll `operation`), or failed; or
    `staged`: the model is ready on a deployment that takes no traffic yet, and the promotion
    moves traffic to it in steps (a `TrafficTarget` with a canary)."""

    state: Literal["succeeded", "pending", "failed", "staged"]
    detail: str | None = None
    operation: str | None = None
    """URL of a long-running operation to poll; None means: poll the target itself."""


SUCCEEDED = Progress("succeeded")


class DeployTarget(Protocol):
    """Where a promoted model goes. A restore or a rollback is `deploy` of the earlier model."""

    def serves(self, model: ModelRef) -> bool:
        """Whether the target serves `model` now (fully provisioned)."""
        ...

    def deploy(self, model: ModelRef) -> Progress:
        """Point the target at `model` unless it already does; safe to call again."""
        ...

    def progress(self, operation: str | None) -> Progress:
        """How a pending deployment is going."""
        ...

    def preflight(self) -> list[str]:
        """Check the target is updatable as configured; returns facts found, raises on a problem."""
        ...


class TrafficTarget(DeployTarget, Protocol):
    """A target whose traffic is split between deployments: what canary steps need."""

    def traffic(self) -> dict[str, int]:
        """The traffic map now (deployment -> percent, no zero entries)."""
        ...

    def shift(self, traffic: dict[str, int], operation: str | None) -> Progress:
        """Make the traffic map `traffic` (it totals 100), reading the target first: succeeded
        once it shows that map, pending (with the operation to pass back) while it changes.
        Safe to call again, with or without the operation the last call returned."""
        ...

    def smoke(self, deployment: str) -> str | None:
        """Send the smoke request to `deployment`; why it failed, or None."""
        ...


class ClassicEndpoint:
    """A non-default Classic web service endpoint, whose trained-model resource is PATCHed."""

    def __init__(
        self,
        endpoint_url: str,
        api_key: str,
        resource_name: str,
        *,
        read: ModelReader,
        session: requests.Session,
        timeout: tuple[float, float],
    ) -> None:
        if endpoint_url.rstrip("/").rsplit("/", 1)[-1].casefold() == "default":
            raise ConfigError("the default endpoint cannot be patched")
        self._url = endpoint_url.rstrip("/")
        self._name = self._url.rsplit("/", 1)[-1]
        self._resource = resource_name
        self._read = read
        self._headers = json_headers(api_key, content_type="application/json; charset=utf-8")
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
            raise shape_error(what, "the reply", "a JSON object", body)
        return body

    def _resource_entry(self, endpoint: dict[str, Any]) -> dict[str, Any]:
        what = f"Classic endpoint GET {self._name}"
        resources: list[dict[str, Any]] = []
        for index, resource in enumerate(field_of(endpoint, "Resources", list, what=what) or []):
            if not isinstance(resource, dict):
                raise shape_error(what, f"Resources[{index}]", "a JSON object", resource)
            resources.append(resource)
        names = [str(r.get("Name")) for r in resources]
        for resource in resources:
            if resource.get("Name") == self._resource:
                return resource
        if not names:
            raise PermanentRemoteError(
                f"endpoint {self._name} has no updatable resource; patch an endpoint of the "
                "predictive web service, not the training one"
            )
        close = difflib.get_close_matches(self._resource, names, n=3, cutoff=0.5)
        hint = f"; did you mean {close}?" if close else ""
        raise PermanentRemoteError(
            f"endpoint {self._name} has no resource named {self._resource!r} (it has {names}){hint}"
        )

    def _location(self, entry: dict[str, Any]) -> str | None:
        what = f"Classic endpoint GET {self._name}: resource {self._resource!r}"
        location = field_of(entry, "Location", dict, what=what) or {}
        relative = field_of(location, "RelativeLocation", str, what=f"{what} Location")
        return str(relative) if relative else None

    def _deployed(self) -> str | None:
        relative = self._location(self._resource_entry(self.get()))
        return relative.lstrip("/") if relative else None

    def serves(self, model: ModelRef) -> bool:
        # The endpoint reports the RelativeLocation it was given (percent-encoded as sent).
        return model.kind == "blob" and self._deployed() == relative_location(
            model.container, model.name
        )

    def deploy(self, model: ModelRef) -> Progress:
        if self.serves(trained_model(model)):
            return SUCCEEDED
        ref = self._read(model)
        body = {
            "Resources": [
                {
                    "Name": self._resource,
                    "Location": {
                        "BaseLocation": ref.base_location,
                        "RelativeLocation": ref.relative_location,
                        "SasBlobToken": ref.sas_token,
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
        return SUCCEEDED

    def progress(self, operation: str | None) -> Progress:
        return SUCCEEDED  # a Classic PATCH takes effect when it returns

    def preflight(self) -> list[str]:
        endpoint = self.get()
        entry = self._resource_entry(endpoint)
        where = self._location(entry) or "nothing yet"
        return [
            f"endpoint {self._name} of web service {endpoint.get('WebServiceId', '?')} answers",
            f"resource {self._resource!r} is updatable; it serves {where}",
        ]
