"""The local runner reaches storage from the app settings it is given, in either mode."""

from __future__ import annotations

import pytest

from localdev.runner import storage_connection
from localdev.stack import connection_string

BLOB = "https://127.0.0.1:10000/devstoreaccount1"
QUEUE = "https://127.0.0.1:10001/devstoreaccount1"


def test_identity_settings_give_an_identity_connection_without_any_key() -> None:
    found = storage_connection(
        {
            "AzureWebJobsStorage": " ",  # blank is unset, as for the app
            "AzureWebJobsStorage__blobServiceUri": BLOB,
            "AzureWebJobsStorage__queueServiceUri": QUEUE + "/",
            "AzureWebJobsStorage__credential": "managedidentity",
            "AzureWebJobsStorage__clientId": "c1",
        }
    )
    assert found.uses_identity
    assert (found.blob_url, found.queue_url) == (BLOB, QUEUE)
    assert (found.managed_identity, found.client_id) == (True, "c1")


def test_the_settings_given_win_over_the_process_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("AzureWebJobsStorage__blobServiceUri", BLOB)
    found = storage_connection({"AzureWebJobsStorage": connection_string(10000, 10001)})
    assert not found.uses_identity


def test_no_storage_setting_names_what_to_set() -> None:
    with pytest.raises(ValueError, match="no storage connection: set AzureWebJobsStorage"):
        storage_connection({"RETRAIN_JOBS_QUEUE": "jobs"})
