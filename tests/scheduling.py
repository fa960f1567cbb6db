"""Deterministic interleavings of real pipeline steps: every call a step makes into a wrapped
port (the document store, the queue) is a scheduling point where its thread stops until the
test lets it go, kills it before the call, or lets the call through and kills it right after.

Only one actor runs at a time: the test hands control to one parked actor and waits until it
parks again at its next call or ends, so one sequence of choices is one interleaving, however
the threads are scheduled by the OS.
"""

from __future__ import annotations

import enum
import functools
import threading
from collections.abc import Callable
from typing import Any

STUCK_AFTER = 10.0
"""Seconds an actor may run between two scheduling points before the test calls it stuck
(blocked on something outside the scheduler, e.g. a lock a parked actor holds). A bound on a
hang, never a wait for something to happen: a healthy handoff takes microseconds."""


class Killed(BaseException):
    """The worker died at this point. A BaseException, so no `except Exception` in the product
    can swallow it, as nothing in a process survives its death."""


class Verdict(enum.Enum):
    """What happens to the call an actor is parked at."""

    GO = "go"
    KILL_BEFORE = "kill before"
    KILL_AFTER = "kill after"
    """The service acted, then the worker died before it saw the answer."""


class Actor:
    """One invocation (one delivery of one message) running a real step in its own thread."""

    def __init__(self, scheduler: Scheduler, name: str, step: Callable[[], Any]) -> None:
        self.name = name
        self._scheduler = scheduler
        self._step = step
        self._resume = threading.Semaphore(0)
        self._parked = threading.Semaphore(0)
        self._verdict = Verdict.GO
        self.point: str | None = None
        """The call this actor waits to make, while it is parked."""
        self.done = False
        self.result: Any = None
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._main, name=name, daemon=True)

    # ----------------------------------------------------------------- actor side

    def _main(self) -> None:
        self._scheduler.local.actor = self
        try:
            self.result = self._step()
        except BaseException as exc:  # noqa: BLE001 - the test judges every outcome
            self.error = exc
        finally:
            self.done = True
            self.point = None
            self._parked.release()

    def at(self, point: str, call: Callable[[], Any]) -> Any:
        """Park before `call` until the scheduler decides; then make it, or die."""
        self.point = point
        self._parked.release()
        self._resume.acquire()
        verdict = self._verdict
        self._scheduler.trace.append(f"{self.name}: {point} [{verdict.value}]")
        if verdict is Verdict.KILL_BEFORE:
            raise Killed(f"{self.name} killed before {point}")
        try:
            result = call()
        except Exception:
            if verdict is Verdict.KILL_AFTER:
                raise Killed(f"{self.name} killed after {point}") from None
            raise
        if verdict is Verdict.KILL_AFTER:
            raise Killed(f"{self.name} killed after {point}")
        return result

    # ------------------------------------------------------------------ test side

    def start(self) -> None:
        """Run the step up to its first scheduling point (or its end)."""
        self._thread.start()
        self._wait()

    def proceed(self, verdict: Verdict = Verdict.GO) -> None:
        """Decide the parked call, and run on to the next scheduling point (or the end)."""
        assert not self.done, f"{self.name} already ended"
        self._verdict = verdict
        self._resume.release()
        self._wait()

    def finish(self) -> None:
        """Let every remaining call through."""
        while not self.done:
            self.proceed()

    def _wait(self) -> None:
        if not self._parked.acquire(timeout=STUCK_AFTER):
            raise AssertionError(
                f"{self.name} neither reached a scheduling point nor ended within "
                f"{STUCK_AFTER} s: it is blocked outside the scheduler (a lock another actor "
                "holds?)\n" + "\n".join(self._scheduler.trace[-30:])
            )
        if self.done:
            self._thread.join()


class Scheduler:
    """Knows which actor a thread belongs to, and what every actor did (the trace)."""

    def __init__(self) -> None:
        self.local = threading.local()
        self.trace: list[str] = []

    def actor(self, name: str, step: Callable[[], Any]) -> Actor:
        return Actor(self, name, step)

    def point(self, label: str, call: Callable[[], Any]) -> Any:
        """A scheduling point in the calling actor; calls from outside any actor (the test
        itself looking at storage) go straight through."""
        actor: Actor | None = getattr(self.local, "actor", None)
        if actor is None:
            return call()
        return actor.at(label, call)


class Scheduled:
    """Any port object, every public method of which is a scheduling point.

    Generic on purpose: a method the wrapped object gains (a new port operation) is
    intercepted without a change here.
    """

    def __init__(self, inner: object, scheduler: Scheduler, port: str) -> None:
        self._inner = inner
        self._scheduler = scheduler
        self._port = port

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._inner, name)
        if name.startswith("_") or not callable(attr):
            return attr
        label = f"{self._port}.{name}"

        @functools.wraps(attr)
        def scheduled(*args: Any, **kwargs: Any) -> Any:
            where = f"{label} {args[0]}" if args and isinstance(args[0], str) else label
            return self._scheduler.point(where, functools.partial(attr, *args, **kwargs))

        return scheduled
