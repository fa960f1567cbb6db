"""Validation of arriving files, from their name, size and first bytes."""

from __future__ import annotations

import pytest

from retrain.errors import InputRejected
from retrain.ingest import route, validate
from tests.unit.test_pipeline import spec

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
