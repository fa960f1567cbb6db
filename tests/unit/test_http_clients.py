"""The BES and Classic endpoint clients against the contracts, over mocked HTTP."""

from __future__ import annotations

import itertools
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import requests
import responses
import urllib3.util.retry
from responses import matchers

from retrain.bes import BesClient, JobState, parse_state
from retrain.deploy import ClassicEndpoint
from retrain.errors import ConfigError, PermanentRemoteError, RemoteError, TransientRemoteError
from retrain.http import MAX_RETRY_WAIT, call, make_session, redact, worst_call
from retrain.ports import ModelRef
from tests.client_support import EP, JOBS, REF, bes, classic
from tests.fakes import blob_reader


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
    assert isinstance(info.value, TransientRemoteError)
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
    assert isinstance(info.value, PermanentRemoteError)


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
    model = ModelRef("c", "m.ilearner")
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
    with pytest.raises(ConfigError, match="default endpoint"):
        ClassicEndpoint(
            EP.replace("prod", "default"),
            "k",
            "M",
            read=blob_reader(),
            session=make_session(),
            timeout=(1, 1),
        )


def test_redaction_removes_query_strings_and_signatures() -> None:
    text = redact("GET https://a.blob.core.windows.net/c/b?sv=1&sig=abc123 failed; sig=xyz")
    assert "abc123" not in text
    assert "xyz" not in text
    assert "https://a.blob.core.windows.net/c/b?<redacted>" in text


class _StatusServer:
    """A loopback BES status endpoint that records when each request arrived.

    `script` says how to answer each request in turn: "drop" closes the connection without an
    answer, an int is a status code (503 carries `Retry-After: <retry_after>` when set), and
    anything after the script answers 200 with a finished job.
    """

    def __init__(self, script: list[str | int], retry_after: str | None = None) -> None:
        self.script = list(script)
        self.retry_after = retry_after
        self.arrivals: list[float] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: object) -> None:
                pass

            def do_GET(self) -> None:
                outer.arrivals.append(time.monotonic())
                step = outer.script.pop(0) if outer.script else 200
                if step == "drop":
                    self.close_connection = True
                    self.connection.close()
                    return
                if step == "cut":  # headers and half the body, then the connection breaks
                    self.send_response(200)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Transfer-Encoding", "chunked")
                    self.end_headers()
                    self.wfile.write(b'40\r\n{"StatusCode": "Fini')
                    self.wfile.flush()
                    self.close_connection = True
                    self.connection.close()
                    return
                status = int(step)
                data = json.dumps(
                    {"StatusCode": "Finished" if status == 200 else "Failed", "Results": None}
                ).encode()
                self.send_response(status)
                if status != 200 and outer.retry_after is not None:
                    self.send_header("Retry-After", outer.retry_after)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> str:
        self.thread.start()
        port = self.httpd.server_address[1]
        return f"http://127.0.0.1:{port}/workspaces/w/services/s/jobs"

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def test_a_dropped_status_answer_is_asked_again_no_sooner_than_1_s() -> None:
    server = _StatusServer(["drop"])
    with server as jobs:
        client = BesClient(jobs, "k", session=make_session(), timeout=(2, 2))
        assert client.status("abc").state is JobState.FINISHED
    first, second = server.arrivals
    assert second - first >= 1.0


def test_an_answer_cut_off_mid_body_is_transient_not_a_failed_run() -> None:
    """The service may have acted; as after a timeout, the caller tries again later."""
    with _StatusServer(["cut"]) as jobs:
        client = BesClient(jobs, "k", session=make_session(), timeout=(2, 2))
        with pytest.raises(TransientRemoteError, match="cut off"):
            client.status("abc")


def test_retries_keep_1_s_between_polls_of_a_job_even_with_retry_after_0() -> None:
    server = _StatusServer(["drop", 503], retry_after="0")
    with server as jobs:
        client = BesClient(jobs, "k", session=make_session(backoff=0), timeout=(2, 2))
        assert client.status("abc").state is JobState.FINISHED
    gaps = [b - a for a, b in itertools.pairwise(server.arrivals)]
    assert len(gaps) == 2
    assert min(gaps) >= 1.0


