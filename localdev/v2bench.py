"""Tracking benchmark for Azure ML v2 jobs: status GETs and queue messages per job of 1 minute,
1 hour and 12 hours, beside classic BES jobs of the same durations.

The real handlers, clients and Azurite state, with the product's poll schedule (the defaults of
RETRAIN_POLL_FIRST_DELAY and RETRAIN_POLL_MAX_DELAY: 30 s doubling to 10 min, each poll a
delayed re-enqueue). The app's queues are replaced by an in-memory timeline on a manual clock
that the emulator's job shares: each delivery moves the clock to the message's due time, so a
12-hour job is tracked in seconds. `time.sleep` is counted, not allowed to pass silently.

With Azure ML's job completion events (`v2 + events`): the emulator's RunCompleted event is
delivered to the app when the job ends, and the polls, now only the fallback, grow to 1 hour.

    python -m localdev.v2bench [--durations 60,3600,43200] [--json]
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import heapq
import json
import math
import sys
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any
from unittest import mock

from localdev import stack, v2stack

DURATIONS = (60, 3600, 43200)
BACKENDS = ("v2", "classic")
EVENTS_MAX_DELAY = timedelta(hours=1)
"""The poll schedule's longest delay with completion events: the polls are only the fallback."""
_STATUS_GET = {"v2": r"/jobs/[^/]+$", "classic": r"/jobs/[0-9a-f]+$"}
"""The path of a job's status GET on each emulator."""


def label(seconds: int) -> str:
    """`60` -> '1 minute', `43200` -> '12 hours'."""
    for unit, size in (("hour", 3600), ("minute", 60)):
        if seconds % size == 0:
            count = seconds // size
            return f"{count} {unit}" + ("s" if count != 1 else "")
    return f"{seconds} s"


class Timeline:
    """The app's outbox as a heap of (due time, message) on a manual clock; counts what is sent."""

    def __init__(self, clock: Any) -> None:
        self.clock = clock
        self.heap: list[tuple[datetime, int, Any]] = []
        self.sent: Counter[str] = Counter()

    def send(self, queue: str, message: Any, *, delay: timedelta = timedelta(0)) -> None:
        self.sent[type(message).__name__] += 1
        heapq.heappush(self.heap, (self.clock.now() + delay, sum(self.sent.values()), message))

    def send_raw(self, queue: str, body: str) -> None:
        from retrain.messages import parse_evaluation, parse_jobs

        parse = parse_jobs if "jobs" in queue else parse_evaluation
        self.send(queue, parse(body.encode()))

    def replacing(self, outbox: object) -> Timeline:
        """As the outbox wrapper of the wiring: the app sends here, not to the queues."""
        return self

    def at(self, due: datetime, action: Callable[[], object]) -> None:
        """Something the service does at `due` (a job's end and its event), in time order."""
        heapq.heappush(self.heap, (due, -len(self.heap) - 1, action))


def deliver(app: Any, timeline: Timeline, over: Callable[[], bool]) -> tuple[float, int]:
    """Deliver messages in due order, the clock moved to each; seconds inside the handlers and
    the number of invocations."""
    from retrain.messages import CheckBatch, EvaluateRun, TrackRun
    from retrain.pipeline import Delivery

    inside, invocations = 0.0, 0
    while timeline.heap and not over():
        due, seq, msg = heapq.heappop(timeline.heap)
        timeline.clock.current = max(timeline.clock.current, due)
        start = time.perf_counter()
        if isinstance(msg, CheckBatch):
            app.on_check_batch(msg)
        elif isinstance(msg, TrackRun):
            app.on_track_run(msg, delivery=Delivery(f"v2bench-{seq}"))
        elif isinstance(msg, EvaluateRun):
            app.on_evaluate(msg, delivery=Delivery(f"v2bench-{seq}"))
        elif callable(msg):
            msg()
        else:
            continue  # run events go to the notify function, not the pipeline
        inside += time.perf_counter() - start
        invocations += 1
    return inside, invocations


