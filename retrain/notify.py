"""Webhook notifications: each run event POSTed as JSON, signed with HMAC-SHA256."""

from __future__ import annotations

import hashlib
import hmac

import requests

from retrain.http import call
from retrain.messages import RunEvent

SIGNATURE_HEADER = "X-Retrain-Signature-256"


def signature(secret: str, body: bytes) -> str:
    """`sha256=<hex>` of the body, keyed with the shared secret (GitHub's scheme)."""
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


class Webhook:
    """POSTs events to one URL. Failures raise, so the host retries the event message."""

    def __init__(
        self,
        url: str,
        secret: str | None,
        *,
        session: requests.Session,
        timeout: tuple[float, float],
    ) -> None:
        self._url = url
        self._secret = secret
        self._session = session
        self._timeout = timeout

    def deliver(self, event: RunEvent) -> None:
        """Send one event."""
        body = event.model_dump_json().encode()
        headers = {"Content-Type": "application/json", "X-Retrain-Event": event.state}
        if self._secret:
            headers[SIGNATURE_HEADER] = signature(self._secret, body)
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
        )
