"""Replies of a wrong shape are typed errors naming the field; service texts carry no secret."""

from __future__ import annotations

import json
from typing import Any

import pytest
import responses

from retrain.bes import JobState
from retrain.errors import PermanentRemoteError, RemoteError
from retrain.http import redact
from tests.client_support import ARM_URL as URL
from tests.client_support import EP, JOBS, MODEL, REF, bes, classic, definition
from tests.client_support import new_web_service as client
from tests.fakes import FakeJobs

SAS = (
    "?sv=2021-08-06&st=2026-01-01T00%3A00%3A00Z&se=2026-01-02T00%3A00%3A00Z&sr=b&sp=r"
    "&sig=Zm9vYmFyYmF6cXV4MTIzNDU2Nzg5MA%3D%3D"
)
URL_WITH_SAS = "https://acct.blob.core.windows.net/data/housing/a.csv" + SAS


@pytest.mark.parametrize(
    ("reply", "named"),
    [
        ({"StatusCode": "Finished", "Results": ["output1"]}, "Results should be a JSON object"),
        ({"StatusCode": "Finished", "Results": "x"}, "Results should be a JSON object"),
        (
            {"StatusCode": "Finished", "Results": {"output1": ["a"]}},
            "Results['output1']: the reference should be a JSON object, got list",
        ),
        (
            {"StatusCode": "Finished", "Results": {"output1": {"BaseLocation": 7}}},
            "BaseLocation should be a string, got int 7",
        ),
        (
            {
                "StatusCode": "Finished",
                "Results": {"output1": {"BaseLocation": "https://a/", "RelativeLocation": None}},
            },
            "RelativeLocation should be a string, got NoneType null",
        ),
        ([1, 2], "the reply should be a JSON object, got list"),
    ],
)
@responses.activate
def test_bes_status_of_the_wrong_shape_is_a_remote_error_naming_the_field(
    reply: Any, named: str
) -> None:
    responses.get(f"{JOBS}/abc", json=reply)
    with pytest.raises(RemoteError) as info:
        bes().status("abc")
    assert named in str(info.value)
    assert str(info.value).startswith("BES status abc")
    assert isinstance(info.value, PermanentRemoteError)


@responses.activate
def test_bes_submit_reply_of_the_wrong_shape_names_it() -> None:
    responses.post(JOBS, json={"Id": "x"})
    with pytest.raises(RemoteError, match=r"BES submit: the reply should be a job id string"):
        bes().submit(inputs={"input1": REF}, outputs={}, global_parameters={})


@pytest.mark.parametrize(
    ("endpoint", "named"),
    [
        ({"Resources": {"Name": "M [trained model]"}}, "Resources should be a JSON array"),
        ({"Resources": ["M [trained model]"]}, "Resources[0] should be a JSON object"),
        (
            {"Resources": [{"Name": "M [trained model]", "Location": "https://x/m.ilearner"}]},
            "Location should be a JSON object, got str",
        ),
        (
            {"Resources": [{"Name": "M [trained model]", "Location": {"RelativeLocation": 3}}]},
            "RelativeLocation should be a string, got int",
        ),
    ],
)
@responses.activate
def test_classic_endpoint_reply_of_the_wrong_shape_names_the_field(
    endpoint: dict[str, Any], named: str
) -> None:
    responses.get(EP, json=endpoint)
    with pytest.raises(RemoteError) as info:
        classic().serves(MODEL)
    assert named in str(info.value)


@pytest.mark.parametrize(
    ("change", "named"),
    [
        (lambda d: d["properties"].update(assets=["tm"]), "assets should be a JSON object"),
        (
            lambda d: d["properties"]["assets"]["tm"].update(locationInfo="https://x"),
            "asset tm: locationInfo should be a JSON object, got str",
        ),
        (
            lambda d: d["properties"]["assets"]["tm"].update(locationInfo={"uri": 5}),
            "uri should be a string, got int",
        ),
        (lambda d: d.update(properties=[]), "properties should be a JSON object"),
    ],
)
@responses.activate
def test_arm_reply_of_the_wrong_shape_names_the_field(change: Any, named: str) -> None:
    service = definition()
    change(service)
    responses.get(URL, json=service)
    with pytest.raises(RemoteError) as info:
        client().serves(MODEL)
    assert named in str(info.value)


