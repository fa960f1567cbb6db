"""Webhook deliveries: signed timestamp and body, a stable delivery id, no redirects."""

from __future__ import annotations

import hashlib
import hmac

import pytest
import responses

from retrain.errors import ConfigError, RemoteError
from retrain.http import make_session
from retrain.messages import RunEvent
from retrain.notify import Webhook
from retrain.settings import get_settings

HOOK = "https://hooks.example/retrain"
EVENT = RunEvent(
    model="housing",
    run_id="20260102T030405-abcdef",
    state="promoted",
    reason="better",
    at="2026-01-02T03:04:05+00:00",
)


SECRET = "s3cret"


def hook(now: float = 1_700_000_000.5) -> Webhook:
    return Webhook(HOOK, SECRET, session=make_session(backoff=0), timeout=(1, 1), clock=lambda: now)


def verify(secret: bytes, header: str, body: bytes, now: int) -> bool:
    """What the README tells a receiver to do, written out independently."""
    parts = dict(item.split("=", 1) for item in header.split(","))
    timestamp = int(parts["t"])
    expected = hmac.new(secret, str(timestamp).encode() + b"." + body, hashlib.sha256)
    return hmac.compare_digest(expected.hexdigest(), parts["v1"]) and abs(now - timestamp) <= 300


@responses.activate
def test_a_delivery_signs_timestamp_and_body_and_names_the_delivery() -> None:
    responses.post(HOOK, status=204)
    hook().deliver(EVENT)
    request = responses.calls[0].request
    body = request.body
    assert isinstance(body, bytes)
    assert body == EVENT.model_dump_json().encode()
    signature = request.headers["X-Retrain-Signature"]
    assert signature.startswith("t=1700000000,v1=")
    assert verify(b"s3cret", signature, body, now=1_700_000_010)
    assert not verify(b"s3cret", signature, body, now=1_700_000_000 + 301)
    assert not verify(b"other", signature, body, now=1_700_000_010)
    assert not verify(b"s3cret", signature, body.replace(b"promoted", b"rejected"), 1_700_000_010)
    forged = signature.replace("t=1700000000", "t=1700000500")
    assert not verify(b"s3cret", forged, body, now=1_700_000_500)
    assert request.headers["X-Retrain-Event"] == "promoted"


@responses.activate
def test_the_delivery_id_is_stable_per_event_and_differs_between_events() -> None:
    responses.post(HOOK, status=500)
    responses.post(HOOK, status=204)
    responses.post(HOOK, status=204)
    with pytest.raises(RemoteError):
        hook(now=1_700_000_000).deliver(EVENT)
    hook(now=1_700_000_060).deliver(EVENT)  # the host's retry of the same event message
    hook(now=1_700_000_060).deliver(EVENT.model_copy(update={"state": "failed"}))
    ids = [c.request.headers["X-Retrain-Delivery"] for c in responses.calls]
    assert ids[0] == ids[1]
    assert ids[2] != ids[0]
    assert len(ids[0]) >= 16


@pytest.mark.parametrize("status", [301, 302, 307, 308])
@responses.activate
def test_a_redirect_is_a_failed_delivery_and_is_not_followed(status: int) -> None:
    responses.post(
        HOOK, status=status, headers={"Location": "https://elsewhere.example/x?token=abc123"}
    )
    responses.post("https://elsewhere.example/x", status=204)
    with pytest.raises(RemoteError) as info:
        hook().deliver(EVENT)
    assert f"HTTP {status} redirect to https://elsewhere.example/x?<redacted> not followed" in str(
        info.value
    )
    assert "abc123" not in str(info.value)
    assert [c.request.url for c in responses.calls] == [HOOK]


@pytest.mark.parametrize("blank", ["", "   ", "\t"])
def test_a_blank_webhook_secret_is_refused_at_load(
    monkeypatch: pytest.MonkeyPatch, blank: str
) -> None:
    monkeypatch.setenv("RETRAIN_WEBHOOK_URL", HOOK)
    monkeypatch.setenv("RETRAIN_WEBHOOK_SECRET", blank)
    get_settings.cache_clear()
    try:
        with pytest.raises(ConfigError, match=r"RETRAIN_WEBHOOK_SECRET: .*is set but blank"):
            get_settings()
    finally:
        get_settings.cache_clear()


@responses.activate
def test_the_readme_receiver_snippet_accepts_a_delivery_once_and_nothing_forged() -> None:
    import re
    import time
    from pathlib import Path
    from typing import Any

    readme = Path(__file__).parents[2].joinpath("README.md").read_text(encoding="utf-8")
    section = readme[readme.index("**Webhook.**") :]
    match = re.search(r"```python\n(.*?)```", section, re.DOTALL)
    assert match is not None
    namespace: dict[str, Any] = {}
    exec(match.group(1), namespace)  # noqa: S102 - the README's own snippet, run as documented
    verify_snippet = namespace["verify"]

    responses.post(HOOK, status=204)
    hook(now=time.time()).deliver(EVENT)
    request = responses.calls[0].request
    headers, body = dict(request.headers), request.body
    seen: set[str] = set()
    assert verify_snippet(SECRET.encode(), headers, body, seen)
    assert not verify_snippet(SECRET.encode(), headers, body, seen)  # the same delivery again
    assert not verify_snippet(b"wrong", headers, body, set())
    assert not verify_snippet(SECRET.encode(), headers, body + b" ", set())
