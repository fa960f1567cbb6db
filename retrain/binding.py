"""The blob trigger's argument: where the new blob is, never its content and never a client.

A parameter whose type derives from the base extension's `SdkType` makes the worker flag the
binding `SupportsDeferredBinding`; the host then sends *model binding data* (a small JSON naming
the connection, the container and the blob) instead of the blob's bytes. The converter below
turns that JSON into a `BlobAddress`. It replaces the blob SDK-type extension, which builds a
`BlobClient` and so imports the storage SDK and azure-identity on every cold start (about 400 ms
here) only for the ingest step to read two names. The storage clients load on first use instead.

Importing this module registers the converter for the `blob` and `blobTrigger` binding types; it
must not be imported together with azurefunctions-extensions-bindings-blob (the registry accepts
one converter per binding type and raises on a second).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from azurefunctions.extensions.base import Datum, InConverter, SdkType

MODEL_BINDING_DATA = "model_binding_data"


@dataclass(frozen=True)
class BlobAddress(SdkType):  # type: ignore[misc]  # the base package ships no type hints
    """The container and name of a blob the host announced, and the connection it came from."""

    container_name: str
    blob_name: str
    connection: str

    def get_sdk_type(self) -> BlobAddress:
        return self

    @classmethod
    def from_model_binding_data(cls, content: str | bytes) -> BlobAddress:
        """Parse the host's JSON; a ValueError names what is missing or malformed."""
        try:
            fields = json.loads(content)
        except ValueError as exc:
            raise ValueError(f"blob trigger: model binding data is not JSON: {exc}") from None
        values = {}
        for key in ("ContainerName", "BlobName", "Connection"):
            value = fields.get(key) if isinstance(fields, dict) else None
            if not isinstance(value, str) or not value:
                raise ValueError(f"blob trigger: model binding data has no {key}")
            values[key] = value
        return cls(values["ContainerName"], values["BlobName"], values["Connection"])


class BlobAddressConverter(  # type: ignore[call-arg]  # keywords go to the base's metaclass
    InConverter,  # type: ignore[misc]  # the base package ships no type hints
    binding="blob",
    trigger="blobTrigger",
):
    """Decodes the blob trigger's model binding data into a `BlobAddress`."""

    @classmethod
    def check_input_type_annotation(cls, pytype: type) -> bool:
        return isinstance(pytype, type) and issubclass(pytype, BlobAddress)

    @classmethod
    def has_implicit_output(cls) -> bool:
        return False

    @classmethod
    def decode(cls, data: Datum, *, trigger_metadata: Any, pytype: type) -> BlobAddress | None:
        if data is None or data.type is None:
            return None
        if data.type != MODEL_BINDING_DATA:
            raise ValueError(
                f"blob trigger: expected {MODEL_BINDING_DATA}, got {data.type!r}; the binding "
                "must be flagged SupportsDeferredBinding (is azurefunctions-extensions-base "
                "installed in the app?)"
            )
        return BlobAddress.from_model_binding_data(data.value.content)
