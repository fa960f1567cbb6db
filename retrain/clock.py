"""Time as a dependency, so tracking hours-long jobs can be tested in seconds."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta
from typing import Protocol


class Clock(Protocol):
    """Something that tells the current time, timezone-aware in UTC."""

    def now(self) -> datetime: ...

    def monotonic(self) -> float:
        """Seconds on a clock that only moves forward and that no one sets: for measuring how
        long something took on this instance (a lease's holder times its lease on it)."""
        ...


class SystemClock:
    """The wall clock."""

    def now(self) -> datetime:
        return datetime.now(UTC)

    def monotonic(self) -> float:
        return time.monotonic()


class ManualClock:
    """A clock that moves only when told: for tests, benchmarks and local replays."""

    def __init__(self, start: datetime | None = None) -> None:
        self.current = self.start = start or datetime(2026, 11, 1, 12, 0, tzinfo=UTC)

    def now(self) -> datetime:
        return self.current

    def monotonic(self) -> float:
        return (self.current - self.start).total_seconds()

    def advance(self, **kwargs: float) -> None:
        self.current += timedelta(**kwargs)
