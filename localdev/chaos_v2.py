"""The Azure ML v2 side of a chaos scenario (`localdev.chaos`): the v2 emulator's faults, the
model spec (an Azure ML job, an online endpoint, with or without canary steps), and what is
checked against the emulator's own records after the scenario.

A v2 scenario draws its faults from `FAULTS`: the classic harness's process and data faults,
the one-shot HTTP faults on the v2 calls, and the v2 service's own (a job that answers
`NotResponding` for a while, a traffic map that a GET still shows stale after a change, a
deployment that fails to provision, canary steps).
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from localdev import v2stack
from localdev.azureml_v2 import Emulator
from retrain.ports import ModelRef

if TYPE_CHECKING:
    from localdev.chaos import Result

PROCESS_FAULTS = (
    "duplicates",
    "reorder",
    "crash",
    "kill",
    "pause",
    "skew",
    "cli",
    "overwrite",
    "429",
    "5xx",
    "drop",
    "late act",
    "late answer",
    "lost response",
    "job fails",
    "job hangs",
    "lost message",
)
"""The faults both kinds of scenario draw first, in this order (a seed's draws depend on it)."""

FAULTS = (
    *PROCESS_FAULTS,
    "manual",
    "canary",
    "not responding",
    "stale traffic",
    "provisioning fails",
)
"""The faults a v2 scenario draws from (the classic `new target` has no v2 counterpart)."""
ODDS = {"canary": 0.5, "provisioning fails": 0.15}
"""Odds of the v2 faults that differ from the classic default (0.3)."""
ENDPOINT = "/onlineEndpoints/housing"
INITIAL_TRAFFIC: dict[str, int] = {}
"""The endpoint's traffic map before the scenario: no deployment yet."""

CALLS: dict[str, dict[str, str]] = {
    "job PUT": {"method": "PUT", "path": "/jobs/"},
    "job GET": {"method": "GET", "path": "/jobs/"},
    "MLflow": {"method": "GET", "path": "/mlflow/"},
    "model version PUT": {"method": "PUT", "path": "/models/"},
    "deployment PUT": {"method": "PUT", "path": "/deployments/"},
    "endpoint PUT": {"method": "PUT", "ends": ENDPOINT},
    "endpoint GET": {"method": "GET", "ends": ENDPOINT},
    "LRO poll": {"method": "GET", "path": "/mfeOperationsStatus/"},
}
"""The v2 calls a fault aims at: how a one-shot fault matches each."""


def http_faults(rng: random.Random, faults: list[str]) -> list[dict[str, Any]]:
    """One-shot faults on the v2 calls: 1-4 of the drawn 429/5xx/drop/late kinds, and 1-3 lost
    responses (the service acted, the answer never came)."""
    http: list[dict[str, Any]] = []
    kinds = [k for k in ("429", "5xx", "drop", "late act", "late answer") if k in faults]
    for _ in range(rng.randint(1, 4) if kinds else 0):
        kind, call = rng.choice(kinds), CALLS[rng.choice(sorted(CALLS))]
        if kind == "429":
            http.append({"status": 429, "retry_after": 1, **call})
        elif kind == "5xx":
            http.append({"status": rng.choice([500, 503]), **call})
        elif kind == "drop":
            http.append({"drop": True, **call})
        elif kind == "late act":
            http.append({"delay": rng.choice([1.5, 3.0]), **call})
        else:
            http.append({"delay_answer": rng.choice([1.5, 3.0]), **call})
    if "lost response" in faults:
        for name in rng.sample(sorted(CALLS), rng.randint(1, 3)):
            http.append({"lose_response": True, **CALLS[name]})
    return http


def call_kind(method: str, path: str) -> str:
    """How the figures name a v2 call."""
    for name, call in CALLS.items():
        if (
            call["method"] == method
            and call.get("path", "") in path
            and path.endswith(call.get("ends", ""))
        ):
            return name
    return f"{method} other"


def emulator(connection: str, container: str) -> Emulator:
    """The v2 emulator over the app's artifacts container, with the housing endpoint."""
    return Emulator(v2stack.emulator_config(connection, container, ["housing"]))


def configure(emu: Emulator, rng: random.Random, faults: list[str]) -> None:
    """The emulator's faults and timings for this scenario's draw."""
    f = emu.faults
    f.http = http_faults(rng, faults)
    f.fail_jobs = 1 if "job fails" in faults else 0
    f.hang_jobs = "job hangs" in faults
    f.job_seconds = rng.choice([0, 0.5, 1.5])
    f.provisioning_seconds = rng.choice([0, 1, 3])
    f.cancel_seconds = rng.choice([0, 2])
    f.not_responding = rng.randint(1, 3) if "not responding" in faults else 0
    f.stale_traffic_gets = rng.randint(1, 3) if "stale traffic" in faults else 0
    f.fail_provisioning = 1 if "provisioning fails" in faults else 0


def model_spec(url: str, rng: random.Random, faults: list[str], **overrides: Any) -> dict[str, Any]:
    """The v2 housing model on the emulator at `url`; canary steps when drawn."""
    spec = v2stack.model_spec(url, **overrides)
    if "canary" in faults:
        spec["target"]["canary"] = {
            "steps": rng.choice([[50], [10, 50]]),
            "hold": rng.choice(["PT1S", "PT3S"]),
            "smoke_each_step": rng.random() < 0.5,
        }
    return spec


@dataclass(frozen=True)
class Deployed:
    """A deployment as the endpoint holds it."""

    model: str | None
    """The registered model version's ARM id it has provisioned (None: none yet)."""
    state: str


def traffic_violations(
    traffic: dict[str, int],
    endpoint_state: str,
    deployments: dict[str, Deployed],
    champion: str | None,
    initial: dict[str, int],
) -> list[str]:
    """Why the endpoint does not serve the champion (empty when it does): with a champion (a
    model version's ARM id) one provisioned deployment takes all traffic and holds it; without
    one the map is still the initial one."""
    shares = {name: share for name, share in traffic.items() if share}
    if endpoint_state.casefold() != "succeeded":
        return [f"the endpoint is {endpoint_state}, traffic {shares}"]
    if champion is None:
        if shares != {k: v for k, v in initial.items() if v}:
            return [f"no champion, but traffic {shares} (initially {initial})"]
        return []
    full = [name for name, share in shares.items() if share == 100]
    if len(full) != 1 or len(shares) != 1:
        return [f"traffic {shares} is not all on one deployment (champion {champion})"]
    found = deployments.get(full[0])
    if found is None:
        return [f"traffic {shares} goes to a deployment that does not exist"]
    if found.state.casefold() != "succeeded":
        return [f"deployment {full[0]} takes all traffic but is {found.state}"]
    if (found.model or "").casefold() != champion.casefold():
        return [f"deployment {full[0]} takes all traffic and serves {found.model}, not {champion}"]
    return []


def champion_id(emu: Emulator, pointer: dict[str, Any] | None) -> str | None:
    """The ARM id of the model version the champion pointer names (None: no champion)."""
    if not pointer:
        return None
    ref = ModelRef.load(pointer)
    if ref.kind != "registered":
        return f"(not a registered model: {ref})"
    return f"{emu.ws_path}/models/{ref.name}/versions/{ref.version}"


def check(
    res: Result,
    emu: Emulator,
    pointer: dict[str, Any] | None,
    run_of: Callable[[str], str | None],
) -> None:
    """The emulator's refusals, one job per run, and the endpoint's traffic against the
    champion pointer; `run_of` maps a datastore path to its run id."""
    for v in list(emu.violations):
        res.violate(f"emulator: {v['kind']}", str(v["detail"])[:300])
    jobs: dict[str, list[str]] = {}
    for job in list(emu.training.jobs.values()):
        for value in (job.props.get("inputs") or {}).values():
            if value.get("jobInputType") in ("uri_file", "uri_folder"):
                run = run_of(str(value.get("uri") or ""))
                jobs.setdefault(run or job.name, []).append(job.name)
    for run, names in jobs.items():
        if len(names) > 1:
            res.violate("extra jobs started", f"run {run}: jobs {sorted(names)}")
    ep = emu.serving.endpoint("housing")  # settles the operations that are due
    with emu.lock:
        deployments = {
            name: Deployed(dep.model_id, dep.state) for name, dep in ep.deployments.items()
        }
        traffic, state = dict(ep.traffic), ep.state
    for problem in traffic_violations(
        traffic, state, deployments, champion_id(emu, pointer), INITIAL_TRAFFIC
    ):
        res.violate("traffic differs from champion", problem)
    puts = [traffic for name, traffic in emu.serving.traffic_puts if name == "housing"]
    res.figures["traffic PUTs"] += len(puts)
    res.figures["split traffic PUTs (canary steps)"] += sum(1 for t in puts if len(t) > 1)
    res.figures["deployment operations"] += sum(
        1 for op in emu.serving.operations.values() if op.kind == "deployment"
    )


def trained(emu: Emulator) -> list[dict[str, Any]]:
    """What each job read, in the shape the classic emulator records it ("job", "blob",
    "version", "sha256"); a job that read a folder has no version and is left out."""
    with emu.lock:
        return [dict(t) for t in emu.training.trained if "version" in t]
