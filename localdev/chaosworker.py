"""One worker process of a chaos scenario: the real function app under the local runner.

Each worker is a separate instance, as in Azure: its own caches, its own `Retrainer`, and its
own clock, which runs `--skew` seconds off the machine's. It polls the blob container and the
queues like the host, fires the sweep every `--sweep-every` seconds, and may kill itself with
SIGKILL right after a side effect (`--crash-rate`), before the message is acked: a process that
dies at the worst moment. It serves until SIGTERM (or a SIGKILL from the harness).

What it saw goes to `--report` as JSON lines: every exception a function raised (its type and
its kind: what the caller must do about it, see `error_kind`) and every crash it injected into
itself.

    python -m localdev.chaosworker --settings settings.json --report worker.jsonl --skew -90
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import signal
import sys
import time
from datetime import datetime, timedelta
from pathlib import Path
from types import FrameType
from typing import Any, Literal, cast

from pydantic import BaseModel

from localdev.runner import LocalRunner, log_handler
from retrain.backends.bes import BesTraining
from retrain.bes import BatchJobs, BlobRef, JobStatus
from retrain.clock import SystemClock
from retrain.deploy import DeployTarget, Progress, TrafficTarget
from retrain.errors import PermanentError, StateConflict, TransientError, UsageError
from retrain.ports import ModelRef, TrainingBackend, TrainingRequest, TrainingResult, TrainingStatus
from retrain.storage import Appended, DocumentStore, Log, Outbox, Versioned
from retrain.wiring import PortWrappers

ErrorKind = Literal["transient", "permanent", "usage", "unexpected"]


def error_kind(exc: BaseException) -> ErrorKind:
    """What the caller must do about an error, by its class (retrain.errors): try again later
    (transient), fail the run (permanent), go back to the operator (usage); anything that is
    none of the app's own kinds is unexpected."""
    if isinstance(exc, TransientError):
        return "transient"
    if isinstance(exc, PermanentError):
        return "permanent"
    if isinstance(exc, UsageError):
        return "usage"
    return "unexpected"


class SkewedClock:
    """The machine's clock, `offset` off: an instance whose clock runs ahead or behind."""

    def __init__(self, offset: timedelta) -> None:
        self.offset = offset
        self._system = SystemClock()

    def now(self) -> datetime:
        return self._system.now() + self.offset

    def monotonic(self) -> float:
        return self._system.monotonic()  # a wrong wall clock does not change elapsed time


class Report:
    """Appends one JSON line per event; flushed at once, so a SIGKILL loses nothing written."""

    def __init__(self, path: Path) -> None:
        self._fh = path.open("a", encoding="utf-8")

    def write(self, **event: Any) -> None:
        self._fh.write(json.dumps(event, default=str) + "\n")
        self._fh.flush()
        os.fsync(self._fh.fileno())


class Crasher:
    """Kills this process right after a side effect, with probability `rate`; loses the answer
    of a ledger write that landed, with probability `lose_rate`."""

    def __init__(
        self, rng: random.Random, rate: float, report: Report, lose_rate: float = 0.0
    ) -> None:
        self.rng = rng
        self.rate = rate
        self.report = report
        self.lose_rate = lose_rate

    def lose(self, key: str) -> None:
        """Call right after a conditional write landed: maybe answer as the storage SDK's retry
        of it would be answered when the first answer was lost (refused as conflicting)."""
        if self.lose_rate and self.rng.random() < self.lose_rate:
            self.report.write(event="lost answer", point="ledger write", key=key)
            raise StateConflict(f"{key}: the retried write was refused (its answer was lost)")

    def after(self, point: str) -> None:
        """Call right after a side effect succeeded."""
        if self.rate and self.rng.random() < self.rate:
            self.report.write(event="crash", point=point)
            os.kill(os.getpid(), signal.SIGKILL)


