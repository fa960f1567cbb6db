"""The scale-out benchmark's arithmetic: per-process measurements summed into one row, the growth
table, the budgets' verdicts and the printed tables. Pure: no storage, no processes."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

PASS, FAIL, NOT_RUN = "PASS", "FAIL", "NOT RUN"

MAX_REQUESTS = 4.0
MAX_CONFLICTS = 0.05
MAX_CPU_RATIO = 1.3
MAX_P99_RATIO = 3.0
MAX_BYTES_RATIO = 1.1


@dataclass
class WorkerFigures:
    """What one worker process measured over its share of a burst. `started`/`ended` are
    `time.monotonic()` readings, one clock for every process of the machine (Linux)."""

    blobs: int = 0
    started: float = 0.0
    ended: float = 0.0
    cpu_seconds: float = 0.0
    latencies: list[float] = field(default_factory=list)
    """Seconds, one per handler call (a retried delivery is a call of its own)."""
    requests: list[int] = field(default_factory=list)
    """Storage requests per blob, its retried deliveries included."""
    written: list[int] = field(default_factory=list)
    """Bytes of PUT/POST request bodies per blob, its retried deliveries included."""
    conflicts: int = 0
    """Answers with status 412 (a conditional write lost its race)."""
    exists: int = 0
    """Answers with status 409 (e.g. a create of something that exists)."""
    failures: int = 0
    first_failure: str | None = None
    given_up: int = 0
    """Blobs whose every delivery failed (the host stops after its maximum dequeue count)."""


def percentile(values: Sequence[float], q: float) -> float:
    """The nearest-rank percentile `q` (0 < q <= 1) of a non-empty sequence."""
    if not values:
        raise ValueError("percentile of no values")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


def _per(total: float, count: int, digits: int = 2) -> float | None:
    return round(total / count, digits) if count else None


def aggregate(workers: Sequence[WorkerFigures], azurite_cpu_seconds: float) -> dict[str, Any]:
    """One burst's row from its workers' figures and the CPU Azurite spent meanwhile."""
    blobs = sum(w.blobs for w in workers)
    latencies = [t for w in workers for t in w.latencies]
    wall = max((w.ended for w in workers), default=0.0) - min(
        (w.started for w in workers), default=0.0
    )
    worker_cpu = sum(w.cpu_seconds for w in workers)
    first = next((w.first_failure for w in workers if w.first_failure), None)
    return {
        "blobs": blobs,
        "wall s": round(wall, 2),
        "arrivals/s": round(blobs / wall, 1) if wall > 0 else None,
        "requests/arrival": _per(sum(sum(w.requests) for w in workers), blobs),
        "412/arrival": _per(sum(w.conflicts for w in workers), blobs, 3),
        "409/arrival": _per(sum(w.exists for w in workers), blobs, 3),
        "p50 ms": round(percentile(latencies, 0.5) * 1000, 1) if latencies else None,
        "p99 ms": round(percentile(latencies, 0.99) * 1000, 1) if latencies else None,
        "CPU ms/arrival": _per((worker_cpu + azurite_cpu_seconds) * 1000, blobs, 1),
        "worker CPU ms/arrival": _per(worker_cpu * 1000, blobs, 1),
        "Azurite CPU ms/arrival": _per(azurite_cpu_seconds * 1000, blobs, 1),
        "bytes written/arrival": _per(sum(sum(w.written) for w in workers), blobs, 0),
        "failed deliveries": sum(w.failures for w in workers),
        "blobs given up": sum(w.given_up for w in workers),
        "first failure": first,
    }


def growth_window(size: int) -> int:
    """How many arrivals, ending at the one that brings the batch to `size`, a growth row
    summarises: a tenth of the batch, at least 10 and at most 200."""
    return max(1, min(size, max(10, min(200, size // 10))))


def growth_rows(
    figures: WorkerFigures, sizes: Sequence[int], not_run: str = "not run"
) -> list[dict[str, Any]]:
    """Per batch size, the arrivals that brought one growing batch to that size (one call per
    blob: `figures` of a single process in arrival order); sizes it never reached are marked
    `not_run`, saying why."""
    rows: list[dict[str, Any]] = []
    for size in sizes:
        if size > figures.blobs or size > len(figures.latencies):
            rows.append({"batch size": size, "not run": not_run})
            continue
        window = growth_window(size)
        span = slice(size - window, size)
        latencies = figures.latencies[span]
        rows.append(
            {
                "batch size": size,
                "arrivals measured": window,
                "bytes written/arrival": round(sum(figures.written[span]) / window),
                "requests/arrival": round(sum(figures.requests[span]) / window, 2),
                "p50 ms": round(percentile(latencies, 0.5) * 1000, 1),
                "p99 ms": round(percentile(latencies, 0.99) * 1000, 1),
            }
        )
    return rows


@dataclass(frozen=True)
class Verdict:
    """One budget: what it says, what was measured against it, and PASS, FAIL or NOT RUN."""

    budget: str
    measured: str
    verdict: str


def _worst(
    rows: Sequence[dict[str, Any]], key: str, limit: float, budget: str, fmt: str
) -> Verdict:
    measured = [r for r in rows if r.get(key) is not None]
    if not measured:
        return Verdict(budget, "no burst measured", NOT_RUN)
    worst = max(measured, key=lambda r: float(r[key]))
    value = float(worst[key])
    return Verdict(
        budget,
        f"worst {value:{fmt}} ({worst['scenario']})",
        PASS if value <= limit else FAIL,
    )


def _ratio(
    low: dict[str, Any] | None, high: dict[str, Any] | None, key: str, limit: float, budget: str
) -> Verdict:
    if low is None or high is None or not low.get(key) or high.get(key) is None:
        return Verdict(budget, "not measured in this run", NOT_RUN)
    ratio = float(high[key]) / float(low[key])
    return Verdict(
        budget,
        f"{ratio:.2f}x ({high[key]} vs {low[key]})",
        PASS if ratio <= limit else FAIL,
    )


def _one_model(rows: Sequence[dict[str, Any]], files: int, procs: int) -> dict[str, Any] | None:
    return next((r for r in rows if r["files"] == files and r["procs"] == procs), None)


def verdicts(bursts: Sequence[dict[str, Any]], growth: Sequence[dict[str, Any]]) -> list[Verdict]:
    """Every budget against this run's figures. `bursts` are aggregated rows with their
    `scenario`, `kind` ('burst', or 'growth' for the growth batch, whose end-of-burst checks
    count too), `files`, `procs`, `models` and end-of-burst checks; `growth` the growth rows."""
    scaled = [r for r in bursts if r.get("kind") == "burst"]
    found = [
        _worst(scaled, "requests/arrival", MAX_REQUESTS, "storage requests/arrival <= 4", ".2f"),
        _worst(scaled, "412/arrival", MAX_CONFLICTS, "412 conflicts/arrival <= 0.05", ".3f"),
    ]
    single = [r for r in scaled if r["models"] == 1]
    for files in sorted({r["files"] for r in single}):
        one, eight = _one_model(single, files, 1), _one_model(single, files, 8)
        found.append(
            _ratio(
                one,
                eight,
                "CPU ms/arrival",
                MAX_CPU_RATIO,
                f"CPU/arrival K=8 <= 1.3x K=1, {files} files",
            )
        )
        found.append(
            _ratio(one, eight, "p99 ms", MAX_P99_RATIO, f"p99 K=8 <= 3x K=1, {files} files")
        )
    by_size = {r["batch size"]: r for r in growth if "bytes written/arrival" in r}
    found.append(
        _ratio(
            by_size.get(100),
            by_size.get(5000),
            "bytes written/arrival",
            MAX_BYTES_RATIO,
            "bytes written/arrival at 5,000 files <= 1.1x at 100",
        )
    )
    failed = sum(r.get("failed deliveries", 0) for r in bursts)
    found.append(
        Verdict("zero failed deliveries", str(failed), PASS if failed == 0 and bursts else FAIL)
    )
    off = [r["scenario"] for r in bursts if not _one_job_each(r)]
    found.append(
        Verdict(
            "one training job per burst",
            "every burst" if not off else "off in " + "; ".join(off),
            PASS if bursts and not off else FAIL,
        )
    )
    lost = sum(r.get("lost blobs", 0) for r in bursts)
    doubled = sum(r.get("duplicated blobs", 0) for r in bursts)
    found.append(
        Verdict(
            "every blob in exactly one run",
            f"{lost} lost, {doubled} in more than one run",
            PASS if bursts and lost == doubled == 0 else FAIL,
        )
    )
    return found


def _one_job_each(row: dict[str, Any]) -> bool:
    runs = row.get("runs per model") or {}
    return row.get("jobs submitted") == row["models"] and all(n == 1 for n in runs.values())


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> list[str]:
    """A pipe table (markdown), columns padded so it also reads on a terminal."""
    cells = [[_cell(v) for v in row] for row in rows]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]

    def line(values: Sequence[str]) -> str:
        return "| " + " | ".join(v.ljust(w) for v, w in zip(values, widths, strict=True)) + " |"

    return [line(headers), line(["-" * w for w in widths]), *(line(r) for r in cells)]


def _cell(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


BURST_COLUMNS = (
    "scenario",
    "arrivals/s",
    "requests/arrival",
    "412/arrival",
    "409/arrival",
    "p50 ms",
    "p99 ms",
    "CPU ms/arrival",
    "worker CPU ms/arrival",
    "Azurite CPU ms/arrival",
    "bytes written/arrival",
    "failed deliveries",
    "lost blobs",
    "duplicated blobs",
    "jobs submitted",
)
GROWTH_COLUMNS = (
    "batch size",
    "arrivals measured",
    "bytes written/arrival",
    "requests/arrival",
    "p50 ms",
    "p99 ms",
)


def _growth_cells(row: dict[str, Any]) -> list[object]:
    if "not run" in row:
        return [row["batch size"], row["not run"], *([None] * (len(GROWTH_COLUMNS) - 2))]
    return [row.get(c) for c in GROWTH_COLUMNS]


def render(results: dict[str, Any]) -> list[str]:
    """The scale-out tables and verdicts as lines (markdown that reads on a terminal)."""
    bursts = results["bursts"]
    lines = ["### Bursts", ""]
    lines += table(BURST_COLUMNS, [[r.get(c) for c in BURST_COLUMNS] for r in bursts])
    failures = [f"- {r['scenario']}: {r['first failure']}" for r in bursts if r["first failure"]]
    if failures:
        lines += ["", "First failure of each burst that had one:", "", *failures]
    lines += ["", "### Growth of one batch (one process)", ""]
    growth = results["growth"]
    lines += table(GROWTH_COLUMNS, [_growth_cells(r) for r in growth])
    lines += ["", "### Budgets", ""]
    lines += table(
        ("budget", "measured", "verdict"),
        [[v["budget"], v["measured"], v["verdict"]] for v in results["verdicts"]],
    )
    return lines
