"""Routing and validation of arriving training files. Pure: a name and a head of bytes in."""

from __future__ import annotations

import csv
import unicodedata
from collections.abc import Iterable
from typing import Any
from urllib.parse import unquote, urlsplit

from retrain.errors import InputRejected
from retrain.settings import ModelSpec

MAX_NAME = 1024
MAX_SEGMENTS = 254
"""Azure Storage's limits on a blob name: characters, and '/'-separated segments."""


FINAL_COMMIT_APIS = frozenset({"PutBlob", "PutBlockList", "FlushWithClose", "CopyBlob"})
"""Event Grid BlobCreated APIs after which a blob is complete (others are skipped)."""


def blob_from_event(event_type: str, data: Any, container: str) -> tuple[str, str] | None:
    """The (container, name) a BlobCreated event announces in `container`, or None to skip it."""
    if event_type != "Microsoft.Storage.BlobCreated" or not isinstance(data, dict):
        return None
    if data.get("api") not in FINAL_COMMIT_APIS:
        return None
    path = unquote(urlsplit(str(data.get("url", ""))).path).lstrip("/")
    if path.startswith("devstoreaccount1/"):  # Azurite puts the account in the path
        path = path.split("/", 1)[1]
    found, _, name = path.partition("/")
    if found != container or not name:
        return None
    return found, name


def route(name: str, models: Iterable[ModelSpec]) -> ModelSpec:
    """The model whose data prefix holds this blob."""
    for spec in models:
        if name.startswith(spec.prefix):
            return spec
    raise InputRejected(f"{name!r} is under no model's data prefix")


def check_name(name: str) -> None:
    """Refuse a blob name that cannot be referenced as it is: one Azure Storage refuses or
    rewrites, so a SAS reference minted for it would name another blob or fail to authenticate.

    Everything else (spaces, '#', '?', '%', non-ASCII) is fine: references percent-encode it.
    """
    if len(name) > MAX_NAME:
        raise InputRejected(f"the blob name is {len(name)} characters; at most {MAX_NAME}")
    try:
        name.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InputRejected(
            f"the blob name is not valid Unicode (character {exc.start}): it has no URL form"
        ) from exc
    control = next((c for c in name if unicodedata.category(c) == "Cc"), None)
    if control is not None:
        raise InputRejected(
            f"the blob name contains the control character {control!r} "
            f"(U+{ord(control):04X}): it cannot be referenced safely; rename the file"
        )
    if "\\" in name:
        raise InputRejected(
            "the blob name contains a backslash, which Azure Storage turns into '/': "
            "the file cannot be referenced by the name it arrived with; rename it"
        )
    parts = name.split("/")
    if len(parts) > MAX_SEGMENTS:
        raise InputRejected(f"the blob name has {len(parts)} path segments; at most {MAX_SEGMENTS}")
    if any(part in ("", ".", "..") for part in parts):
        raise InputRejected("the blob name has an empty, '.' or '..' path segment")
    if any(part.endswith(".") for part in parts):
        raise InputRejected(
            "a path segment of the blob name ends with '.', which Azure Storage drops from "
            "URLs: the file cannot be referenced by its name; rename it"
        )


def validate(spec: ModelSpec, name: str, *, size: int, head: bytes) -> list[str]:
    """Check an arriving file from its name, size and first bytes; returns its header columns."""
    check_name(name)
    suffix = _suffix(spec, name)
    _check_size(spec, size)
    if b"\x00" in head:
        raise InputRejected("the file contains NUL bytes: binary data, not delimited text")
    newline = head.find(b"\n")
    if newline < 0 and size > len(head):
        raise InputRejected(f"the first line is longer than {len(head)} bytes: no header found")
    header_text = _header_text(head if newline < 0 else head[:newline])
    columns = _columns(spec, header_text, suffix)
    rest = b"" if newline < 0 else head[newline + 1 :]
    if size <= len(head) and not rest.strip():
        raise InputRejected("the file has a header but no data rows")
    return columns


def _suffix(spec: ModelSpec, name: str) -> str:
    """The file's extension (casefolded, '' when none), refused unless the model takes it."""
    suffix = name.rsplit(".", 1)[-1].casefold() if "." in name.rsplit("/", 1)[-1] else ""
    if suffix not in spec.formats:
        raise InputRejected(
            f"not a {' or '.join(f.upper() for f in spec.formats)} file by its name "
            f"(extension {('.' + suffix) if suffix else 'missing'})"
        )
    return suffix


def _check_size(spec: ModelSpec, size: int) -> None:
    if size == 0:
        raise InputRejected("the file is empty")
    if size > spec.max_bytes:
        raise InputRejected(
            f"the file is {size} bytes; the limit for {spec.name} is {spec.max_bytes}"
        )


def _header_text(first: bytes) -> str:
    """The first line as text (a UTF-8 BOM and a trailing CR dropped)."""
    try:
        return first.decode("utf-8-sig").rstrip("\r")
    except UnicodeDecodeError as exc:
        raise InputRejected(f"the header is not valid UTF-8 (byte {exc.start})") from exc


def _columns(spec: ModelSpec, header_text: str, suffix: str) -> list[str]:
    """The header's columns, refused when blank, split by the wrong delimiter, or lacking one
    the model requires."""
    delimiter = "\t" if suffix == "tsv" else ","
    columns = [c.strip() for c in next(csv.reader([header_text], delimiter=delimiter), [])]
    if not any(columns):
        raise InputRejected("the first line is blank: no header found")
    other = "," if delimiter == "\t" else "\t"
    if len(columns) == 1 and other in header_text:
        raise InputRejected(
            f"the header has one column but contains {other!r}: wrong delimiter for a "
            f".{suffix} file"
        )
    if spec.columns is not None:
        missing = [c for c in spec.columns if c not in columns]
        if missing:
            raise InputRejected(f"the header lacks columns {missing}; it has {_show(columns)}")
    return columns


def _show(columns: list[str]) -> list[str]:
    """Columns as a message shows them: at most 20, each cut to 40 characters."""
    shown = [c if len(c) <= 40 else c[:39] + "…" for c in columns[:20]]
    return [*shown, f"... {len(columns) - 20} more"] if len(columns) > 20 else shown
