"""The BES and Classic endpoint clients against the contracts, over mocked HTTP."""

from __future__ import annotations

import json

import pytest
import responses
from responses import matchers

from retrain.bes import BesClient, BlobRef, JobState, parse_state
from retrain.deploy import ClassicEndpoint
from retrain.errors import RemoteError
from retrain.http import make_session, redact

JOBS = "https://ussouthcentral.services.azureml.net/workspaces/w/services/s/jobs"
EP = "https://management.azureml.net/workspaces/w/webservices/p/endpoints/prod"
REF = BlobRef("https://acct.blob.core.windows.net/", "c/in.csv", "?sv=1&sp=r&sig=SECRETSIG")


def bes() -> BesClient:
    return BesClient(JOBS, "the-key", session=make_session(backoff=0), timeout=(1, 1))


@responses.activate
def test_submit_sends_the_documented_body_and_returns_the_unquoted_id() -> None:
    responses.post(
        JOBS,
        json="539d0bc2fde945b6ac986b851d0000f0",
        match=[
            matchers.query_param_matcher({"api-version": "2.0"}),
            matchers.header_matcher({"Authorization": "Bearer the-key"}),
        ],
    )
    job = bes().submit(
        inputs={"input1": REF}, outputs={"output1": REF}, global_parameters={"Label": "price"}
    )
    assert job == "539d0bc2fde945b6ac986b851d0000f0"
    body = json.loads(responses.calls[0].request.body)
    assert body == {
        "Inputs": {
            "input1": {
                "ConnectionString": None,
                "BaseLocation": "https://acct.blob.core.windows.net/",
                "RelativeLocation": "c/in.csv",
                "SasBlobToken": "?sv=1&sp=r&sig=SECRETSIG",
            }
        },
        "Outputs": {"output1": body["Inputs"]["input1"]},
        "GlobalParameters": {"Label": "price"},
    }


@responses.activate
def test_submit_is_never_retried_on_a_server_error() -> None:
    responses.post(JOBS, status=503, body="busy")
    with pytest.raises(RemoteError) as info:
        bes().submit(inputs={}, outputs={}, global_parameters={})
    assert info.value.retryable
    assert len(responses.calls) == 1


@responses.activate
def test_status_get_is_retried_on_503_then_parsed() -> None:
    url = f"{JOBS}/abc"
    responses.get(url, status=503)
    responses.get(
        url,
        json={
            "StatusCode": "Finished",
            "Details": None,
            "Results": {
                "output1": {
                    "ConnectionString": None,
                    "BaseLocation": "https://a/",
                    "RelativeLocation": "c/m.ilearner",
                    "SasBlobToken": "?sig=x",
                }
            },
        },
    )
    status = bes().status("abc")
    assert status.state is JobState.FINISHED
    assert status.outputs["output1"].relative_location == "c/m.ilearner"
    assert len(responses.calls) == 2


@responses.activate
def test_status_with_the_doc_typo_key_and_failed_details() -> None:
    responses.get(f"{JOBS}/abc", json={"Status Code": 2, "Results": None, "Details": "boom"})
    status = bes().status("abc")
    assert (status.state, status.details) == (JobState.FAILED, "boom")


@responses.activate
def test_html_error_page_is_a_clear_error() -> None:
    responses.get(
        f"{JOBS}/abc",
        body="<html><body>Gateway</body></html>",
        status=200,
        content_type="text/html",
    )
    with pytest.raises(RemoteError, match="expected JSON, got text/html"):
        bes().status("abc")


@responses.activate
def test_401_says_the_key_is_wrong_and_is_not_retryable() -> None:
    responses.get(f"{JOBS}/abc", status=401, json={"error": "nope"})
    with pytest.raises(RemoteError, match="API key is wrong") as info:
        bes().status("abc")
    assert not info.value.retryable


@responses.activate
def test_429_carries_retry_after() -> None:
    responses.post(JOBS, status=429, headers={"Retry-After": "12"})
    with pytest.raises(RemoteError) as info:
        bes().submit(inputs={}, outputs={}, global_parameters={})
    assert info.value.retry_after == 12


@pytest.mark.parametrize(
    ("value", "state"),
    [
        (0, JobState.NOT_STARTED),
        ("1", JobState.RUNNING),
        ("Not started", JobState.NOT_STARTED),
        ("Canceled", JobState.CANCELLED),
        ("cancelled", JobState.CANCELLED),
        (4, JobState.FINISHED),
        ("FINISHED", JobState.FINISHED),
    ],
)
def test_status_codes_are_normalised(value: object, state: JobState) -> None:
    assert parse_state(value) is state


def classic() -> ClassicEndpoint:
    return ClassicEndpoint(
        EP, "ep-key", "M [trained model]", session=make_session(backoff=0), timeout=(1, 1)
    )


@responses.activate
def test_patch_sends_resources_then_verifies_with_get() -> None:
    def endpoint_with(location: str) -> dict[str, object]:
        return {
            "Name": "prod",
            "Resources": [
                {
                    "Name": "M [trained model]",
                    "Kind": "TrainedModel",
                    "Location": {"RelativeLocation": location},
                }
            ],
        }

    responses.get(EP, json=endpoint_with("c/old.ilearner"))
    responses.get(EP, json=endpoint_with("/c/m.ilearner"))
    responses.patch(
        EP, status=200, body="", match=[matchers.header_matcher({"Authorization": "Bearer ep-key"})]
    )
    model = BlobRef("https://acct.blob.core.windows.net/", "c/m.ilearner", "?sp=r&sig=S")
    endpoint = classic()
    assert endpoint.deploy(model).state == "succeeded"
    assert [c.request.method for c in responses.calls] == ["GET", "PATCH"]
    assert json.loads(responses.calls[1].request.body) == {
        "Resources": [
            {
                "Name": "M [trained model]",
                "Location": {
                    "BaseLocation": "https://acct.blob.core.windows.net/",
                    "RelativeLocation": "c/m.ilearner",
                    "SasBlobToken": "?sp=r&sig=S",
                },
            }
        ]
    }
    assert endpoint.serves(model)


@responses.activate
def test_wrong_resource_name_suggests_close_matches() -> None:
    responses.get(EP, json={"Resources": [{"Name": "M [Trained Model]"}]})
    with pytest.raises(RemoteError, match=r"did you mean \['M \[Trained Model\]'\]"):
        classic().preflight()


def test_default_endpoint_is_refused() -> None:
    with pytest.raises(ValueError, match="default endpoint"):
        ClassicEndpoint(
            EP.replace("prod", "default"), "k", "M", session=make_session(), timeout=(1, 1)
        )


def test_redaction_removes_query_strings_and_signatures() -> None:
    text = redact("GET https://a.blob.core.windows.net/c/b?sv=1&sig=abc123 failed; sig=xyz")
    assert "abc123" not in text
    assert "xyz" not in text
    assert "https://a.blob.core.windows.net/c/b?<redacted>" in text
