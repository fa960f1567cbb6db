"""Benchmarks for the costs that matter to a serverless retraining app.

Each figure is printed beside a baseline measured in the same run, so ratios hold on a noisy
machine. Writes a markdown table (default docs/benchmarks.md).

    python -m localdev.bench [--out docs/benchmarks.md] [--big-mib 1024]
    python -m localdev.bench --only-v2-import   # just the cold import with a v2 model configured
    python -m localdev.bench --only-scale-out [--scale-files 1000 --scale-procs 1,2,4,8 ...]
                                                # just the scale-out benchmark (localdev/scalebench)
"""

from __future__ import annotations

import argparse
import contextlib
import heapq
import json
import logging
import math
import os
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from functools import partial
from pathlib import Path
from typing import Any
from unittest import mock

from localdev import scalebench, stack

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


# What an import of function_app loaded, printed by the child process itself.
_LOADED = (
    "import sys, function_app; "
    "print(' '.join(sorted(m for m in sys.modules if m.startswith(('retrain', 'azure.ai.ml')) "
    "or m in ('requests', 'azure.identity', 'azure.storage.blob'))))"
)


def cold_import_v2(runs: int = 15) -> dict[str, Any]:
    """`cold_import` with an Azure ML v2 model configured (RETRAIN_MODELS holds a spec with
    `training.kind: azureml` and `target.kind: online_endpoint`), blob trigger, beside
    `import azure.functions` measured in the same run; and which of the app's modules (and of
    the heavy SDKs) the import loaded: the v2 adapters are built on first use, not at import."""
    from localdev import v2stack

    env = {
        "RETRAIN_INGEST_TRIGGER": "blob",
        "RETRAIN_MODELS": json.dumps([v2stack.model_spec("http://127.0.0.1:9")]),
        "RETRAIN_ARM_TOKEN": v2stack.ARM_TOKEN,
    }
    base = _median_import("azure.functions", runs)
    v2 = _median_import("function_app", runs, **env)
    loaded = subprocess.run(
        [sys.executable, "-c", _LOADED],
        cwd=ROOT,
        check=True,
        capture_output=True,
        text=True,
        env={**os.environ, **env},
    ).stdout.split()
    return {
        "azure.functions ms": round(base * 1000),
        "function_app ms, v2 model configured": round(v2 * 1000),
        "ratio, v2 model configured": round(v2 / base, 2),
        "modules loaded by the import": " ".join(loaded),
        "budget": "ratio <= 1.2",
        "met": v2 / base <= 1.2,
    }


