"""The local stack: Azurite, the Azure ML emulator and the function app under the local runner."""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
AZURITE = ROOT / "node_modules" / ".bin" / "azurite"
DEV_ACCOUNT = "devstoreaccount1"
DEV_KEY = (  # Azurite's published development key
    "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="
)


def connection_string(blob_port: int, queue_port: int) -> str:
    """Connection string for Azurite on the given loopback ports."""
    return (
        f"DefaultEndpointsProtocol=http;AccountName={DEV_ACCOUNT};AccountKey={DEV_KEY};"
        f"BlobEndpoint=http://127.0.0.1:{blob_port}/{DEV_ACCOUNT};"
        f"QueueEndpoint=http://127.0.0.1:{queue_port}/{DEV_ACCOUNT};"
    )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _answers(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex(("127.0.0.1", port)) == 0


@contextlib.contextmanager
def azurite() -> Iterator[str]:
    """Start Azurite (in memory, loopback, free ports); yield its connection string."""
    with azurite_process() as (connection, _):
        yield connection


@contextlib.contextmanager
def azurite_process() -> Iterator[tuple[str, int]]:
    """`azurite`, yielding its process id too (the benchmark reads the CPU it spent)."""
    if not AZURITE.exists():
        raise RuntimeError(f"{AZURITE} is missing: run 'npm ci' first")
    ports = [_free_port() for _ in range(3)]
    with serve([str(AZURITE), *azurite_args(ports)], ports[:2]) as proc:
        yield connection_string(ports[0], ports[1]), proc.pid


def azurite_args(ports: list[int]) -> list[str]:
    """Azurite's options: in memory, loopback only, blob, queue and table on `ports`."""
    return [
        "--silent",
        "--inMemoryPersistence",
        "--skipApiVersionCheck",
        "--disableTelemetry",
        "--blobHost",
        "127.0.0.1",
        "--blobPort",
        str(ports[0]),
        "--queueHost",
        "127.0.0.1",
        "--queuePort",
        str(ports[1]),
        "--tableHost",
        "127.0.0.1",
        "--tablePort",
        str(ports[2]),
    ]


@contextlib.contextmanager
def serve(
    argv: list[str], ports: list[int], env: dict[str, str] | None = None
) -> Iterator[subprocess.Popen[bytes]]:
    """Run a server until the block ends; enter the block (with its process) once every one of
    `ports` answers."""
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    try:
        deadline = time.monotonic() + 30
        while not all(_answers(port) for port in ports):
            if proc.poll() is not None:
                err = proc.stderr.read().decode() if proc.stderr else ""
                raise RuntimeError(f"{argv[0]} exited with {proc.returncode}: {err[-500:]}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{argv[0]} did not answer within 30 s")
            time.sleep(0.05)
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def emulator_config(*, champion_endpoint: bool = False) -> dict[str, Any]:
    """One training service and one predictive endpoint, as the demo and tests use them."""
    service: dict[str, Any] = {
        "workspace": "ws1",
        "service": "housing-train",
        "api_key": "local-bes-key",
        "label_parameter": "Label Column",
    }
    if champion_endpoint:
        service["champion_endpoint"] = "housing-predict-prod"
    return {
        "account_key": DEV_KEY,
        "training_services": [service],
        "web_services": [
            {
                "subscription": "sub1",
                "resource_group": "rg1",
                "name": "housing-new",
                "arm_token": "local-arm-token",
                "api_key": "local-new-key",
                "asset_name": "Housing Model [trained model]",
            }
        ],
        "endpoints": [
            {
                "workspace": "ws1",
                "webservice": "housing-predict",
                "name": "prod",
                "api_key": "local-endpoint-key",
                "resource_name": "Housing Model [trained model]",
            }
        ],
    }


def model_spec(emulator_url: str, **overrides: Any) -> dict[str, Any]:
    """The 'housing' model spec pointing at the emulator."""
    spec: dict[str, Any] = {
        "name": "housing",
        "columns": ["rooms", "age", "distance", "price"],
        "training": {
            "kind": "bes",
            "jobs_url": f"{emulator_url}/workspaces/ws1/services/housing-train/jobs",
            "api_key_setting": "RETRAIN_BES_KEY_HOUSING",
            "model_output": "output1",
            "evaluation_output": "output2",
            "global_parameters": {"Label Column": "price"},
        },
        "gate": {"metric": "Root Mean Squared Error"},
        "target": {
            "kind": "classic",
            "endpoint_url": f"{emulator_url}/workspaces/ws1/webservices/housing-predict/"
            "endpoints/prod",
            "api_key_setting": "RETRAIN_ENDPOINT_KEY_HOUSING",
            "resource_name": "Housing Model [trained model]",
        },
        "quiet_period": 1,
        "max_wait": 30,
        "job_deadline": 600,
    }
    spec.update(overrides)
    return spec


def new_target(emulator_url: str, **overrides: Any) -> dict[str, Any]:
    """A 'new' target: the emulator's ARM web service, with a fixed local token."""
    target: dict[str, Any] = {
        "kind": "new",
        "subscription_id": "sub1",
        "resource_group": "rg1",
        "web_service": "housing-new",
        "arm_endpoint": emulator_url,
        "token_setting": "RETRAIN_ARM_TOKEN",
    }
    target.update(overrides)
    return target


def app_settings(
    connection: str, models: list[dict[str, Any]], *, suffix: str = ""
) -> dict[str, str]:
    """The app settings of a local run (what local.settings.json holds in Values)."""
    return {
        "FUNCTIONS_WORKER_RUNTIME": "python",
        "AzureWebJobsStorage": connection,
        "RETRAIN_DATA_CONTAINER": f"training-data{suffix}",
        "RETRAIN_ARTIFACTS_CONTAINER": f"retrain-artifacts{suffix}",
        "RETRAIN_STATE_CONTAINER": f"retrain-state{suffix}",
        "RETRAIN_QUARANTINE_CONTAINER": f"retrain-quarantine{suffix}",
        "RETRAIN_JOBS_QUEUE": f"retrain-jobs{suffix}",
        "RETRAIN_EVALUATIONS_QUEUE": f"retrain-evaluations{suffix}",
        "RETRAIN_MODELS": json.dumps(models),
        "RETRAIN_POLL_FIRST_DELAY": "PT1S",
        "RETRAIN_POLL_MAX_DELAY": "PT4S",
        "RETRAIN_BES_KEY_HOUSING": "local-bes-key",
        "RETRAIN_ENDPOINT_KEY_HOUSING": "local-endpoint-key",
        "RETRAIN_ARM_TOKEN": "local-arm-token",
        "RETRAIN_EVENTS_QUEUE": f"retrain-events{suffix}",
        "RETRAIN_SWEEP_SCHEDULE": "0 */5 * * * *",
    }


def load_app(settings: dict[str, str]) -> Any:
    """Apply app settings to this process and (re)load the function app with fresh caches.
    The storage connection is exactly the one given: another app's lingers in no form."""
    for name in [k for k in os.environ if k.startswith("AzureWebJobsStorage")]:
        if name not in settings:
            del os.environ[name]
    os.environ.update(settings)
    from retrain import settings as settings_module
    from retrain import wiring

    settings_module.get_settings.cache_clear()
    wiring.retrainer.cache_clear()
    wiring.webhook.cache_clear()
    import function_app

    return importlib.reload(function_app).app
