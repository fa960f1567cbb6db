"""What every model spec section shares: frozen, no unknown fields, https URLs, setting names,
and JSON documents given inline or as a file path."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

from pydantic import (
    AnyHttpUrl,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    StringConstraints,
    ValidationInfo,
)

from retrain.connection import is_loopback

SettingName = Annotated[str, StringConstraints(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")]


class Spec(BaseModel):
    """A section of a model spec: frozen, unknown fields refused."""

    model_config = ConfigDict(frozen=True, extra="forbid")


def require_https(url: AnyHttpUrl) -> AnyHttpUrl:
    """`url`, refused when it is plain http off loopback."""
    if url.scheme != "https" and not is_loopback(url.host or ""):
        raise ValueError(
            f"{url} uses plain http; use https (http is accepted only for loopback emulators)"
        )
    return url


def _json_document(value: Any, info: ValidationInfo) -> Any:
    """A JSON object given inline, or the path of a file holding one (relative to the app's
    working directory), read once when the spec loads; an error names the field."""
    if not isinstance(value, str):
        return value
    path = Path(value)
    what = info.field_name
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ValueError(f"{what}: cannot read the file {value!r}: {exc.strerror}") from exc
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{what}: the file {value!r} is not valid JSON: {exc}") from exc


JsonDocument = Annotated[dict[str, Any], BeforeValidator(_json_document)]
"""A JSON object given inline, or as the path of a JSON file (read when the spec loads)."""
