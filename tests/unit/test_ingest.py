"""Validation of arriving files, from their name, size and first bytes."""

from __future__ import annotations

import pytest

from retrain.errors import InputRejected
from retrain.ingest import route, validate
from tests.unit.test_pipeline import spec

SPEC = spec(columns=["rooms", "price"], max_bytes=10_000)


@pytest.mark.parametrize(
    ("name", "size", "head", "reason"),
    [
        ("housing/a.csv", 0, b"", "the file is empty"),
        ("housing/a.csv", 20_000, b"rooms,price\n1,2\n", "the limit for housing is 10000"),
        ("housing/a.json", 10, b"{}", "not a CSV or TSV file by its name (extension .json)"),
        ("housing/noext", 10, b"a", "extension missing"),
        ("housing/a.csv", 10, b"\x00\x01\x02", "NUL bytes"),
        ("housing/a.csv", 12, b"rooms;price\n1;2\n", "the header lacks columns"),
        ("housing/a.tsv", 16, b"rooms,price\n1,2\n", "wrong delimiter for a .tsv file"),
        ("housing/a.csv", 12, b"\xff\xferooms\n", "not valid UTF-8"),
        ("housing/a.csv", 12, b"rooms,price\n", "header but no data rows"),
        ("housing/a.csv", 12, b"rooms,price\n\n\n", "header but no data rows"),
        ("housing/a.csv", 9_000, b"r" * 64, "first line is longer than 64 bytes"),
        ("housing/a.csv", 3, b"\n\n\n", "first line is blank"),
        ("housing/../x.csv", 10, b"rooms,price\n1,2\n", "'..' path segment"),
        ("housing/" + "a" * 1100 + ".csv", 10, b"rooms,price\n1,2\n", "at most 1024"),
    ],
)
def test_bad_files_are_rejected_with_a_reason(
    name: str, size: int, head: bytes, reason: str
) -> None:
    with pytest.raises(InputRejected, match=None) as info:
        validate(SPEC, name, size=size, head=head)
    assert reason in str(info.value)


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
