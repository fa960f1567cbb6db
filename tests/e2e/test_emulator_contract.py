"""The emulator holds the code to the documented contracts, so passing tests mean something."""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import quote

import pytest
import requests
from azure.storage.blob import BlobSasPermissions, BlobServiceClient, generate_blob_sas

from localdev import stack
from localdev.amlemu import AUTH_FAILED, Emulator, EmulatorServer
from retrain.clock import ManualClock
from tests.stack_support import STORAGE_MODES, Storage

pytestmark = pytest.mark.e2e


@pytest.fixture
def url() -> Iterator[str]:
    with EmulatorServer(Emulator(stack.emulator_config())) as server:
        yield server.url


BES = "/workspaces/ws1/services/housing-train/jobs"
EP = "/workspaces/ws1/webservices/housing-predict/endpoints"
ARM = "/subscriptions/sub1/resourceGroups/rg1/providers/Microsoft.MachineLearning/webServices/"


def test_bes_needs_the_api_version_and_the_key(url: str) -> None:
    auth = {"Authorization": "Bearer local-bes-key"}
    assert requests.post(url + BES, json={}, headers=auth, timeout=5).status_code == 400
    wrong = {"Authorization": "Bearer nope"}
    assert (
        requests.post(
            url + BES + "?api-version=2.0", json={"Inputs": {}}, headers=wrong, timeout=5
        ).status_code
        == 401
    )
    response = requests.post(
        url + BES + "?api-version=2.0", json={"Inputs": {}}, headers=auth, timeout=5
    )
    job = response.json()
    assert isinstance(job, str)
    assert len(job) == 32
    status = requests.get(f"{url}{BES}/{job}?api-version=2.0", headers=auth, timeout=5).json()
    assert status == {"StatusCode": "NotStarted", "Results": None, "Details": None}


def test_classic_management_refuses_default_and_unknown_resources(url: str) -> None:
    auth = {"Authorization": "Bearer local-endpoint-key"}
    body = {
        "Resources": [
            {
                "Name": "Housing Model [trained model]",
                "Location": {
                    "BaseLocation": "http://x/",
                    "RelativeLocation": "c/m.ilearner",
                    "SasBlobToken": "?s",
                },
            }
        ]
    }
    default = requests.patch(f"{url}{EP}/default", json=body, headers=auth, timeout=5)
    assert default.status_code == 400
    assert "cannot be replaced" in default.text
    body["Resources"][0]["Name"] = "Other"
    unknown = requests.patch(f"{url}{EP}/prod", json=body, headers=auth, timeout=5)
    assert unknown.status_code == 400
    assert "was not found" in unknown.text


def test_arm_needs_a_bearer_token_and_a_known_api_version(url: str) -> None:
    auth = {"Authorization": "Bearer local-arm-token"}
    assert (
        requests.get(url + ARM + "housing-new?api-version=2017-01-01", timeout=5).status_code == 401
    )
    assert (
        requests.get(
            url + ARM + "housing-new?api-version=2099-01-01", headers=auth, timeout=5
        ).status_code
        == 400
    )
    body = requests.get(
        url + ARM + "housing-new?api-version=2017-01-01", headers=auth, timeout=5
    ).json()
    assert body["properties"]["provisioningState"] == "Succeeded"
    assert "keys" not in body["properties"]
    assert (
        requests.get(
            url + ARM + "missing?api-version=2017-01-01", headers=auth, timeout=5
        ).status_code
        == 404
    )


AUTH = {"Authorization": "Bearer local-bes-key"}
V = "?api-version=2.0"


