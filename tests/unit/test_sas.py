"""SAS signing without an account key: user delegation keys, cached and renewed in time."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import parse_qs

import pytest
from azure.core.exceptions import ClientAuthenticationError, HttpResponseError
from azure.storage.blob import BlobSasPermissions, BlobServiceClient, UserDelegationKey

from retrain.blobdata import BlobData
from retrain.errors import ConfigError, PermanentRemoteError, TransientRemoteError
from retrain.sas import (
    KEY_MAX_LIFETIME,
    DelegationSigner,
    access_problem,
    signer_for,
)

T0 = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)
READ = BlobSasPermissions(read=True)


class FakeBlobService:
    """The two things a DelegationSigner asks of a BlobServiceClient, and a count of keys."""

    def __init__(self, url: str = "https://acct.blob.core.windows.net/") -> None:
        self.url = url
        self.account_name = "acct"
        self.requests: list[tuple[datetime, datetime]] = []
        self.fail: Exception | None = None

    def get_user_delegation_key(self, start: datetime, expiry: datetime) -> UserDelegationKey:
        if self.fail is not None:
            raise self.fail
        self.requests.append((start, expiry))
        key = UserDelegationKey()
        key.signed_oid = "00000000-0000-0000-0000-0000000000aa"
        key.signed_tid = "00000000-0000-0000-0000-0000000000bb"
        key.signed_start = start.strftime("%Y-%m-%dT%H:%M:%SZ")
        key.signed_expiry = expiry.strftime("%Y-%m-%dT%H:%M:%SZ")
        key.signed_service = "b"
        key.signed_version = "2025-01-05"
        key.value = "a2V5LXZhbHVl"
        return key


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> datetime:
        return self.now


def signer(service: FakeBlobService, clock: Clock) -> DelegationSigner:
    fake: Any = service
    return DelegationSigner(fake, now=clock)


def query(token: str) -> dict[str, str]:
    return {k: v[0] for k, v in parse_qs(token).items()}


def test_one_key_signs_many_tokens_and_each_token_is_blob_scoped_https_only() -> None:
    service, clock = FakeBlobService(), Clock()
    sign = signer(service, clock)
    first = query(sign.sign("c", "a.csv", READ, T0 + timedelta(hours=7)))
    clock.now += timedelta(hours=1)
    second = query(sign.sign("c", "b.csv", READ, clock.now + timedelta(hours=7)))
    assert len(service.requests) == 1
    for token in (first, second):
        assert token["sr"] == "b"  # one blob
        assert token["sp"] == "r"
        assert token["spr"] == "https"
        assert token["skoid"] == "00000000-0000-0000-0000-0000000000aa"
        assert token["sig"]
    start, until = service.requests[0]
    assert start < T0  # a token starting a few minutes back is inside the key
    assert until >= T0 + timedelta(hours=7)


def test_a_key_is_renewed_shortly_before_it_expires() -> None:
    service, clock = FakeBlobService(), Clock()
    sign = signer(service, clock)
    sign.sign("c", "a.csv", READ, T0 + timedelta(hours=1))
    (_, until) = service.requests[0]
    clock.now = until - timedelta(minutes=5)
    sign.sign("c", "a.csv", READ, clock.now + timedelta(minutes=1))
    assert len(service.requests) == 2
    assert service.requests[1][1] > until


def test_a_token_outliving_the_cached_key_gets_a_key_that_covers_it() -> None:
    service, clock = FakeBlobService(), Clock()
    sign = signer(service, clock)
    sign.sign("c", "a.csv", READ, T0 + timedelta(hours=1))
    deadline = T0 + timedelta(days=3)
    token = query(sign.sign("c", "b.csv", READ, deadline))
    assert len(service.requests) == 2
    assert service.requests[1][1] >= deadline
    assert token["ske"] >= deadline.strftime("%Y-%m-%dT%H:%M:%SZ")


def test_a_token_past_the_longest_key_names_the_setting_to_shorten() -> None:
    sign = signer(FakeBlobService(), Clock())
    with pytest.raises(PermanentRemoteError, match="job_deadline"):
        sign.sign("c", "a.csv", READ, T0 + KEY_MAX_LIFETIME)


def test_tokens_for_a_loopback_emulator_allow_plain_http() -> None:
    sign = signer(FakeBlobService("http://127.0.0.1:10000/devstoreaccount1"), Clock())
    assert "spr" not in query(sign.sign("c", "a.csv", READ, T0 + timedelta(hours=1)))


def http_error(status: int, code: str) -> HttpResponseError:
    error = HttpResponseError(message=f"{code} sig=secret")
    error.status_code = status
    error.error_code = code
    return error


def test_a_refused_key_says_which_role_to_assign_and_a_busy_service_is_transient() -> None:
    service = FakeBlobService()
    sign = signer(service, Clock())
    service.fail = http_error(403, "AuthorizationPermissionMismatch")
    with pytest.raises(PermanentRemoteError) as info:
        sign.sign("c", "a.csv", READ, T0 + timedelta(hours=1))
    assert "Storage Blob Data Contributor" in str(info.value)
    assert "sig=secret" not in str(info.value)
    service.fail = http_error(503, "ServerBusy")
    with pytest.raises(TransientRemoteError):
        sign.sign("c", "a.csv", READ, T0 + timedelta(hours=1))


def test_access_problems_tell_a_missing_token_from_a_missing_role() -> None:
    no_token = access_problem(ClientAuthenticationError("ManagedIdentityCredential: no"), "ROLE")
    assert no_token is not None
    assert "__clientId" in no_token
    bad = access_problem(http_error(403, "AuthenticationFailed"), "ROLE")
    assert bad is not None
    assert "did not accept the app's credentials" in bad
    role = access_problem(http_error(403, "AuthorizationPermissionMismatch"), "ROLE")
    assert role is not None
    assert role.endswith("ROLE")
    assert access_problem(http_error(500, "InternalError"), "ROLE") is None


def test_a_connection_string_without_a_key_cannot_sign_and_says_how_to_connect() -> None:
    sas_only = BlobServiceClient.from_connection_string(
        "BlobEndpoint=https://acct.blob.core.windows.net/;SharedAccessSignature=sv=1&sig=x"
    )
    with pytest.raises(ConfigError, match="AzureWebJobsStorage__accountName"):
        BlobData(sas_only)
    keyed = BlobServiceClient.from_connection_string(
        "DefaultEndpointsProtocol=https;AccountName=acct;AccountKey=a2V5;"
        "EndpointSuffix=core.windows.net"
    )
    assert type(signer_for(keyed)).__name__ == "AccountKeySigner"
