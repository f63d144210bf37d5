"""Trigger-to-relief, measured: how long nr_negative stays over the act line with a trasher.

Shared by tests/real/test_negative_dentries_relief_real.py (which asserts <= 60 s) and
`benchmarks/dentries_cost.py relief` (which prints the seconds). Nothing here is a fixture: the
caller starts the trasher container (so the test can use its labelled, cleaned-up fixtures) and
passes in how to pause it.

The measurement: a thread reads /proc/sys/fs/dentry-state every 0.2 s. An *episode* starts at
the first read over the act line (2 per hash bucket, the bundled `negative-dentries` trigger) and
ends at the first read under the clear line (1 per bucket) after it; its length is the seconds
between the two. The controller runs as it does in production: `remediator run` (the daemon,
enforce), or `remediator once` started on the timer's cadence (systemd/remediator-once.timer,
read from the unit file: OnUnitActiveSec plus its largest RandomizedDelaySec, the worst case).
The trasher starts right after a timer run has finished: the worst phase for the timer, whose
next look is a whole period away while the count crosses the line ~20 s after the start.

Safety on a shared machine: the trasher runs under a memory limit (its dentry slab is charged to
it, so the kernel stops its growth there), and the watch pauses it when the count goes
`ceiling` over the start: a controller that never acts cannot fill the host's memory.
"""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from remediator.host import HostRoot
from remediator.probes.dentries import parse_dentry_state

HOST = HostRoot()
REPO = Path(__file__).resolve().parents[2]
TIMER_UNIT = REPO / "systemd" / "remediator-once.timer"
POLL_SECONDS = 0.2
# The trasher's memory limit: ~20 M negatives of ~200 bytes charged. Over the act line (8.4 M
# on a 24 GiB host), far under the host's free memory; when the kernel holds it there, the count
# is still over the clear line, so the limit itself never looks like relief.
TRASHER_MEMORY = "4g"
# The watch pauses the trasher this far over the count at the start (~3.6 GB of slab).
CEILING = 18_000_000


def negatives() -> int:
    return parse_dentry_state(HOST.read_sysctl("fs.dentry-state")).nr_negative


def _seconds(text: str) -> float:
    """A systemd time span as the timer unit writes it: "1min", "30s", "45", "1min 30s"."""
    units = {"": 1.0, "s": 1.0, "sec": 1.0, "min": 60.0, "m": 60.0, "h": 3600.0}
    total = 0.0
    for number, unit in re.findall(r"(\d+(?:\.\d+)?)\s*([a-z]*)", text):
        total += float(number) * units[unit]
    return total


def timer_cadence(unit: Path = TIMER_UNIT) -> tuple[float, float]:
    """(OnUnitActiveSec, RandomizedDelaySec) of the bundled timer, in seconds."""
    values: dict[str, str] = {}
    for line in unit.read_text().splitlines():
        key, sep, value = line.partition("=")
        if sep and not line.startswith("#"):
            values[key.strip()] = value.strip()
    return _seconds(values["OnUnitActiveSec"]), _seconds(values.get("RandomizedDelaySec", "0"))


@dataclass
class Episode:
    crossed_at: float  # monotonic seconds
    relieved_at: float | None = None
    peak: int = 0

    @property
    def seconds(self) -> float | None:
        return None if self.relieved_at is None else self.relieved_at - self.crossed_at


@dataclass
class Watch:
    """Polls dentry-state; records episodes over `act` until under `clear`."""

    act: int
    clear: int
    ceiling: int
    on_ceiling: Callable[[], None]
    episodes: list[Episode] = field(default_factory=list)
    peak: int = 0
    above_clear_seconds: float = 0.0  # total time over the clear line, episode or not
    ceiling_hit: bool = False
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def _run(self) -> None:
        last: tuple[float, int] | None = None
        while not self._stop.is_set():
            n, t = negatives(), time.monotonic()
            if last is not None and last[1] > self.clear:
                self.above_clear_seconds += t - last[0]
            last = (t, n)
            self.peak = max(self.peak, n)
            open_ = self.episodes[-1] if self.episodes and self.episodes[-1].relieved_at is None else None
            if open_ is None and n > self.act:
                open_ = Episode(t)
                self.episodes.append(open_)
            if open_ is not None:
                open_.peak = max(open_.peak, n)
                if n < self.clear:
                    open_.relieved_at = t
            if n > self.ceiling and not self.ceiling_hit:
                self.ceiling_hit = True
                self.on_ceiling()
            self._stop.wait(POLL_SECONDS)


