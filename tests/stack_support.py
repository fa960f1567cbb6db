"""The running stack an end-to-end test drives: the function app under the local runner, the
emulator and Azurite, with the reads the tests check (run records, model state, arrivals)."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
from azure.core.exceptions import ResourceNotFoundError
from azure.storage.blob import BlobServiceClient
from azure.storage.queue import QueueClient

from localdev import stack, v2stack
from localdev.amlemu import Emulator
from localdev.azureml_v2 import Emulator as V2Emulator
from localdev.oauth import FakeTokenCredential
from localdev.runner import LocalRunner, storage_connection
from retrain.connection import PREFIX

STORAGE_MODES = ["key", pytest.param("identity", marks=pytest.mark.identity)]
"""Both storage modes, as the params of a module's `storage_mode` fixture; the identity
variants carry the `identity` marker (`-m "not identity"` leaves them out)."""


@dataclass(frozen=True)
class Storage:
    """A storage connection a stack uses: its app settings, and the credential that goes with
    them (None with a connection string)."""

    mode: str
    """"key" (a connection string) or "identity" (OAuth tokens, user-delegation SAS)."""
    settings: dict[str, str]
    credential: FakeTokenCredential | None
    service_key: str | None = field(default=None, repr=False)
    """Identity: the account key a service linked to the account holds (the app holds none)."""

    def blobs(self) -> BlobServiceClient:
        """The blob service, reached as the app reaches it."""
        return storage_connection(self.settings).clients(self.credential)[0]

    def queue(self, name: str) -> QueueClient:
        """A queue, its messages sent and read as the raw text they are."""
        return storage_connection(self.settings).clients(self.credential)[1].get_queue_client(name)

    def app_settings(self, models: list[dict[str, Any]], *, suffix: str) -> dict[str, str]:
        """A local run's app settings with this storage connection."""
        settings = stack.app_settings("", models, suffix=suffix)
        del settings[PREFIX]
        return settings | self.settings

    def v2_emulator(self, container: str, **options: Any) -> V2Emulator:
        """The Azure ML v2 emulator (see `localdev.v2stack`) with its datastore over
        `container`: through the account's connection string, or (identity) through its blob
        endpoint with a token credential, as an identity-based datastore is read."""
        config = v2stack.emulator_config("", container, ["housing"])
        config["datastores"]["retrain"] = (
            {"connection_string": self.settings[PREFIX], "container": container}
            if self.credential is None
            else {"account_url": self.settings[f"{PREFIX}__blobServiceUri"], "container": container}
        )
        return V2Emulator(config, credential=self.credential, **options)


@dataclass
class Stack:
    """A running stack for one test, isolated by container and queue names."""

    runner: LocalRunner
    emulator: Emulator
    emulator_url: str
    settings: dict[str, str]
    blobs: BlobServiceClient
    storage: Storage

    @property
    def storage_mode(self) -> str:
        """ "key" (a connection string) or "identity" (OAuth tokens, user-delegation SAS)."""
        return self.storage.mode

    def queue(self, name: str) -> QueueClient:
        """One of the app's queues (or a poison queue), reached as the app reaches it."""
        return self.storage.queue(name)

    def upload(self, name: str, data: str | bytes) -> None:
        """Drop a file into the data container (created if no blob trigger made it)."""
        container = self.blobs.get_container_client(self.settings["RETRAIN_DATA_CONTAINER"])
        if not container.exists():
            container.create_container()
        container.upload_blob(name, data, overwrite=True)

    def _doc(self, key: str) -> dict[str, Any] | None:
        client = self.blobs.get_blob_client(self.settings["RETRAIN_STATE_CONTAINER"], key)
        if not client.exists():
            return None
        result: dict[str, Any] = json.loads(client.download_blob().readall())
        return result

    def runs(self, model: str = "housing") -> list[dict[str, Any]]:
        """Every run record of the model, oldest first."""
        return [self._doc(n) or {} for n in sorted(self._keys(f"runs/{model}/"))]

    def run_files(self, run: dict[str, Any]) -> list[dict[str, Any]]:
        """The files of `run`, read from its manifest."""
        manifest = self._doc(run["manifest"])
        assert manifest is not None, f"run {run['run_id']}: no manifest {run['manifest']}"
        files: list[dict[str, Any]] = manifest["files"]
        return files

    def _keys(self, prefix: str) -> list[str]:
        container = self.blobs.get_container_client(self.settings["RETRAIN_STATE_CONTAINER"])
        try:
            return [b.name for b in container.list_blobs(name_starts_with=prefix)]
        except ResourceNotFoundError:
            return []

    def step_until_running(self) -> None:
        """Poll like the host until the first run's BES job is running."""
        for _ in range(200):
            if self.runs() and self.runs()[0]["state"] == "running":
                return
            self.runner.step()
        raise AssertionError(f"no running run: {[r['state'] for r in self.runs()]}")

    def model_state(self, model: str = "housing") -> dict[str, Any]:
        """The model's document: batch, active run, champion."""
        return self._doc(f"models/{model}.json") or {}

    def arrivals(self) -> list[dict[str, Any]]:
        """Every arrival record."""
        return [self._doc(n) or {} for n in self._keys("arrivals/")]

    def jobs_submitted(self) -> int:
        """BES submits the emulator accepted."""
        return self.emulator.count("POST", r"/jobs$", 200)

    def predict(self, rows: list[list[float]], *, new: bool = False) -> list[float]:
        """Score rows through RRS on the Classic endpoint (or the New web service)."""
        import requests

        path = (
            "/subscriptions/sub1/services/housing-new"
            if new
            else "/workspaces/ws1/services/housing-predict-prod"
        )
        key = "local-new-key" if new else "local-endpoint-key"
        response = requests.post(
            f"{self.emulator_url}{path}/execute?api-version=2.0",
            json={
                "Inputs": {"input1": {"ColumnNames": ["rooms", "age", "distance"], "Values": rows}},
                "GlobalParameters": {},
            },
            headers={"Authorization": f"Bearer {key}"},
            timeout=10,
        )
        response.raise_for_status()
        return [r[-1] for r in response.json()["Results"]["output1"]["value"]["Values"]]


MakeStack = Callable[..., Stack]


@dataclass
class V2Stack:
    """The app under the local runner on the Azure ML v2 emulator, with the reads the v2 tests
    check: run records, the model document, the endpoint's traffic map."""

    runner: LocalRunner
    emulator: V2Emulator
    settings: dict[str, str]
    blobs: BlobServiceClient
    url: str = ""

    def upload(self, name: str, data: str) -> None:
        container = self.blobs.get_container_client(self.settings["RETRAIN_DATA_CONTAINER"])
        if not container.exists():
            container.create_container()
        container.upload_blob(name, data, overwrite=True)

    def doc(self, key: str) -> dict[str, Any]:
        client = self.blobs.get_blob_client(self.settings["RETRAIN_STATE_CONTAINER"], key)
        found: dict[str, Any] = json.loads(client.download_blob().readall())
        return found

    def runs(self) -> list[dict[str, Any]]:
        container = self.blobs.get_container_client(self.settings["RETRAIN_STATE_CONTAINER"])
        names = sorted(b.name for b in container.list_blobs(name_starts_with="runs/housing/"))
        return [self.doc(n) for n in names]

    def traffic(self) -> dict[str, int]:
        return dict(self.emulator.serving.endpoints["housing"].traffic)
