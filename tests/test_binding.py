"""The blob trigger's converter: the host's model binding data in, a blob address out."""

from __future__ import annotations

import json
from dataclasses import dataclass

import pytest
from azurefunctions.extensions.base import Datum, get_binding_registry

from retrain.binding import BlobAddress


@dataclass
class _Mbd:
    content: str


def _decode(content: str, kind: str = "model_binding_data") -> BlobAddress | None:
    converter = get_binding_registry().get("blobTrigger")
    result: BlobAddress | None = converter.decode(
        Datum(_Mbd(content), kind), trigger_metadata={}, pytype=BlobAddress
    )
    return result


def test_decodes_the_address_the_host_sends() -> None:
    content = json.dumps(
        {"Connection": "AzureWebJobsStorage", "ContainerName": "data", "BlobName": "housing/a.csv"}
    )
    address = _decode(content)
    assert address == BlobAddress("data", "housing/a.csv", "AzureWebJobsStorage")
    assert address is not None
    assert address.get_sdk_type() is address


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        ("not json", "not JSON"),
        ("[1]", "no ContainerName"),
        ('{"Connection": "c", "BlobName": "b"}', "no ContainerName"),
        ('{"Connection": "c", "ContainerName": "d", "BlobName": ""}', "no BlobName"),
        ('{"ContainerName": "d", "BlobName": "b"}', "no Connection"),
    ],
)
def test_malformed_binding_data_is_named(content: str, problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        _decode(content)


def test_content_instead_of_a_reference_is_refused_with_the_reason() -> None:
    """Bytes mean the host was not told the binding is deferred: say so, do not guess."""
    with pytest.raises(ValueError, match="SupportsDeferredBinding"):
        _decode("a,b\n1,2\n", kind="bytes")


def test_an_empty_binding_decodes_to_none() -> None:
    converter = get_binding_registry().get("blobTrigger")
    assert converter.decode(Datum(None, None), trigger_metadata={}, pytype=BlobAddress) is None


def test_only_blob_addresses_are_claimed() -> None:
    converter = get_binding_registry().get("blobTrigger")
    assert converter.check_input_type_annotation(BlobAddress)
    assert not converter.check_input_type_annotation(bytes)
