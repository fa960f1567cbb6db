"""One way to talk HTTP: timeouts on every call, retries only where safe, errors that say why."""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from typing import Any, Protocol

import requests
from requests.adapters import HTTPAdapter
from urllib3.util.retry import Retry

from retrain.errors import PermanentRemoteError, RemoteError, TransientError, TransientRemoteError

RETRY_STATUSES = (429, 500, 502, 503, 504)
GATEWAY_STATUSES = (502, 504)
READS = frozenset({"GET", "HEAD", "OPTIONS"})
"""Methods that change nothing: one of them with no answer leaves nothing to wait for."""
RETRIES = 4
"""Retries of one call (connection failures; 429/5xx for idempotent methods)."""
MAX_RETRY_WAIT = 5
"""The longest wait between two attempts of one call, backoff or Retry-After, by default
(RETRAIN_HTTP_MAX_RETRY_WAIT): a service that asks for longer gets the call back as a retryable
error carrying its Retry-After, and the handler re-sends its message with that delay instead of
waiting inside the invocation."""
MIN_RETRY_GAP = 1.0
"""Seconds between two attempts of one call, at least: BES clients poll at 1 s or slower."""
_URL_QUERY = re.compile(r"(https?://[^\s\"'?<>]+)\?[^\s\"'<>]+")
_SAS_QUERY = re.compile(r"(?i)(?<![\w%])\??sv=\d{4}-\d{2}-\d{2}[^\s\"'<>]*")
_SIG = re.compile(r"(?i)\b(sig|signature|key|token|code|password|secret)(=|%3d)[^&;\s\"'<>]+")
_ACCOUNT_KEY = re.compile(r"(?i)\b(AccountKey|SharedAccessKey|SharedAccessSignature)=[^;\s\"'<>]+")
_BEARER = re.compile(r"(?i)\bBearer\s+[A-Za-z0-9\-._~+/]+=*")


def redact(text: str) -> str:
    """Remove every secret a service may echo: a URL's whole query string, a SAS query without
    its URL (`?sv=…&sig=…`), a bare `sig=`/`key=`/`token=` value, `AccountKey=…` of a
    connection string, and `Bearer` tokens. Applied to every text that comes from a service
    before it is stored, logged or sent on."""
    text = _URL_QUERY.sub(r"\1?<redacted>", text)
    text = _SAS_QUERY.sub("<redacted SAS>", text)
    text = _ACCOUNT_KEY.sub(r"\1=<redacted>", text)
    text = _BEARER.sub("Bearer <redacted>", text)
    return _SIG.sub(r"\1=<redacted>", text)


def worst_call(
    connect_timeout: float, read_timeout: float, max_wait: float = MAX_RETRY_WAIT
) -> float:
    """Seconds one call through `make_session(max_wait=...)` can take at most: every attempt
    timing out, with the longest wait between attempts. Leases that guard a call are derived
    from it."""
    return (connect_timeout + read_timeout) * (RETRIES + 1) + max_wait * RETRIES


class CallTooLate(TransientError):
    """A call not sent: even at its longest it would have ended after the lease that guards it
    (`calls_end_by`). Nothing reached the service; the caller gives the lease back and tries
    again."""


_GUARD: ContextVar[tuple[Callable[[], float], float, Callable[[], None] | None] | None] = (
    ContextVar("retrain_call_guard", default=None)
)


@contextlib.contextmanager
def calls_end_by(
    monotonic: Callable[[], float],
    end: float,
    bound: float,
    *,
    before_change: Callable[[], None] | None = None,
) -> Iterator[None]:
    """Inside the block a call is sent only if it ends by `end` (on the `monotonic` clock) even
    at its longest, `bound` seconds (`worst_call`); otherwise `call` raises CallTooLate. Guards
    a lease: however many calls an adapter makes under it, none is still on its way when the
    lease runs out and another copy may take over. `before_change` runs before each call that
    may change something (not a GET, HEAD or OPTIONS): it raises to keep the call from being
    sent (e.g. once the lease is no longer held)."""
    token = _GUARD.set((monotonic, end - bound, before_change))
    try:
        yield
    finally:
        _GUARD.reset(token)


