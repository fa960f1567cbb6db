"""Scale-out benchmark: a burst of blobs handled by K separate processes, as by K Functions
instances, each with its own app (its own ledger cache) calling the registered `ingest` function.

The blobs are uploaded first; the processes then split the (shuffled) list and call the handler
for each, as fast as they can. Afterwards the batch is driven to its seal as the host would (the
check messages the arrivals sent are delivered on a clock past the quiet period, then the run's
first train message), and the run records are checked: every blob in exactly one run's `files`,
one training job per burst. Each burst gets its own Azurite (in memory) and emulator, so
Azurite's CPU (from /proc) is the burst's alone. Figures: localdev/scalefigures.py.

    python -m localdev.scalebench [--scale-files 1000,5000] [--scale-procs 1,2,4,8]
        [--scale-models 8 --scale-models-procs 4] [--scale-growth 100,1000,5000,10000]
        [--scale-growth-cap 900] [--scale-json .localdev/scalebench.json]
    python -m localdev.bench --only-scale-out [the same options]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import multiprocessing
import os
import queue
import random
import sys
import time
import traceback
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta
from functools import partial
from pathlib import Path
from threading import BrokenBarrierError
from typing import TYPE_CHECKING, Any

from localdev import stack
from localdev.scalefigures import WorkerFigures, aggregate, growth_rows, render, verdicts

if TYPE_CHECKING:
    from multiprocessing.synchronize import Barrier

    import requests
    from pydantic import BaseModel

    from localdev.amlemu import EmulatorServer
    from retrain.storage import Outbox

ROOT = Path(__file__).resolve().parent.parent
QUIET = 3600
"""Quiet period of the benchmark's models (s): longer than any burst, so a burst is one batch."""
MAX_WAIT = 7200
DELIVERIES = 5
"""Deliveries of a blob before the host gives up on it (the blob trigger's maxDequeueCount)."""
STARTUP = 300.0
"""Seconds the workers may take to import and build their apps."""


@dataclass(frozen=True)
class Scenario:
    """One burst: `files` blobs spread over `models` models, handled by `procs` processes."""

    files: int
    procs: int
    models: int = 1

    @property
    def label(self) -> str:
        models = "1 model" if self.models == 1 else f"{self.models} models"
        return f"{self.files:,} files, {models}, K={self.procs}"


# ----------------------------------------------------------------------------- worker side


class Wire:
    """Counts a process's HTTP requests as the storage SDK sends them (through `requests`):
    how many, 412 and 409 answers, and bytes of PUT/POST bodies. Installed in bench workers
    only, by wrapping `requests.Session.send`."""

    def __init__(self) -> None:
        self.requests = 0
        self.written = 0
        self.conflicts = 0
        self.exists = 0

    def note(self, request: requests.PreparedRequest, status: int | None) -> None:
        """Count one request and its answer's status (None: no answer)."""
        self.requests += 1
        if request.method in ("PUT", "POST"):
            self.written += _body_bytes(request)
        if status == 412:
            self.conflicts += 1
        elif status == 409:
            self.exists += 1

    def install(self) -> None:
        """Route every `requests` send of this process through `note`."""
        import requests

        original = requests.Session.send
        wire = self

        def send(
            session: requests.Session, request: requests.PreparedRequest, **kwargs: Any
        ) -> requests.Response:
            status: int | None = None
            try:
                response = original(session, request, **kwargs)
                status = response.status_code
                return response
            finally:
                wire.note(request, status)

        requests.Session.send = send  # type: ignore[method-assign,assignment]


def _body_bytes(request: requests.PreparedRequest) -> int:
    length = request.headers.get("Content-Length")
    if length is not None:
        return int(length)
    body = request.body
    return len(body) if isinstance(body, bytes | str) else 0


class Recorder:
    """An outbox wrapper: every message goes on to the real queues and is also kept, so the
    harness can deliver it later (a check is invisible in the queue for the quiet period)."""

    def __init__(self, sent: list[tuple[str, str]], inner: Outbox) -> None:
        self._sent = sent
        self._inner = inner

    def send(self, queue: str, message: BaseModel, *, delay: timedelta = timedelta(0)) -> None:
        self._inner.send(queue, message, delay=delay)
        self._sent.append((queue, message.model_dump_json()))

    def send_raw(self, queue: str, body: str) -> None:
        self._inner.send_raw(queue, body)
        self._sent.append((queue, body))


