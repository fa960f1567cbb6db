"""The error tree: each error says by its class what the caller must do."""

from __future__ import annotations

import pytest
import responses

from retrain.arm import NewWebService, StaticToken
from retrain.deploy import ClassicEndpoint
from retrain.errors import (
    ConfigError,
    DocumentMissing,
    EvaluationError,
    IllegalTransition,
    InputRejected,
    MessageError,
    PermanentError,
    PermanentRemoteError,
    RemoteError,
    StateConflict,
    TransientError,
    TransientRemoteError,
    UsageError,
)
from retrain.http import call, make_session
from retrain.ports import ModelRef
from retrain.storage import BlobUnreadable
from tests.fakes import blob_reader

URL = "https://svc.example/op"
NOT_A_MODEL = ModelRef("artifacts", "run/model.bin")


class TestTheTree:
    @pytest.mark.parametrize(
        ("error", "kind"),
        [
            (StateConflict, TransientError),
            (TransientRemoteError, TransientError),
            (MessageError, PermanentError),
            (EvaluationError, PermanentError),
            (IllegalTransition, PermanentError),
            (DocumentMissing, PermanentError),
            (PermanentRemoteError, PermanentError),
            (BlobUnreadable, PermanentError),
            (ConfigError, UsageError),
            (InputRejected, UsageError),
        ],
    )
    def test_each_error_is_of_exactly_one_kind(
        self, error: type[Exception], kind: type[Exception]
    ) -> None:
        assert [
            k for k in (TransientError, PermanentError, UsageError) if issubclass(error, k)
        ] == [kind]

    def test_a_remote_error_must_say_whether_it_is_transient(self) -> None:
        with pytest.raises(TypeError, match="TransientRemoteError or PermanentRemoteError"):
            RemoteError("GET x: HTTP 500")

    def test_a_transient_remote_error_carries_status_and_retry_after(self) -> None:
        exc = TransientRemoteError("GET x: HTTP 429", status=429, retry_after=7)
        assert (exc.status, exc.retry_after) == (429, 7)
        assert StateConflict("k changed").retry_after is None


class TestHttpCallsAreSortedByWhatToDo:
    @responses.activate
    def test_a_busy_service_is_transient_with_its_retry_after(self) -> None:
        responses.post(URL, status=503, headers={"Retry-After": "30"})
        with pytest.raises(TransientRemoteError) as info:
            call(make_session(total_retries=0), "POST", URL, what="op", timeout=(1, 1), headers={})
        assert (info.value.status, info.value.retry_after) == (503, 30)

    @responses.activate
    def test_a_refused_request_is_permanent(self) -> None:
        responses.post(URL, status=400, json={"error": "bad input"})
        with pytest.raises(PermanentRemoteError, match="HTTP 400"):
            call(make_session(total_retries=0), "POST", URL, what="op", timeout=(1, 1), headers={})


class TestTargetsRefuseWhatIsNotAModel:
    """A model reference that is not an .ilearner blob is a bug upstream: a permanent error
    that is not a remote one, so no handler mistakes it for the service's answer."""

    def test_classic(self) -> None:
        target = ClassicEndpoint(
            "https://management.azureml.net/workspaces/w/webservices/p/endpoints/prod",
            "k",
            "M",
            read=blob_reader(),
            session=make_session(),
            timeout=(1, 1),
        )
        with pytest.raises(PermanentError, match=r"\.ilearner") as info:
            target.deploy(NOT_A_MODEL)
        assert not isinstance(info.value, RemoteError)

    def test_new(self) -> None:
        target = NewWebService(
            arm_endpoint="https://management.azure.com",
            subscription_id="s",
            resource_group="rg",
            name="ws",
            asset_name=None,
            api_version="2017-01-01",
            credential=StaticToken("t"),
            read=blob_reader(),
            session=make_session(),
            timeout=(1, 1),
        )
        with pytest.raises(PermanentError, match=r"\.ilearner") as info:
            target.deploy(NOT_A_MODEL)
        assert not isinstance(info.value, RemoteError)

    def test_the_default_classic_endpoint_is_a_configuration_error(self) -> None:
        with pytest.raises(ConfigError, match="default endpoint"):
            ClassicEndpoint(
                "https://management.azureml.net/workspaces/w/webservices/p/endpoints/default",
                "k",
                "M",
                read=blob_reader(),
                session=make_session(),
                timeout=(1, 1),
            )
