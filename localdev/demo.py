"""The whole pipeline on sample data, classic and Azure ML v2 side by side: Azurite, both
emulators and the function app under the local runner.

Two models learn from the same data: 'housing' on Azure ML Studio (classic): a BES job and a
classic web service endpoint; 'housing-v2' on Azure ML v2: an Azure ML job, a registered model
version and blue/green deployments of a managed online endpoint. Each of three datasets is
dropped under both models' prefixes: a small noisy one (the first champion), a large clean one
(better: promoted), a very noisy one (worse: rejected). After each drop both endpoints are
scored; then each model's run history, and a rollback of each from the CLI (back to the first
champion). Exits 0 when both endpoints behaved as the runs say.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import sys
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import requests
from azure.storage.blob import BlobServiceClient

from localdev import azureml_v2, stack, v2stack
from localdev.amlemu import Emulator, EmulatorServer
from localdev.runner import LocalRunner
from localdev.sample import housing_csv
from retrain import cli
from retrain.pipeline.records import file_count

HOUSE = [4.0, 30.0, 10.0]
TRUE_PRICE = 30 * 4.0 - 0.8 * 30.0 - 4 * 10.0 + 50
CLASSIC, V2 = "housing", "housing-v2"
DROPS = [
    ("2026-11-01.csv", housing_csv(40, seed=1, noise=40), "small, noisy"),
    ("2026-11-02.csv", housing_csv(500, seed=2, noise=2), "large, clean"),
    ("2026-11-03.csv", housing_csv(40, seed=3, noise=60), "small, very noisy"),
]
EXPECTED_RUNS = ["promoted", "promoted", "rejected", "promoted"]


def _predict_classic(url: str) -> tuple[float, str]:
    response = requests.post(
        f"{url}/workspaces/ws1/services/housing-predict-prod/execute?api-version=2.0",
        json={
            "Inputs": {"input1": {"ColumnNames": v2stack.COLUMNS, "Values": [HOUSE]}},
            "GlobalParameters": {},
        },
        headers={"Authorization": "Bearer local-endpoint-key"},
        timeout=10,
    )
    response.raise_for_status()
    price = float(response.json()["Results"]["output1"]["value"]["Values"][0][-1])
    return price, "classic web service endpoint"


def _predict_v2(server: azureml_v2.EmulatorServer) -> tuple[float, str]:
    """Score the online endpoint as a client does: its traffic map picks the deployment."""
    response = requests.post(
        f"{server.url}/score/{V2}",
        json=v2stack.score_request([HOUSE]),
        headers={"Authorization": f"Bearer {v2stack.SCORE_KEY}"},
        timeout=10,
    )
    response.raise_for_status()
    traffic = server.emulator.serving.endpoints[V2].traffic
    return float(response.json()[0]), f"online endpoint, traffic {traffic}"


def _runs(blobs: BlobServiceClient, container: str, model: str) -> list[dict[str, Any]]:
    client = blobs.get_container_client(container)
    names = sorted(b.name for b in client.list_blobs(name_starts_with=f"runs/{model}/"))
    return [json.loads(client.download_blob(n).readall()) for n in names]


def _print_runs(model: str, runs: list[dict[str, Any]]) -> None:
    print(f"Run history (model {model!r}):")
    print(f"  {'run':<31} {'kind':<8} {'state':<9} {'files':>5}  {'RMSE':>8}  reason")
    for run in runs:
        rmse = ((run.get("metrics") or {}).get("challenger") or {}).get("Root Mean Squared Error")
        reason = (run.get("decision") or {}).get("reason") or run.get("error") or ""
        rmse_text = f"{rmse:8.3f}" if rmse is not None else "       -"
        print(
            f"  {run['run_id']:<31} {run.get('kind', 'retrain'):<8} {run['state']:<9} "
            f"{file_count(run):>5}  {rmse_text}  {reason}"
        )
    print()


def _verdict(model: str, prices: list[float], runs: list[dict[str, Any]]) -> bool:
    """The endpoint moved to the better model, held against the worse one, rolled back to the
    first champion, and the runs say so."""
    first, promoted, rejected, rolled_back = prices
    states = [run["state"] for run in runs]
    ok = (
        states == EXPECTED_RUNS
        and abs(promoted - TRUE_PRICE) < abs(first - TRUE_PRICE)
        and rejected == promoted
        and rolled_back == first
    )
    print(
        f"{model:<11} before the better model {first:7.2f}; after promotion {promoted:7.2f}; "
        f"after the rejected run {rejected:7.2f}; after the rollback {rolled_back:7.2f}"
        + ("" if ok else f"  <- FAILED (runs: {', '.join(states)})")
    )
    return ok


def _scenario(
    runner: LocalRunner,
    settings: dict[str, str],
    predictors: dict[str, Callable[[], tuple[float, str]]],
) -> dict[str, list[float]]:
    """Drop each dataset under both prefixes, then roll both models back; the prices each
    endpoint predicted after each step."""
    blobs = BlobServiceClient.from_connection_string(settings["AzureWebJobsStorage"])
    data = blobs.get_container_client(settings["RETRAIN_DATA_CONTAINER"])
    prices: dict[str, list[float]] = {model: [] for model in predictors}

    def settle(step: str) -> None:
        runner.run_until_idle(timeout=120)
        print(f"  -> endpoints predict for {HOUSE} (true value {TRUE_PRICE:.2f}), {step}:")
        for model, predict in predictors.items():
            price, serving = predict()
            prices[model].append(price)
            print(f"     {model:<11} {price:7.2f}  ({serving})")
        print()

    for name, text, what in DROPS:
        print(f"Dropping {name} ({what}) as {CLASSIC}/{name} and {V2}/{name}")
        for model in predictors:
            data.upload_blob(f"{model}/{name}", text, overwrite=True)
        settle(f"after {name}")
    for model in predictors:
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            code = cli.main(["--json", "rollback", model, "--by", "demo"])
        answer = json.loads(out.getvalue()) if code == 0 else {"error": out.getvalue()}
        print(f"retrain rollback {model} --by demo -> {answer}")
    settle("after the rollbacks")
    return prices


def main() -> int:
    """Run the demo; returns the process exit code."""
    logging.basicConfig(level=logging.INFO, format="  %(name)-17s %(message)s", stream=sys.stdout)
    logging.getLogger().setLevel(logging.WARNING)
    logging.getLogger("retrain").setLevel(logging.INFO)
    print("Starting Azurite, the Azure ML (classic) emulator and the Azure ML v2 emulator ...")
    with stack.azurite() as conn:
        settings = stack.app_settings(conn, [])
        v2_config = v2stack.emulator_config(conn, settings["RETRAIN_ARTIFACTS_CONTAINER"], [V2])
        with (
            EmulatorServer(Emulator(stack.emulator_config())) as classic,
            azureml_v2.EmulatorServer(azureml_v2.Emulator(v2_config)) as v2,
        ):
            models = [stack.model_spec(classic.url), v2stack.model_spec(v2.url, V2)]
            settings = stack.app_settings(conn, models)
            runner = LocalRunner(
                stack.load_app(settings), env=settings, failure_visibility=timedelta(seconds=1)
            )
            print(f"Classic emulator on {classic.url}, v2 emulator on {v2.url}\n")
            predictors = {
                CLASSIC: lambda: _predict_classic(classic.url),
                V2: lambda: _predict_v2(v2),
            }
            prices = _scenario(runner, settings, predictors)
            blobs = BlobServiceClient.from_connection_string(conn)
            runs = {m: _runs(blobs, settings["RETRAIN_STATE_CONTAINER"], m) for m in predictors}
            for model in predictors:
                _print_runs(model, runs[model])
            verdicts = [_verdict(m, prices[m], runs[m]) for m in predictors]
            violations = v2.emulator.violations
            if violations:
                print(f"The v2 emulator refused {len(violations)} request(s): {violations}")
    ok = all(verdicts) and not violations
    print("Demo " + ("succeeded." if ok else "FAILED: an endpoint did not behave as expected."))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
