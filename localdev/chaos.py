"""Fault-injection runs that check the exactly-once promise, seeded and reproducible.

Each scenario drives the real function app (local runner + Azure ML emulator + Azurite) through
one to three batches of data while injecting faults chosen from the seed: duplicate and
reordered deliveries, a crash right after a side effect and before the ack, two workers on the
same queues, HTTP 429/5xx, dropped connections, answers slower than the client's timeout,
failed and never-ending jobs, and a lost queue message. Afterwards it counts what the promise
forbids: more than one started BES job per batch, more than one promotion per run, a run left
in a non-terminal state, a blob that is in no run and was not rejected, a blob version trained
in two runs, and a promoted model that was not better than the champion it replaced.

    python -m localdev.chaos --scenarios 12 --seed 1       # the CI size
    python -m localdev.chaos --scenarios 500 --seed 1      # the long mode
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import re
import sys
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from azure.storage.blob import BlobServiceClient
from azure.storage.queue import QueueClient

from localdev import stack
from localdev.amlemu import Emulator, EmulatorServer
from localdev.runner import LocalRunner
from localdev.sample import housing_csv

log = logging.getLogger("chaos")

CRASH_POINTS = ("ledger write", "BES submit", "BES start", "PATCH", "enqueue")
FAULTS = (
    "duplicates",
    "reorder",
    "crash",
    "two workers",
    "429",
    "5xx",
    "drop",
    "slow",
    "job fails",
    "job hangs",
    "lost message",
    "new target",
)


class InjectedCrash(Exception):
    """The process 'died' right after a side effect, before the message was acked."""


class Crasher:
    """Decides, from the scenario's seed, where to crash; counts what it injected."""

    def __init__(self, rng: random.Random, rate: float) -> None:
        self.rng = rng
        self.rate = rate
        self.lock = threading.Lock()
        self.injected: Counter[str] = Counter()

    def after(self, point: str) -> None:
        """Call right after a side effect succeeded."""
        with self.lock:
            crash = self.rng.random() < self.rate
            if crash:
                self.injected[point] += 1
        if crash:
            raise InjectedCrash(point)


class _Wrapper:
    def __init__(self, inner: Any, crasher: Crasher) -> None:
        self._inner = inner
        self._crasher = crasher

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


class CrashingStore(_Wrapper):
    def create(self, key: str, doc: dict[str, Any]) -> str:
        etag: str = self._inner.create(key, doc)
        self._crasher.after("ledger write")
        return etag

    def replace(self, key: str, doc: dict[str, Any], etag: str) -> str:
        new: str = self._inner.replace(key, doc, etag)
        self._crasher.after("ledger write")
        return new


class CrashingJobs(_Wrapper):
    def submit(self, **kwargs: Any) -> str:
        job: str = self._inner.submit(**kwargs)
        self._crasher.after("BES submit")
        return job

    def start(self, job_id: str) -> None:
        self._inner.start(job_id)
        self._crasher.after("BES start")


class CrashingTarget(_Wrapper):
    def deploy(self, model: Any) -> Any:
        progress = self._inner.deploy(model)
        self._crasher.after("PATCH")
        return progress


class CrashingOutbox(_Wrapper):
    def send(self, queue: str, message: Any, **kwargs: Any) -> None:
        self._inner.send(queue, message, **kwargs)
        self._crasher.after("enqueue")


WRAPPERS = {
    "store": CrashingStore,
    "jobs": CrashingJobs,
    "target": CrashingTarget,
    "outbox": CrashingOutbox,
}


@dataclass
class Result:
    """What one scenario did and what it found."""

    seed: int
    faults: list[str]
    injected: Counter[str] = field(default_factory=Counter)
    batches: int = 0
    jobs_started_max: int = 0
    promotions_max: int = 0
    not_terminal: int = 0
    blobs_missing: int = 0
    trained_twice: int = 0
    worse_promoted: int = 0
    states: Counter[str] = field(default_factory=Counter)
    seconds: float = 0.0

    def breaches(self) -> dict[str, int]:
        """The non-zero counts of what the promise forbids."""
        found = {
            "extra jobs started": max(0, self.jobs_started_max - 1),
            "extra promotions": max(0, self.promotions_max - 1),
            "runs not terminal": self.not_terminal,
            "blobs missing": self.blobs_missing,
            "blob versions trained twice": self.trained_twice,
            "worse promoted": self.worse_promoted,
        }
        return {k: v for k, v in found.items() if v}

    @property
    def violations(self) -> int:
        """Breaches of the promise (must be 0)."""
        return (
            max(0, self.jobs_started_max - 1)
            + max(0, self.promotions_max - 1)
            + self.not_terminal
            + self.blobs_missing
            + self.trained_twice
            + self.worse_promoted
        )


def _run_id(location: str) -> str | None:
    match = re.search(r"/housing/([^/]+)/model\.ilearner$", "/" + location.lstrip("/"))
    return match.group(1) if match else None


