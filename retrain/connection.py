"""The storage connection: a connection string, or an identity (no key in any setting).

The settings follow the Functions conventions for identity-based connections, so the host (the
triggers' `connection="AzureWebJobsStorage"`) and the app's own clients read the same ones:

- `AzureWebJobsStorage`: a connection string (with `AccountKey`: SAS tokens are signed with it);
- or, with `AzureWebJobsStorage` unset, `AzureWebJobsStorage__accountName` (public cloud
  endpoints), or `AzureWebJobsStorage__blobServiceUri` (or `__serviceUri`) and
  `AzureWebJobsStorage__queueServiceUri`; `AzureWebJobsStorage__credential=managedidentity` and
  `AzureWebJobsStorage__clientId` pick a user-assigned managed identity. SAS tokens are then signed
  with user delegation keys (see retrain/sas.py).

Nothing here imports the storage SDK or azure-identity until clients are built.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

if TYPE_CHECKING:
    from azure.core.credentials import TokenCredential
    from azure.storage.blob import BlobServiceClient
    from azure.storage.queue import QueueServiceClient

PREFIX = "AzureWebJobsStorage"
MANAGED_IDENTITY = "managedidentity"


def is_loopback(host: str) -> bool:
    """Whether a URL host is this machine (plain http is allowed only there)."""
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class StorageConnection:
    """Where storage is and how the app authenticates to it."""

    connection_string: SecretStr | None = None
    blob_url: str | None = None
    queue_url: str | None = None
    managed_identity: bool = False
    client_id: str | None = None

    @property
    def uses_identity(self) -> bool:
        """True when tokens from azure-identity authenticate (no account key)."""
        return self.connection_string is None

    def describe(self) -> str:
        """The mode in one line, for `check` (never a key)."""
        if not self.uses_identity:
            return f"connection string ({PREFIX}); SAS tokens signed with the account key"
        if self.managed_identity:
            who = (
                f"user-assigned managed identity (client id {self.client_id})"
                if self.client_id
                else "system-assigned managed identity"
            )
        else:
            who = "DefaultAzureCredential (managed identity in Azure, developer sign-in locally)"
        return (
            f"identity: {who}; blob {self.blob_url}, queue {self.queue_url}; "
            "SAS tokens signed with user delegation keys"
        )

    def credential(self) -> TokenCredential:
        """The azure-identity credential this connection names (built on each call)."""
        if self.managed_identity:
            from azure.identity import ManagedIdentityCredential

            return ManagedIdentityCredential(client_id=self.client_id)
        from azure.identity import DefaultAzureCredential

        return DefaultAzureCredential()

    def clients(
        self, credential: TokenCredential | None = None, **options: Any
    ) -> tuple[BlobServiceClient, QueueServiceClient]:
        """Blob and queue service clients; `credential` overrides the configured identity."""
        from azure.storage.blob import BlobServiceClient
        from azure.storage.queue import QueueServiceClient

        if self.connection_string is not None:
            text = self.connection_string.get_secret_value()
            return (
                BlobServiceClient.from_connection_string(text, **options),
                QueueServiceClient.from_connection_string(text, **options),
            )
        token = credential or self.credential()
        return (
            BlobServiceClient(str(self.blob_url), credential=token, **options),
            QueueServiceClient(str(self.queue_url), credential=token, **options),
        )


def _service_url(setting: str, value: str) -> str:
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"{setting} must be a URL such as https://<account>.blob.core.windows.net")
    if parts.query or parts.fragment:
        raise ValueError(f"{setting} must not carry a query string (no SAS in a setting)")
    if parts.scheme != "https" and not is_loopback(parts.hostname):
        raise ValueError(
            f"{setting} uses plain http; use https (http is accepted only for loopback emulators)"
        )
    return value.rstrip("/")


class StorageSettings(BaseSettings):
    """The storage connection's app settings; part of `retrain.settings.Settings`."""

    model_config = SettingsConfigDict(case_sensitive=True, extra="ignore", frozen=True)

    storage_connection: SecretStr | None = Field(default=None, validation_alias=PREFIX)
    storage_account_name: str | None = Field(
        default=None, validation_alias=f"{PREFIX}__accountName"
    )
    storage_service_uri: str | None = Field(default=None, validation_alias=f"{PREFIX}__serviceUri")
    storage_blob_uri: str | None = Field(default=None, validation_alias=f"{PREFIX}__blobServiceUri")
    storage_queue_uri: str | None = Field(
        default=None, validation_alias=f"{PREFIX}__queueServiceUri"
    )
    storage_credential: str | None = Field(default=None, validation_alias=f"{PREFIX}__credential")
    storage_client_id: str | None = Field(default=None, validation_alias=f"{PREFIX}__clientId")

    @field_validator(
        "storage_connection",
        "storage_account_name",
        "storage_service_uri",
        "storage_blob_uri",
        "storage_queue_uri",
        "storage_credential",
        "storage_client_id",
        mode="before",
    )
    @classmethod
    def _blank_is_unset(cls, value: Any) -> Any:
        return None if isinstance(value, str) and not value.strip() else value

    @model_validator(mode="after")
    def _storage_resolves(self) -> StorageSettings:
        _ = self.storage
        return self

    @functools.cached_property
    def storage(self) -> StorageConnection:
        """The storage connection these settings describe (validated at load); a ValueError
        names the setting to fix."""
        identity = {
            "accountName": self.storage_account_name,
            "serviceUri": self.storage_service_uri,
            "blobServiceUri": self.storage_blob_uri,
            "queueServiceUri": self.storage_queue_uri,
        }
        if self.storage_connection is not None:
            extra = [f"{PREFIX}__{k}" for k, v in identity.items() if v]
            if extra:
                raise ValueError(
                    f"{PREFIX} is a connection string, but {', '.join(extra)} is set too: keep "
                    f"one way to connect (remove {PREFIX} to connect with an identity)"
                )
            return StorageConnection(connection_string=self.storage_connection)
        credential, client_id = self.storage_credential, self.storage_client_id
        if credential is not None and credential.casefold() != MANAGED_IDENTITY:
            raise ValueError(
                f"{PREFIX}__credential is {credential!r}; the only value is 'managedidentity' "
                "(leave it unset to use DefaultAzureCredential)"
            )
        if client_id is not None and credential is None:
            raise ValueError(
                f"{PREFIX}__clientId is set but {PREFIX}__credential is not 'managedidentity'; "
                "set both to use a user-assigned managed identity"
            )
        blob, queue = _endpoints(
            self.storage_account_name,
            self.storage_blob_uri or self.storage_service_uri,
            self.storage_queue_uri,
        )
        return StorageConnection(
            blob_url=_service_url(f"{PREFIX}__blobServiceUri", blob),
            queue_url=_service_url(f"{PREFIX}__queueServiceUri", queue),
            managed_identity=credential is not None,
            client_id=client_id,
        )


def _endpoints(account: str | None, blob: str | None, queue: str | None) -> tuple[str, str]:
    if account is not None:
        if not (3 <= len(account) <= 24 and account.isalnum() and account.islower()):
            raise ValueError(
                f"{PREFIX}__accountName {account!r} is not a storage account name "
                "(3-24 lowercase letters and digits)"
            )
        blob = blob or f"https://{account}.blob.core.windows.net"
        queue = queue or f"https://{account}.queue.core.windows.net"
    if blob is None and queue is None:
        raise ValueError(
            f"no storage connection: set {PREFIX} to a connection string, or connect with an "
            f"identity through {PREFIX}__accountName, or {PREFIX}__blobServiceUri and "
            f"{PREFIX}__queueServiceUri (see README, Storage without keys)"
        )
    if blob is None:
        raise ValueError(f"{PREFIX}__blobServiceUri is missing (the app's containers need it)")
    if queue is None:
        raise ValueError(
            f"{PREFIX}__queueServiceUri is missing (the app's queues need it; "
            f"{PREFIX}__serviceUri names the blob service only)"
        )
    return blob, queue
