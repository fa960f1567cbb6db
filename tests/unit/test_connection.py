"""The storage connection settings: a connection string, or an identity, each validated."""

from __future__ import annotations

import os

import pytest
from pydantic import ValidationError

from retrain.connection import PREFIX, StorageConnection, StorageSettings
from retrain.errors import ConfigError
from retrain.settings import get_settings

KEYED = (
    "DefaultEndpointsProtocol=https;AccountName=acct;AccountKey=a2V5;"
    "EndpointSuffix=core.windows.net"
)


@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """No storage setting from the outside environment."""
    for name in list(os.environ):
        if name == PREFIX or name.startswith(f"{PREFIX}__"):
            monkeypatch.delenv(name)
    return monkeypatch


def connect(env: pytest.MonkeyPatch, **values: str) -> StorageConnection:
    for key, value in values.items():
        env.setenv(PREFIX if key == "string" else f"{PREFIX}__{key}", value)
    return StorageSettings().storage


def refused(env: pytest.MonkeyPatch, **values: str) -> str:
    with pytest.raises(ValidationError) as info:
        connect(env, **values)
    return str(info.value)


def test_a_connection_string_keeps_working(env: pytest.MonkeyPatch) -> None:
    connection = connect(env, string=KEYED)
    assert not connection.uses_identity
    blobs, queues = connection.clients()
    assert blobs.url.startswith("https://acct.blob.core.windows.net")
    assert queues.url.startswith("https://acct.queue.core.windows.net")
    assert "a2V5" not in connection.describe()


def test_an_account_name_means_the_public_cloud_endpoints(env: pytest.MonkeyPatch) -> None:
    connection = connect(env, accountName="acct", credential="managedidentity", clientId="c-1")
    assert connection.uses_identity
    assert connection.blob_url == "https://acct.blob.core.windows.net"
    assert connection.queue_url == "https://acct.queue.core.windows.net"
    assert "user-assigned managed identity (client id c-1)" in connection.describe()


def test_service_uris_name_each_service(env: pytest.MonkeyPatch) -> None:
    connection = connect(
        env,
        blobServiceUri="https://acct.blob.core.usgovcloudapi.net/",
        queueServiceUri="https://acct.queue.core.usgovcloudapi.net",
    )
    assert connection.blob_url == "https://acct.blob.core.usgovcloudapi.net"
    assert connection.queue_url == "https://acct.queue.core.usgovcloudapi.net"
    assert "DefaultAzureCredential" in connection.describe()
    serviced = connect(env, serviceUri="https://other.blob.core.usgovcloudapi.net")
    assert serviced.blob_url == "https://acct.blob.core.usgovcloudapi.net"  # the specific one wins


def test_no_connection_at_all_says_both_ways(env: pytest.MonkeyPatch) -> None:
    message = refused(env)
    assert f"set {PREFIX} to a connection string" in message
    assert f"{PREFIX}__accountName" in message
    assert f"{PREFIX}__queueServiceUri" in message


def test_a_blob_uri_without_a_queue_uri_names_the_missing_setting(
    env: pytest.MonkeyPatch,
) -> None:
    message = refused(env, serviceUri="https://acct.blob.core.windows.net")
    assert f"{PREFIX}__queueServiceUri is missing" in message
    env.delenv(f"{PREFIX}__serviceUri")
    assert f"{PREFIX}__blobServiceUri is missing" in refused(
        env, queueServiceUri="https://acct.queue.core.windows.net"
    )


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        ({"accountName": "acct", "credential": "clientsecret"}, "only value is 'managedidentity'"),
        ({"accountName": "acct", "clientId": "c-1"}, "set both"),
        ({"accountName": "Not_An_Account"}, "is not a storage account name"),
        (
            {"blobServiceUri": "http://acct.blob.core.windows.net", "queueServiceUri": "x"},
            "uses plain http",
        ),
        (
            {
                "blobServiceUri": "https://acct.blob.core.windows.net?sv=1&sig=abc",
                "queueServiceUri": "https://acct.queue.core.windows.net",
            },
            "must not carry a query string",
        ),
        ({"string": KEYED, "accountName": "acct"}, "keep one way to connect"),
    ],
)
def test_bad_identity_settings_name_the_setting_and_fix(
    env: pytest.MonkeyPatch, values: dict[str, str], expected: str
) -> None:
    assert expected in refused(env, **values)


def test_a_sas_in_a_service_uri_is_refused_without_repeating_it(
    env: pytest.MonkeyPatch,
) -> None:
    env.setenv(f"{PREFIX}__blobServiceUri", "https://acct.blob.core.windows.net?sv=1&sig=abc")
    env.setenv(f"{PREFIX}__queueServiceUri", "https://acct.queue.core.windows.net")
    get_settings.cache_clear()
    with pytest.raises(ConfigError) as info:
        get_settings()
    get_settings.cache_clear()
    assert "must not carry a query string" in str(info.value)
    assert "sig=abc" not in str(info.value)


def test_http_is_accepted_for_a_loopback_emulator(env: pytest.MonkeyPatch) -> None:
    connection = connect(
        env,
        blobServiceUri="http://127.0.0.1:10000/devstoreaccount1",
        queueServiceUri="http://127.0.0.1:10001/devstoreaccount1",
    )
    assert connection.blob_url == "http://127.0.0.1:10000/devstoreaccount1"


def test_the_credential_is_the_managed_identity_named_or_the_default_chain(
    env: pytest.MonkeyPatch,
) -> None:
    from azure.identity import DefaultAzureCredential, ManagedIdentityCredential

    user = connect(env, accountName="acct", credential="ManagedIdentity", clientId="c-1")
    credential = user.credential()
    assert isinstance(credential, ManagedIdentityCredential)
    env.delenv(f"{PREFIX}__credential")
    env.delenv(f"{PREFIX}__clientId")
    assert isinstance(connect(env, accountName="acct").credential(), DefaultAzureCredential)


def test_settings_build_no_credential_until_clients_are_made(env: pytest.MonkeyPatch) -> None:
    """Loading settings must stay cheap at a cold start: no azure-identity object yet."""
    import gc

    from azure.identity import ManagedIdentityCredential

    before = sum(isinstance(o, ManagedIdentityCredential) for o in gc.get_objects())
    connect(env, accountName="acct", credential="managedidentity")
    assert sum(isinstance(o, ManagedIdentityCredential) for o in gc.get_objects()) == before


def test_the_app_settings_report_a_missing_connection_with_the_other_problems(
    env: pytest.MonkeyPatch,
) -> None:
    env.delenv("RETRAIN_DATA_CONTAINER", raising=False)
    get_settings.cache_clear()
    with pytest.raises(ConfigError) as info:
        get_settings()
    get_settings.cache_clear()
    assert "RETRAIN_DATA_CONTAINER" in str(info.value)
    assert f"set {PREFIX} to a connection string" in str(info.value)
