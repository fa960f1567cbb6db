"""Fault-injection runs that check the exactly-once promise, seeded and reproducible.

Each scenario runs the real function app as 2-3 separate worker processes
(`localdev.chaosworker`: own caches, own `Retrainer`, own clock skewed by up to minutes) against
one Azurite and the strict Azure ML emulator, and while they work it:

- SIGKILLs workers at random moments and restarts them; a worker may also kill itself right
  after a side effect (ledger write, BES submit or start, PATCH, enqueue), before the ack;
- SIGSTOPs a worker for longer than the deploy lease while a run is promoting, then resumes it;
- runs the CLI beside them (`approve`, `rollback`, `retrain`), and SIGKILLs some commands;
- makes the emulator answer 429/5xx, drop connections, act late or answer late (past the read
  timeout), lose the answer after acting (submit, start, status, PATCH, ARM PATCH), fail or hang
  a job; loses the answer of ledger writes that landed (answered as the storage SDK's retry of
  such a conditional write is: refused as conflicting);
- overwrites data files with valid and invalid versions while their batch is open, sealed, or
  training; loses a queue message; duplicates and reorders deliveries.

When the scenario has settled (no message pending, every blob version delivered, no run in
progress) it checks, by blob version (name + ETag): at most one started job per batch and per
version, the bytes each job read equal the version its run validated, every version uploaded is
in a run or rejected (or was overwritten before any delivery), every run ended, no worse model
promoted, the target serves the champion the pointer names, the emulator recorded no contract
violation, no secret in any captured output, and no error but a transient one escaping a
function.

A scenario runs a classic model (BES, a Classic endpoint or New web service) or, for a third of
the seeds, an Azure ML v2 one (a job, an online endpoint, maybe canary steps) against the v2
emulator (`localdev.chaos_v2`): the same checks, plus the emulator's refusals and the endpoint's
traffic map against the champion. `--kinds` picks the kinds.

    python -m localdev.chaos --scenarios 12 --seed 1          # make chaos
    python -m localdev.chaos --scenarios 6 --seed 9 --kinds v2
    python -m localdev.chaos --scenarios 3 --seed 7 --json out.json
    python -m localdev.chaos --merge out-*.json               # add up parallel shards
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

from azure.core.exceptions import ResourceNotFoundError
from azure.storage.blob import BlobServiceClient, ContainerClient
from azure.storage.queue import QueueServiceClient

from localdev import azureml_v2 as v2emu
from localdev import chaos_v2, stack, v2stack
from localdev.amlemu import Emulator, EmulatorServer
from localdev.oauth import OAuthAzurite, oauth_azurite
from localdev.sample import housing_csv
from retrain.http import worst_call
from retrain.ledger import log_key
from retrain.pipeline import Timing
from retrain.ports import ModelRef
from retrain.runstate import TERMINAL
from retrain.storage import BlobDocumentStore, normalize_etag

log = logging.getLogger("chaos")

CONNECT_TIMEOUT = 1.0
READ_TIMEOUT = 1.0
MAX_RETRY_WAIT = 1
"""The longest wait between two attempts of one call (the emulators ask for 1 s at most)."""
CALL_BOUND = worst_call(CONNECT_TIMEOUT, READ_TIMEOUT, MAX_RETRY_WAIT)
_LEASES = Timing(
    timedelta(seconds=1), timedelta(seconds=4), call_bound=timedelta(seconds=CALL_BOUND)
)
DEPLOY_LEASE = _LEASES.deploy_lease.total_seconds()
"""The app's deploy lease with these timeouts: a pause longer than this outlives it."""
START_LEASE = _LEASES.start_lease.total_seconds()
"""What a copy that finds another delivery's start claim waits before it takes over."""
VISIBILITY = 20.0
"""How long a message a worker received stays invisible: a killed worker's messages reappear
after this (the host renews it while a function runs; the emulated one does not)."""
TICK = 0.25
"""The harness's own polling interval."""
MODEL = "housing"

FAULTS = (
    *chaos_v2.PROCESS_FAULTS,
    "new target",
    "manual",
)
ODDS = {
    "pause": 0.06,
    "job fails": 0.15,
    "job hangs": 0.1,
    "manual": 0.2,
    "kill": 0.5,
    "skew": 0.5,
    "cli": 0.5,
    "overwrite": 0.5,
    "lost response": 0.5,
}
KINDS = ("classic", "v2")
"""The kinds of model a scenario runs: classic (BES training, a Classic or New web service) or
v2 (an Azure ML job, an online endpoint, see localdev.chaos_v2)."""
V2_SHARE = 1 / 3
"""The share of v2 scenarios when both kinds run. The kind is drawn from its own stream of the
seed, so a seed drawn classic runs the same classic scenario as with `--kinds classic`."""
EXPECTED_KINDS = {"transient"}
"""Kinds of error (localdev.chaosworker.error_kind) a function may let escape: a transient one
is the host's to retry. A permanent error should have failed its run, a usage error should
never reach a function, and any other exception is a bug."""
SECRETS = (
    "local-bes-key",
    "local-endpoint-key",
    "local-arm-token",
    "local-new-key",
    v2stack.SCORE_KEY,
    stack.DEV_KEY,
)
_SIG = re.compile(r"(?i)\bsig(=|%3d)(?!<redacted>)[A-Za-z0-9%+/]")
_RUN_IN_PATH = re.compile(r"/" + MODEL + r"/([^/]+)/(?:model\.ilearner|input\.[a-z]+)$")


def _run_of(path: str) -> str | None:
    match = _RUN_IN_PATH.search("/" + unquote(path).lstrip("/"))
    return match.group(1) if match else None


@dataclass
class Upload:
    """One version of a data file the harness wrote."""

    name: str
    etag: str
    sha256: str
    valid: bool
    phase: str
    """'new' (a first upload), or the phase of its batch when it overwrote: open/sealed/training."""