def _command(*args: str, policies: Path, state: Path) -> list[str]:
    return [
        sys.executable,
        "-m",
        "remediator",
        *args,
        "--policies",
        str(policies),
        "--state-dir",
        str(state),
        "--log-format",
        "json",
    ]


class Daemon:
    """`remediator run` in enforce mode, as remediator.service runs it."""

    def __init__(self, policies: Path, state: Path, log: Path) -> None:
        self._log = log.open("wb")
        self.proc = subprocess.Popen(
            _command("run", policies=policies, state=state), stdout=self._log, stderr=subprocess.STDOUT
        )

    def warm(self, seconds: float) -> None:
        """Let it run a few cycles first, as a daemon that has been up does."""
        time.sleep(seconds)
        if self.proc.poll() is not None:
            raise RuntimeError(f"remediator run exited {self.proc.returncode}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=120)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


class Timer:
    """`remediator once` started every `period + delay` seconds (start to start), as
    remediator-once.timer starts remediator-once.service; a run still going is never overlapped
    (systemd does not start an active oneshot again)."""

    def __init__(self, policies: Path, state: Path, log: Path, period: float, delay: float) -> None:
        self.policies, self.state, self.log = policies, state, log
        self.interval = period + delay
        self.runs: list[tuple[float, float, int]] = []  # (started, ended, exit code)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._run_done = threading.Event()

    def _once(self) -> None:
        t = time.monotonic()
        with self.log.open("ab") as out:
            rc = subprocess.run(
                _command("once", policies=self.policies, state=self.state),
                stdout=out,
                stderr=subprocess.STDOUT,
                timeout=600,
                check=False,
            ).returncode
        self.runs.append((t, time.monotonic(), rc))
        self._run_done.set()

    def warm(self) -> None:
        """One run (it calibrates the canary and leaves the first growth sample), then the loop;
        returns right after the loop's first run has finished: the worst phase to start a
        trasher in, as the next look is a whole interval away."""
        self._once()
        self._run_done.clear()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()
        self._run_done.wait(timeout=self.interval + 120)

    def _loop(self) -> None:
        next_at = self.runs[-1][0] + self.interval
        while not self._stop.wait(max(0.0, next_at - time.monotonic())):
            self._once()
            next_at = self.runs[-1][0] + self.interval

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=600)


@dataclass(frozen=True)
class Lines:
    buckets: int
    source: str
    act: int
    clear: int


def lines_from(doc: dict[str, object]) -> Lines:
    """The act and clear lines of the bundled policy on this host, from a `--json` document."""
    dentries = doc["readings"]["dentries"]  # type: ignore[index]
    buckets = int(dentries["values"]["hash_buckets"])
    return Lines(buckets, str(dentries["detail"]["hash_source"]), 2 * buckets, buckets)


def summary(path: str, watch: Watch, started: float) -> str:
    parts = []
    for e in watch.episodes:
        s = e.seconds
        took = f"{s:.1f} s" if s is not None else "not relieved"
        parts.append(f"crossed at +{e.crossed_at - started:.1f} s, peak {e.peak:,}, relieved in {took}")
    body = "; ".join(parts) if parts else "never crossed the act line"
    ceiling = ", CEILING HIT" if watch.ceiling_hit else ""
    return (
        f"{path}: {body} (peak {watch.peak:,}; over the clear line {watch.above_clear_seconds:.1f} s "
        f"in all{ceiling})"
    )


__all__ = [
    "CEILING",
    "TRASHER_MEMORY",
    "Daemon",
    "Episode",
    "Lines",
    "Timer",
    "Watch",
    "lines_from",
    "negatives",
    "summary",
    "timer_cadence",
]
