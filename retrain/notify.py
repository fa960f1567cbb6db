"""Webhook notifications: each run event POSTed as JSON, signed with HMAC-SHA256.

The scheme (the one GitHub and Stripe document): the signed text is `<timestamp>.<body>`, sent
as `X-Retrain-Signature: t=<timestamp>,v1=<hex HMAC-SHA256>`; `X-Retrain-Delivery` is the same
for every delivery of one event, so a receiver can drop a replayed or retried copy. Redirects are
never followed: a signed body goes only to the configured URL.
"""

from __future__ import annotations

import hashlib
import hmac
import time
from collections.abc import Callable

import requests

from retrain.http import call
from retrain.messages import RunEvent

SIGNATURE_HEADER = "X-Retrain-Signature"
DELIVERY_HEADER = "X-Retrain-Delivery"
EVENT_HEADER = "X-Retrain-Event"


def signature(secret: str, timestamp: int, body: bytes) -> str:
    """`t=<timestamp>,v1=<hex>`: HMAC-SHA256 of `<timestamp>.<body>` keyed with the secret."""
    signed = f"{timestamp}.".encode() + body
    return f"t={timestamp},v1={hmac.new(secret.encode(), signed, hashlib.sha256).hexdigest()}"


def delivery_id(body: bytes) -> str:
    """Stable per event: every delivery (and retry) of the same event message has this id."""
    return hashlib.sha256(body).hexdigest()[:32]


class Webhook:
    """POSTs events to one URL. Failures raise, so the host retries the event message."""

    def __init__(
        self,
        url: str,
        secret: str | None,
        *,
        session: requests.Session,
        timeout: tuple[float, float],
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._url = url
        self._secret = secret
        self._session = session
        self._timeout = timeout
        self._clock = clock

    def deliver(self, event: RunEvent) -> None:
        """Send one event."""
        body = event.model_dump_json().encode()
        headers = {
            "Content-Type": "application/json",
            EVENT_HEADER: event.state,
            DELIVERY_HEADER: delivery_id(body),
        }
        if self._secret:
            headers[SIGNATURE_HEADER] = signature(self._secret, int(self._clock()), body)
        call(
            self._session,
            "POST",
            self._url,
            what=f"webhook for run {event.run_id}",
            timeout=self._timeout,
            headers=headers,
            json_body=None,
            send_body=False,
            data=body,
            follow_redirects=False,
        )
