"""Long-running operations (spec §1.2): one poll per call, never a wait.

A mutating call returns a `Progress` whose `operation` says how to follow it:
`async <url>` (an Azure-AsyncOperation URL: its body has `status`), `location <url>` (a
Location URL: 202 while running, 200/204 when done) or `resource <url>` (no async URL was
given: the resource's own `provisioningState` tells).
"""

from __future__ import annotations

from typing import Any, Literal

import requests

from retrain.azureml.workspace import ArmClient, as_object, object_of
from retrain.deploy import SUCCEEDED, Progress
from retrain.errors import PermanentRemoteError
from retrain.http import redact

Kind = Literal["async", "location", "resource"]
TERMINAL_FAILURES = ("failed", "canceled", "cancelled")
IN_PROGRESS_STATES = ("creating", "updating", "deleting", "scaling", "inprogress", "accepted")


def pending(kind: Kind, url: str) -> Progress:
    """A pending operation to follow through `url`."""
    return Progress("pending", operation=f"{kind} {url}")


def from_mutation(response: requests.Response, resource_url: str, what: str) -> Progress:
    """Where a PUT/PATCH/DELETE/POST stands from its answer: an async header to follow, or the
    resource state in the body (echoed `AzureAsyncOperationUri` as the fallback, spec §1.2)."""
    header = response.headers.get("Azure-AsyncOperation")
    if header:
        return pending("async", header)
    if response.status_code == 202:
        location = response.headers.get("Location")
        return pending("location", location) if location else pending("resource", resource_url)
    if response.status_code == 204 or not response.content:
        return SUCCEEDED
    body = object_of(response, what)
    props = as_object(body.get("properties"))
    echoed = as_object(props.get("properties")).get("AzureAsyncOperationUri")
    state = str(props.get("provisioningState") or "").casefold()
    if state in ("", "succeeded"):
        return SUCCEEDED
    if state in TERMINAL_FAILURES:
        return Progress("failed", f"{what}: provisioningState {props.get('provisioningState')}")
    if isinstance(echoed, str) and echoed:
        return pending("async", echoed)
    return pending("resource", resource_url)


def poll(arm: ArmClient, operation: str, what: str) -> Progress:
    """Poll an operation once and say where it stands."""
    kind, _, url = operation.partition(" ")
    if kind not in ("async", "location", "resource") or not url:
        raise PermanentRemoteError(f"{what}: not an operation this client made: {operation[:60]!r}")
    arm.check_own(url)
    response = arm.request("GET", url, what)
    if kind == "location":
        return pending("location", url) if response.status_code == 202 else SUCCEEDED
    body = object_of(response, what)
    if kind == "async":
        return _from_status(body, url, what)
    props = as_object(body.get("properties"))
    state = str(props.get("provisioningState") or "")
    if state.casefold() == "succeeded":
        return SUCCEEDED
    if state.casefold() in TERMINAL_FAILURES:
        return Progress("failed", f"{what}: provisioningState {state}")
    return pending("resource", url)


def _from_status(body: dict[str, Any], url: str, what: str) -> Progress:
    """An Azure-AsyncOperation body: `status` InProgress until Succeeded/Failed/Canceled."""
    state = str(body.get("status") or "")
    if state.casefold() == "succeeded":
        return SUCCEEDED
    if state.casefold() in TERMINAL_FAILURES:
        error = as_object(body.get("error"))
        reason = f"{error.get('code') or state}: {error.get('message') or 'no message'}"
        return Progress("failed", redact(f"{what}: {reason}")[:500])
    if not state:
        raise PermanentRemoteError(f"{what}: the operation status has no 'status'")
    return pending("async", url)