class _Counter(logging.Handler):
    """Counts the storage SDK's requests (its HTTP logging policy logs one line per request)."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.requests = 0

    def emit(self, record: logging.LogRecord) -> None:
        if record.getMessage().startswith("Request URL"):
            self.requests += 1


@contextlib.contextmanager
def _counting() -> Iterator[_Counter]:
    counter = _Counter()
    sdk = logging.getLogger("azure.core.pipeline.policies.http_logging_policy")
    sdk.addHandler(counter)
    sdk.setLevel(logging.INFO)
    sdk.propagate = False
    try:
        yield counter
    finally:
        sdk.removeHandler(counter)
        sdk.setLevel(logging.NOTSET)
        sdk.propagate = True


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, math.ceil(q * len(ordered)) - 1)]


def _spread(values: list[int]) -> str:
    return f"{statistics.median(values):g} / {max(values)}"


def _measure(counter: _Counter, call: Callable[[], object]) -> tuple[int, float]:
    before = counter.requests
    start = time.perf_counter()
    call()
    return counter.requests - before, time.perf_counter() - start


def arrival_cost(connection: str, samples: int = 60) -> dict[str, Any]:
    """Storage requests and handler latency for one arrival, against one enqueue.

    Four situations: joining an open batch and opening one on a warm instance (the steady
    state of one instance), the first arrival on a cold instance, and an arrival after another
    instance changed the model's state (its remembered version is stale).
    """
    from azure.storage.blob import BlobServiceClient
    from azure.storage.queue import QueueServiceClient

    from localdev.sample import housing_csv
    from retrain import wiring
    from retrain.ledger import Ledger, model_key
    from retrain.messages import CheckBatch
    from retrain.settings import get_settings
    from retrain.storage import BlobDocumentStore, QueueOutbox

    names = ["housing"] + [f"m{i}" for i in range(samples)]
    specs = [
        stack.model_spec("http://127.0.0.1:9", name=n, quiet_period=600, max_wait=900)
        for n in names
    ]
    settings = stack.app_settings(connection, specs, suffix="-" + uuid.uuid4().hex[:8])
    stack.load_app(settings)
    app = wiring.build(get_settings())
    container = settings["RETRAIN_DATA_CONTAINER"]
    blobs = BlobServiceClient.from_connection_string(connection)
    text = housing_csv(20, seed=1)
    for i in range(samples + 4):
        _upload(connection, container, f"housing/{i}.csv", text)
    for n in names[1:]:
        _upload(connection, container, f"{n}/a.csv", text)
    # Models that exist with no open batch, known to this instance (as after a run ended here).
    other = Ledger(BlobDocumentStore(blobs, settings["RETRAIN_STATE_CONTAINER"]))
    for n in names[1:]:
        other.create(model_key(n), {"model": n, "batch": None, "active_run": None})
        app.model_state(n)
    app.on_blob(container, "housing/0.csv")  # warm: containers, connections; opens the batch
    joins: list[tuple[int, float]] = []
    opens: list[tuple[int, float]] = []
    with _counting() as counter:
        for i in range(1, samples + 1):
            joins.append(_measure(counter, partial(app.on_blob, container, f"housing/{i}.csv")))
        for n in names[1:]:
            opens.append(_measure(counter, partial(app.on_blob, container, f"{n}/a.csv")))
        cold_app = wiring.build(get_settings())
        cold, _ = _measure(
            counter, lambda: cold_app.on_blob(container, f"housing/{samples + 1}.csv")
        )
        # cold_app changed the model: this instance's remembered version is now stale.
        stale, _ = _measure(counter, lambda: app.on_blob(container, f"housing/{samples + 2}.csv"))
        outbox = QueueOutbox(QueueServiceClient.from_connection_string(connection))
        floor = [
            _measure(
                counter,
                lambda: outbox.send(
                    settings["RETRAIN_JOBS_QUEUE"] + "-bench",
                    CheckBatch(model="housing", batch_id="b", arrivals=1),
                ),
            )[1]
            for _ in range(samples)
        ]
    join_requests = [r for r, _ in joins]
    open_requests = [r for r, _ in opens]
    latencies = [t for _, t in joins + opens]
    return {
        "requests, joins an open batch (median / max)": _spread(join_requests),
        "requests, opens a batch (median / max)": _spread(open_requests),
        "requests, first arrival on a cold instance": cold,
        "requests, after another instance changed the model": stale,
        "handler p50 ms": round(_pct(latencies, 0.5) * 1000, 1),
        "handler p95 ms": round(_pct(latencies, 0.95) * 1000, 1),
        "one enqueue p50 ms": round(_pct(floor, 0.5) * 1000, 1),
        "one enqueue p95 ms": round(_pct(floor, 0.95) * 1000, 1),
        "budget": "<= 3 storage requests joining a batch (warm instance); opening one adds "
        "its log, its pointer write, the arrival's claim and its check",
        "met": max(join_requests) <= 3,
    }


def burst(connection: str, count: int = 1000, threads: int = 4) -> dict[str, Any]:
    """`count` blobs for one model within its quiet period: BES jobs submitted, arrivals/s.

    Twice: the local runner's sequential blob scan, then `threads` concurrent invocations of the
    `ingest` function on one instance (as the host runs them), each burst then driven to its
    promotion by the runner with a zero-length job.
    """
    from concurrent.futures import ThreadPoolExecutor

    from azure.storage.blob import BlobServiceClient

    from localdev.amlemu import Emulator, EmulatorServer
    from localdev.runner import LocalRunner
    from localdev.sample import housing_csv
    from retrain.binding import BlobAddress

    rows: dict[str, Any] = {"blobs per burst": count}
    with EmulatorServer(Emulator(stack.emulator_config())) as emu:
        spec = stack.model_spec(emu.url, quiet_period=5, max_wait=900)
        settings = stack.app_settings(connection, [spec], suffix="-" + uuid.uuid4().hex[:8])
        app = stack.load_app(settings)
        functions = app.get_functions()
        runner = LocalRunner(app, env=settings, functions=functions)
        ingest = next(f for f in functions if f.get_function_name() == "ingest").get_user_function()
        container = settings["RETRAIN_DATA_CONTAINER"]
        data = BlobServiceClient.from_connection_string(connection).get_container_client(container)
        text = housing_csv(20, seed=1)

        def upload(prefix: str) -> list[str]:
            names = [f"housing/{prefix}-{i:04d}.csv" for i in range(count)]
            with ThreadPoolExecutor(16) as pool:
                list(pool.map(lambda n: data.upload_blob(n, text), names))
            return names

        def submitted() -> int:
            return emu.emulator.count("POST", r"/jobs$")

        upload("seq")
        with _counting() as counter:
            start = time.perf_counter()
            runner.step()
            seconds = time.perf_counter() - start
            ingested = sum(1 for name, _, _ in runner.invocations if name == "ingest")
            requests = counter.requests
        runner.run_until_idle(timeout=300)
        rows["sequential: arrivals per second"] = round(ingested / seconds, 1)
        rows["sequential: storage requests per arrival"] = round(requests / ingested, 2)
        rows["sequential: BES jobs submitted"] = submitted()

        names = upload("par")
        for props in data.list_blobs(name_starts_with="housing/par-"):
            runner.receipts.add((container, props.name, str(props.etag)))  # delivered below
        with _counting() as counter, ThreadPoolExecutor(threads) as pool:
            start = time.perf_counter()
            list(
                pool.map(lambda n: ingest(BlobAddress(container, n, "AzureWebJobsStorage")), names)
            )
            seconds = time.perf_counter() - start
            requests = counter.requests
        runner.run_until_idle(timeout=300)
        rows[f"{threads} threads: arrivals per second"] = round(count / seconds, 1)
        rows[f"{threads} threads: storage requests per arrival"] = round(requests / count, 2)
        rows[f"{threads} threads: BES jobs submitted"] = (
            submitted() - rows["sequential: BES jobs submitted"]
        )
        rows["budget"] = "exactly 1 BES job per burst"
        rows["met"] = (
            rows["sequential: BES jobs submitted"] == 1
            and rows[f"{threads} threads: BES jobs submitted"] == 1
        )
    return rows


class _Timeline:
    """The app's queues in memory, where a delayed message waits on a manual clock: a job of
    12 hours is tracked in seconds, with the same handlers and the same backoff."""

    def __init__(self, clock: Any) -> None:
        self.clock = clock
        self.heap: list[tuple[datetime, int, str, Any]] = []
        self.seq = 0

    def send(self, queue: str, message: Any, *, delay: timedelta = timedelta(0)) -> None:
        self.seq += 1
        heapq.heappush(self.heap, (self.clock.now() + delay, self.seq, queue, message))

    def instead_of(self, queues: object) -> _Timeline:
        """As the outbox's wrapper: the app sends to this timeline, not to the queues."""
        return self

    def send_raw(self, queue: str, body: str) -> None:
        from retrain.messages import parse_evaluation, parse_jobs

        parse = parse_jobs if "jobs" in queue else parse_evaluation
        self.send(queue, parse(body.encode()))


