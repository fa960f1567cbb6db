"""Blob-scoped SAS tokens, signed with the account key or with a user delegation key.

A connection string with `AccountKey` signs with the key. An identity connection has no key: it
asks the service for a *user delegation key* (Get User Delegation Key, OAuth only), signs with
that, and the token is good until the earlier of its own expiry and the key's. A key is cached
and reused while it covers the expiry asked for and is not about to expire itself; a key lasts
at most 7 days, so no token can outlive that.

Either way tokens are HTTPS-only (`spr=https`) unless storage is a loopback emulator, and the
signature never leaves this module except inside the token handed to the job.
"""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from azure.core.exceptions import AzureError, ClientAuthenticationError
from azure.storage.blob import BlobSasPermissions, generate_blob_sas

from retrain.connection import PREFIX, is_loopback
from retrain.errors import ConfigError, PermanentRemoteError, TransientRemoteError
from retrain.http import redact

if TYPE_CHECKING:
    from azure.storage.blob import BlobServiceClient, UserDelegationKey

KEY_MAX_LIFETIME = timedelta(days=7)
"""The longest a user delegation key may last (the service refuses more)."""
KEY_MIN_LIFETIME = timedelta(days=1)
"""A new key lasts at least this long, so one key serves many tokens."""
KEY_RENEW_BEFORE = timedelta(minutes=10)
"""A cached key is replaced this long before it expires."""
CLOCK_SKEW = timedelta(minutes=15)
"""Keys start this far in the past, so a token starting a few minutes back is inside the key."""
SAS_MARGIN = timedelta(hours=1)
"""A job's SAS tokens outlive its deadline by this much."""
LONGEST_JOB_DEADLINE = KEY_MAX_LIFETIME - KEY_RENEW_BEFORE - SAS_MARGIN
"""The longest job_deadline a user delegation key can cover (its tokens end an hour later)."""

DELEGATION_ROLES = (
    "assign the app's identity 'Storage Blob Data Contributor' or 'Storage Blob Data Owner' on "
    "the storage account (both allow getting a user delegation key); a new assignment can take "
    "a few minutes to apply"
)


def _now() -> datetime:
    return datetime.now(UTC)


def _protocol(service: BlobServiceClient) -> str | None:
    """`https` (tokens refuse plain http) unless storage is a loopback emulator."""
    return None if is_loopback(urlsplit(service.url).hostname or "") else "https"


class SasSigner(ABC):
    """Signs a SAS for one blob of the account; a subclass gives the signing credential."""

    def __init__(self, service: BlobServiceClient, account: str) -> None:
        self._account = account
        self._protocol = _protocol(service)

    @abstractmethod
    def _credential(self, expires: datetime) -> dict[str, Any]:
        """The `generate_blob_sas` keyword that signs a token valid until `expires`."""

    def sign(
        self,
        container: str,
        name: str,
        permission: BlobSasPermissions,
        expires: datetime,
        start: datetime | None = None,
    ) -> str:
        return generate_blob_sas(
            self._account,
            container,
            name,
            permission=permission,
            expiry=expires,
            start=start,
            protocol=self._protocol,
            **self._credential(expires),
        )


class AccountKeySigner(SasSigner):
    """Signs with the storage account key from the connection string."""

    def __init__(self, service: BlobServiceClient, account: str, key: str) -> None:
        super().__init__(service, account)
        self._key = key

    def _credential(self, expires: datetime) -> dict[str, Any]:
        return {"account_key": self._key}