@dataclass
class Result:
    """What one scenario did and what it found."""

    seed: int
    faults: list[str]
    kind: str = "classic"
    storage: str = "key"
    """How the app reached storage: "key" (a connection string) or "identity" (OAuth tokens
    from an identity connection, user-delegation SAS; localdev.oauth)."""
    figures: Counter[str] = field(default_factory=Counter)
    skews: list[float] = field(default_factory=list)
    states: Counter[str] = field(default_factory=Counter)
    violations: Counter[str] = field(default_factory=Counter)
    details: list[str] = field(default_factory=list)
    exceptions: Counter[str] = field(default_factory=Counter)
    seconds: float = 0.0

    def violate(self, kind: str, detail: str) -> None:
        self.violations[kind] += 1
        if len(self.details) < 20:
            self.details.append(f"{kind}: {detail}")

    @property
    def total(self) -> int:
        """Breaches of the promise (must be 0)."""
        return sum(self.violations.values())

    def line(self, index: int) -> str:
        f = self.figures
        shown = {
            k: v
            for k, v in (
                ("workers", f["workers started"]),
                ("kills", f["worker kills"]),
                ("crashes", sum(v for k, v in f.items() if k.startswith("crash after "))),
                ("pauses", f["pauses past the lease"]),
                ("cli", sum(v for k, v in f.items() if k.startswith("cli "))),
                ("cli kills", f["cli kills"]),
                ("overwrites", sum(v for k, v in f.items() if k.startswith("overwrite "))),
                ("lost", sum(v for k, v in f.items() if k.startswith("lost response on "))),
            )
            if v
        }
        skew = f" skew={min(self.skews):+.0f}..{max(self.skews):+.0f}s" if any(self.skews) else ""
        return (
            f"  scenario {index:>3} seed {self.seed}: {self.seconds:5.1f}s {self.kind} "
            f"{'' if self.storage == 'key' else '(identity) '}"
            f"faults={','.join(self.faults) or '-'} {shown}{skew} runs={dict(self.states)} "
            f"violations={self.total}" + (f" {dict(self.violations)}" if self.total else "")
        )


class Worker:
    """One worker process slot: restarted after a kill, with the same clock skew."""

    def __init__(self, index: int, skew: float, scenario: Scenario) -> None:
        self.index = index
        self.skew = skew
        self.scenario = scenario
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0
        self.paused_until: float | None = None
        self.killed: set[int] = set()
        """Pids the harness killed (their deaths are not findings)."""

    def start(self) -> None:
        s = self.scenario
        self.starts += 1
        name = f"worker-{self.index}-{self.starts}"
        args = [
            *s.program("localdev.chaosworker"),
            "--settings",
            str(s.settings_path),
            "--report",
            str(s.dir / f"{name}.jsonl"),
            "--skew",
            str(self.skew),
            "--seed",
            str(s.seed * 10 + self.index * 1000 + self.starts),
            "--duplicates",
            "0.3" if "duplicates" in s.faults else "0",
            "--crash-rate",
            "0.04" if "crash" in s.faults else "0",
            "--lose-rate",
            "0.03" if "lost response" in s.faults else "0",
            "--visibility",
            str(VISIBILITY),
        ]
        if "reorder" in s.faults:
            args.append("--shuffle")
        with (s.dir / f"{name}.log").open("wb") as out:
            self.proc = subprocess.Popen(
                args, stdout=out, stderr=subprocess.STDOUT, cwd=stack.ROOT, env=s.env
            )
        s.result.figures["workers started"] += 1

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        if self.alive() and self.proc is not None:
            self.killed.add(self.proc.pid)
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()

    def pause(self, seconds: float) -> None:
        if self.alive() and self.proc is not None:
            self.proc.send_signal(signal.SIGSTOP)
            self.paused_until = time.monotonic() + seconds

    def tend(self) -> None:
        """Resume a pause that is over; restart a process that died (killed, or crashed itself)."""
        if self.paused_until is not None and time.monotonic() >= self.paused_until:
            if self.proc is not None:
                self.proc.send_signal(signal.SIGCONT)
            self.paused_until = None
        if self.proc is not None and self.proc.poll() is not None:
            self.start()

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.paused_until is not None:
            self.proc.send_signal(signal.SIGCONT)
            self.paused_until = None
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.killed.add(self.proc.pid)
                self.proc.kill()
                self.proc.wait()


@dataclass
class Cli:
    """One CLI command running beside the workers."""

    command: list[str]
    proc: subprocess.Popen[bytes]
    out: Path
    kill_at: float | None
    killed: bool = False


