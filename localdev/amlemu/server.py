"""The emulator: the three services over one shared state, and the HTTP layer that injects
faults, parses requests and answers through the route tables."""

from __future__ import annotations

import threading
from typing import Any, ClassVar
from urllib.parse import parse_qs, urlsplit

from localdev.amlemu.arm import Arm, WebService
from localdev.amlemu.bes import Bes, Job, TrainingService
from localdev.amlemu.classic import Classic, Endpoint
from localdev.amlemu.common import BadRequest, Faults, HttpError, Shared
from localdev.amlemu.routes import ANY, Reply, Request, Route, dispatch, route
from localdev.emuhttp import FaultHandler, LoopbackServer, serve
from retrain.clock import Clock

DESCRIPTION = "A local emulator of Azure ML Studio (classic) BES v2.0 and endpoint management."


class Emulator:
    """The emulator's state and its route table; the HTTP server is a thin layer over it."""

    def __init__(self, config: dict[str, Any], *, clock: Clock | None = None) -> None:
        self.shared = Shared(account_key=config.get("account_key"), clock=clock)
        self.classic = Classic(self.shared, config.get("endpoints", []))
        self.arm = Arm(self.shared, config.get("web_services", []))
        self.bes = Bes(
            self.shared, config.get("training_services", []), champion_model=self.classic.model_of
        )
        self.routes: list[Route] = [
            route("POST", "/_emulator/faults", self._set_faults),
            route(ANY, "/_emulator/calls", self._calls),
            route(ANY, "/_emulator/violations", self._violations),
            route(ANY, "/_emulator/trained", self._trained),
            route(ANY, "/_emulator/.*", self._unknown),
            *self.bes.routes(),
            *self.classic.routes(),
            *self.arm.routes(),
        ]

    # ---- what tests and tools read and set

    @property
    def clock(self) -> Clock | None:
        """The clock jobs run on (None: real time, a thread per job)."""
        return self.shared.clock

    @property
    def faults(self) -> Faults:
        """The faults to inject; set their fields."""
        return self.shared.faults

    @property
    def calls(self) -> list[tuple[str, str, int]]:
        """Every answered request: (method, path, status); status 0 for a dropped one."""
        return self.shared.calls

    @property
    def violations(self) -> list[dict[str, Any]]:
        """Contract breaches by the client (see `Shared.violations`)."""
        return self.shared.violations

    @property
    def lock(self) -> threading.RLock:
        """Held while the services change what the properties here return."""
        return self.shared.lock

    @property
    def services(self) -> dict[tuple[str, str], TrainingService]:
        """BES training services by (workspace, service)."""
        return self.bes.services

    @property
    def jobs(self) -> dict[str, Job]:
        """BES jobs by id (a deleted job is gone)."""
        return self.bes.jobs

    @property
    def started(self) -> list[tuple[str, list[str]]]:
        """Every started job with its output locations (kept after DELETE)."""
        return self.bes.started

    @property
    def trained(self) -> list[dict[str, Any]]:
        """What each job read: {"job", "version", "blob", "etag", "sha256"}."""
        return self.bes.trained

    @property
    def endpoints(self) -> dict[tuple[str, str, str], Endpoint]:
        """Classic endpoints by (workspace, web service, endpoint)."""
        return self.classic.endpoints

    @property
    def web_services(self) -> dict[tuple[str, str, str], WebService]:
        """New web services by (subscription, resource group, name)."""
        return self.arm.web_services

    def count(self, method: str, pattern: str, status: int | None = None) -> int:
        """How many calls matched (method, regex on path, status)."""
        return self.shared.count(method, pattern, status)

    def violation(self, kind: str, job: str | None, detail: str) -> None:
        """Record a breach of the contract by the client (never a secret in `detail`)."""
        self.shared.violation(kind, job, detail)

    # ---- faults (the chaos harness wraps these two to count them)

    def take_fault(self, method: str, path: str) -> dict[str, Any] | None:
        """The next one-shot HTTP fault matching this request, removed from the list."""
        return self.shared.take_fault(method, path)

    def slow(self, seconds: float) -> None:
        """Hold a request, as an overloaded service would."""
        self.shared.slow(seconds)

    # ---- requests

    def arrived(self, method: str, path: str) -> None:
        """A request arrived, before any fault decides its answer (BES notes status polls)."""
        self.bes.observe(method, path)

    def handle(self, request: Request) -> Reply:
        """The answer of the route table."""
        return dispatch(self.routes, request)

    def _set_faults(self, request: Request) -> Reply:
        for k, v in (request.body or {}).items():
            setattr(self.faults, k, v)
        return Reply(200, {})

    def _calls(self, request: Request) -> Reply:
        return Reply(200, [list(c) for c in self.calls])

    def _violations(self, request: Request) -> Reply:
        with self.lock:
            return Reply(200, list(self.violations))

    def _trained(self, request: Request) -> Reply:
        with self.lock:
            return Reply(200, [{**t, "version": list(t["version"])} for t in self.trained])

    def _unknown(self, request: Request) -> Reply:
        raise HttpError(404, "NotFound")


class _Handler(FaultHandler):
    """HTTP for one emulator (`make_handler` binds it): one-shot faults, then the routes."""

    emulator: ClassVar[Emulator]

    def bad_body(self, problem: str) -> HttpError:
        return BadRequest(problem)

    def _handle(self) -> None:
        parts = urlsplit(self.path)
        request = Request(
            method=self.command,
            path=parts.path,
            query=parse_qs(parts.query),
            body=self._body(),
            authorization=self.headers.get("Authorization"),
            host=self.headers.get("Host"),
        )
        self.emulator.arrived(request.method, request.path)
        self._answer(request.path, lambda: self.emulator.handle(request))


def make_handler(emu: Emulator) -> type[FaultHandler]:
    """The request handler class bound to one emulator."""
    return type("Handler", (_Handler,), {"emulator": emu})


class EmulatorServer(LoopbackServer):
    """The emulator on a loopback port, served from a background thread."""

    def __init__(self, emulator: Emulator, port: int = 0) -> None:
        super().__init__(make_handler(emulator), port)
        self.emulator = emulator

    def stop(self) -> None:
        """Stop serving, then cancel the jobs still running on threads."""
        super().stop()
        for job in self.emulator.jobs.values():
            job.cancel.set()


def main() -> None:
    """Serve the emulator until interrupted."""
    serve(
        "Azure ML emulator",
        description=DESCRIPTION,
        prog="python -m localdev.amlemu",
        config_help="JSON file with services and endpoints",
        port=8765,
        server_for=lambda config, port: EmulatorServer(Emulator(config), port),
    )