def _instance(settings: dict[str, str], sent: list[tuple[str, str]]) -> Callable[[Any], None]:
    """This process as one Functions instance: its app built from `settings`, and the
    registered `ingest` function the host would call."""
    os.environ.update(settings)
    from retrain import wiring
    from retrain.settings import get_settings

    get_settings.cache_clear()
    built = wiring.build(
        get_settings(), decorate=wiring.PortWrappers(outbox=partial(Recorder, sent))
    )
    wiring.retrainer = lambda: built  # type: ignore[assignment]
    import function_app

    functions = function_app.app.get_functions()
    ingest: Callable[[Any], None] = next(
        f for f in functions if f.get_function_name() == "ingest"
    ).get_user_function()
    return ingest


def deliver(
    ingest: Callable[[Any], None],
    container: str,
    names: list[str],
    wire: Wire,
    deadline: float | None = None,
) -> WorkerFigures:
    """Call `ingest` for each blob in turn (a failed delivery is retried, as the host does, up
    to DELIVERIES times); stop early once `deadline` seconds have passed."""
    from retrain.binding import BlobAddress

    figures = WorkerFigures(started=time.monotonic())
    cpu = time.process_time()
    for name in names:
        if deadline is not None and time.monotonic() - figures.started > deadline:
            break
        requests, written = wire.requests, wire.written
        seconds = 0.0
        for _ in range(DELIVERIES):
            start = time.perf_counter()
            try:
                ingest(BlobAddress(container, name, "AzureWebJobsStorage"))
                seconds += time.perf_counter() - start
                break
            except Exception as exc:  # noqa: BLE001 - a failed delivery is one of the figures
                seconds += time.perf_counter() - start
                figures.failures += 1
                figures.first_failure = (
                    figures.first_failure or (f"{name}: {type(exc).__name__}: {exc}"[:400])
                )
        else:
            figures.given_up += 1
        figures.latencies.append(seconds)
        figures.requests.append(wire.requests - requests)
        figures.written.append(wire.written - written)
        figures.blobs += 1
    figures.ended = time.monotonic()
    figures.cpu_seconds = time.process_time() - cpu
    figures.conflicts, figures.exists = wire.conflicts, wire.exists
    return figures


def worker(
    settings: dict[str, str],
    container: str,
    names: list[str],
    barrier: Barrier,
    results: multiprocessing.Queue[Any],
    deadline: float | None,
) -> None:
    """A spawned process: build the app, wait for the others, deliver its share, report."""
    logging.basicConfig(level=logging.ERROR)  # failed deliveries are counted, not logged
    sent: list[tuple[str, str]] = []
    try:
        ingest = _instance(settings, sent)
        wire = Wire()
        wire.install()
    except BaseException:
        barrier.abort()
        results.put(("error", traceback.format_exc(), []))
        raise
    try:
        barrier.wait(STARTUP)
    except BrokenBarrierError:
        return
    figures = deliver(ingest, container, names, wire, deadline)
    results.put(("ok", asdict(figures), sent))


# ----------------------------------------------------------------------------- harness side


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds a process has used so far (/proc/<pid>/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _collect(processes: list[Any], results: multiprocessing.Queue[Any]) -> list[Any]:
    """Every worker's report; a worker that died without one breaks the harness."""
    reports: list[Any] = []
    while len(reports) < len(processes):
        try:
            report = results.get(timeout=5)
        except queue.Empty:
            if not any(p.is_alive() for p in processes):
                raise RuntimeError("a benchmark worker exited without reporting") from None
            continue
        if report[0] == "error":
            raise RuntimeError(f"a benchmark worker failed to start:\n{report[1]}")
        reports.append(report)
    return reports


def burst(
    settings: dict[str, str],
    shares: list[list[str]],
    azurite_pid: int,
    deadline: float | None = None,
) -> tuple[list[WorkerFigures], float, list[tuple[str, str]]]:
    """One worker process per share, started together; returns their figures, the CPU seconds
    Azurite spent from the start to the last report, and every message the workers sent."""
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(len(shares) + 1)
    results: multiprocessing.Queue[Any] = ctx.Queue()
    container = settings["RETRAIN_DATA_CONTAINER"]
    processes = [
        ctx.Process(target=worker, args=(settings, container, share, barrier, results, deadline))
        for share in shares
    ]
    for process in processes:
        process.start()
    try:
        before = cpu_seconds(azurite_pid)  # the workers only import and build until all wait
        try:
            barrier.wait(STARTUP)
        except BrokenBarrierError:
            _collect(processes, results)  # raises with the worker's error
            raise
        reports = _collect(processes, results)
        azurite = cpu_seconds(azurite_pid) - before
    finally:
        for process in processes:
            process.join(30)
            if process.is_alive():
                process.terminate()
                process.join()
    figures = [WorkerFigures(**report[1]) for report in reports]
    return figures, azurite, [message for report in reports for message in report[2]]


def _upload(connection: str, container: str, names: list[str]) -> None:
    from azure.core.exceptions import ResourceExistsError
    from azure.storage.blob import BlobServiceClient

    from localdev.sample import housing_csv

    client = BlobServiceClient.from_connection_string(connection).get_container_client(container)
    with contextlib.suppress(ResourceExistsError):
        client.create_container()
    text = housing_csv(20, seed=1)
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda name: client.upload_blob(name, text, overwrite=True), names))