@contextlib.contextmanager
def service(
    backend: str, clock: Any, duration: int, connection: str, suffix: str
) -> Iterator[tuple[Any, dict[str, Any]]]:
    """The backend's emulator on the manual clock, its jobs lasting `duration` seconds, and a
    model spec pointing at it."""
    if backend == "v2":
        from localdev.azureml_v2 import Emulator, EmulatorServer

        config = v2stack.emulator_config(connection, f"retrain-artifacts{suffix}", ["housing"])
        v2 = Emulator(config, clock=clock)
        v2.faults.job_seconds = duration
        with EmulatorServer(v2) as server:
            yield v2, v2stack.model_spec(server.url, job_deadline=2 * duration)
        return
    from localdev.amlemu import Emulator as ClassicEmulator
    from localdev.amlemu import EmulatorServer as ClassicServer

    classic = ClassicEmulator(stack.emulator_config(), clock=clock)
    classic.faults.job_seconds = duration
    with ClassicServer(classic) as server:
        yield classic, stack.model_spec(server.url, job_deadline=2 * duration)


def upload(connection: str, container: str, name: str, text: str) -> None:
    """Put a data file in place (the container made first if need be)."""
    from azure.core.exceptions import ResourceExistsError
    from azure.storage.blob import BlobServiceClient

    client = BlobServiceClient.from_connection_string(connection).get_container_client(container)
    with contextlib.suppress(ResourceExistsError):
        client.create_container()
    client.upload_blob(name, text, overwrite=True)


def schedule() -> tuple[timedelta, timedelta]:
    """The product's default poll schedule: first delay and the most it grows to."""
    from retrain.settings import Settings

    fields = Settings.model_fields
    first: timedelta = fields["poll_first_delay"].default
    most: timedelta = fields["poll_max_delay"].default
    return first, most


class CompletionEvents:
    """Azure ML's side of the job events: when a started job's time is up, the job ends and its
    RunCompleted event goes to the app's `job_events` handler."""

    def __init__(self, app: Any, emulator: Any, timeline: Timeline, duration: int) -> None:
        self.app, self.emulator, self.timeline = app, emulator, timeline
        self.duration = duration
        self.scheduled: set[str] = set()
        self.delivered = 0

    def watch(self) -> None:
        """Schedule the end of every job that has started since the last look."""
        for job in list(self.emulator.training.jobs.values()):
            if job.started is not None and job.name not in self.scheduled:
                self.scheduled.add(job.name)
                due = datetime.fromtimestamp(job.started + self.duration, UTC)
                self.timeline.at(due, functools.partial(self.end, job))

    def end(self, job: Any) -> None:
        from retrain.azureml.events import job_completed

        training = self.emulator.training
        seen = len(training.events)
        training.advance(job)
        for event in training.events[seen:]:
            found = job_completed(event["eventType"], event["topic"], event["data"])
            if found is not None:
                self.delivered += 1
                self.app.on_job_completed(found)