class CrashingStore:
    """The ledger's document store, crashing after each write."""

    def __init__(self, inner: DocumentStore, crasher: Crasher) -> None:
        self._inner = inner
        self._crasher = crasher

    def read(self, key: str) -> Versioned | None:
        return self._inner.read(key)

    def create(self, key: str, doc: dict[str, Any]) -> str:
        etag = self._inner.create(key, doc)
        self._crasher.after("ledger write")
        self._crasher.lose(key)
        return etag

    def replace(self, key: str, doc: dict[str, Any], etag: str) -> str:
        new = self._inner.replace(key, doc, etag)
        self._crasher.after("ledger write")
        self._crasher.lose(key)
        return new

    def keys(self, prefix: str) -> list[str]:
        return self._inner.keys(prefix)

    def put_entry(self, key: str, entry: dict[str, Any], *, replace: bool) -> bool:
        written = self._inner.put_entry(key, entry, replace=replace)
        self._crasher.after("ledger write")
        return written

    def entries(self, prefix: str) -> list[tuple[str, dict[str, Any]]]:
        return self._inner.entries(prefix)

    def start_log(self, key: str) -> bool:
        started = self._inner.start_log(key)
        self._crasher.after("ledger write")
        return started

    def append(self, key: str, entry: dict[str, Any]) -> Appended:
        appended = self._inner.append(key, entry)
        self._crasher.after("ledger write")
        return appended

    def seal_log(self, key: str) -> bool:
        sealed = self._inner.seal_log(key)
        self._crasher.after("ledger write")
        return sealed

    def read_log(self, key: str) -> Log | None:
        return self._inner.read_log(key)


class CrashingJobs:
    """BES, crashing after a submit or a start."""

    def __init__(self, inner: BatchJobs, crasher: Crasher) -> None:
        self._inner = inner
        self._crasher = crasher

    def submit(
        self,
        *,
        inputs: dict[str, BlobRef],
        outputs: dict[str, BlobRef],
        global_parameters: dict[str, str],
    ) -> str:
        job = self._inner.submit(
            inputs=inputs, outputs=outputs, global_parameters=global_parameters
        )
        self._crasher.after("BES submit")
        return job

    def start(self, job_id: str) -> None:
        self._inner.start(job_id)
        self._crasher.after("BES start")

    def status(self, job_id: str) -> JobStatus:
        return self._inner.status(job_id)

    def cancel(self, job_id: str) -> None:
        self._inner.cancel(job_id)

    def probe(self) -> str:
        return self._inner.probe()


class CrashingTraining:
    """A training backend whose submit is the service call itself (Azure ML v2: the job PUT),
    crashing after a submit and after a result (which registers the model version)."""

    def __init__(self, inner: TrainingBackend, crasher: Crasher) -> None:
        self._inner = inner
        self._crasher = crasher
        self.what = inner.what

    def submit(self, request: TrainingRequest) -> str:
        job = self._inner.submit(request)
        self._crasher.after("job PUT")
        return job

    def outputs(self, request: TrainingRequest) -> dict[str, str]:
        return self._inner.outputs(request)

    def start(self, job_id: str) -> None:
        self._inner.start(job_id)

    def status(self, job_id: str) -> TrainingStatus:
        return self._inner.status(job_id)

    def cancel(self, job_id: str) -> None:
        self._inner.cancel(job_id)

    def probe(self) -> str:
        return self._inner.probe()

    def result(self, request: TrainingRequest, job_id: str) -> TrainingResult:
        found = self._inner.result(request, job_id)
        self._crasher.after("model version PUT")
        return found


def _crashing_training(inner: TrainingBackend, crasher: Crasher) -> TrainingBackend:
    """BES crashes inside its service client (`CrashingJobs`); any other backend here."""
    return inner if isinstance(inner, BesTraining) else CrashingTraining(inner, crasher)


class CrashingTarget:
    """A deploy target, crashing after a deploy call (the PATCH, or a deployment or traffic
    PUT) and after a canary step's traffic change."""

    def __init__(self, inner: DeployTarget, crasher: Crasher) -> None:
        self._inner = inner
        self._crasher = crasher

    def serves(self, model: ModelRef) -> bool:
        return self._inner.serves(model)

    def deploy(self, model: ModelRef) -> Progress:
        progress = self._inner.deploy(model)
        self._crasher.after("PATCH")
        return progress

    def progress(self, operation: str | None) -> Progress:
        return self._inner.progress(operation)

    def preflight(self) -> list[str]:
        return self._inner.preflight()

    # A target with traffic (the online endpoint): what canary steps call.

    def traffic(self) -> dict[str, int]:
        return cast("TrafficTarget", self._inner).traffic()

    def shift(self, traffic: dict[str, int], operation: str | None) -> Progress:
        progress = cast("TrafficTarget", self._inner).shift(traffic, operation)
        self._crasher.after("traffic shift")
        return progress

    def smoke(self, deployment: str) -> str | None:
        return cast("TrafficTarget", self._inner).smoke(deployment)


class CrashingOutbox:
    """The queues, crashing after each message sent (not after a kept message is replayed)."""

    def __init__(self, inner: Outbox, crasher: Crasher) -> None:
        self._inner = inner
        self._crasher = crasher

    def send(self, queue: str, message: BaseModel, *, delay: timedelta = timedelta(0)) -> None:
        self._inner.send(queue, message, delay=delay)
        self._crasher.after("enqueue")

    def send_raw(self, queue: str, body: str) -> None:
        self._inner.send_raw(queue, body)