class Scenario:
    """One seeded scenario against the Azurite `storage`: a connection string (the app gets
    it too), or an OAuth Azurite (the app gets an identity connection and a token credential;
    the harness and the emulated services read with the account's key)."""

    def __init__(
        self,
        storage: str | OAuthAzurite,
        seed: int,
        workdir: Path,
        faults: list[str] | None = None,
        kind: str = "classic",
    ) -> None:
        self.identity = storage if isinstance(storage, OAuthAzurite) else None
        self.connection = storage if isinstance(storage, str) else storage.key_connection()
        self.seed = seed
        self.kind = kind
        self.rng = random.Random(seed)
        rng = self.rng
        if kind == "v2":
            odds = {**ODDS, **chaos_v2.ODDS}
            drawn = sorted(f for f in chaos_v2.FAULTS if rng.random() < odds.get(f, 0.3))
        else:
            drawn = sorted(f for f in FAULTS if rng.random() < ODDS.get(f, 0.3))
        faults = drawn if faults is None else sorted(faults)
        self.faults = faults
        self.result = Result(seed, faults, kind, "key" if self.identity is None else "identity")
        self.dir = workdir / f"scenario-{seed}"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.settings_path = self.dir / "settings.json"
        self.skew_range = rng.choice([30, 90, 180]) if "skew" in faults else 0
        self.uploads: list[Upload] = []
        self.cli: list[Cli] = []
        self.paused = False
        self.lost_message = "lost message" in faults
        self.env: dict[str, str] = {}
        self.settings: dict[str, str] = {}
        self.late: Counter[str] = Counter()
        """Requests the emulator holds right now (a late act lands when its hold ends)."""
        self.late_lock = threading.Lock()
        self.unanswered = 0
        """The service calls this scenario leaves with no answer (see `_waits`)."""

    # ---------------------------------------------------------------- set-up

    def _http_faults(self) -> list[dict[str, Any]]:
        rng, faults = self.rng, self.faults
        http: list[dict[str, Any]] = []
        kinds = [k for k in ("429", "5xx", "drop", "late act", "late answer") if k in faults]
        paths = ["/jobs", "/jobs/", "/endpoints/", "/webServices/", "/operationsStatus/"]
        for _ in range(rng.randint(1, 4) if kinds else 0):
            kind, path = rng.choice(kinds), rng.choice(paths)
            if kind == "429":
                http.append({"status": 429, "retry_after": 1, "path": path})
            elif kind == "5xx":
                http.append({"status": rng.choice([500, 503]), "path": path})
            elif kind == "drop":
                http.append({"drop": True, "path": path})
            elif kind == "late act":
                http.append({"delay": rng.choice([1.5, 3.0]), "path": path})
            else:
                http.append({"delay_answer": rng.choice([1.5, 3.0]), "path": path})
        if "lost response" in faults:
            calls = {
                "submit": {"method": "POST", "path": "/jobs"},
                "start": {"method": "POST", "path": "/start"},
                "status": {"method": "GET", "path": "/jobs/"},
                "PATCH": {"method": "PATCH", "path": "/endpoints/"},
                "ARM PATCH": {"method": "PATCH", "path": "/webServices/"},
            }
            for call in rng.sample(sorted(calls), rng.randint(1, 3)):
                http.append({"lose_response": True, **calls[call]})
        return http

    def _observe(self, emulator: Emulator | v2emu.Emulator) -> None:
        """Count the faults the emulator hands out, and the requests it holds."""
        take, slow = emulator.take_fault, emulator.slow
        call_kind = chaos_v2.call_kind if self.kind == "v2" else _call_kind

        def take_fault(method: str, path: str) -> dict[str, Any] | None:
            fault = take(method, path)
            if fault is not None:
                self.result.figures[f"{_fault_kind(fault)} on {call_kind(method, path)}"] += 1
            return fault

        def held(seconds: float) -> None:
            with self.late_lock:
                self.late["held"] += 1
            try:
                slow(seconds)
            finally:
                with self.late_lock:
                    self.late["held"] -= 1

        emulator.take_fault = take_fault  # type: ignore[method-assign]
        emulator.slow = held  # type: ignore[method-assign]

    # ------------------------------------------------------------------ run

    def program(self, module: str) -> list[str]:
        """The command line that runs `module` as the app's programs run here: with the fake
        identity (localdev.oauth) when the app connects to storage with one."""
        wrap = [] if self.identity is None else ["localdev.oauth"]
        return [sys.executable, "-m", *wrap, module]

    def run(self) -> Result:
        if self.identity is None:
            return self._run()
        # The emulated services in this process read and write through the app's SAS URLs,
        # over the OAuth Azurite's HTTPS.
        with _env(REQUESTS_CA_BUNDLE=str(self.identity.cert)):
            return self._run()

    def _run(self) -> Result:
        started = time.monotonic()
        suffix = "-" + uuid.uuid4().hex[:8]
        overrides: dict[str, Any] = {
            "job_deadline": 20 + 2 * self.skew_range,
            "quiet_period": 2,
            "promotion": "manual" if "manual" in self.faults else "auto",
        }
        if self.kind == "v2":
            v2 = chaos_v2.emulator(self.connection, f"retrain-artifacts{suffix}")
            self._observe(v2)
            with v2emu.EmulatorServer(v2) as server:
                chaos_v2.configure(v2, self.rng, self.faults)
                spec = chaos_v2.model_spec(server.url, self.rng, self.faults, **overrides)
                self._play(spec, suffix, v2)
        else:
            config = stack.emulator_config()
            if self.identity is not None:
                # As in the identity e2e tests: BES hands back the SAS the app minted; only a
                # New web service reads its linked account with the account's key.
                new = "new target" in self.faults
                config["account_key"] = self.identity.account_key if new else None
            emulator = Emulator(config)
            self._observe(emulator)
            with EmulatorServer(emulator) as server:
                emulator.faults.http = self._http_faults()
                emulator.faults.fail_jobs = 1 if "job fails" in self.faults else 0
                emulator.faults.hang_jobs = "job hangs" in self.faults
                emulator.faults.job_seconds = self.rng.choice([0, 0.5, 1.5])
                spec = stack.model_spec(server.url, **overrides)
                if "new target" in self.faults:
                    spec["target"] = stack.new_target(server.url)
                self._play(spec, suffix, emulator)
        self.result.seconds = time.monotonic() - started
        return self.result

    def _play(self, spec: dict[str, Any], suffix: str, emulator: Emulator | v2emu.Emulator) -> None:
        """Run the workers on `spec` until the scenario settles (or its deadline), then check."""
        rng = self.rng
        settings = stack.app_settings(self.connection, [spec], suffix=suffix)
        if self.identity is not None:
            del settings["AzureWebJobsStorage"]
            settings.update(self.identity.identity_settings())
        settings.update(
            RETRAIN_HTTP_CONNECT_TIMEOUT=str(CONNECT_TIMEOUT),
            RETRAIN_HTTP_READ_TIMEOUT=str(READ_TIMEOUT),
            RETRAIN_HTTP_MAX_RETRY_WAIT=str(MAX_RETRY_WAIT),
            RETRAIN_SWEEP_STALL="PT1S",
        )
        self.settings = settings
        self.settings_path.write_text(json.dumps(settings), encoding="utf-8")
        self.env = {**os.environ, **settings}
        if self.identity is not None:
            self.env["REQUESTS_CA_BUNDLE"] = str(self.identity.cert)
        blobs = BlobServiceClient.from_connection_string(self.connection)
        data = blobs.get_container_client(settings["RETRAIN_DATA_CONTAINER"])
        data.create_container()
        count = rng.randint(2, 3)
        self.result.skews = [
            round(rng.uniform(-self.skew_range, self.skew_range)) if i else 0.0
            for i in range(count)
        ]
        workers = [Worker(i, skew, self) for i, skew in enumerate(self.result.skews)]
        for w in workers:
            w.start()
        # A call with no answer (dropped, answered late, answer lost) is followed one call bound
        # later, and so is the call of a worker that died: each may add that much to the end.
        self.unanswered = sum(
            1
            for f in emulator.faults.http
            if f.get("drop") or {"delay", "delay_answer", "lose_response"} & set(f)
        )
        settled = False
        try:
            settled = self._drive(workers, blobs, data)
        finally:
            for w in workers:
                w.stop()
            for c in self.cli:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    c.proc.wait(30)
        if not settled:
            self.result.violate("not settled", self._unsettled(blobs, data))
        self._check(blobs, data, emulator, workers)
        if self.result.violations:
            self._dump(blobs, data)

    def _dump(self, blobs: BlobServiceClient, data: ContainerClient) -> None:
        """What a violation is judged from, kept beside the workers' logs (with `--keep`): every
        document of the app's state, the data blobs as they are, and the versions written."""
        states = blobs.get_container_client(self.settings["RETRAIN_STATE_CONTAINER"])
        out = self.dir / "state"
        with contextlib.suppress(ResourceNotFoundError):
            for b in states.list_blobs():
                path = out / b.name
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(states.download_blob(b.name).readall())
        current = [{"name": b.name, "etag": normalize_etag(b.etag)} for b in data.list_blobs()]
        uploads = [dataclasses.asdict(u) for u in self.uploads]
        (self.dir / "data.json").write_text(
            json.dumps({"current": current, "uploads": uploads}, indent=1), encoding="utf-8"
        )

    def _drive(
        self, workers: list[Worker], blobs: BlobServiceClient, data: ContainerClient
    ) -> bool:
        rng, faults = self.rng, self.faults
        act_until = 25.0
        plan: list[tuple[float, str]] = []
        for i in range(rng.randint(1, 3)):
            plan.append((rng.uniform(0, 12), f"upload {MODEL}/part-{i}.csv"))
        if "kill" in faults:
            plan += [(rng.uniform(1, act_until), "kill") for _ in range(rng.randint(1, 3))]
        if "cli" in faults:
            plan += [(rng.uniform(3, act_until), "cli") for _ in range(rng.randint(1, 3))]
        if self.lost_message:
            plan += [(rng.uniform(2, act_until), "lose message")]
        if "canary" in faults:
            # A second wave once the first model is likely crowned: a better model's promotion
            # then moves traffic in steps (the first one takes all traffic at once).
            wave = rng.uniform(act_until + 5, act_until + 15)
            plan += [(wave + j, f"upload {MODEL}/wave-{j}.csv") for j in range(rng.randint(1, 2))]
        plan.sort()
        overwrites = (
            [
                (rng.choice(["open", "sealed", "training"]), rng.random() < 0.5)
                for _ in range(rng.randint(1, 3))
            ]
            if "overwrite" in faults
            else []
        )
        pause_wanted = "pause" in faults
        start = time.monotonic()
        deadline = (
            start
            + act_until
            + 90
            + DEPLOY_LEASE
            + START_LEASE
            + 3 * self.skew_range
            + VISIBILITY
            + (DEPLOY_LEASE + 10 if pause_wanted else 0)
        )
        states = blobs.get_container_client(self.settings["RETRAIN_STATE_CONTAINER"])
        next_settle = 0.0
        while time.monotonic() < deadline + self._waits(workers):
            now = time.monotonic() - start
            for w in workers:
                w.tend()
            self._tend_cli()
            while plan and plan[0][0] <= now:
                _, action = plan.pop(0)
                self._act(action, workers, data, states)
            runs = _docs(states, "runs/") if overwrites or pause_wanted else []
            if overwrites:
                self._overwrite(overwrites, data, states, runs)
            if pause_wanted and (
                any(r["state"] == "promoting" for r in runs) or now > act_until + 20
            ):
                pause_wanted = False
                w = rng.choice([w for w in workers if w.alive()] or workers)
                w.pause(DEPLOY_LEASE + 10)
                self.result.figures["pauses past the lease"] += 1
            busy = (
                plan
                or any(w.paused_until for w in workers)
                or any(c.proc.poll() is None for c in self.cli)
            )
            if not busy and now >= next_settle:
                next_settle = now + 1.0
                if self._settled(blobs, data, states):
                    return True
            time.sleep(TICK)
        return False

    def _waits(self, workers: list[Worker]) -> float:
        """What the protocol's waits after calls with no answer may add to the deadline: one
        call bound per such call and per worker death so far (at most ten)."""
        deaths = sum(w.starts - 1 for w in workers)
        return CALL_BOUND * min(self.unanswered + deaths, 10)

    # --------------------------------------------------------------- actions

    def _act(
        self, action: str, workers: list[Worker], data: ContainerClient, states: ContainerClient
    ) -> None:
        rng = self.rng
        if action.startswith("upload "):
            name = action.removeprefix("upload ")
            self._upload(data, name, valid=True, phase="new")
        elif action == "kill":
            alive = [w for w in workers if w.alive() and not w.paused_until]
            if alive:
                rng.choice(alive).kill()
                self.result.figures["worker kills"] += 1
        elif action == "cli":
            self._cli(states, kill=rng.random() < 0.3)
        elif action == "lose message":
            queues = QueueServiceClient.from_connection_string(self.connection)
            jobs = queues.get_queue_client(self.settings["RETRAIN_JOBS_QUEUE"])
            with contextlib.suppress(ResourceNotFoundError):  # no worker has made it yet
                if jobs.get_queue_properties().approximate_message_count:
                    jobs.clear_messages()
                    self.result.figures["lost messages"] += 1

    def _upload(self, data: ContainerClient, name: str, *, valid: bool, phase: str) -> None:
        text = housing_csv(
            self.rng.randint(40, 200),
            seed=self.rng.randrange(1_000_000),
            noise=self.rng.choice([1, 5, 40]),
        )
        if not valid:  # a new version without the 'age' column
            text = "\n".join(
                ",".join(c for i, c in enumerate(line.split(",")) if i != 1)
                for line in text.splitlines()
            )
        body = text.encode()
        reply = data.get_blob_client(name).upload_blob(body, overwrite=True)
        self.uploads.append(
            Upload(
                name,
                normalize_etag(reply["etag"]),
                hashlib.sha256(body).hexdigest(),
                valid,
                phase,
            )
        )

    def _overwrite(
        self,
        wanted: list[tuple[str, bool]],
        data: ContainerClient,
        states: ContainerClient,
        runs: list[dict[str, Any]],
    ) -> None:
        model = _doc(states, f"models/{MODEL}.json") or {}
        open_id = (model.get("batch") or {}).get("id")
        store = BlobDocumentStore.over(states)
        members = [entry for _, entry in store.entries(f"batches/{MODEL}/{open_id}/")]
        logged = store.read_log(log_key(MODEL, open_id)) if open_id else None
        members += logged.entries if logged else []
        names = {
            "open": sorted({entry["name"] for entry in members}) if open_id else [],
            "sealed": [
                r["training_file"]["name"]
                for r in runs
                if r["state"] in ("queued", "submitted") and r.get("training_file")
            ],
            "training": [
                r["training_file"]["name"]
                for r in runs
                if r["state"] == "running" and r.get("training_file")
            ],
        }
        for phase, valid in list(wanted):
            if names[phase]:
                self._upload(data, self.rng.choice(names[phase]), valid=valid, phase=phase)
                wanted.remove((phase, valid))
                validity = "valid" if valid else "invalid"
                self.result.figures[f"overwrite {validity} while {phase}"] += 1

    def _cli(self, states: ContainerClient, *, kill: bool) -> None:
        rng = self.rng
        runs = _docs(states, "runs/")
        promoted = [r["run_id"] for r in runs if r["state"] == "promoted"]
        waiting = [r["run_id"] for r in runs if r["state"] == "awaiting_approval"]
        choice = rng.choice(["approve", "rollback", "retrain"])
        if choice == "approve":
            command = ["approve", rng.choice(waiting or [r["run_id"] for r in runs] or ["none"])]
        elif choice == "rollback":
            command = ["rollback", MODEL]
            if promoted and rng.random() < 0.5:
                command += ["--to", rng.choice(promoted)]
        else:
            command = ["retrain", MODEL]
            if self.uploads and rng.random() < 0.5:
                command += ["--blob", rng.choice(self.uploads).name]
        self._spawn_cli(command, kill_after=rng.uniform(0.3, 3.0) if kill else None)

    def _spawn_cli(self, command: list[str], *, kill_after: float | None) -> None:
        out = self.dir / f"cli-{len(self.cli)}.log"
        with out.open("wb") as fh:
            proc = subprocess.Popen(
                [*self.program("retrain"), "--json", *command, "--by", "chaos"],
                stdout=fh,
                stderr=subprocess.STDOUT,
                cwd=stack.ROOT,
                env=self.env,
            )
        kill_at = time.monotonic() + kill_after if kill_after is not None else None
        self.cli.append(Cli(command, proc, out, kill_at))
        self.result.figures[f"cli {command[0]}"] += 1

    def _tend_cli(self) -> None:
        for c in self.cli:
            if c.kill_at is not None and time.monotonic() >= c.kill_at and c.proc.poll() is None:
                c.proc.send_signal(signal.SIGKILL)
                c.proc.wait()
                c.killed = True
                self.result.figures["cli kills"] += 1

    # ---------------------------------------------------------------- settle

    def _pending(self) -> int:
        queues = QueueServiceClient.from_connection_string(self.connection)
        total = 0
        for setting in ("RETRAIN_JOBS_QUEUE", "RETRAIN_EVALUATIONS_QUEUE"):
            for name in (self.settings[setting], self.settings[setting] + "-poison"):
                with contextlib.suppress(ResourceNotFoundError):
                    props = queues.get_queue_client(name).get_queue_properties()
                    total += props.approximate_message_count or 0
        return total

    def _settled(
        self, blobs: BlobServiceClient, data: ContainerClient, states: ContainerClient
    ) -> bool:
        """No message pending, no request held, every blob version delivered, no run going on;
        a run waiting for approval is approved (by the CLI, as a person would)."""
        if self.late["held"] or self._pending():
            return False
        model = _doc(states, f"models/{MODEL}.json") or {}
        if model.get("batch") or model.get("active_run"):
            return False
        runs = _docs(states, "runs/")
        waiting = [r["run_id"] for r in runs if r["state"] == "awaiting_approval"]
        if waiting:
            self._spawn_cli(["approve", waiting[0]], kill_after=None)
            return False
        if any(r["state"] not in TERMINAL for r in runs):
            return False
        accounted = _accounted(states, runs, _docs(states, "arrivals/"))
        return all((b.name, normalize_etag(b.etag)) in accounted for b in data.list_blobs())

    def _unsettled(self, blobs: BlobServiceClient, data: ContainerClient) -> str:
        states = blobs.get_container_client(self.settings["RETRAIN_STATE_CONTAINER"])
        model = _doc(states, f"models/{MODEL}.json") or {}
        runs = _docs(states, "runs/")
        accounted = _accounted(states, runs, _docs(states, "arrivals/"))
        undelivered = [
            b.name for b in data.list_blobs() if (b.name, normalize_etag(b.etag)) not in accounted
        ]
        return (
            f"pending messages {self._pending()}, held requests {self.late['held']}, "
            f"batch {bool(model.get('batch'))}, active run {model.get('active_run')}, "
            f"runs {[(r['run_id'], r['state']) for r in runs if r['state'] not in TERMINAL]}, "
            f"undelivered {undelivered}"
        )

    # ----------------------------------------------------------------- check

    def _check(
        self,
        blobs: BlobServiceClient,
        data: ContainerClient,
        emulator: Emulator | v2emu.Emulator,
        workers: list[Worker],
    ) -> None:
        res = self.result
        states = blobs.get_container_client(self.settings["RETRAIN_STATE_CONTAINER"])
        runs = {r["run_id"]: r for r in _docs(states, "runs/")}
        arrivals = _docs(states, "arrivals/")
        res.states = Counter(r["state"] for r in runs.values())
        res.figures["runs"] += len(runs)
        for r in runs.values():
            if r["state"] not in TERMINAL:
                res.violate("run not terminal", f"{r['run_id']} is {r['state']}")
        if isinstance(emulator, v2emu.Emulator):
            trained = chaos_v2.trained(emulator)
        else:
            trained = emulator.trained
            self._check_classic_jobs(emulator)
        # Each version trained in one run, exactly the validated bytes.
        by_version: dict[tuple[str, str], set[str]] = {}
        uploads = {(u.name, u.etag): u for u in self.uploads}
        rejected = {
            (a["name"], normalize_etag(a["etag"])) for a in arrivals if a["status"] == "rejected"
        }
        data_prefix = data.container_name + "/"
        for t in trained:
            run_id = _run_of(t["blob"])
            source, etag = t["version"]
            name = str(source).removeprefix(data_prefix)
            version = (name, normalize_etag(etag))
            by_version.setdefault(version, set()).add(run_id or t["job"])
            run = runs.get(run_id or "")
            if run is None:
                res.violate("job of no run", f"job {t['job']} read {t['blob']}")
                continue
            training = run.get("training_file") or {}
            expected = (training.get("name"), normalize_etag(training.get("etag", "")))
            if version != expected:
                res.violate(
                    "trained another version than the run recorded",
                    f"run {run_id} recorded {expected}, its job read {version}",
                )
            upload = uploads.get(version)
            if upload is None:
                res.violate("trained an unknown version", f"run {run_id}: {version}")
            elif upload.sha256 != t["sha256"]:
                res.violate(
                    "trained bytes differ from the validated version",
                    f"run {run_id}: {version}",
                )
            elif not upload.valid or version in rejected:
                res.violate("trained a rejected version", f"run {run_id}: {version}")
        for version, trained_by in by_version.items():
            if len(trained_by) > 1:
                res.violate("version trained in two runs", f"{version}: {sorted(trained_by)}")
        # Every version uploaded is in a run or rejected (or was replaced before any delivery).
        accounted = _accounted(states, list(runs.values()), arrivals)
        recorded = {(a["name"], normalize_etag(a["etag"])) for a in arrivals}
        latest = {u.name: u.etag for u in self.uploads}
        for u in self.uploads:
            if (u.name, u.etag) in accounted:
                continue
            if (u.name, u.etag) not in recorded and latest[u.name] != u.etag:
                res.figures["versions overwritten before any delivery"] += 1
                continue
            res.violate("blob version lost", f"{u.name}@{u.etag} ({u.phase})")
        # No worse model promoted (a rollback or restore deploys an older one on purpose).
        for r in runs.values():
            if r["state"] != "promoted" or r.get("kind") in ("rollback", "restore"):
                continue
            metrics = r.get("metrics") or {}
            new = (metrics.get("challenger") or {}).get("Root Mean Squared Error")
            old = (metrics.get("champion") or {}).get("Root Mean Squared Error")
            if new is None or (old is not None and not new < old):
                res.violate("worse model promoted", f"run {r['run_id']}: {new} over {old}")
        # The target serves what the champion pointer names.
        model = _doc(states, f"models/{MODEL}.json") or {}
        pointer = (model.get("champion") or {}).get("model")
        if isinstance(emulator, v2emu.Emulator):
            chaos_v2.check(res, emulator, pointer, _run_of)
        else:
            self._check_classic_target(emulator, pointer)
        self._check_outputs(workers)

    def _check_classic_jobs(self, emulator: Emulator) -> None:
        """The emulator's contract violations; at most one started job per batch."""
        res = self.result
        for v in emulator.violations:
            res.violate(f"emulator: {v['kind']}", f"job {v['job']}: {v['detail']}")
        started = Counter(
            rid for _, outs in emulator.started for o in outs if (rid := _run_of(o)) is not None
        )
        for started_run, n in started.items():
            if n > 1:
                res.violate("extra jobs started", f"run {started_run}: {n} jobs started")

    def _check_classic_target(self, emulator: Emulator, pointer: dict[str, Any] | None) -> None:
        """The Classic endpoint or New web service serves the champion."""
        res = self.result
        champion = str(ModelRef.load(pointer)) if pointer else None
        served = _served(emulator)
        if served != champion:
            res.violate(
                "target differs from champion",
                f"target serves {served}, champion pointer {champion}",
            )
        # Patches per run, for the record (a retried PATCH of the same model is not a breach).
        patches = Counter(_run_of(p) for p in _patched(emulator))
        res.figures["most PATCHes of one model"] = max(patches.values(), default=0)

    def _check_outputs(self, workers: list[Worker]) -> None:
        res = self.result
        for path in sorted(self.dir.glob("worker-*.jsonl")):
            for line in path.read_text(encoding="utf-8").splitlines():
                event = json.loads(line)
                if event["event"] == "crash":
                    res.figures[f"crash after {event['point']}"] += 1
                elif event["event"] == "lost answer":
                    res.figures[f"lost response on {event['point']}"] += 1
                elif event["event"] == "host error":
                    res.figures["host polling errors"] += 1
                elif event["event"] == "exception":
                    judge_exception(res, event)
        outputs = sorted(self.dir.glob("worker-*.log")) + [c.out for c in self.cli]
        for path in outputs:
            text = path.read_text(encoding="utf-8", errors="replace")
            for secret in SECRETS:
                if secret in text:
                    res.violate("secret in output", f"{path.name}: a configured key")
            if _SIG.search(text):
                res.violate("secret in output", f"{path.name}: a SAS signature")
        for c in self.cli:
            text = c.out.read_text(encoding="utf-8", errors="replace")
            if c.killed:
                continue
            if "Traceback" in text:
                last = text.strip().splitlines()[-1][:160]
                res.violate("CLI traceback", f"{' '.join(c.command)}: {last}")
            elif c.proc.returncode in (1, 2):
                res.figures["cli refusals"] += 1
            elif c.proc.returncode not in (0, None):
                res.violate("CLI exit", f"{' '.join(c.command)}: exit {c.proc.returncode}")