@pytest.mark.parametrize("max_wait", [None, 2])
def test_a_huge_retry_after_is_cut_inside_the_call(
    monkeypatch: pytest.MonkeyPatch, max_wait: int | None
) -> None:
    """Cut to the session's longest wait (RETRAIN_HTTP_MAX_RETRY_WAIT, 5 s by default), which
    is what the call bound and the leases derived from it count on."""
    waits: list[float] = []

    class RecordingTime:
        """The clock urllib3's Retry reads; records the waits it asks for instead of waiting."""

        time = staticmethod(time.time)

        @staticmethod
        def sleep(seconds: float) -> None:
            waits.append(seconds)

    monkeypatch.setattr(urllib3.util.retry, "time", RecordingTime)
    session = make_session() if max_wait is None else make_session(max_wait=max_wait)
    with _StatusServer([503], retry_after="86400") as jobs:
        client = BesClient(jobs, "k", session=session, timeout=(2, 2))
        assert client.status("abc").state is JobState.FINISHED
    longest = MAX_RETRY_WAIT if max_wait is None else max_wait
    assert waits == [longest]  # not a day
    assert worst_call(2, 2, longest) == 4 * 5 + longest * 4


def prober() -> BesClient:
    return BesClient(
        JOBS,
        "the-key",
        session=make_session(),
        timeout=(1, 1),
        key_setting="RETRAIN_BES_KEY_HOUSING",
    )


@responses.activate
def test_probe_passes_on_404_for_a_job_that_cannot_exist() -> None:
    responses.get(
        f"{JOBS}/{'0' * 32}",
        status=404,
        match=[matchers.header_matcher({"Authorization": "Bearer the-key"})],
    )
    assert prober().probe() == "BES service answers and accepts the key"
    assert [c.request.method for c in responses.calls] == ["GET"]


@pytest.mark.parametrize("status", [401, 403])
@responses.activate
def test_probe_names_the_key_setting_when_the_key_is_refused(status: int) -> None:
    responses.get(f"{JOBS}/{'0' * 32}", status=status)
    with pytest.raises(RemoteError, match="RETRAIN_BES_KEY_HOUSING") as info:
        prober().probe()
    assert isinstance(info.value, PermanentRemoteError)
    assert "the-key" not in str(info.value)


@pytest.mark.parametrize("status", [200, 400])
@responses.activate
def test_probe_says_the_url_is_suspect_on_any_other_answer(status: int) -> None:
    responses.get(f"{JOBS}/{'0' * 32}", status=status, json={"StatusCode": "Running"})
    with pytest.raises(RemoteError, match=f"should answer 404, got HTTP {status}.*jobs_url"):
        prober().probe()


def test_a_storage_error_quoting_a_signed_url_is_redacted() -> None:
    """A copy whose source answers with an error can quote the source URL, SAS and all."""
    from azure.core.exceptions import HttpResponseError

    from retrain.storage import storage_error

    exc = HttpResponseError(
        message="CannotVerifyCopySource: https://acct.blob.core.windows.net/data/a.csv"
        "?sv=2024-11-04&sp=r&sig=c2VjcmV0c2lnbmF0dXJl%3D"
    )
    text = str(storage_error("freeze data/a.csv", exc))
    assert "c2VjcmV0c2lnbmF0dXJl" not in text
    assert "freeze data/a.csv" in text


@responses.activate
@pytest.mark.parametrize(
    ("method", "answer", "unanswered"),
    [
        ("PUT", {"body": requests.exceptions.ReadTimeout("read timed out")}, True),
        ("POST", {"body": requests.exceptions.ConnectionError("reset")}, True),
        ("PUT", {"status": 504}, True),  # a gateway's answer, not the service's
        ("PATCH", {"status": 502}, True),
        ("PUT", {"status": 503}, False),  # the service answered: it did not act
        ("PUT", {"status": 429}, False),
        ("GET", {"body": requests.exceptions.ReadTimeout("read timed out")}, False),
        ("GET", {"status": 504}, False),
    ],
)
def test_a_change_with_no_answer_is_told_from_an_answered_failure(
    method: str, answer: dict[str, object], unanswered: bool
) -> None:
    """A change that got no answer may still be acted on by the service: the pipeline must not
    send it again before the call's worst case has passed. A read, or an answered refusal,
    leaves nothing to wait for."""
    url = "https://svc.example.net/thing"
    responses.add(method, url, **answer)  # type: ignore[arg-type]
    session = requests.Session()  # no retries: one call
    with pytest.raises(RemoteError) as info:
        call(session, method, url, what=f"{method} thing", timeout=(1, 1), headers={})
    assert info.value.change_unanswered is unanswered
