"""The New (ARM) web service client against the ARM contract, over mocked HTTP."""

from __future__ import annotations

import copy
import json
import re
from typing import Any

import pytest
import responses
from responses import matchers

from retrain.errors import PermanentRemoteError, RemoteError, TransientRemoteError
from tests.client_support import ARM, MODEL, NEW_URI, definition
from tests.client_support import ARM_URL as URL
from tests.client_support import new_web_service as client


@responses.activate
def test_patch_sends_a_minimal_body_with_only_the_uri_changed() -> None:
    current = definition()
    responses.get(
        URL,
        json=current,
        match=[
            matchers.query_param_matcher({"api-version": "2017-01-01"}),
            matchers.header_matcher({"Authorization": "Bearer tok"}),
        ],
    )
    responses.patch(
        URL,
        json=definition(NEW_URI, "Provisioning"),
        headers={"Azure-AsyncOperation": f"{ARM}/ops/1?api-version=2017-01-01"},
    )
    progress = client().deploy(MODEL)
    assert (progress.state, progress.operation) == (
        "pending",
        f"{ARM}/ops/1?api-version=2017-01-01",
    )
    body = json.loads(responses.calls[1].request.body)
    expected = copy.deepcopy(current["properties"]["assets"])
    expected["tm"]["locationInfo"]["uri"] = NEW_URI
    assert body == {
        "location": "South Central US",
        "properties": {"packageType": "Graph", "assets": expected},
    }


@responses.activate
def test_operation_status_succeeded_failed_and_running() -> None:
    op = f"{ARM}/ops/1?api-version=2017-01-01"
    responses.get(op, json={"status": "InProgress"})
    responses.get(op, json={"status": "Failed", "error": {"code": "Bad", "message": "no model"}})
    responses.get(op, json={"provisioningState": "Succeeded"})
    c = client()
    assert c.progress(op).state == "pending"
    failed = c.progress(op)
    assert (failed.state, failed.detail) == ("failed", "Bad: no model")
    assert c.progress(op).state == "succeeded"
    with pytest.raises(RemoteError, match="outside"):
        c.progress("https://elsewhere.example/op")


@responses.activate
def test_without_an_operation_header_the_resource_is_polled() -> None:
    responses.get(URL, json=definition(NEW_URI, "Provisioning"))
    responses.get(URL, json=definition(NEW_URI, "Succeeded"))
    c = client()
    assert c.progress(None).state == "pending"
    assert c.serves(MODEL)


@responses.activate
def test_already_serving_or_provisioning_the_model_does_not_patch_again() -> None:
    responses.get(URL, json=definition(NEW_URI, "Succeeded"))
    responses.get(URL, json=definition(NEW_URI, "Provisioning"))
    c = client()
    assert c.deploy(MODEL).state == "succeeded"
    assert c.deploy(MODEL).state == "pending"
    assert all(call.request.method == "GET" for call in responses.calls)


@pytest.mark.parametrize(
    ("props", "asset_name", "message"),
    [
        ({"readOnly": True}, None, "is read-only"),
        ({"payloadsInBlobStorage": True}, None, "blob storage"),
        ({}, "Other [trained model]", "no Resource asset named 'Other [trained model]'"),
    ],
)
@responses.activate
def test_unusable_definitions_are_refused(
    props: dict[str, Any], asset_name: str | None, message: str
) -> None:
    responses.get(URL, json=definition(**props))
    with pytest.raises(RemoteError, match=re.escape(message)):
        client(asset_name).preflight()


@pytest.mark.parametrize(
    ("status", "message", "kind"),
    [
        (401, "Contributor role", PermanentRemoteError),
        (403, "Contributor role", PermanentRemoteError),
        (404, "web service ws not found", PermanentRemoteError),
        (409, "in progress", TransientRemoteError),
    ],
)
@responses.activate
def test_arm_errors_say_what_to_do(status: int, message: str, kind: type[RemoteError]) -> None:
    responses.get(URL, status=status, json={"error": {"code": "X"}})
    with pytest.raises(RemoteError, match=message) as info:
        client().get()
    assert type(info.value) is kind
