"""The whole pipeline on sample data: Azurite + the Azure ML emulator + the function app.

Drops three datasets for the 'housing' model, one after another: a small noisy one (the first
champion), a large clean one (better: promoted), and a noisy one again (worse: rejected). Prints
each step, the run history, and a prediction from the endpoint before and after promotion.
"""

from __future__ import annotations

import logging
import sys
from datetime import timedelta
from typing import Any

import requests
from azure.storage.blob import BlobServiceClient

from localdev import stack
from localdev.amlemu import Emulator, EmulatorServer
from localdev.runner import LocalRunner
from localdev.sample import housing_csv

HOUSE = [4.0, 30.0, 10.0]
TRUE_PRICE = 30 * 4.0 - 0.8 * 30.0 - 4 * 10.0 + 50


def _predict(url: str) -> float:
    response = requests.post(
        f"{url}/workspaces/ws1/services/housing-predict-prod/execute?api-version=2.0",
        json={
            "Inputs": {"input1": {"ColumnNames": ["rooms", "age", "distance"], "Values": [HOUSE]}},
            "GlobalParameters": {},
        },
        headers={"Authorization": "Bearer local-endpoint-key"},
        timeout=10,
    )
    response.raise_for_status()
    return float(response.json()["Results"]["output1"]["value"]["Values"][0][-1])


def _runs(blobs: BlobServiceClient, container: str) -> list[dict[str, Any]]:
    import json

    client = blobs.get_container_client(container)
    names = sorted(b.name for b in client.list_blobs(name_starts_with="runs/housing/"))
    return [json.loads(client.download_blob(n).readall()) for n in names]


def main() -> int:
    """Run the demo; returns the process exit code."""
    logging.basicConfig(level=logging.INFO, format="  %(name)-17s %(message)s", stream=sys.stdout)
    logging.getLogger().setLevel(logging.WARNING)
    logging.getLogger("retrain").setLevel(logging.INFO)
    print("Starting Azurite and the Azure ML emulator ...")
    with stack.azurite() as conn, EmulatorServer(Emulator(stack.emulator_config())) as emu:
        settings = stack.app_settings(conn, [stack.model_spec(emu.url)])
        runner = LocalRunner(
            stack.load_app(settings), env=settings, failure_visibility=timedelta(seconds=1)
        )
        blobs = BlobServiceClient.from_connection_string(conn)
        data = blobs.get_container_client(settings["RETRAIN_DATA_CONTAINER"])
        print(
            f"Azure ML emulator on {emu.url}; functions: "
            f"{', '.join(t.name for t in runner.triggers)}\n"
        )
        drops = [
            ("housing/2026-11-01.csv", housing_csv(40, seed=1, noise=40), "small, noisy"),
            ("housing/2026-11-02.csv", housing_csv(500, seed=2, noise=2), "large, clean"),
            ("housing/2026-11-03.csv", housing_csv(40, seed=3, noise=60), "small, very noisy"),
        ]
        predictions = []
        for name, text, what in drops:
            print(f"Dropping {name} ({what}) into {data.container_name}/")
            data.upload_blob(name, text, overwrite=True)
            runner.run_until_idle(timeout=120)
            price = _predict(emu.url)
            predictions.append(price)
            print(f"  -> endpoint predicts {price:.2f} for {HOUSE} (true value {TRUE_PRICE:.2f})\n")

        print("Run history (model 'housing'):")
        print(f"  {'run':<24} {'state':<9} {'files':>5}  {'RMSE':>8}  reason")
        for run in _runs(blobs, settings["RETRAIN_STATE_CONTAINER"]):
            rmse = ((run.get("metrics") or {}).get("challenger") or {}).get(
                "Root Mean Squared Error"
            )
            reason = (run.get("decision") or {}).get("reason") or run.get("error") or ""
            rmse_text = f"{rmse:8.3f}" if rmse is not None else "       -"
            print(
                f"  {run['run_id']:<24} {run['state']:<9} {len(run['files']):>5}  "
                f"{rmse_text}  {reason}"
            )
        print(
            f"\nPrediction before the better model: {predictions[0]:.2f}; after promotion: "
            f"{predictions[1]:.2f}; after the rejected run: {predictions[2]:.2f} "
            f"(true value {TRUE_PRICE:.2f})"
        )
        ok = predictions[2] == predictions[1] and abs(predictions[1] - TRUE_PRICE) < abs(
            predictions[0] - TRUE_PRICE
        )
        print(
            "Demo " + ("succeeded." if ok else "FAILED: the endpoint did not behave as expected.")
        )
        return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
