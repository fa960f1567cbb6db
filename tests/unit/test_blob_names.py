"""Blob names: how references encode them, which names ingest refuses, and how SAS is scoped."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import parse_qs

import pytest
from azure.storage.blob import BlobServiceClient

from retrain.bes import BlobRef, relative_location
from retrain.blobdata import BlobData
from retrain.errors import InputRejected, RemoteError, TransientRemoteError
from retrain.ingest import check_name
from tests.harness import World

KEY = "a2V5a2V5a2V5a2V5a2V5a2V5a2V5a2V5a2V5a2V5a2V5"
HTTPS = (
    f"DefaultEndpointsProtocol=https;AccountName=acct;AccountKey={KEY};"
    "EndpointSuffix=core.windows.net"
)
AZURITE = (
    f"DefaultEndpointsProtocol=http;AccountName=devstoreaccount1;AccountKey={KEY};"
    "BlobEndpoint=http://127.0.0.1:10000/devstoreaccount1"
)
LATER = datetime.now(UTC) + timedelta(hours=1)


@pytest.mark.parametrize(
    ("name", "encoded"),
    [
        ("housing/a.csv", "data/housing/a.csv"),
        ("housing/a b#c?d%20e.csv", "data/housing/a%20b%23c%3Fd%2520e.csv"),
        ("housing/%2e%2e/x.csv", "data/housing/%252e%252e/x.csv"),
        ("housing/ü €.csv", "data/housing/%C3%BC%20%E2%82%AC.csv"),
        ("housing/a+b&c=d;e,f'g(h).csv", "data/housing/a%2Bb%26c%3Dd%3Be%2Cf%27g%28h%29.csv"),
        ("housing/~-_.csv", "data/housing/~-_.csv"),
    ],
)
def test_relative_location_percent_encodes_all_but_unreserved_and_slash(
    name: str, encoded: str
) -> None:
    assert relative_location("data", name) == encoded
    ref = BlobData(BlobServiceClient.from_connection_string(HTTPS)).reference(
        "data", name, write=False, expires=LATER
    )
    assert ref.relative_location == encoded
    assert ref.path == encoded
    assert ref.base_location == "https://acct.blob.core.windows.net/"
    assert BlobRef.to_blob("https://x/", "data", name, "?s") == BlobRef("https://x/", encoded, "?s")


def test_minted_sas_is_https_only_outside_loopback() -> None:
    for write in (False, True):
        data = BlobData(BlobServiceClient.from_connection_string(HTTPS))
        data._created.add("data")  # no container creation: this test makes no request
        token = data.reference("data", "housing/a.csv", write=write, expires=LATER).sas_token
        assert parse_qs(token.lstrip("?"))["spr"] == ["https"]
    local = BlobData(BlobServiceClient.from_connection_string(AZURITE))
    token = local.reference("data", "housing/a.csv", write=False, expires=LATER).sas_token
    assert "spr" not in parse_qs(token.lstrip("?"))


def test_the_quarantine_copy_source_is_https_only_and_encoded(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from azure.storage.blob import BlobClient

    sources: list[str] = []

    def copy(self: Any, url: str, **kwargs: Any) -> None:
        sources.append(url)

    monkeypatch.setattr(BlobClient, "start_copy_from_url", copy)
    data = BlobData(BlobServiceClient.from_connection_string(HTTPS))
    data._created.add("quarantine")
    data.quarantine("data", "housing/a b#c.csv", "quarantine", "why")
    (source,) = sources
    url, _, query = source.partition("?")
    assert url == "https://acct.blob.core.windows.net/data/housing/a%20b%23c.csv"
    assert parse_qs(query)["spr"] == ["https"]


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("housing/a\nb.csv", "control character '\\n' (U+000A)"),
        ("housing/a\tb.csv", "control character '\\t' (U+0009)"),
        ("housing/a\rb.csv", "(U+000D)"),
        ("housing/a\x7fb.csv", "(U+007F)"),
        ("housing/a\x85b.csv", "(U+0085)"),
        ("housing/a\\b.csv", "contains a backslash, which Azure Storage turns into '/'"),
        ("housing/dir./a.csv", "ends with '.'"),
        ("housing/a.csv.", "ends with '.'"),
        ("housing/a.csv/", "an empty, '.' or '..' path segment"),
        ("housing/../a.csv", "an empty, '.' or '..' path segment"),
        ("housing/" + "d/" * 260 + "a.csv", "path segments; at most 254"),
        ("housing/" + "x" * 1100 + ".csv", "at most 1024"),
        ("housing/\ud800.csv", "not valid Unicode"),
    ],
)
def test_names_that_cannot_be_referenced_are_refused(name: str, reason: str) -> None:
    with pytest.raises(InputRejected) as info:
        check_name(name)
    assert reason in str(info.value)


@pytest.mark.parametrize(
    "name",
    ["housing/a b#c?d%20e.csv", "housing/%2e%2e/x.csv", "housing/ü.csv", "housing/.a/b.csv"],
)
def test_names_that_encode_are_accepted(name: str) -> None:
    check_name(name)


@pytest.mark.parametrize("name", ["housing/a\\b.csv", "housing/a\nb.csv", "housing/a\tb.csv"])
def test_an_unreferenceable_name_is_recorded_rejected_and_quarantined_once(name: str) -> None:
    w = World()
    w.data.put("data", name, "rooms,price\n1,2\n")
    assert w.retrainer.on_blob("data", name) == "rejected"
    assert w.retrainer.on_blob("data", name) == "duplicate"
    ((record, _),) = [v for k, v in w.store.docs.items() if k.startswith("arrivals/")]
    assert record["status"] == "rejected"
    assert record["name"] == name
    ((source, target, reason),) = w.data.quarantined
    assert (source, target) == (f"data/{name}", "quarantine")
    assert reason == record["reason"]
    assert w.outbox.sent == []


def test_a_name_whose_read_is_refused_is_still_recorded_not_retried() -> None:
    """A request signed for a '\\' name does not authenticate where the service rewrote it."""
    w = World()
    name = "housing/a\\b.csv"

    def refuse(container: str, blob: str) -> Any:
        raise TransientRemoteError("storage read: HTTP 403 AuthenticationFailed")

    w.data.head = refuse  # type: ignore[method-assign]
    assert w.retrainer.on_blob("data", name) == "rejected"
    assert w.retrainer.on_blob("data", name) == "duplicate"
    assert len(w.data.quarantined) == 1


def test_a_readable_name_whose_read_fails_is_still_retried() -> None:
    w = World()

    def fail(container: str, blob: str) -> Any:
        raise TransientRemoteError("storage read: timed out")

    w.data.head = fail  # type: ignore[method-assign]
    with pytest.raises(RemoteError):
        w.retrainer.on_blob("data", "housing/a.csv")