class Service:
    """The emulator on a manual clock (a started job reads its input at once and runs 60 s of
    that clock), and a container in Azurite to put job inputs in."""

    def __init__(
        self, url: str, emulator: Emulator, blobs: BlobServiceClient, *, delegated: bool
    ) -> None:
        self.url, self.emulator, self.clock = url, emulator, emulator.clock
        self.blobs = blobs
        self.container = "emu-" + uuid.uuid4().hex[:12]
        blobs.create_container(self.container)
        now = datetime.now(UTC)
        # As the app signs in each storage mode: a user delegation key, or the account key.
        self.signing: dict[str, Any] = (
            {"user_delegation_key": blobs.get_user_delegation_key(now, now + timedelta(hours=2))}
            if delegated
            else {"account_key": stack.DEV_KEY}
        )

    def put(self, name: str, data: bytes, metadata: dict[str, str] | None = None) -> str:
        """Upload a blob; its ETag."""
        client = self.blobs.get_blob_client(self.container, name)
        etag: str = client.upload_blob(data, overwrite=True, metadata=metadata)["etag"]
        return etag

    def ref(self, name: str, *, relative: str | None = None) -> dict[str, Any]:
        """A read SAS reference to the blob, with the RelativeLocation encoded as the app does
        (or `relative` as given)."""
        sas = generate_blob_sas(
            stack.DEV_ACCOUNT,
            self.container,
            name,
            permission=BlobSasPermissions(read=True),
            expiry=datetime.now(UTC) + timedelta(hours=1),
            **self.signing,
        )
        return {
            "ConnectionString": None,
            "BaseLocation": self.blobs.url.rstrip("/") + "/",
            "RelativeLocation": relative or f"{self.container}/{quote(name, safe='/')}",
            "SasBlobToken": "?" + sas,
        }

    def submit(self, ref: dict[str, Any], **kwargs: Any) -> str:
        body = {"Inputs": {"input1": ref}, "Outputs": {}, "GlobalParameters": {}}
        response = requests.post(f"{self.url}{BES}{V}", json=body, headers=AUTH, timeout=5)
        response.raise_for_status()
        job: str = response.json()
        return job

    def start(self, job: str, timeout: float = 5) -> requests.Response:
        return requests.post(f"{self.url}{BES}/{job}/start{V}", headers=AUTH, timeout=timeout)

    def status(self, job: str) -> dict[str, Any]:
        response = requests.get(f"{self.url}{BES}/{job}{V}", headers=AUTH, timeout=5)
        response.raise_for_status()
        body: dict[str, Any] = response.json()
        return body

    def kinds(self) -> list[tuple[str, str | None]]:
        return [(v["kind"], v["job"]) for v in self.emulator.violations]


@pytest.fixture(params=STORAGE_MODES)
def storage_mode(request: pytest.FixtureRequest) -> str:
    """The tests that read blobs run with account-key SAS and with user-delegation SAS."""
    return str(request.param)


@pytest.fixture
def service(storage: Storage) -> Iterator[Service]:
    emulator = Emulator(stack.emulator_config(), clock=ManualClock())
    emulator.faults.job_seconds = 60
    with EmulatorServer(emulator) as server:
        yield Service(
            server.url, emulator, storage.blobs(), delegated=storage.credential is not None
        )


def test_a_second_start_is_refused_with_409_and_recorded(service: Service) -> None:
    service.put("a.csv", b"x,price\n1,2\n")
    job = service.submit(service.ref("a.csv"))
    assert service.start(job).status_code == 200
    again = service.start(job)
    assert again.status_code == 409
    assert again.json()["error"]["code"] == "JobAlreadyStarted"
    assert service.status(job)["StatusCode"] == "Running"
    assert service.kinds() == [("second start", job)]


def test_status_polls_under_1_s_apart_are_recorded(service: Service) -> None:
    service.put("a.csv", b"x,price\n1,2\n")
    job = service.submit(service.ref("a.csv"))
    service.status(job)
    service.clock.advance(seconds=1)  # type: ignore[union-attr]
    service.status(job)
    assert service.kinds() == []
    service.clock.advance(seconds=0.5)  # type: ignore[union-attr]
    service.status(job)
    assert service.kinds() == [("poll under 1 s", job)]
    served = requests.get(f"{service.url}/_emulator/violations", timeout=5).json()
    assert served == service.emulator.violations


def test_a_second_job_on_one_blob_version_is_recorded_with_what_it_read(
    service: Service,
) -> None:
    first_bytes, second_bytes = b"x,price\n1,2\n", b"x,price\n3,4\n"
    etag = service.put("a.csv", first_bytes).strip('"')
    jobs = [service.submit(service.ref("a.csv")) for _ in range(2)]
    for job in jobs:
        assert service.start(job).status_code == 200
    assert service.kinds() == [("second job on blob version", jobs[1])]
    version = (f"{service.container}/a.csv", etag)
    assert service.emulator.trained == [
        {
            "job": job,
            "version": version,
            "blob": f"{service.container}/a.csv",
            "etag": etag,
            "sha256": hashlib.sha256(first_bytes).hexdigest(),
        }
        for job in jobs
    ]
    # A new version of the same name is new data: no violation.
    service.put("a.csv", second_bytes)
    third = service.submit(service.ref("a.csv"))
    service.start(third)
    assert len(service.kinds()) == 1
    assert service.emulator.trained[-1]["sha256"] == hashlib.sha256(second_bytes).hexdigest()
    served = requests.get(f"{service.url}/_emulator/trained", timeout=5).json()
    assert [t["version"] for t in served] == [list(version)] * 2 + [
        list(service.emulator.trained[-1]["version"])
    ]