def _drive(app: Any, timeline: _Timeline, run_over: Callable[[], bool]) -> tuple[float, int]:
    """Deliver messages in due order, moving the clock to each; returns the seconds spent inside
    handlers and the number of invocations."""
    from retrain.messages import CheckBatch, EvaluateRun, TrackRun
    from retrain.pipeline import Delivery

    inside, invocations = 0.0, 0
    while timeline.heap and not run_over():
        due, seq, _, msg = heapq.heappop(timeline.heap)
        timeline.clock.current = max(timeline.clock.current, due)
        start = time.perf_counter()
        if isinstance(msg, CheckBatch):
            app.on_check_batch(msg)
        elif isinstance(msg, TrackRun):
            app.on_track_run(msg, delivery=Delivery(f"bench-{seq}"))
        elif isinstance(msg, EvaluateRun):
            app.on_evaluate(msg, delivery=Delivery(f"bench-{seq}"))
        else:
            continue  # run events: the notify function, not part of the pipeline
        inside += time.perf_counter() - start
        invocations += 1
    return inside, invocations


def tracking(connection: str) -> dict[str, Any]:
    """Status polls and time inside invocations for BES jobs of 1 minute, 1 hour and 12 hours.

    The real handlers, BES client and Azurite state; the emulator's job and the pipeline share a
    manual clock, and each delayed message moves that clock (default backoff: 30 s doubling to
    10 min). `time.sleep` is counted, not allowed to pass silently.
    """
    from localdev.amlemu import Emulator, EmulatorServer
    from localdev.sample import housing_csv
    from retrain import wiring
    from retrain.clock import ManualClock
    from retrain.settings import get_settings

    first, most = 30, 600
    rows: dict[str, Any] = {}
    slept: list[float] = []
    for label, duration in (("1 minute", 60), ("1 hour", 3600), ("12 hours", 43200)):
        clock = ManualClock(datetime.now(UTC))
        emulator = Emulator(stack.emulator_config(), clock=clock)
        emulator.faults.job_seconds = duration
        with EmulatorServer(emulator) as emu:
            spec = stack.model_spec(emu.url, job_deadline=2 * duration)
            settings = stack.app_settings(connection, [spec], suffix="-" + uuid.uuid4().hex[:8])
            settings.update(
                RETRAIN_POLL_FIRST_DELAY=f"PT{first}S", RETRAIN_POLL_MAX_DELAY=f"PT{most}S"
            )
            stack.load_app(settings)
            timeline = _Timeline(clock)
            app = wiring.build(
                get_settings(),
                clock=clock,
                decorate=wiring.PortWrappers(outbox=timeline.instead_of),
            )
            _upload(
                connection,
                settings["RETRAIN_DATA_CONTAINER"],
                "housing/a.csv",
                housing_csv(40, seed=1),
            )
            app.on_blob(settings["RETRAIN_DATA_CONTAINER"], "housing/a.csv")

            def over(app: Any = app) -> bool:
                runs = app.runs("housing")
                return bool(runs) and runs[-1]["state"] in ("promoted", "rejected", "failed")

            with mock.patch.object(time, "sleep", wraps=time.sleep) as sleeper:
                inside, invocations = _drive(app, timeline, over)
            slept += [float(c.args[0]) for c in sleeper.call_args_list]
            polls = emulator.count("GET", r"/jobs/[0-9a-f]+$")
            bound = math.ceil(math.log2(duration / first)) + duration / most + 2
            rows[label] = {
                "polls": polls,
                "budget": round(bound, 1),
                "run": app.runs("housing")[-1]["state"],
                "invocations": invocations,
                "seconds inside invocations": round(inside, 2),
                "met": polls <= bound,
            }
    rows["seconds slept"] = round(sum(slept), 3)
    rows["met"] = all(r["met"] for r in rows.values() if isinstance(r, dict)) and not slept
    return rows