def run_scenario(connection: str, seed: int) -> Result:
    """One seeded scenario against the Azurite at `connection`."""
    from retrain import wiring
    from retrain.settings import get_settings

    rng = random.Random(seed)
    odds = {"job fails": 0.15, "job hangs": 0.1}
    faults = sorted(f for f in FAULTS if rng.random() < odds.get(f, 0.3))
    result = Result(seed, faults)
    crasher = Crasher(rng, 0.08 if "crash" in faults else 0.0)
    emulator = Emulator(stack.emulator_config())
    started = time.monotonic()
    with EmulatorServer(emulator) as server:
        http: list[dict[str, Any]] = []
        for _ in range(rng.randint(1, 4)):
            kind = rng.choice([f for f in ("429", "5xx", "drop", "slow") if f in faults] or [""])
            path = rng.choice(["/jobs", "/jobs/", "/endpoints/", "/webServices/"])
            if kind == "429":
                http.append({"status": 429, "retry_after": 1, "path": path})
            elif kind == "5xx":
                http.append({"status": rng.choice([500, 503]), "path": path})
            elif kind == "drop":
                http.append({"drop": True, "path": path})
            elif kind == "slow":
                http.append({"delay": 3, "path": path})
        emulator.faults.http = http
        emulator.faults.fail_jobs = 1 if "job fails" in faults else 0
        emulator.faults.hang_jobs = "job hangs" in faults
        emulator.faults.job_seconds = rng.choice([0, 0.5, 1.5])
        suffix = "-" + uuid.uuid4().hex[:8]
        spec = stack.model_spec(server.url, job_deadline=8)
        if "new target" in faults:
            spec["target"] = stack.new_target(server.url)
        settings = stack.app_settings(connection, [spec], suffix=suffix)
        settings["RETRAIN_HTTP_READ_TIMEOUT"] = "2"
        settings["RETRAIN_SWEEP_STALL"] = "PT1S"
        app = stack.load_app(settings)

        def decorate(kind: str, port: Any) -> Any:
            wrapper = WRAPPERS.get(kind)
            return wrapper(port, crasher) if wrapper and "crash" in faults else port

        built = wiring.build(get_settings(), decorate=decorate)
        original = wiring.retrainer
        wiring.retrainer = lambda: built  # type: ignore[assignment]
        try:
            first = LocalRunner(
                app,
                env=settings,
                failure_visibility=timedelta(seconds=1),
                duplicates=0.3 if "duplicates" in faults else 0.0,
                shuffle="reorder" in faults,
                rng=random.Random(seed),
            )
            runners = [first]
            if "two workers" in faults:
                runners.append(
                    LocalRunner(
                        app,
                        env=settings,
                        failure_visibility=timedelta(seconds=1),
                        duplicates=first.duplicates,
                        shuffle=first.shuffle,
                        rng=random.Random(seed + 1),
                        functions=first.functions,
                    )
                )
            _drive(rng, result, runners, settings, faults)
        finally:
            wiring.retrainer = original
        _check(result, emulator, settings, connection)
    result.injected.update(crasher.injected)
    result.seconds = time.monotonic() - started
    return result


def _drive(
    rng: random.Random,
    result: Result,
    runners: list[LocalRunner],
    settings: dict[str, str],
    faults: list[str],
) -> None:
    blobs = BlobServiceClient.from_connection_string(settings["AzureWebJobsStorage"])
    data = blobs.get_container_client(settings["RETRAIN_DATA_CONTAINER"])
    # Each upload lands after a random number of polling rounds: some coalesce, some arrive
    # while a run is active, some start a batch of their own.
    uploads = sorted(
        (
            rng.randint(0, 60),
            f"housing/part-{i}.csv",
            housing_csv(
                rng.randint(40, 200), seed=rng.randrange(1_000_000), noise=rng.choice([1, 5, 40])
            ),
        )
        for i in range(rng.randint(1, 3))
    )
    lost = "lost message" in faults
    deadline = time.monotonic() + 200  # room for a deploy lease (2 min) to run out
    rounds = 0
    while time.monotonic() < deadline:
        while uploads and uploads[0][0] <= rounds:
            _, name, text = uploads.pop(0)
            data.upload_blob(name, text, overwrite=True)
        rounds += 1
        if len(runners) == 2:
            threads = [threading.Thread(target=r.step) for r in runners]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
        else:
            runners[0].step()
        if lost and rng.random() < 0.2:
            jobs = QueueClient.from_connection_string(
                settings["AzureWebJobsStorage"], settings["RETRAIN_JOBS_QUEUE"]
            )
            if jobs.get_queue_properties().approximate_message_count:
                jobs.clear_messages()
                result.injected["lost message"] += 1
                lost = False
        if rounds % 10 == 0:
            runners[0].fire("sweep")
        if not uploads and _settled(runners[0], blobs, settings):
            return
        time.sleep(0.1)  # the emulated host's polling interval


def _settled(runner: LocalRunner, blobs: BlobServiceClient, settings: dict[str, str]) -> bool:
    if runner.pending() or runner.undelivered():
        return False
    state = blobs.get_container_client(settings["RETRAIN_STATE_CONTAINER"])
    for item in state.list_blobs(name_starts_with="runs/"):
        run = json.loads(state.download_blob(item.name).readall())
        if run["state"] not in ("promoted", "rejected", "failed", "superseded"):
            return False
    model = state.get_blob_client("models/housing.json")
    if model.exists():
        doc = json.loads(model.download_blob().readall())
        if doc.get("batch") or doc.get("active_run"):
            return False
    return True


