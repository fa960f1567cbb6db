"""Benchmarks for the costs that matter to a serverless retraining app.

Each figure is printed beside a baseline measured in the same run, so ratios hold on a noisy
machine. Writes a markdown table (default docs/benchmarks.md).

    python -m localdev.bench [--out docs/benchmarks.md] [--big-mib 1024]
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import statistics
import subprocess
import sys
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from localdev import stack

ROOT = Path(__file__).resolve().parent.parent


def _median_import(module: str, runs: int, **env: str) -> float:
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        subprocess.run(
            [sys.executable, "-c", f"import {module}"],
            cwd=ROOT,
            check=True,
            env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1", **env},
        )
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def cold_import(runs: int = 15) -> dict[str, Any]:
    """Median wall time of a fresh `import function_app` against `import azure.functions`.

    Both ingest modes: the blob trigger (imports the SDK-type binding extension) and the
    Event Grid trigger (RETRAIN_INGEST_TRIGGER=eventgrid, which does not).
    """
    base = _median_import("azure.functions", runs)
    blob = _median_import("function_app", runs, RETRAIN_INGEST_TRIGGER="blob")
    grid = _median_import("function_app", runs, RETRAIN_INGEST_TRIGGER="eventgrid")
    return {
        "azure.functions ms": round(base * 1000),
        "function_app ms, blob trigger": round(blob * 1000),
        "ratio, blob trigger": round(blob / base, 2),
        "function_app ms, Event Grid trigger": round(grid * 1000),
        "ratio, Event Grid trigger": round(grid / base, 2),
        "budget": "ratio <= 1.2",
        "met": f"blob trigger {blob / base <= 1.2}, Event Grid trigger {grid / base <= 1.2}",
    }


class _Counter(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.requests = 0

    def emit(self, record: logging.LogRecord) -> None:
        if record.getMessage().startswith("Request URL"):
            self.requests += 1


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, math.ceil(q * len(ordered)) - 1)]


def arrival_cost(connection: str, samples: int = 60) -> dict[str, Any]:
    """Storage requests and handler latency for one arrival, against one enqueue."""
    from azure.storage.blob import BlobServiceClient

    from localdev.sample import housing_csv
    from retrain.messages import CheckBatch
    from retrain.wiring import retrainer

    settings = stack.app_settings(
        connection, [stack.model_spec("http://127.0.0.1:9")], suffix="-" + uuid.uuid4().hex[:8]
    )
    stack.load_app(settings)
    app = retrainer()
    data = BlobServiceClient.from_connection_string(connection).get_container_client(
        settings["RETRAIN_DATA_CONTAINER"]
    )
    data.create_container()
    text = housing_csv(20, seed=1)
    for i in range(samples + 1):
        data.upload_blob(f"housing/{i}.csv", text)
    app.on_blob(data.container_name, "housing/0.csv")  # warm: containers, connections
    counter = _Counter()
    sdk = logging.getLogger("azure.core.pipeline.policies.http_logging_policy")
    sdk.addHandler(counter)
    sdk.setLevel(logging.INFO)
    sdk.propagate = False
    latencies, requests = [], []
    try:
        for i in range(1, samples + 1):
            before = counter.requests
            start = time.perf_counter()
            app.on_blob(data.container_name, f"housing/{i}.csv")
            latencies.append(time.perf_counter() - start)
            requests.append(counter.requests - before)
        from azure.storage.queue import QueueServiceClient

        from retrain.storage import QueueOutbox  # the floor: one enqueue

        outbox = QueueOutbox(QueueServiceClient.from_connection_string(connection))
        floor = []
        for _ in range(samples):
            start = time.perf_counter()
            outbox.send(
                settings["RETRAIN_JOBS_QUEUE"] + "-bench",
                CheckBatch(model="housing", batch_id="b", arrivals=1),
            )
            floor.append(time.perf_counter() - start)
    finally:
        sdk.removeHandler(counter)
        sdk.setLevel(logging.NOTSET)
        sdk.propagate = True
    return {
        "requests per arrival (median)": statistics.median(requests),
        "requests per arrival (max)": max(requests),
        "handler p50 ms": round(_pct(latencies, 0.5) * 1000, 1),
        "handler p95 ms": round(_pct(latencies, 0.95) * 1000, 1),
        "one enqueue p50 ms": round(_pct(floor, 0.5) * 1000, 1),
        "one enqueue p95 ms": round(_pct(floor, 0.95) * 1000, 1),
        "budget": "<= 4 storage requests",
        "met": max(requests) <= 4,
    }


def tracking() -> dict[str, Any]:
    """Polls the pipeline's backoff schedule makes for jobs of 1 minute, 1 hour and 12 hours.

    Computed from the same Timing the train step uses (30 s doubling to 10 min); no sleep is
    involved anywhere: each poll is a delayed queue message.
    """
    from retrain.pipeline import Timing

    timing = Timing(timedelta(seconds=30), timedelta(minutes=10))
    rows = {}
    for label, duration in (("1 minute", 60), ("1 hour", 3600), ("12 hours", 43200)):
        elapsed, polls = 0.0, 0
        while elapsed < duration:
            polls += 1
            elapsed += timing.delay(polls).total_seconds()
        bound = math.ceil(math.log2(duration / 30)) + duration / 600 + 2
        rows[label] = {"polls": polls, "budget": round(bound, 1), "met": polls <= bound}
    return rows


def _peak_rss_of_arrival(connection: str, container: str, name: str) -> int:
    code = (
        "import os, resource, json\n"
        "from localdev import stack\n"
        f"settings = json.loads({json.dumps(json.dumps(_settings_for(connection, container)))})\n"
        "stack.load_app(settings)\n"
        "from retrain.wiring import retrainer\n"
        "app = retrainer()\n"
        f"app.on_blob({container!r}, {name!r})\n"
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, check=True, capture_output=True, text=True
    ).stdout.split()
    return int(out[-1])


def _settings_for(connection: str, container: str) -> dict[str, str]:
    settings = stack.app_settings(
        connection, [stack.model_spec("http://127.0.0.1:9", max_bytes=8 * 1024**3)]
    )
    settings["RETRAIN_DATA_CONTAINER"] = container
    return settings


def memory(connection: str, big_mib: int) -> dict[str, Any]:
    """Peak RSS of a process handling one arrival of a big blob against a 1 KiB one."""
    from azure.storage.blob import BlobBlock, BlobServiceClient

    container = "bench-" + uuid.uuid4().hex[:8]
    data = BlobServiceClient.from_connection_string(connection).get_container_client(container)
    data.create_container()
    data.upload_blob("housing/small.csv", b"rooms,age,distance,price\n" + b"1,2,3,4\n" * 40)
    chunk = b"1.0,2.0,3.0,4.0\n" * 65536
    header = b"rooms,age,distance,price\n"
    blob = data.get_blob_client("housing/big.csv")
    blocks = []
    total = 0
    index = 0
    while total < big_mib * 1024 * 1024:
        block_id = f"{index:08d}"
        payload = header + chunk if index == 0 else chunk
        blob.stage_block(block_id, payload)
        blocks.append(block_id)
        total += len(payload)
        index += 1
    blob.commit_block_list([BlobBlock(block_id=b) for b in blocks])
    small = _peak_rss_of_arrival(connection, container, "housing/small.csv")
    big = _peak_rss_of_arrival(connection, container, "housing/big.csv")
    growth = (big - small) / 1024  # ru_maxrss is in KiB on Linux
    return {
        "blob MiB": round(total / 1024**2),
        "peak RSS small MiB": round(small / 1024),
        "peak RSS big MiB": round(big / 1024),
        "growth MiB": round(growth, 1),
        "budget": "growth <= 64 MiB",
        "met": growth <= 64,
    }


def main() -> int:
    """Run the benchmarks and write the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks.md")
    parser.add_argument("--big-mib", type=int, default=1024)
    parser.add_argument("--import-runs", type=int, default=15)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    results: dict[str, Any] = {
        "cold import": cold_import(args.import_runs),
        "BES poll schedule (polls per job)": tracking(),
    }
    with stack.azurite() as connection:
        results["one arrival"] = arrival_cost(connection)
        results["memory"] = memory(connection, args.big_mib)
    when = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        "# Benchmarks",
        "",
        f"`python -m localdev.bench` on {when}, {os.cpu_count()} cores, Python "
        f"{sys.version.split()[0]}.",
        "",
    ]
    for name, figures in results.items():
        lines += [f"## {name}", "", "| figure | value |", "|---|---|"]
        for key, value in figures.items():
            lines.append(f"| {key} | {json.dumps(value) if isinstance(value, dict) else value} |")
        lines.append("")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines), encoding="utf-8")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
