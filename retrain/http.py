"""One way to talk HTTP: timeouts on every call, retries only where safe, errors that say why."""

from __future__ import annotations

import json
import re
from email.utils import parsedate_to_datetime
from typing import Any

import requests
from requests.adapters import HTTPAdapter
from urllib3.util.retry import Retry

from retrain.errors import RemoteError

RETRY_STATUSES = (429, 500, 502, 503, 504)
RETRIES = 4
"""Retries of one call (connection failures; 429/5xx for idempotent methods)."""
MAX_RETRY_WAIT = 5.0
"""The longest wait between two attempts of one call, backoff or Retry-After; a service that
asks for longer gets the call back as a retryable error carrying its Retry-After, and the
handler re-sends its message with that delay instead of waiting inside the invocation."""
_SIG = re.compile(r"(?i)(sig|signature|key|token|code)=[^&\s\"']+")


def redact(text: str) -> str:
    """Drop query strings from URLs and mask anything that looks like a signature or key."""
    text = re.sub(r"(https?://[^\s\"'?]+)\?[^\s\"']*", r"\1?<redacted>", text)
    return _SIG.sub(r"\1=<redacted>", text)


def worst_call(connect_timeout: float, read_timeout: float) -> float:
    """Seconds one call through `make_session` can take at most: every attempt timing out,
    with the longest wait between attempts. Leases that guard a call are derived from it."""
    return (connect_timeout + read_timeout) * (RETRIES + 1) + MAX_RETRY_WAIT * RETRIES


def make_session(*, total_retries: int = RETRIES, backoff: float = 0.5) -> requests.Session:
    """A session that retries idempotent calls (GET, DELETE) on 429/5xx, honouring Retry-After.

    POSTs and PATCHes are retried only when the connection failed before the request was sent:
    BES submit has no idempotency key, so a retry after the request reached the service could
    create a second job.
    """
    retry = Retry(
        total=total_retries,
        connect=total_retries,
        read=total_retries,
        status=total_retries,
        allowed_methods=frozenset({"GET", "DELETE", "HEAD"}),
        status_forcelist=RETRY_STATUSES,
        backoff_factor=backoff,
        backoff_max=MAX_RETRY_WAIT,
        respect_retry_after_header=True,
        raise_on_status=False,
    )
    session = requests.Session()
    adapter = HTTPAdapter(max_retries=retry)
    session.mount("https://", adapter)
    session.mount("http://", adapter)
    return session


def retry_after(response: requests.Response) -> float | None:
    """Seconds the server asked us to wait, from Retry-After (seconds or an HTTP date)."""
    value = response.headers.get("Retry-After")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    date = response.headers.get("Date")
    now = parsedate_to_datetime(date) if date else None
    return max(0.0, (when - now).total_seconds()) if now else None


def call(
    session: requests.Session,
    method: str,
    url: str,
    *,
    what: str,
    timeout: tuple[float, float],
    headers: dict[str, str],
    json_body: Any = None,
    send_body: bool = False,
    data: bytes | None = None,
) -> requests.Response:
    """Send one request and turn every failure into a RemoteError that names the operation."""
    try:
        response = session.request(
            method,
            url,
            headers=headers,
            data=json.dumps(json_body) if send_body else data,
            timeout=timeout,
        )
    except requests.exceptions.RetryError as exc:
        raise RemoteError(
            f"{what}: still failing after retries ({redact(str(exc))})", retryable=True
        ) from exc
    except requests.exceptions.Timeout as exc:
        raise RemoteError(f"{what}: timed out", retryable=True) from exc
    except requests.exceptions.ConnectionError as exc:
        raise RemoteError(
            f"{what}: connection failed ({type(exc).__name__})", retryable=True
        ) from exc
    except requests.exceptions.RequestException as exc:
        raise RemoteError(f"{what}: {type(exc).__name__}: {redact(str(exc))}") from exc
    if response.status_code >= 400:
        status = response.status_code
        retryable = status in RETRY_STATUSES
        hint = {
            401: "the API key is wrong or expired",
            403: "the key is not allowed to do this",
            404: "the URL does not exist (check the configured URL and names)",
        }.get(status, "")
        body = redact(_snippet(response))
        raise RemoteError(
            f"{what}: HTTP {status}{' - ' + hint if hint else ''}{': ' + body if body else ''}",
            status=status,
            retryable=retryable,
            retry_after=retry_after(response),
        )
    return response


def _snippet(response: requests.Response) -> str:
    text = response.text.strip()
    ctype = response.headers.get("Content-Type", "")
    if "html" in ctype or text[:1] == "<":
        return f"(an HTML page, {len(text)} characters)"
    return " ".join(text.split())[:300]


def json_of(response: requests.Response, *, what: str) -> Any:
    """The JSON body of a response, or a RemoteError saying what came back instead."""
    try:
        return response.json()
    except ValueError as exc:
        ctype = response.headers.get("Content-Type") or "no content type"
        raise RemoteError(
            f"{what}: expected JSON, got {ctype} {redact(_snippet(response))!r}",
            status=response.status_code,
        ) from exc