def _check(result: Result, emulator: Emulator, settings: dict[str, str], connection: str) -> None:
    blobs = BlobServiceClient.from_connection_string(connection)
    state = blobs.get_container_client(settings["RETRAIN_STATE_CONTAINER"])
    runs = [
        json.loads(state.download_blob(b.name).readall())
        for b in state.list_blobs(name_starts_with="runs/")
    ]
    result.batches = len(runs)
    result.states = Counter(r["state"] for r in runs)
    result.not_terminal = sum(
        1 for r in runs if r["state"] not in ("promoted", "rejected", "failed", "superseded")
    )
    starts = Counter(
        rid for _, outs in emulator.started for o in outs if (rid := _run_id(o)) is not None
    )
    result.jobs_started_max = max(starts.values(), default=0)
    patched = [
        p.get("RelativeLocation", "") for ep in emulator.endpoints.values() for p in ep.patches
    ]
    patched += [
        a.get("locationInfo", {}).get("uri", "")
        for ws in emulator.web_services.values()
        for assets in ws.patches
        for a in assets.values()
        if a.get("type") == "Resource"
    ]
    promotions = Counter(rid for loc in patched if (rid := _run_id(loc)) is not None)
    result.promotions_max = max(promotions.values(), default=0)
    trained = Counter((f["name"], f["etag"]) for r in runs for f in r.get("files") or [])
    result.trained_twice = sum(1 for n in trained.values() if n > 1)
    accounted = {name for name, _ in trained}
    for b in state.list_blobs(name_starts_with="arrivals/"):
        arrival = json.loads(state.download_blob(b.name).readall())
        if arrival.get("status") == "rejected":
            accounted.add(arrival["name"])
    data = blobs.get_container_client(settings["RETRAIN_DATA_CONTAINER"])
    result.blobs_missing = sum(1 for b in data.list_blobs() if b.name not in accounted)
    for run in runs:
        metrics = run.get("metrics") or {}
        new = (metrics.get("challenger") or {}).get("Root Mean Squared Error")
        old = (metrics.get("champion") or {}).get("Root Mean Squared Error")
        if (
            run["state"] == "promoted"
            and run.get("kind") != "rollback"
            and (new is None or (old is not None and not new < old))
        ):
            result.worse_promoted += 1


def main() -> int:
    """Run scenarios, print one line each and a summary; exit 1 on any violation."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenarios", type=int, default=12)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--json", type=str, help="also write the results to this file")
    parser.add_argument(
        "--merge",
        nargs="+",
        metavar="JSON",
        help="only add up the summaries of earlier runs (e.g. parallel ones)",
    )
    args = parser.parse_args()
    if args.merge:
        return _merge(args.merge)
    logging.basicConfig(level=logging.CRITICAL)
    print(f"chaos: {args.scenarios} scenario(s) from seed {args.seed}")
    results = []
    with stack.azurite() as connection:
        for i in range(args.scenarios):
            result = run_scenario(connection, args.seed * 100_000 + i)
            results.append(result)
            print(
                f"  scenario {i:>3} seed {result.seed}: {result.seconds:5.1f}s "
                f"faults={','.join(result.faults) or '-'} "
                f"injected={dict(result.injected) or '-'} runs={dict(result.states)} "
                f"violations={result.violations} {result.breaches() or ''}",
                flush=True,
            )
    summary = {
        "scenarios": len(results),
        "seed": args.seed,
        "faults_injected": sum(sum(r.injected.values()) + len(r.faults) for r in results),
        "crashes_injected": sum(sum(r.injected.values()) for r in results),
        "runs": sum(r.batches for r in results),
        "max_jobs_started_per_batch": max((r.jobs_started_max for r in results), default=0),
        "max_promotions_per_run": max((r.promotions_max for r in results), default=0),
        "runs_not_terminal": sum(r.not_terminal for r in results),
        "blobs_missing": sum(r.blobs_missing for r in results),
        "blob_versions_trained_twice": sum(r.trained_twice for r in results),
        "worse_models_promoted": sum(r.worse_promoted for r in results),
        "violations": sum(r.violations for r in results),
    }
    print(json.dumps(summary, indent=2))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump(summary, fh, indent=2)
    return 1 if summary["violations"] else 0


def _merge(paths: list[str]) -> int:
    parts = []
    for path in paths:
        with open(path, encoding="utf-8") as fh:
            parts.append(json.load(fh))
    merged: dict[str, Any] = {"seeds": [p["seed"] for p in parts]}
    for key in parts[0]:
        if key == "seed":
            continue
        values = [p[key] for p in parts]
        merged[key] = max(values) if key.startswith("max_") else sum(values)
    print(json.dumps(merged, indent=2))
    return 1 if merged["violations"] else 0


if __name__ == "__main__":
    sys.exit(main())