def track(connection: str, backend: str, duration: int, *, events: bool = False) -> dict[str, Any]:
    """Track one job of `duration` seconds from drop to the run's end; what it cost. With
    `events` (v2), the job's completion event reaches the app and the polls grow to 1 hour."""
    from localdev.sample import housing_csv
    from retrain import wiring
    from retrain.clock import ManualClock
    from retrain.settings import get_settings

    clock = ManualClock(datetime.now(UTC))
    suffix = "-" + uuid.uuid4().hex[:8]
    first, most = schedule()
    if events:
        most = EVENTS_MAX_DELAY
    with service(backend, clock, duration, connection, suffix) as (emulator, spec):
        settings = stack.app_settings(connection, [spec], suffix=suffix)
        settings.update(
            RETRAIN_POLL_FIRST_DELAY=f"PT{first.total_seconds():g}S",
            RETRAIN_POLL_MAX_DELAY=f"PT{most.total_seconds():g}S",
        )
        stack.load_app(settings)
        timeline = Timeline(clock)
        app = wiring.build(
            get_settings(), clock=clock, decorate=wiring.PortWrappers(outbox=timeline.replacing)
        )
        data = settings["RETRAIN_DATA_CONTAINER"]
        upload(connection, data, "housing/a.csv", housing_csv(40, seed=1))
        app.on_blob(data, "housing/a.csv")

        def over() -> bool:
            runs = app.runs("housing")
            return bool(runs) and runs[-1]["state"] in ("promoted", "rejected", "failed")

        completions = CompletionEvents(app, emulator, timeline, duration) if events else None

        def done() -> bool:
            if completions is not None:
                completions.watch()
            return over()

        with mock.patch.object(time, "sleep", wraps=time.sleep) as sleeper:
            inside, invocations = deliver(app, timeline, done)
        polls = emulator.count("GET", _STATUS_GET[backend])
        run = app.runs("housing")[-1]
        bound = math.ceil(math.log2(duration / first.total_seconds())) + duration / most.seconds
        return {
            "status GETs": polls,
            "track messages": timeline.sent["TrackRun"],
            "queue messages": sum(timeline.sent.values()),
            "invocations": invocations,
            "seconds inside invocations": round(inside, 2),
            "seconds slept": round(sum(float(c.args[0]) for c in sleeper.call_args_list), 3),
            "run": run["state"],
            "budget": round(bound + 2, 1),
            "end to gate (s)": to_gate(run, emulator, duration) if backend == "v2" else None,
            "events delivered": completions.delivered if completions else 0,
        }


def to_gate(run: dict[str, Any], emulator: Any, duration: int) -> float:
    """Seconds from the job's end (on the emulator's clock) to the run reaching `trained`."""
    (job,) = emulator.training.jobs.values()
    trained = next(h["at"] for h in run["history"] if h["state"] == "trained")
    ended = float(job.started) + duration
    return round(datetime.fromisoformat(str(trained)).timestamp() - ended, 1)


def measure(connection: str, durations: tuple[int, ...]) -> dict[str, dict[str, Any]]:
    """Every backend at every duration: `{"v2, 1 hour": {...}, ...}`."""
    results: dict[str, dict[str, Any]] = {}
    for d in durations:
        for backend in BACKENDS:
            results[f"{backend}, {label(d)}"] = track(connection, backend, d)
        results[f"v2 + events, {label(d)}"] = track(connection, "v2", d, events=True)
    return results


def table(results: dict[str, dict[str, Any]]) -> str:
    """The figures as a markdown table, one row per (backend, duration)."""
    first, most = schedule()
    columns = [
        "status GETs",
        "track messages",
        "queue messages",
        "seconds inside invocations",
        "end to gate (s)",
    ]
    lines = [
        f"Poll schedule: {first.total_seconds():g} s doubling to {most.total_seconds():g} s "
        "(the defaults), a delayed message per poll; manual clock. `v2 + events`: the job's "
        f"RunCompleted event delivered as it ends, the polls growing to "
        f"{EVENTS_MAX_DELAY.total_seconds():g} s.",
        "",
        "| job | " + " | ".join(columns) + " | slept | run | polls budget |",
        "|---|" + "---|" * (len(columns) + 3),
    ]
    for name, row in results.items():
        cells = ["-" if row[c] is None else str(row[c]) for c in columns]
        extra = [f"{row['seconds slept']} s", row["run"], f"<= {row['budget']}"]
        lines.append(f"| {name} | " + " | ".join(cells + extra) + " |")
    return "\n".join(lines)


def met(results: dict[str, dict[str, Any]]) -> bool:
    """Every job tracked to a judged run within the poll budget, nothing slept."""
    return all(
        r["status GETs"] <= r["budget"] and r["seconds slept"] == 0 and r["run"] != "failed"
        for r in results.values()
    )


def main() -> int:
    """Measure and print the table (or JSON); exit 1 when a budget is missed."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--durations",
        default=",".join(str(d) for d in DURATIONS),
        help="job durations in seconds, comma-separated",
    )
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = parser.parse_args()
    durations = tuple(int(d) for d in args.durations.split(","))
    with stack.azurite() as connection:
        results = measure(connection, durations)
    print(json.dumps(results, indent=2) if args.json else table(results))
    return 0 if met(results) else 1


if __name__ == "__main__":
    sys.exit(main())