def _upload(connection: str, container: str, name: str, text: str) -> None:
    from azure.core.exceptions import ResourceExistsError
    from azure.storage.blob import BlobServiceClient

    client = BlobServiceClient.from_connection_string(connection).get_container_client(container)
    with contextlib.suppress(ResourceExistsError):
        client.create_container()
    client.upload_blob(name, text, overwrite=True)


def end_to_end(connection: str, interval: float = 0.1) -> dict[str, Any]:
    """Drop -> promoted through the local runner, with a zero-length BES job (the emulator
    still trains, in milliseconds): the pipeline's own time from upload to the new champion."""
    from datetime import timedelta as td

    from localdev.amlemu import Emulator, EmulatorServer
    from localdev.runner import LocalRunner
    from localdev.sample import housing_csv
    from retrain.wiring import retrainer

    rows: dict[str, Any] = {}
    with EmulatorServer(Emulator(stack.emulator_config())) as emu:
        spec = stack.model_spec(emu.url, quiet_period=1)
        settings = stack.app_settings(connection, [spec], suffix="-" + uuid.uuid4().hex[:8])
        runner = LocalRunner(
            stack.load_app(settings), env=settings, failure_visibility=td(seconds=1)
        )
        container = settings["RETRAIN_DATA_CONTAINER"]
        seconds = []
        drops = [(40, 40.0), (200, 10.0), (800, 2.0)]  # each better than the last: promoted
        for k, (rows_, noise) in enumerate(drops, start=1):
            text = housing_csv(rows_, seed=k, noise=noise)
            start = time.perf_counter()
            _upload(connection, container, f"housing/{k}.csv", text)
            while True:
                runner.step()
                runs = retrainer().runs("housing")
                if len(runs) == k and runs[-1]["state"] in ("promoted", "rejected", "failed"):
                    break
                if time.perf_counter() - start > 60:
                    raise TimeoutError(f"drop {k} did not finish in 60 s")
                time.sleep(interval)  # the runner's polling interval, as the host polls
            seconds.append(time.perf_counter() - start)
            rows[f"drop {k}"] = f"{runs[-1]['state']} after {seconds[-1]:.2f} s"
    rows["BES job length s"] = 0
    rows["configured waits s"] = "quiet period 1 + first status poll 1"
    rows["runner polling interval s"] = interval
    rows["overhead median s"] = round(statistics.median(seconds), 2)
    rows["budget"] = "<= 5 s"
    rows["met"] = max(seconds) <= 5
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


