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
MIN_RETRY_GAP = 1.0
"""Seconds between two attempts of one call, at least: BES clients poll at 1 s or slower."""
MAX_RETRY_AFTER = 60
"""The longest Retry-After honoured inside one call; a longer one is cut to this."""
_SIG = re.compile(r"(?i)(sig|signature|key|token|code)=[^&\s\"']+")


def redact(text: str) -> str:
    """Drop query strings from URLs and mask anything that looks like a signature or key."""
    text = re.sub(r"(https?://[^\s\"'?]+)\?[^\s\"']*", r"\1?<redacted>", text)
    return _SIG.sub(r"\1=<redacted>", text)


class PacedRetry(Retry):
    """urllib3's Retry with a floor under every wait and a cap on the server's Retry-After.

    urllib3 makes its first retry at once (zero backoff), so a dropped answer to a status GET
    would be asked again within milliseconds; here every retry waits at least MIN_RETRY_GAP.
    A Retry-After above MAX_RETRY_AFTER (`retry_after_max`) is cut, so a hostile or broken
    header cannot hold an invocation for hours.
    """

    def get_backoff_time(self) -> float:
        return max(MIN_RETRY_GAP, super().get_backoff_time())

    def parse_retry_after(self, retry_after: str) -> float:
        return max(MIN_RETRY_GAP, super().parse_retry_after(retry_after))


def make_session(*, total_retries: int = 4, backoff: float = 0.5) -> requests.Session:
    """A session that retries idempotent calls (GET, DELETE) on 429/5xx, honouring Retry-After.

    Every retry waits at least MIN_RETRY_GAP and at most MAX_RETRY_AFTER for a Retry-After.

    POSTs and PATCHes are retried only when the connection failed before the request was sent:
    BES submit has no idempotency key, so a retry after the request reached the service could
    create a second job.
    """
    retry = PacedRetry(
        total=total_retries,
        connect=total_retries,
        read=total_retries,
        status=total_retries,
        allowed_methods=frozenset({"GET", "DELETE", "HEAD"}),
        status_forcelist=RETRY_STATUSES,
        backoff_factor=backoff,
        backoff_max=30,
        respect_retry_after_header=True,
        retry_after_max=MAX_RETRY_AFTER,
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