class DelegationSigner(SasSigner):
    """Signs with a user delegation key the app's identity gets from the service."""

    def __init__(self, service: BlobServiceClient, *, now: Callable[[], datetime] = _now) -> None:
        super().__init__(service, service.account_name or "")
        self._service = service
        self._now = now
        self._lock = threading.Lock()
        self._key: UserDelegationKey | None = None
        self._key_expires: datetime | None = None

    def key_for(self, expires: datetime) -> UserDelegationKey:
        """A key valid until at least `expires`: the cached one, or a new one."""
        with self._lock:
            now = self._now()
            if expires > now + KEY_MAX_LIFETIME - KEY_RENEW_BEFORE:
                # A run fails with this (the pipeline fails a run on a PermanentRemoteError).
                raise PermanentRemoteError(
                    f"a SAS valid until {expires:%Y-%m-%d %H:%M} UTC cannot be signed with a user "
                    "delegation key (storage gives them for at most 7 days): shorten the model's "
                    "job_deadline"
                )
            cached, until = self._key, self._key_expires
            if (
                cached is not None
                and until is not None
                and until >= expires
                and now < until - KEY_RENEW_BEFORE
            ):
                return cached
            until = min(max(expires, now + KEY_MIN_LIFETIME), now + KEY_MAX_LIFETIME)
            self._key = get_delegation_key(self._service, now - CLOCK_SKEW, until)
            self._key_expires = until
            return self._key

    def _credential(self, expires: datetime) -> dict[str, Any]:
        return {"user_delegation_key": self.key_for(expires)}


def get_delegation_key(
    service: BlobServiceClient, start: datetime, expires: datetime
) -> UserDelegationKey:
    """Ask the service for a user delegation key; a refusal says which role is missing."""
    try:
        return service.get_user_delegation_key(start, expires)
    except AzureError as exc:
        problem = access_problem(exc, DELEGATION_ROLES)
        if problem is not None:
            raise PermanentRemoteError(
                f"storage refused a user delegation key: {problem}", status=403
            ) from exc
        raise TransientRemoteError(f"storage: get user delegation key: {why(exc)}") from exc


AUTHENTICATION_CODES = frozenset(
    {"AuthenticationFailed", "InvalidAuthenticationInfo", "NoAuthenticationInformation"}
)


def access_problem(exc: AzureError, roles: str) -> str | None:
    """What to fix when storage refused the app (its identity, or its roles), else None."""
    status = getattr(exc, "status_code", None)
    code = error_code(exc)
    if isinstance(exc, ClientAuthenticationError) and status is None:
        # No answer from storage at all: the credential could not get a token.
        return (
            f"no token for the app's identity ({why(exc)}); check that {PREFIX}__credential and "
            f"{PREFIX}__clientId name an identity assigned to the app"
        )
    if status == 401 or (status == 403 and code in AUTHENTICATION_CODES):
        return (
            f"storage did not accept the app's credentials ({why(exc)}); with a connection "
            "string, check its AccountKey and that the account allows shared-key access; with an "
            "identity, that the token is for this account's tenant"
        )
    if status == 403:
        return f"the app's identity lacks a role ({why(exc)}): {roles}"
    return None


def error_code(exc: AzureError) -> str | None:
    """The storage error code as text (the SDK gives an enum member, or a string, or None)."""
    code = getattr(exc, "error_code", None)
    return None if code is None else str(getattr(code, "value", code))


def why(exc: AzureError) -> str:
    """An Azure error in one redacted line: its code and the first line of its message."""
    code = error_code(exc)
    text = (exc.message or type(exc).__name__).splitlines()[0]
    return redact(f"{code}: {text}" if code else text)[:300]


def signer_for(service: BlobServiceClient) -> SasSigner:
    """The signer the client's credential allows: the account key, or delegation keys."""
    credential: Any = service.credential
    name = getattr(credential, "account_name", None)
    key = getattr(credential, "account_key", None)
    if name and key:
        return AccountKeySigner(service, str(name), str(key))
    if callable(getattr(credential, "get_token", None)):
        return DelegationSigner(service)
    raise ConfigError(
        f"{PREFIX} has no AccountKey, so the app cannot sign SAS tokens for jobs: use a "
        f"connection string with AccountKey, or connect with an identity ({PREFIX}__accountName, "
        f"or {PREFIX}__blobServiceUri and {PREFIX}__queueServiceUri; see README, Storage "
        "without keys)"
    )