def judge_exception(res: Result, event: dict[str, Any]) -> None:
    """Count an exception a function raised by its kind and class; a kind that may not escape
    a function is a violation."""
    kind, name = event["kind"], event["type"].rsplit(".", 1)[-1]
    res.exceptions[f"{kind} {name}"] += 1
    if kind not in EXPECTED_KINDS:
        res.violate(
            f"{kind} exception escaped",
            f"{event['function']}: {event['type']}: {event['message'][:160]}",
        )


def _fault_kind(fault: dict[str, Any]) -> str:
    if fault.get("lose_response"):
        return "lost response"
    if "delay_answer" in fault:
        return "late answer"
    if "delay" in fault:
        return "late act"
    if fault.get("drop"):
        return "drop"
    return str(fault.get("status"))


def _call_kind(method: str, path: str) -> str:
    if "/operationsStatus/" in path:
        return "ARM operation"
    if "/webServices/" in path:
        return "ARM " + method
    if "/endpoints/" in path:
        return method if method == "PATCH" else f"endpoint {method}"
    if path.endswith("/start"):
        return "start"
    if re.search(r"/jobs/?$", path):
        return "submit"
    if "/jobs/" in path:
        return "status" if method == "GET" else f"job {method}"
    return f"{method} other"


def _doc(container: ContainerClient, key: str) -> dict[str, Any] | None:
    try:
        loaded: dict[str, Any] = json.loads(container.download_blob(key).readall())
    except ResourceNotFoundError:
        return None
    return loaded


