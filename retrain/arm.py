"""New (Azure Resource Manager) web services: the trained-model asset updated by ARM PATCH."""

from __future__ import annotations

import copy
import time
from typing import Any

import requests

from retrain.deploy import SUCCEEDED, ModelReader, Progress, trained_model
from retrain.errors import PermanentRemoteError, RemoteError, TransientRemoteError
from retrain.http import BearerCalls, TokenCredential, field_of, json_of, redact, shape_error
from retrain.ports import ModelRef

ROLE_HINT = "the app's identity needs the Contributor role on the web service or its resource group"


class StaticToken:
    """A fixed bearer token, for local emulators and tests."""

    def __init__(self, token: str) -> None:
        self._token = token

    def get_token(self, *scopes: str) -> Any:
        from azure.core.credentials import AccessToken as SdkToken

        return SdkToken(self._token, int(time.time()) + 3600)


class NewWebService:
    """A `Microsoft.MachineLearning/webServices` resource: GET, PATCH assets, poll provisioning."""

    def __init__(
        self,
        *,
        arm_endpoint: str,
        subscription_id: str,
        resource_group: str,
        name: str,
        asset_name: str | None,
        api_version: str,
        credential: TokenCredential,
        read: ModelReader,
        session: requests.Session,
        timeout: tuple[float, float],
    ) -> None:
        self._base = arm_endpoint.rstrip("/")
        self._url = (
            f"{self._base}/subscriptions/{subscription_id}/resourceGroups/{resource_group}"
            f"/providers/Microsoft.MachineLearning/webServices/{name}"
        )
        self._name = name
        self._asset_name = asset_name
        self._api_version = api_version
        self._read = read
        self._arm = BearerCalls(session, timeout, credential, f"{self._base}/.default")

    def _call(self, method: str, url: str, what: str, body: Any = None) -> requests.Response:
        try:
            return self._arm.send(method, url, what, body)
        except RemoteError as exc:
            if exc.status in (401, 403):
                raise PermanentRemoteError(f"{exc} ({ROLE_HINT})", status=exc.status) from exc
            if exc.status == 404:
                raise PermanentRemoteError(
                    f"web service {self._name} not found at {self._url} (check subscription, "
                    "resource group and name)",
                    status=404,
                ) from exc
            if exc.status == 409:
                raise TransientRemoteError(
                    f"{exc} (another operation on {self._name} is in progress)",
                    status=409,
                    retry_after=exc.retry_after,
                ) from exc
            raise

    def get(self) -> dict[str, Any]:
        """The web service definition."""
        what = f"ARM GET web service {self._name}"
        body = json_of(
            self._call("GET", f"{self._url}?api-version={self._api_version}", what), what=what
        )
        if not isinstance(body, dict):
            raise shape_error(what, "the reply", "a JSON object", body)
        field_of(body, "properties", dict, what=what, required=True)
        return body

    def _asset_uri(self, assets: dict[str, Any], key: str) -> str | None:
        what = f"ARM GET web service {self._name}: asset {key}"
        info = field_of(assets[key], "locationInfo", dict, what=what) or {}
        uri = field_of(info, "uri", str, what=f"{what} locationInfo")
        return str(uri) if uri else None

    def _checked(self, service: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        props = service["properties"]
        if props.get("readOnly"):
            raise PermanentRemoteError(
                f"web service {self._name} is read-only and can no longer be "
                "updated; deploy a new web service to retrain it"
            )
        if props.get("payloadsInBlobStorage"):
            raise PermanentRemoteError(
                f"web service {self._name} keeps its definition in blob storage "
                "(over 3 MB), so its assets cannot be patched through ARM"
            )
        assets = field_of(props, "assets", dict, what=f"ARM GET web service {self._name}")
        if not assets:
            raise PermanentRemoteError(f"web service {self._name} has no assets in its definition")
        return self._find_asset(assets), assets

    def _find_asset(self, assets: dict[str, Any]) -> str:
        resources = {
            k: v for k, v in assets.items() if isinstance(v, dict) and v.get("type") == "Resource"
        }
        names = sorted(str(v.get("name")) for v in resources.values())
        if self._asset_name is not None:
            found = [k for k, v in resources.items() if v.get("name") == self._asset_name]
            what = f"named {self._asset_name!r}"
        else:
            found = [
                k
                for k, v in resources.items()
                if str(v.get("name", "")).casefold().endswith("[trained model]")
            ]
            what = "whose name ends in '[trained model]'"
        if len(found) == 1:
            return found[0]
        problem = "no" if not found else f"{len(found)}"
        raise PermanentRemoteError(
            f"web service {self._name}: {problem} Resource asset {what} (Resource assets: "
            f"{names}); set target.asset_name to the trained model's asset name"
        )

    def _uri(self, model: ModelRef) -> str:
        # The documented definitions carry no SAS: the service reads its own storage account.
        ref = self._read(model)
        return ref.base_location.rstrip("/") + "/" + ref.path

    def serves(self, model: ModelRef) -> bool:
        if model.kind != "blob":
            return False
        service = self.get()
        key, assets = self._checked(service)
        uri = self._asset_uri(assets, key)
        state = service["properties"].get("provisioningState")
        return bool(uri == self._uri(model) and state == "Succeeded")

    def deploy(self, model: ModelRef) -> Progress:
        trained_model(model)
        service = self.get()
        key, assets = self._checked(service)
        uri = self._uri(model)
        state = service["properties"].get("provisioningState")
        if self._asset_uri(assets, key) == uri:
            if state == "Succeeded":
                return SUCCEEDED
            if state == "Provisioning":
                return Progress("pending")
        patched = copy.deepcopy(assets)
        patched[key].setdefault("locationInfo", {})["uri"] = uri
        body = {
            "location": service.get("location"),
            "properties": {
                "packageType": service["properties"].get("packageType", "Graph"),
                "assets": patched,
            },
        }
        what = f"ARM PATCH web service {self._name}"
        response = self._call("PATCH", f"{self._url}?api-version={self._api_version}", what, body)
        operation = response.headers.get("Azure-AsyncOperation")
        if operation:
            return Progress("pending", operation=operation)
        result = json_of(response, what=what) if response.content else {}
        if not isinstance(result, dict):
            raise shape_error(what, "the reply", "a JSON object", result)
        props = field_of(result, "properties", dict, what=what) or {}
        return self._from_state(props.get("provisioningState"), None)

    def progress(self, operation: str | None) -> Progress:
        if operation is None:
            props = self.get()["properties"]
            return self._from_state(props.get("provisioningState"), None)
        if not operation.startswith(self._base + "/"):
            raise PermanentRemoteError(f"refusing to poll an operation outside {self._base}")
        what = f"ARM operation status for {self._name}"
        body = json_of(self._call("GET", operation, what), what=what)
        if not isinstance(body, dict):
            raise shape_error(what, "the reply", "a JSON object", body)
        # The generic ARM field is 'status'; this provider's model names it 'provisioningState'.
        state = body.get("status") or body.get("provisioningState")
        error = body.get("error") or body.get("errorInfo") or {}
        detail = None
        if isinstance(error, dict) and error:
            detail = redact(f"{error.get('code', 'error')}: {error.get('message', '')}".strip())
        elif error:
            detail = redact(str(error))[:300]
        return self._from_state(state, detail)

    @staticmethod
    def _from_state(state: Any, detail: str | None) -> Progress:
        text = str(state or "").casefold()
        if text == "succeeded":
            return SUCCEEDED
        if text in ("failed", "canceled", "cancelled"):
            return Progress("failed", detail or f"provisioning {state}")
        return Progress("pending")

    def preflight(self) -> list[str]:
        service = self.get()
        key, assets = self._checked(service)
        asset = assets[key]
        return [
            f"web service {self._name} answers (provisioningState "
            f"{service['properties'].get('provisioningState')})",
            f"asset {asset.get('name')!r} ({key}) serves "
            f"{self._asset_uri(assets, key) or 'nothing yet'}",
        ]