@contextlib.contextmanager
def _stack(models: list[str]) -> Iterator[tuple[dict[str, str], int, EmulatorServer]]:
    """A dedicated Azurite and emulator, and app settings for `models` against them."""
    from localdev.amlemu import Emulator, EmulatorServer

    with (
        stack.azurite_process() as (connection, pid),
        EmulatorServer(Emulator(stack.emulator_config())) as emu,
    ):
        specs = [
            stack.model_spec(emu.url, name=m, quiet_period=QUIET, max_wait=MAX_WAIT) for m in models
        ]
        suffix = "-" + uuid.uuid4().hex[:8]
        yield stack.app_settings(connection, specs, suffix=suffix), pid, emu


def seal_and_check(
    settings: dict[str, str],
    emu: EmulatorServer,
    sent: list[tuple[str, str]],
    expected: dict[str, list[str]],
) -> dict[str, Any]:
    """Drive each burst's batch to its seal as the host would, and check the run records."""
    from retrain import wiring
    from retrain.clock import ManualClock
    from retrain.messages import CheckBatch, TrackRun, parse_jobs
    from retrain.pipeline import Delivery
    from retrain.settings import get_settings

    stack.load_app(settings)
    clock = ManualClock(datetime.now(UTC) + timedelta(seconds=MAX_WAIT + 60))
    more: list[tuple[str, str]] = []
    app = wiring.build(
        get_settings(), clock=clock, decorate=wiring.PortWrappers(outbox=partial(Recorder, more))
    )
    submitted = emu.emulator.count("POST", r"/jobs$")
    outcomes: Counter[str] = Counter()
    pending = list(sent)
    for _ in range(4):  # checks, then the runs' first train messages (later polls: not ours)
        for queue_name, body in pending:
            if queue_name != settings["RETRAIN_JOBS_QUEUE"]:
                continue
            message = parse_jobs(body.encode())
            try:
                if isinstance(message, CheckBatch):
                    outcomes["check: " + app.on_check_batch(message)] += 1
                elif isinstance(message, TrackRun) and message.poll == 0:
                    delivery = Delivery(uuid.uuid4().hex)
                    outcomes["train: " + app.on_track_run(message, delivery=delivery)] += 1
            except Exception as exc:  # noqa: BLE001 - reported with the burst's figures
                outcomes[f"raised {type(exc).__name__}: {str(exc)[:200]}"] += 1
        pending = list(more)
        more.clear()
    seen: Counter[str] = Counter()
    runs_per_model: dict[str, int] = {}
    for model in expected:
        runs = app.runs(model)
        runs_per_model[model] = len(runs)
        seen.update(f["name"] for run in runs for f in app.run_files(run))
    names = [n for group in expected.values() for n in group]
    return {
        "jobs submitted": emu.emulator.count("POST", r"/jobs$") - submitted,
        "runs per model": runs_per_model,
        "lost blobs": sum(1 for n in names if seen[n] == 0),
        "duplicated blobs": sum(1 for n in names if seen[n] > 1),
        "sealing": dict(outcomes),
    }


def _model_names(count: int) -> list[str]:
    return ["housing"] if count == 1 else [f"model{i}" for i in range(count)]


def run_burst(scenario: Scenario, seed: int = 1) -> dict[str, Any]:
    """One burst of `scenario`: upload, split, deliver from K processes, seal, check."""
    models = _model_names(scenario.models)
    each = scenario.files // scenario.models
    expected = {m: [f"{m}/{i:05d}.csv" for i in range(each)] for m in models}
    order = [n for group in expected.values() for n in group]
    random.Random(seed).shuffle(order)
    with _stack(models) as (settings, pid, emu):
        _upload(settings["AzureWebJobsStorage"], settings["RETRAIN_DATA_CONTAINER"], order)
        shares = [order[i :: scenario.procs] for i in range(scenario.procs)]
        figures, azurite, sent = burst(settings, shares, pid)
        row = {"scenario": scenario.label, "kind": "burst", **asdict(scenario)}
        row.update(aggregate(figures, azurite))
        row.update(seal_and_check(settings, emu, sent, expected))
    return row