def _run_files(states: ContainerClient, run: dict[str, Any]) -> list[dict[str, Any]]:
    """A run's files: its manifest's (none if the manifest is missing), or its own list."""
    if not run.get("manifest"):
        return list(run.get("files") or [])
    return list((_doc(states, run["manifest"]) or {}).get("files") or [])


def _docs(container: ContainerClient, prefix: str) -> list[dict[str, Any]]:
    try:
        names = [b.name for b in container.list_blobs(name_starts_with=prefix)]
    except ResourceNotFoundError:
        return []
    return [d for n in names if (d := _doc(container, n)) is not None]


def _accounted(
    states: ContainerClient, runs: list[dict[str, Any]], arrivals: list[dict[str, Any]]
) -> set[tuple[str, str]]:
    """Versions in a run's files (its manifest's), or recorded as rejected."""
    held = {(f["name"], normalize_etag(f["etag"])) for r in runs for f in _run_files(states, r)}
    return held | {
        (a["name"], normalize_etag(a["etag"])) for a in arrivals if a.get("status") == "rejected"
    }


def _patched(emulator: Emulator) -> list[str]:
    paths = [
        str(p.get("RelativeLocation", "")) for ep in emulator.endpoints.values() for p in ep.patches
    ]
    paths += [
        _asset_path(a)
        for ws in emulator.web_services.values()
        for assets in ws.patches
        for a in assets.values()
        if a.get("type") == "Resource"
    ]
    return paths