def test_a_copy_that_names_its_source_is_that_source_version(service: Service) -> None:
    data = b"x,price\n1,2\n"
    etag = service.put("housing/a.csv", data)
    source = f"{service.container}/housing/a.csv"
    service.put(
        "runs/r1/input.csv",
        data,
        metadata={"retrain_source": source, "retrain_source_etag": etag},
    )
    copy_job = service.submit(service.ref("runs/r1/input.csv"))
    service.start(copy_job)
    original_job = service.submit(service.ref("housing/a.csv"))
    service.start(original_job)
    assert [t["version"] for t in service.emulator.trained] == [(source, etag.strip('"'))] * 2
    assert service.emulator.trained[0]["blob"] == f"{service.container}/runs/r1/input.csv"
    assert service.kinds() == [("second job on blob version", original_job)]


@pytest.mark.parametrize("name", ["housing/a b#1.csv", "housing/q?x=1.csv", "housing/100%.csv"])
def test_an_unencoded_reference_fails_the_job_as_storage_would(service: Service, name: str) -> None:
    service.put(name, b"x,price\n1,2\n")
    job = service.submit(service.ref(name, relative=f"{service.container}/{name}"))
    assert service.kinds() == [("unencoded reference", job)]
    assert service.start(job).status_code == 200
    service.clock.advance(seconds=60)  # type: ignore[union-attr]
    status = service.status(job)
    assert status["StatusCode"] == "Failed"
    assert status["Details"] == AUTH_FAILED
    assert service.emulator.trained == []


@pytest.mark.parametrize(
    "name", ["housing/a b#1.csv", "housing/q?x=1&sig=2.csv", "housing/%2e%2e.csv", "h/ü\tx.csv"]
)
def test_an_encoded_reference_reads_exactly_the_blob_it_names(service: Service, name: str) -> None:
    data = f"x,price\n1,{len(name)}\n".encode()
    service.put(name, data)
    service.put("housing/decoy.csv", b"x,price\n0,0\n")
    job = service.submit(service.ref(name))
    service.start(job)
    (trained,) = service.emulator.trained
    assert trained["blob"] == f"{service.container}/{name}"
    assert trained["sha256"] == hashlib.sha256(data).hexdigest()
    assert service.kinds() == []


def test_an_unencoded_patch_location_is_refused_with_400_and_recorded(url: str) -> None:
    body = {
        "Resources": [
            {
                "Name": "Housing Model [trained model]",
                "Location": {
                    "BaseLocation": "http://127.0.0.1:9/devstoreaccount1/",
                    "RelativeLocation": "artifacts/runs/a b#/model.ilearner",
                    "SasBlobToken": "?sv=1&sig=x",
                },
            }
        ]
    }
    emulator = Emulator(stack.emulator_config())
    with EmulatorServer(emulator) as server:
        auth = {"Authorization": "Bearer local-endpoint-key"}
        response = requests.patch(f"{server.url}{EP}/prod", json=body, headers=auth, timeout=5)
    assert response.status_code == 400
    assert "AuthenticationFailed" in response.text
    assert [(v["kind"], v["job"]) for v in emulator.violations] == [("unencoded reference", None)]
    assert "sig=" not in emulator.violations[0]["detail"]


def test_a_lost_response_comes_after_the_service_acted(service: Service) -> None:
    service.put("a.csv", b"x,price\n1,2\n")
    job = service.submit(service.ref("a.csv"))
    fault = {"http": [{"lose_response": True, "method": "POST", "path": "/start"}]}
    assert requests.post(f"{service.url}/_emulator/faults", json=fault, timeout=5).ok
    with pytest.raises(requests.ConnectionError):
        service.start(job)
    assert service.status(job)["StatusCode"] == "Running"
    assert len(service.emulator.trained) == 1
    assert service.start(job).status_code == 409
    assert service.kinds() == [("second start", job)]


def test_a_late_answer_comes_after_the_service_acted(service: Service) -> None:
    service.put("a.csv", b"x,price\n1,2\n")
    job = service.submit(service.ref("a.csv"))
    service.emulator.faults.http.append({"delay_answer": 2, "method": "POST", "path": "/start"})
    with pytest.raises(requests.Timeout):
        service.start(job, timeout=0.5)
    # The answer is still being held, yet the job already runs.
    assert service.status(job)["StatusCode"] == "Running"
    assert service.emulator.started[0][0] == job


def test_an_unknown_job_is_404_with_the_right_key_and_401_with_a_wrong_one(url: str) -> None:
    unknown = f"{url}{BES}/{'0' * 32}{V}"
    assert requests.get(unknown, headers=AUTH, timeout=5).status_code == 404
    wrong = {"Authorization": "Bearer nope"}
    assert requests.get(unknown, headers=wrong, timeout=5).status_code == 401
