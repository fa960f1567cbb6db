"""The v2 workspace client: api-version, token, ARM error shape, and what each status means."""

from __future__ import annotations

import pytest
import responses
from responses import matchers

from retrain.azureml.workspace import ROLE_HINT, WorkspaceRef
from retrain.errors import PermanentRemoteError, TransientRemoteError
from tests.azureml_support import API, TOKEN, WS, arm


@responses.activate
def test_workspace_get_sends_the_spec_api_version_and_the_bearer_token() -> None:
    responses.get(
        WS,
        json={
            "location": "westeurope",
            "properties": {
                "mlFlowTrackingUri": "azureml://westeurope.api.azureml.ms/mlflow/v1.0/x",
                "discoveryUrl": "https://westeurope.api.azureml.ms/discovery",
            },
        },
        match=[matchers.query_param_matcher(API), matchers.header_matcher(TOKEN)],
    )
    info = arm().workspace_info()
    assert info.mlflow_tracking_uri.startswith("azureml://westeurope")
    assert info.discovery_url == "https://westeurope.api.azureml.ms/discovery"
    assert info.location == "westeurope"


@responses.activate
def test_a_workspace_without_a_tracking_uri_is_a_clear_shape_error() -> None:
    responses.get(WS, json={"properties": {}})
    with pytest.raises(PermanentRemoteError, match="mlFlowTrackingUri"):
        arm().workspace_info()


@responses.activate
def test_the_arm_error_body_is_read_into_the_message() -> None:
    responses.get(
        WS,
        status=400,
        json={
            "error": {
                "code": "UserError",
                "message": "The request is invalid.",
                "details": [{"code": "Validation", "message": "jobType is required"}],
            }
        },
    )
    with pytest.raises(PermanentRemoteError) as info:
        arm().workspace_info()
    text = str(info.value)
    assert "UserError: The request is invalid." in text
    assert "Validation: jobType is required" in text
    assert info.value.status == 400


@responses.activate
def test_403_names_the_role_the_identity_needs() -> None:
    responses.get(
        WS,
        status=403,
        json={"error": {"code": "AuthorizationFailed", "message": "no access"}},
    )
    with pytest.raises(PermanentRemoteError) as info:
        arm().workspace_info()
    assert ROLE_HINT in str(info.value)
    assert "AzureML Data Scientist" in str(info.value)


@pytest.mark.parametrize("status", [429, 500, 503])
@responses.activate
def test_429_and_5xx_are_transient_and_carry_retry_after(status: int) -> None:
    responses.put(WS + "/jobs/j", status=status, headers={"Retry-After": "30"}, json={})
    client = arm()
    with pytest.raises(TransientRemoteError) as info:
        client.request("PUT", client.url("/jobs/j"), "PUT job j", {"properties": {}})
    assert info.value.retry_after == 30


@responses.activate
def test_a_get_that_meets_a_503_is_retried_inside_the_call() -> None:
    responses.get(WS, status=503, headers={"Retry-After": "0"})
    responses.get(WS, json={"properties": {"mlFlowTrackingUri": "azureml://h/x"}})
    assert arm(retries=2).workspace_info().mlflow_tracking_uri == "azureml://h/x"


@responses.activate
def test_409_is_transient_by_default_but_permanent_when_asked() -> None:
    client = arm()
    body = {"error": {"code": "Conflict", "message": "another operation is running"}}
    responses.put(WS + "/x", status=409, json=body)
    with pytest.raises(TransientRemoteError, match="in progress"):
        client.request("PUT", client.url("/x"), "PUT x", {})
    with pytest.raises(PermanentRemoteError, match="another operation"):
        client.request("PUT", client.url("/x"), "PUT x", {}, conflict_is_transient=False)


@responses.activate
def test_no_token_is_sent_to_a_url_outside_the_arm_endpoint() -> None:
    with pytest.raises(PermanentRemoteError, match="outside"):
        arm().check_own("https://evil.example/op?sig=abc")
    assert len(responses.calls) == 0


def test_the_long_datastore_form_names_the_workspace() -> None:
    ws = WorkspaceRef("sub", "rg", "ws")
    assert ws.long_datastore_uri("azureml://datastores/store/paths/a/b/") == (
        "azureml://subscriptions/sub/resourceGroups/rg/workspaces/ws/datastores/store/paths/a/b/"
    )
    with pytest.raises(PermanentRemoteError, match="not a datastore URI"):
        ws.long_datastore_uri("https://acct.blob.core.windows.net/c/a")
