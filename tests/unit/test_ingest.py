"""Validation of arriving files, from their name, size and first bytes."""

from __future__ import annotations

import pytest

from retrain.errors import InputRejected
from retrain.ingest import blob_from_event, route, validate
from tests.harness import spec

SPEC = spec(columns=["rooms", "price"], max_bytes=10_000)


@pytest.mark.parametrize(
    ("name", "head"),
    [
        ("housing/a.csv", b"\xef\xbb\xbfrooms,price\r\n1,2\r\n"),
        ("housing/sub dir/ünïcode name.csv", b"price,rooms,extra\n1,2,3\n"),
        ("housing/a.TSV", b"rooms\tprice\n1\t2\n"),
    ],
)
def test_good_files_pass(name: str, head: bytes) -> None:
    columns = validate(SPEC, name, size=len(head), head=head)
    assert {"rooms", "price"} <= set(columns)


def test_large_file_is_judged_by_its_head() -> None:
    assert validate(SPEC, "housing/a.csv", size=9_999, head=b"rooms,price\n1,2") == [
        "rooms",
        "price",
    ]


def test_routing_by_prefix() -> None:
    assert route("housing/x.csv", [SPEC]) is SPEC
    with pytest.raises(InputRejected, match="under no model's data prefix"):
        route("housingx/x.csv", [SPEC])


@pytest.mark.parametrize(
    ("event_type", "data", "expected"),
    [
        (
            "Microsoft.Storage.BlobCreated",
            {
                "api": "PutBlob",
                "url": "https://acct.blob.core.windows.net/training-data/housing/a.csv",
            },
            ("training-data", "housing/a.csv"),
        ),
        (
            "Microsoft.Storage.BlobCreated",
            {
                "api": "PutBlockList",
                "url": "http://127.0.0.1:10000/devstoreaccount1/training-data/"
                "housing/sub%20dir/%C3%BC.csv",
            },
            ("training-data", "housing/sub dir/ü.csv"),
        ),
        (
            "Microsoft.Storage.BlobCreated",
            {
                "api": "PutBlock",
                "url": "https://a.blob.core.windows.net/training-data/housing/a.csv",
            },
            None,
        ),
        (
            "Microsoft.Storage.BlobDeleted",
            {"api": "DeleteBlob", "url": "https://a.blob.core.windows.net/training-data/housing/a"},
            None,
        ),
        (
            "Microsoft.Storage.BlobCreated",
            {"api": "PutBlob", "url": "https://a.blob.core.windows.net/other/housing/a.csv"},
            None,
        ),
        ("Microsoft.Storage.BlobCreated", "not an object", None),
    ],
)
def test_blob_created_events_name_their_blob(
    event_type: str, data: object, expected: tuple[str, str] | None
) -> None:
    assert blob_from_event(event_type, data, "training-data") == expected