def _shown(path: Path) -> Path:
    return path.relative_to(ROOT) if path.is_relative_to(ROOT) else path


def main() -> int:
    """Run the benchmarks and write the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks.md")
    parser.add_argument("--big-mib", type=int, default=1024)
    parser.add_argument("--import-runs", type=int, default=15)
    parser.add_argument(
        "--only-v2-import",
        action="store_true",
        help="measure only the cold import with a v2 model configured and print it",
    )
    parser.add_argument(
        "--only-scale-out",
        action="store_true",
        help="run only the scale-out benchmark (K processes per burst) and print its tables",
    )
    scalebench.add_arguments(parser)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.only_v2_import:
        print(json.dumps(cold_import_v2(args.import_runs), indent=2))
        return 0
    if args.only_scale_out:
        print("\n".join(scalebench.report(args)))
        return 0
    results: dict[str, Any] = {
        "cold import": cold_import(args.import_runs),
        "cold import, v2 configured": cold_import_v2(args.import_runs),
    }
    with stack.azurite() as connection:
        results["tracking BES jobs (manual clock)"] = tracking(connection)
        results["one arrival"] = arrival_cost(connection)
        results["bursts"] = burst(connection)
        results["end to end"] = end_to_end(connection)
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
    lines += [
        "## scale-out (K processes per burst)",
        "",
        f"Every figure, as JSON: `{_shown(args.scale_json)}`.",
        "",
        *scalebench.report(args),
        "",
    ]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines), encoding="utf-8")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