def crashing(crasher: Crasher) -> PortWrappers:
    """Ports that may crash right after a ledger write, a BES submit or start, an Azure ML job
    PUT or model registration, a deploy call, a canary's traffic change or an enqueue."""
    return PortWrappers(
        store=lambda port: CrashingStore(port, crasher),
        jobs=lambda port: CrashingJobs(port, crasher),
        training=lambda port: _crashing_training(port, crasher),
        target=lambda port: CrashingTarget(port, crasher),
        outbox=lambda port: CrashingOutbox(port, crasher),
    )


class FunctionErrors(logging.Handler):
    """Reports each exception a function raised (the runner logs them with exc_info)."""

    def __init__(self, report: Report) -> None:
        super().__init__(logging.ERROR)
        self.report = report

    def emit(self, record: logging.LogRecord) -> None:
        if not record.exc_info or not record.exc_info[1]:
            return
        exc = record.exc_info[1]
        args = record.args if isinstance(record.args, tuple) else ()
        self.report.write(
            event="exception",
            function=str(args[0]) if args else "?",
            type=f"{type(exc).__module__}.{type(exc).__qualname__}",
            kind=error_kind(exc),
            message=str(exc)[:300],
        )


POLL_MIN = 0.1
POLL_MAX = 1.0
"""The emulated host's polling interval: 0.1 s after a round that found work, doubling up to
1 s while there is none (the real host backs off the same way, up to a minute by default)."""


def main() -> int:
    """Serve one worker until SIGTERM."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--settings", type=Path, required=True, help="app settings (JSON)")
    parser.add_argument("--report", type=Path, required=True, help="JSON lines written here")
    parser.add_argument("--skew", type=float, default=0.0, help="clock offset in seconds")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--duplicates", type=float, default=0.0)
    parser.add_argument("--shuffle", action="store_true")
    parser.add_argument("--crash-rate", type=float, default=0.0)
    parser.add_argument(
        "--lose-rate",
        type=float,
        default=0.0,
        help="share of ledger writes whose answer is lost after they landed",
    )
    parser.add_argument("--sweep-every", type=float, default=3.0)
    parser.add_argument(
        "--visibility",
        type=float,
        default=30.0,
        help="seconds a received message stays invisible (a killed worker's messages reappear)",
    )
    args = parser.parse_args()
    settings: dict[str, str] = json.loads(args.settings.read_text(encoding="utf-8"))
    os.environ.update(settings)
    report = Report(args.report)
    logging.basicConfig(level=logging.INFO, handlers=[log_handler(sys.stderr)])
    logging.getLogger("azure").setLevel(logging.WARNING)
    logging.getLogger("runner").addHandler(FunctionErrors(report))

    from retrain import wiring
    from retrain.settings import get_settings

    rng = random.Random(args.seed)
    crasher = Crasher(random.Random(args.seed + 1), args.crash_rate, report, args.lose_rate)

    built = wiring.build(
        get_settings(),
        decorate=crashing(crasher) if args.crash_rate or args.lose_rate else None,
        clock=SkewedClock(timedelta(seconds=args.skew)),
    )
    wiring.retrainer = lambda: built  # type: ignore[assignment]
    import function_app

    runner = LocalRunner(
        function_app.app,
        env=settings,
        failure_visibility=timedelta(seconds=1),
        lease=timedelta(seconds=args.visibility),
        duplicates=args.duplicates,
        shuffle=args.shuffle,
        rng=rng,
    )
    stop = False

    def on_term(signum: int, frame: FrameType | None) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, on_term)
    report.write(event="ready", pid=os.getpid())
    next_sweep = time.monotonic() + args.sweep_every * rng.random()
    log = logging.getLogger("chaosworker")
    interval = POLL_MIN
    while not stop:
        handled = 0
        try:
            if time.monotonic() >= next_sweep:
                runner.fire("sweep")
                next_sweep = time.monotonic() + args.sweep_every
            handled = runner.step()
        except Exception as exc:  # noqa: BLE001 - the emulated host's own hiccup, not the app's
            # E.g. a message another worker re-received after its visibility ran out: the pop
            # receipt no longer matches. The host logs such errors and keeps polling.
            log.warning("polling round failed: %s: %s", type(exc).__name__, exc)
            report.write(event="host error", type=type(exc).__name__)
        # The host's polling: at once again after work, backing off while there is none.
        interval = POLL_MIN if handled else min(interval * 2, POLL_MAX)
        time.sleep(interval)
    return 0


if __name__ == "__main__":
    sys.exit(main())
