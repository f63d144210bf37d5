"""Churn for real: tasks and execs start and stop in a loop on every containerd version while
clean-fifos runs back to back (up to 10 runs a second) on their fifo root. Zero live
directories removed, zero task or exec failures, every live task's stdio still works, and what
leaked meanwhile is cleaned.

The cleaner is the controller's probe and action (the real clock, `minAge: 2s` so that live
sets are judged by whether they are open and known, not only by age; every clause applies), in
a thread, walking at every run whatever the probe's estimate. Duration per version:
REMEDIATOR_FIFO_CHURN_SECONDS (default 60; raise it for longer runs); the pause between runs:
REMEDIATOR_FIFO_CHURN_CLEAN_EVERY (default 0.1 s).
"""

from __future__ import annotations

import os
import secrets
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from remediator.actions.base import ApplyContext, PlanContext
from remediator.actions.fifo_cleanup import CleanFifos, CleanFifosParams
from remediator.clock import SystemClock
from remediator.host import HostRoot
from remediator.model import Outcome, Plan
from remediator.probes.base import ProbeContext
from remediator.probes.containerd import CtrCli
from remediator.probes.fifos import FifosProbe
from tests.real.private_containerd import VERSIONS, Containerd, fixture_host
from tests.real.private_containerd import containerds as containerds  # the session fixture

pytestmark = pytest.mark.real

SECONDS = float(os.environ.get("REMEDIATOR_FIFO_CHURN_SECONDS", "60"))
# The cleaner starts a new run this often (or right after the last one, when a run takes longer):
# far more often than any policy would, so that one minute per version is hundreds of runs racing
# the churn, not sixty.
CLEAN_EVERY_S = float(os.environ.get("REMEDIATOR_FIFO_CHURN_CLEAN_EVERY", "0.1"))
POOL = 6  # live tasks at a time: each lives ~6 iterations, well past minAge
# Short, so that the live sets are judged by clauses (d) and (e), not only kept as too young;
# long enough for `ctr run` to get from making the FIFOs to the shim holding them.
MIN_AGE = "2s"


class Cleaner(threading.Thread):
    def __init__(self, host: HostRoot, c: Containerd) -> None:
        super().__init__(daemon=True)
        self.host = host
        self.ctr = CtrCli(binary=c.ctr_binary)
        self.stop = threading.Event()
        self.runs = 0
        self.removed = 0
        self.kept: Counter[str] = Counter()
        self.problems: list[str] = []

    def once(self) -> None:
        clock = SystemClock()
        reading = FifosProbe(ctr=self.ctr).read(ProbeContext(self.host, clock))
        for r in reading.detail["roots"]:  # walk every second, whatever the estimate
            if r["orphan_estimate"] is not None:
                r["orphan_estimate"] = max(1, r["orphan_estimate"])
        params = CleanFifosParams(minAge=MIN_AGE)
        ctx = PlanContext("churn", "orphan_fifo_dirs", "host", reading, params, lambda c: True, clock.now())
        action = CleanFifos(ctr=self.ctr)
        plan = action.plan(ctx)
        if not isinstance(plan, Plan):
            return  # containerd busy: the check was incomplete, nothing removed (fail closed)
        result = action.execute(plan, ApplyContext(self.host, clock, dry_run=False))
        if result.outcome is Outcome.FAILED or result.after.get("failed_dirs"):
            self.problems.append(result.message)
        self.removed += int(result.after.get("removed_dirs", 0))
        self.kept.update(result.after.get("kept", {}))
        self.runs += 1

    def run(self) -> None:
        while not self.stop.is_set():
            started = time.monotonic()
            try:
                self.once()
            except Exception as e:  # reported by the test, never swallowed
                self.problems.append(f"{type(e).__name__}: {e}")
            self.stop.wait(max(0.0, CLEAN_EVERY_S - (time.monotonic() - started)))


def sets_by_id(root: Path) -> dict[str, str]:
    """id -> the directory holding its FIFO set (a complete one)."""
    found: dict[str, str] = {}
    for d in os.listdir(root):
        try:
            names = os.listdir(root / d)
        except FileNotFoundError:
            continue
        for n in names:
            if n.endswith("-stdout"):
                found[n.removesuffix("-stdout")] = d
    return found


@pytest.fixture
def churned(containerds: dict[str, Containerd]) -> Iterator[list[tuple[Containerd, str]]]:
    made: list[tuple[Containerd, str]] = []
    yield made
    for c, name in made:
        c.remove(name)


@pytest.mark.timeout(SECONDS + 240)  # the loop itself, then start-up and clean-up
@pytest.mark.parametrize("version", VERSIONS)
def test_churn_while_cleaning_continuously_removes_no_live_dir(
    version: str, containerds: dict[str, Containerd], churned: list[tuple[Containerd, str]], tmp_path: Path
) -> None:
    c = containerds[version]
    host, fifo = fixture_host(tmp_path, c)
    cleaner = Cleaner(host, c)
    tag = secrets.token_hex(3)
    pool: list[str] = []
    live: dict[str, list[str]] = {}  # task -> its live ids (itself and its live execs)
    iterations = 0

    def assert_alive(task: str) -> None:
        sets = sets_by_id(fifo)
        for ident in live[task]:
            assert ident in sets, f"{version}: the live FIFO set of {ident} was removed"
            assert len(os.listdir(fifo / sets[ident])) == 3

    cleaner.start()
    try:
        deadline = time.monotonic() + SECONDS
        while time.monotonic() < deadline:
            name = f"rmd-test-churn-{tag}-{iterations}"
            churned.append((c, name))
            c.run_task(fifo, name, "sleep", "3600")
            pool.append(name)
            live[name] = [name]
            c.exec_detached(fifo, name, f"live-{tag}-{iterations}", "sleep", "3600")
            live[name].append(f"live-{tag}-{iterations}")
            # Leaks: a detached exec that ends at once and is never deleted.
            c.exec_detached(fifo, pool[0], f"leak-{tag}-{iterations}", "true")
            if len(pool) > POOL:
                old = pool.pop(0)
                assert_alive(old)
                c.remove(old)
            iterations += 1
    finally:
        cleaner.stop.set()
        cleaner.join(timeout=60)
    # Shown with `pytest -s`: what the run did.
    print(
        f"churn {version}: {iterations} iterations, {cleaner.runs} runs, "
        f"{cleaner.removed} removed, kept {dict(cleaner.kept)}"
    )
    assert not cleaner.problems, cleaner.problems
    assert cleaner.runs >= SECONDS, (cleaner.runs, SECONDS)  # at least one a second, on a loaded host
    assert iterations >= 5
    for task in pool:
        assert_alive(task)
        out = c.ctr(
            "tasks", "exec", "--fifo-dir", str(fifo), "--exec-id", f"chk-{task[-12:]}", task, "echo", "ok"
        )
        assert out.stdout.strip() == "ok"
    # What leaked from the tasks already removed was cleaned meanwhile (or is within minAge).
    assert cleaner.removed > 0, (cleaner.runs, iterations)
    # Live sets were judged by (d) and (e), not only kept for their age.
    assert cleaner.kept["open"] + cleaner.kept["known_to_containerd"] > 0, dict(cleaner.kept)
