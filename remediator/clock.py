"""The only place that asks the system for the time.

Logic takes a `Clock` (or a plain `now` float) so that tests drive it with `FakeClock`.
Times are Unix seconds as floats: they are stored in SQLite and compared across restarts,
which a monotonic clock cannot do.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Protocol


class Clock(Protocol):
    def now(self) -> float:
        """Wall-clock time, Unix seconds."""
        ...

    def sleep(self, seconds: float) -> None: ...


def stopwatch() -> Callable[[], float]:
    """Seconds elapsed since the call, from a monotonic clock: for measuring cost, never for
    logic (which takes `now` from a `Clock`)."""
    start = time.perf_counter()
    return lambda: time.perf_counter() - start


class SystemClock:
    def now(self) -> float:
        return time.time()

    def sleep(self, seconds: float) -> None:
        time.sleep(seconds)


class FakeClock:
    """A clock that moves only when told to; `sleep` advances it instantly."""

    def __init__(self, start: float = 1_700_000_000.0) -> None:
        self._now = float(start)

    def now(self) -> float:
        return self._now

    def advance(self, seconds: float) -> float:
        if seconds < 0:
            raise ValueError("time does not go backwards")
        self._now += seconds
        return self._now

    def sleep(self, seconds: float) -> None:
        self.advance(seconds)


def process_cpu_seconds() -> float:
    """CPU time this process has used (user + system): what a scan's CPU budget is spent from."""
    return time.process_time()