def _asset_path(asset: dict[str, Any]) -> str:
    """'container/name' of an ARM asset's blob URI (account and SAS left out)."""
    path = urlsplit(str((asset.get("locationInfo") or {}).get("uri") or "")).path
    return unquote(path.lstrip("/").removeprefix(stack.DEV_ACCOUNT + "/"))


def _served(emulator: Emulator) -> str | None:
    """The model the target serves, as 'container/name', or None for the initial one."""
    for ep in emulator.endpoints.values():
        if ep.name != "default" and ep.location is not None:
            return unquote(str(ep.location["RelativeLocation"]).lstrip("/"))
    for ws in emulator.web_services.values():
        for asset in (ws.assets or {}).values():
            if asset.get("type") == "Resource" and ws.patches:
                return _asset_path(asset)
    return None


def draw_kind(seed: int, kinds: tuple[str, ...] = KINDS) -> str:
    """The kind of model the scenario of `seed` runs, among `kinds`. Drawn from a stream of its
    own, so the rest of the scenario (its faults, their timing) comes from the seed as before."""
    if unknown := set(kinds) - set(KINDS):
        raise ValueError(f"unknown kinds {sorted(unknown)}; known: {', '.join(KINDS)}")
    if len(kinds) == 1:
        return kinds[0]
    return "v2" if random.Random(f"kind {seed}").random() < V2_SHARE else "classic"


