"""What every model spec section shares: frozen, no unknown fields, https URLs, setting names,
and JSON documents given inline or as a file path."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

from pydantic import AnyHttpUrl, BaseModel, ConfigDict, StringConstraints

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


def json_document(value: Any, what: str) -> Any:
    """A JSON object given inline, or the path of a file holding one (relative to the app's
    working directory), read once when the spec loads."""
    if not isinstance(value, str):
        return value
    path = Path(value)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ValueError(f"{what}: cannot read the file {value!r}: {exc.strerror}") from exc
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{what}: the file {value!r} is not valid JSON: {exc}") from exc