def shape_error(what: str, field: str, expected: str, got: Any) -> PermanentRemoteError:
    """A reply that does not have the documented shape: names the field and what came instead."""
    shown = redact(json.dumps(got, default=str)[:80]) if got is not None else "null"
    return PermanentRemoteError(
        f"{what}: {field} should be {expected}, got {type(got).__name__} {shown}"
    )


def field_of(
    body: Any, field: str, expected: type | tuple[type, ...], *, what: str, required: bool = False
) -> Any:
    """`body[field]` if it has the expected JSON type (None when absent and not required)."""
    if not isinstance(body, dict):
        raise shape_error(what, "the reply", "a JSON object", body)
    value = body.get(field)
    if value is None and not required:
        return None
    if isinstance(value, bool) or not isinstance(value, expected):
        raise shape_error(what, field, _kind(expected), value)
    return value


def _kind(expected: type | tuple[type, ...]) -> str:
    names = {dict: "a JSON object", list: "a JSON array", str: "a string", int: "a number"}
    kinds = expected if isinstance(expected, tuple) else (expected,)
    return " or ".join(names.get(k, k.__name__) for k in kinds)


class PacedRetry(Retry):
    """urllib3's Retry with a floor under every wait and a cap on the server's Retry-After.

    urllib3 makes its first retry at once (zero backoff), so a dropped answer to a status GET
    would be asked again within milliseconds; here every retry waits at least MIN_RETRY_GAP.
    A Retry-After above the session's longest wait (`retry_after_max`) is cut, so a hostile or
    broken header cannot hold an invocation for hours.
    """

    def get_backoff_time(self) -> float:
        return max(MIN_RETRY_GAP, super().get_backoff_time())

    def parse_retry_after(self, retry_after: str) -> float:
        return max(MIN_RETRY_GAP, super().parse_retry_after(retry_after))