def run_scenario(
    storage: str | OAuthAzurite,
    seed: int,
    workdir: Path | None = None,
    *,
    faults: list[str] | None = None,
    kind: str | None = None,
) -> Result:
    """One seeded scenario against the Azurite `storage` (a connection string, or an OAuth
    Azurite the app reaches with an identity); `faults` replaces the mix the seed would draw
    (each fault's timing and details still come from the seed), `kind` ("classic" or "v2")
    the kind of model it would draw."""
    kind = kind or draw_kind(seed)
    known = chaos_v2.FAULTS if kind == "v2" else FAULTS
    if kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}; known: {', '.join(KINDS)}")
    if faults is not None and (unknown := set(faults) - set(known)):
        raise ValueError(f"unknown {kind} faults {sorted(unknown)}; known: {', '.join(known)}")
    if workdir is not None:
        return Scenario(storage, seed, workdir, faults, kind).run()
    with tempfile.TemporaryDirectory(prefix="chaos-") as tmp:
        return Scenario(storage, seed, Path(tmp), faults, kind).run()


@contextlib.contextmanager
def _env(**values: str) -> Iterator[None]:
    """Environment variables set for the block, restored after it."""
    before = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in before.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def summarize(
    results: list[Result], seed: int, harness_errors: list[str] | None = None
) -> dict[str, Any]:
    """The figures of a set of scenarios, as `--json` writes and `--merge` adds up."""
    figures: Counter[str] = Counter()
    violations: Counter[str] = Counter()
    states: Counter[str] = Counter()
    exceptions: Counter[str] = Counter()
    faults: Counter[str] = Counter()
    kinds: Counter[str] = Counter()
    modes: Counter[str] = Counter()
    for r in results:
        kinds[r.kind] += 1
        modes[r.storage] += 1
        figures.update(r.figures)
        violations.update(r.violations)
        states.update(r.states)
        exceptions.update(r.exceptions)
        faults.update(r.faults)
    skews = [s for r in results for s in r.skews if s]
    figures.pop("most PATCHes of one model", None)  # a maximum, not a sum
    return {
        "scenarios": len(results),
        "seeds": [seed],
        "scenarios_by_kind": dict(sorted(kinds.items())),
        "scenarios_by_storage": dict(sorted(modes.items())),
        "seconds": round(sum(r.seconds for r in results), 1),
        "longest_scenario_seconds": round(max((r.seconds for r in results), default=0), 1),
        "scenarios_with_fault": dict(sorted(faults.items())),
        "figures": dict(sorted(figures.items())),
        "max_patches_of_one_model": max(
            (r.figures["most PATCHes of one model"] for r in results), default=0
        ),
        "clock_skews": {
            "count": len(skews),
            "min_seconds": min(skews, default=0),
            "max_seconds": max(skews, default=0),
        },
        "runs_by_state": dict(sorted(states.items())),
        "exceptions": dict(sorted(exceptions.items())),
        "violations_by_kind": dict(sorted(violations.items())),
        "violations": sum(violations.values()),
        "violating_seeds": [r.seed for r in results if r.total],
        "harness_errors": list(harness_errors or []),
    }