def run_growth(sizes: list[int], cap: float) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """One batch of one model growing to each size in turn, in one process per step (its
    first arrival cold, outside the measured windows); stops when `cap` seconds of delivery
    are spent. Returns the growth rows and the batch's burst row."""
    names = [f"housing/{i:05d}.csv" for i in range(max(sizes))]
    merged = WorkerFigures()
    azurite = spent = 0.0
    sent: list[tuple[str, str]] = []
    capped = False
    with _stack(["housing"]) as (settings, pid, emu):
        done = 0
        for size in sorted(sizes):
            step = names[done:size]
            _upload(settings["AzureWebJobsStorage"], settings["RETRAIN_DATA_CONTAINER"], step)
            figures, cpu, messages = burst(settings, [step], pid, deadline=cap - spent)
            one = figures[0]
            _merge(merged, one)
            azurite += cpu
            spent += one.ended - one.started
            sent += messages
            done += one.blobs
            if one.blobs < len(step):
                capped = True
                break
        delivered = {"housing": names[:done]}
        row: dict[str, Any] = {"scenario": f"growth batch, {done:,} files, K=1"}
        row.update(kind="growth")
        row.update(files=done, procs=1, models=1)
        row.update(aggregate([merged], azurite))
        row["arrivals/s"] = round(done / spent, 1) if spent else None
        row.update(seal_and_check(settings, emu, sent, delivered))
    why = f"not run: the {cap:g} s cap was reached at {done:,} files" if capped else "not run"
    return growth_rows(merged, sizes, not_run=why), row


def _merge(into: WorkerFigures, step: WorkerFigures) -> None:
    into.started = into.started or step.started
    into.ended = step.ended
    into.blobs += step.blobs
    into.cpu_seconds += step.cpu_seconds
    into.latencies += step.latencies
    into.requests += step.requests
    into.written += step.written
    into.conflicts += step.conflicts
    into.exists += step.exists
    into.failures += step.failures
    into.given_up += step.given_up
    into.first_failure = into.first_failure or step.first_failure


def _counts(text: str) -> list[int]:
    try:
        values = [int(v.replace("_", "")) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected whole numbers separated by commas: {text!r}"
        ) from None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected counts of at least 1: {text!r}")
    return values


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The scale-out options, shared by this module's command line and localdev.bench's."""
    group = parser.add_argument_group("scale-out benchmark")
    group.add_argument(
        "--scale-files",
        type=_counts,
        default=[1000, 5000],
        help="blobs per burst, comma-separated (default 1000,5000)",
    )
    group.add_argument(
        "--scale-procs",
        type=_counts,
        default=[1, 2, 4, 8],
        help="worker processes K per burst of one model (default 1,2,4,8)",
    )
    group.add_argument(
        "--scale-models",
        type=int,
        default=8,
        help="models of the multi-model burst, 0 to skip it (default 8)",
    )
    group.add_argument(
        "--scale-models-procs",
        type=int,
        default=4,
        help="processes of the multi-model burst (default 4)",
    )
    group.add_argument(
        "--scale-growth",
        type=_counts,
        default=[100, 1000, 5000, 10000],
        help="batch sizes of the growth table (default 100,1000,5000,10000)",
    )
    group.add_argument(
        "--scale-growth-cap",
        type=float,
        default=900.0,
        help="seconds of delivery the growth batch may take (default 900)",
    )
    group.add_argument(
        "--scale-json",
        type=Path,
        default=ROOT / ".localdev" / "scalebench.json",
        help="where every figure is written as JSON",
    )


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Every burst, the growth table and the verdicts, as one JSON-able dict."""
    scenarios = [Scenario(files, procs) for files in args.scale_files for procs in args.scale_procs]
    if args.scale_models > 1:
        scenarios += [
            Scenario(files, args.scale_models_procs, args.scale_models)
            for files in args.scale_files
        ]
    bursts = []
    for scenario in scenarios:
        print(f"scale-out: {scenario.label} ...", file=sys.stderr, flush=True)
        bursts.append(run_burst(scenario))
    print("scale-out: growth of one batch ...", file=sys.stderr, flush=True)
    growth, growth_burst = run_growth(args.scale_growth, args.scale_growth_cap)
    bursts.append(growth_burst)
    return {
        "bursts": bursts,
        "growth": growth,
        "verdicts": [asdict(v) for v in verdicts(bursts, growth)],
        "cores": os.cpu_count(),
        "when": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
    }


def report(args: argparse.Namespace) -> list[str]:
    """Run the benchmark, write its JSON and return its tables."""
    results = run(args)
    args.scale_json.parent.mkdir(parents=True, exist_ok=True)
    args.scale_json.write_text(json.dumps(results, indent=2), encoding="utf-8")
    return render(results)


def main() -> int:
    """Run the scale-out benchmark alone and print its tables."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    print("\n".join(report(args)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