@pytest.mark.parametrize(
    "text",
    [
        f"Error 0000: cannot read {URL_WITH_SAS} (403)",
        f"the token {SAS} was refused",
        f"token {SAS[1:]} was refused",
        "bare sig=Zm9vYmFyYmF6cXV4MTIzNDU2Nzg5MA%3D%3D in the text",
        "DefaultEndpointsProtocol=https;AccountName=a;AccountKey=Zm9vYmFy+/Zm9v==;EndpointSuffix=x",
        "Authorization: Bearer eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxIn0.c2lnbmF0dXJl",
    ],
)
def test_redact_removes_every_kind_of_secret(text: str) -> None:
    cleaned = redact(text)
    for secret in ("Zm9vYmFy", "sig=Zm", "eyJhbGci", "2021-08-06"):
        assert secret not in cleaned
    assert redact(cleaned) == cleaned


@responses.activate
def test_failed_job_details_echoing_the_input_url_carry_no_sas() -> None:
    details = f"Error 0000: the input {URL_WITH_SAS} could not be read"
    responses.get(f"{JOBS}/abc", json={"StatusCode": "Failed", "Results": None, "Details": details})
    status = bes().status("abc")
    assert status.state is JobState.FAILED
    assert status.details is not None
    assert "sig=" not in status.details
    assert "data/housing/a.csv?<redacted>" in status.details


@responses.activate
def test_an_error_body_echoing_a_sas_or_a_key_is_redacted_in_the_error() -> None:
    responses.get(
        EP, status=400, json={"message": f"cannot read {URL_WITH_SAS}; AccountKey=Zm9vYmFy=="}
    )
    with pytest.raises(RemoteError) as info:
        classic().serves(MODEL)
    assert "Zm9vYmFy" not in str(info.value)


def test_a_remote_error_never_holds_a_signature() -> None:
    assert "Zm9v" not in str(PermanentRemoteError(f"storage read: {URL_WITH_SAS}"))


@responses.activate
def test_arm_provisioning_error_text_is_redacted() -> None:
    operation = "https://management.azure.com/operations/op1"
    responses.get(
        operation,
        json={"status": "Failed", "error": {"code": "BadUri", "message": f"no {URL_WITH_SAS}"}},
    )
    progress = client().progress(operation)
    assert progress.state == "failed"
    assert progress.detail is not None
    assert "sig=" not in progress.detail


def test_a_failed_run_stores_logs_and_announces_no_signature(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The last line of defence: even a backend that does not redact its Details leaks nothing."""
    from retrain.messages import RunEvent
    from retrain.pipeline import Places
    from tests.harness import World

    w = World(jobs=FakeJobs([JobState.FAILED], details=f"cannot read {URL_WITH_SAS}; {SAS}"))
    w.retrainer._ctx.places = Places("data", "artifacts", "quarantine", "jobs", "evals", "events")
    caplog.set_level("DEBUG")
    w.drop("housing/a.csv")
    events: list[RunEvent] = []
    for _ in range(5):
        events += [m for _, m, _ in w.outbox.sent if isinstance(m, RunEvent)]
        w.outbox.sent = [s for s in w.outbox.sent if not isinstance(s[1], RunEvent)]
        w.deliver()
    run = w.run()
    assert run["state"] == "failed"
    assert "data/housing/a.csv?<redacted>" in run["error"]
    stored = json.dumps(run)
    assert events[-1].state == "failed"
    for text in (stored, *(e.model_dump_json() for e in events), caplog.text):
        assert "sig=Zm9v" not in text
        assert "Zm9vYmFy" not in text