def make_session(
    *, total_retries: int = RETRIES, backoff: float = 0.5, max_wait: int = MAX_RETRY_WAIT
) -> requests.Session:
    """A session that retries idempotent calls (GET, DELETE) on 429/5xx, honouring Retry-After.

    Every retry waits at least MIN_RETRY_GAP and at most `max_wait`, backoff or Retry-After.

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
        backoff_max=max_wait,
        respect_retry_after_header=True,
        retry_after_max=max_wait,
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
    follow_redirects: bool = True,
    describe: Callable[[requests.Response], str] | None = None,
) -> requests.Response:
    """Send one request and turn every failure into a remote error that names the operation:
    transient (timeouts, connection failures, 429 and 5xx) or permanent (everything else).

    With `follow_redirects=False` a 3xx answer is an error: the request (and its headers) is
    not re-sent to wherever the answer points. `describe` turns an error answer's body into
    the text the error carries (a service's own error shape); by default, a redacted snippet.
    Inside `calls_end_by`, a call that could end past its end is not sent (CallTooLate).
    """
    guard = _GUARD.get()
    if guard is not None:
        monotonic, latest_start, before_change = guard
        if monotonic() > latest_start:
            raise CallTooLate(f"{what}: not sent, it could end after the deploy lease runs out")
        if before_change is not None and method.upper() not in READS:
            before_change()
    try:
        response = session.request(
            method,
            url,
            headers=headers,
            data=json.dumps(json_body) if send_body else data,
            timeout=timeout,
            allow_redirects=follow_redirects,
        )
    except requests.exceptions.RequestException as exc:
        error = _unanswered(what, exc)
        error.change_unanswered = method.upper() not in READS
        raise error from exc
    if not follow_redirects and 300 <= response.status_code < 400:
        location = redact(response.headers.get("Location") or "nowhere")
        raise PermanentRemoteError(
            f"{what}: HTTP {response.status_code} redirect to {location} not followed; "
            "configure the final URL",
            status=response.status_code,
        )
    if response.status_code >= 400:
        status = response.status_code
        kind = TransientRemoteError if status in RETRY_STATUSES else PermanentRemoteError
        hint = {
            401: "the API key is wrong or expired",
            403: "the key is not allowed to do this",
            404: "the URL does not exist (check the configured URL and names)",
        }.get(status, "")
        body = redact(describe(response)) if describe else _snippet(response)
        failed = kind(
            f"{what}: HTTP {status}{' - ' + hint if hint else ''}{': ' + body if body else ''}",
            status=status,
            retry_after=retry_after(response),
        )
        # A gateway's 502/504 answers for the gateway: the service behind it may have acted.
        failed.change_unanswered = method.upper() not in READS and status in GATEWAY_STATUSES
        raise failed
    return response


def _unanswered(what: str, exc: requests.exceptions.RequestException) -> RemoteError:
    """The error for a request that got no (whole) answer: transient where trying again can
    help (the retries ran out, a timeout, a failed or broken connection), else permanent."""
    kind = type(exc).__name__
    if isinstance(exc, requests.exceptions.RetryError):
        return TransientRemoteError(f"{what}: still failing after retries ({redact(str(exc))})")
    if isinstance(exc, requests.exceptions.Timeout):
        return TransientRemoteError(f"{what}: timed out")
    if isinstance(exc, requests.exceptions.ConnectionError):
        return TransientRemoteError(f"{what}: connection failed ({kind})")
    if isinstance(exc, requests.exceptions.ChunkedEncodingError):
        # The connection broke while the answer was being read: the outcome is unknown, as
        # after a timeout (the service may have acted), so it is tried again, not failed.
        return TransientRemoteError(f"{what}: the answer was cut off ({kind})")
    return PermanentRemoteError(f"{what}: {kind}: {redact(str(exc))}")


def json_headers(token: str, *, content_type: str = "application/json") -> dict[str, str]:
    """`Authorization: Bearer <token>`, sending `content_type` and accepting JSON."""
    return {
        "Authorization": f"Bearer {token}",
        "Content-Type": content_type,
        "Accept": "application/json",
    }


class TokenCredential(Protocol):
    """The part of azure-identity's credential interface the clients use."""

    def get_token(self, *scopes: str) -> Any: ...


@dataclass(frozen=True)
class BearerCalls:
    """JSON calls on one session and its timeouts, each with a bearer token for `scope`."""

    session: requests.Session
    timeout: tuple[float, float]
    credential: TokenCredential
    scope: str

    def send(
        self,
        method: str,
        url: str,
        what: str,
        body: Any = None,
        *,
        describe: Callable[[requests.Response], str] | None = None,
    ) -> requests.Response:
        """`call` with a token asked for now, and `body` sent as JSON when there is one."""
        return call(
            self.session,
            method,
            url,
            what=what,
            timeout=self.timeout,
            headers=json_headers(self.credential.get_token(self.scope).token),
            json_body=body,
            send_body=body is not None,
            describe=describe,
        )


def _snippet(response: requests.Response) -> str:
    text = response.text.strip()
    ctype = response.headers.get("Content-Type", "")
    if "html" in ctype or text[:1] == "<":
        return f"(an HTML page, {len(text)} characters)"
    return redact(" ".join(text.split()))[:300]


def json_of(response: requests.Response, *, what: str) -> Any:
    """The JSON body of a response, or a PermanentRemoteError saying what came instead."""
    try:
        return response.json()
    except ValueError as exc:
        ctype = response.headers.get("Content-Type") or "no content type"
        raise PermanentRemoteError(
            f"{what}: expected JSON, got {ctype} {_snippet(response)!r}",
            status=response.status_code,
        ) from exc