def _merge(paths: list[str]) -> int:
    parts = []
    for path in paths:
        with open(path, encoding="utf-8") as fh:
            parts.append(json.load(fh))
    merged: dict[str, Any] = {}
    for part in parts:
        for key, value in part.items():
            if key.startswith(("max_", "longest_")):
                merged[key] = max(merged.get(key, 0), value)
            elif key == "clock_skews":
                prior = merged.get(key)
                merged[key] = (
                    {
                        "count": prior["count"] + value["count"],
                        "min_seconds": min(prior["min_seconds"], value["min_seconds"]),
                        "max_seconds": max(prior["max_seconds"], value["max_seconds"]),
                    }
                    if prior
                    else dict(value)
                )
            elif isinstance(value, dict):
                sub = Counter(merged.get(key, {}))
                sub.update(value)
                merged[key] = dict(sorted(sub.items()))
            else:
                merged[key] = merged.get(key, type(value)()) + value
    print(json.dumps(merged, indent=2))
    return 1 if merged.get("violations") or merged.get("harness_errors") else 0


@contextlib.contextmanager
def _storage(mode: str) -> Iterator[str | OAuthAzurite]:
    """A private Azurite of the mode asked for: its connection string, or the OAuth one."""
    if mode == "key":
        with stack.azurite() as connection:
            yield connection
        return
    with (
        tempfile.TemporaryDirectory(prefix="chaos-oauth-") as tmp,
        oauth_azurite(Path(tmp)) as oauth,
    ):
        yield oauth


@contextlib.contextmanager
def _workdir(keep: str | None) -> Iterator[Path]:
    if keep:
        path = Path(keep)
        path.mkdir(parents=True, exist_ok=True)
        yield path
        return
    with tempfile.TemporaryDirectory(prefix="chaos-") as tmp:
        yield Path(tmp)


def _terminate(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main() -> int:
    """Run scenarios, print one line each and a summary; exit 1 on any violation."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenarios", type=int, default=12)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument(
        "--first", type=int, default=0, help="index of the first scenario (to rerun one seed)"
    )
    parser.add_argument(
        "--kinds",
        default=",".join(KINDS),
        help="kinds of model to run, comma-separated: classic, v2 (default both: a third of "
        "the seeds run v2; `--kinds classic` runs every seed as before v2 existed)",
    )
    parser.add_argument(
        "--storage",
        choices=("key", "identity"),
        default="key",
        help="how the app reaches storage: a connection string to Azurite 3.35 (default), or "
        "an identity connection to an OAuth Azurite 3.37 with a token credential and "
        "user-delegation SAS (localdev.oauth)",
    )
    parser.add_argument("--json", type=str, help="also write the summary to this file")
    parser.add_argument(
        "--keep", type=str, help="keep each scenario's worker and CLI output under this folder"
    )
    parser.add_argument(
        "--merge",
        nargs="+",
        metavar="JSON",
        help="only add up the summaries of earlier runs (e.g. parallel shards)",
    )
    args = parser.parse_args()
    if args.merge:
        return _merge(args.merge)
    kinds = tuple(k.strip() for k in args.kinds.split(",") if k.strip())
    draw_kind(0, kinds)  # refuses an unknown kind before anything starts
    # SIGTERM (e.g. `kill`, or a stopped make) unwinds like Ctrl-C: the scenario stops its
    # workers (a paused one is resumed first) and Azurite is stopped.
    signal.signal(signal.SIGTERM, _terminate)
    logging.basicConfig(level=logging.CRITICAL)
    print(
        f"chaos: {args.scenarios} scenario(s) from seed {args.seed} ({', '.join(kinds)}), "
        f"worker processes, {args.storage} storage, "
        f"deploy lease {DEPLOY_LEASE:.0f} s",
        flush=True,
    )
    results = []
    errors: list[str] = []
    with _storage(args.storage) as storage, _workdir(args.keep) as workdir:
        for i in range(args.first, args.first + args.scenarios):
            seed = args.seed * 100_000 + i
            try:
                result = run_scenario(storage, seed, workdir, kind=draw_kind(seed, kinds))
            except Exception as exc:  # noqa: BLE001 - any harness failure is reported below
                # The harness itself failed: say so and go on; the run does not pass.
                errors.append(f"seed {seed}: {type(exc).__name__}: {exc}"[:300])
                print(f"  scenario {i:>3} seed {seed}: HARNESS ERROR", flush=True)
                traceback.print_exc()
                continue
            results.append(result)
            print(result.line(i), flush=True)
            for detail in result.details:
                print(f"      {detail}", flush=True)
            if args.json:  # after every scenario, so a run stopped early still adds up
                _write_summary(args.json, summarize(results, args.seed, errors))
    summary = summarize(results, args.seed, errors)
    print(json.dumps(summary, indent=2))
    if args.json:
        _write_summary(args.json, summary)
    return 1 if summary["violations"] or errors else 0


def _write_summary(path: str, summary: dict[str, Any]) -> None:
    partial = path + ".partial"
    with open(partial, "w", encoding="utf-8") as fh:
        json.dump(summary, fh, indent=2)
    os.replace(partial, path)


if __name__ == "__main__":
    sys.exit(main())
