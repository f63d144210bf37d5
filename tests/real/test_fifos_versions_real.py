"""The fifo orphan rule for real on every containerd we can run: 1.6.20, 1.7.24, 2.1.9.

Each version's own `ctr` makes the tasks and execs (so each version's client puts its FIFO sets
into a fifo root of the test's own, `ctr --fifo-dir`), and remediator asks that daemon through
that same `ctr` (1.6 prints gogo text, 1.7 and 2.x prototext: both parsers run for real). The
root is judged against that daemon's socket only. The probe and the action see time one hour
ahead (FakeClock) so the 10-minute minimum age does not make the test wait.

Live on purpose, and never touched: a running task, a live exec, a paused task, an exec that
has exited but was never deleted (its shim may still hold its stdin), and a container whose task
is still being created (its FIFO set exists, its process does not yet). Leaked on purpose: the
FIFO sets of detached execs of a task that was then deleted (leaks on every version).
"""

from __future__ import annotations

import os
import secrets
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from remediator.actions.base import ApplyContext, PlanContext
from remediator.actions.fifo_cleanup import CleanFifos, CleanFifosParams
from remediator.clock import FakeClock, SystemClock
from remediator.host import HostRoot
from remediator.model import ActionResult, Outcome, Plan, Reading
from remediator.probes.base import ProbeContext
from remediator.probes.containerd import CtrCli
from remediator.probes.fifos import FifosProbe
from tests.real.private_containerd import VERSIONS, Containerd, fixture_host
from tests.real.private_containerd import containerds as containerds  # the session fixture

pytestmark = [pytest.mark.real, pytest.mark.slow]

AHEAD = 3600.0


class Cleaner:
    """The controller's probe and action, configured for one fifo root and one containerd."""

    def __init__(self, host: HostRoot, c: Containerd) -> None:
        self.host = host
        self.ctr = CtrCli(binary=c.ctr_binary)

    def clock(self) -> FakeClock:
        return FakeClock(SystemClock().now() + AHEAD)

    def read(self) -> Reading:
        return FifosProbe(ctr=self.ctr).read(ProbeContext(self.host, self.clock()))

    def clean(self) -> ActionResult | str:
        reading = self.read()
        now = self.clock().now()
        ctx = PlanContext(
            "fifos", "orphan_fifo_dirs", "host", reading, CleanFifosParams(), lambda c: True, now
        )
        action = CleanFifos(ctr=self.ctr)
        plan = action.plan(ctx)
        if not isinstance(plan, Plan):
            return plan
        return action.execute(plan, ApplyContext(self.host, self.clock(), dry_run=False))


@pytest.fixture
def tasks(
    containerds: dict[str, Containerd], request: pytest.FixtureRequest
) -> Iterator[list[tuple[Containerd, str]]]:
    made: list[tuple[Containerd, str]] = []
    yield made
    for c, name in made:
        c.remove(name)
    for c, name in made:
        assert name not in c.containers(), f"could not delete {name} on containerd {c.version}"


def wait_for(predicate: Callable[[], bool], what: str, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def snapshot(root: Path) -> dict[str, list[str]]:
    return {d: sorted(os.listdir(root / d)) for d in os.listdir(root)}


@pytest.mark.parametrize("version", VERSIONS)
def test_live_tasks_execs_paused_and_creating_are_kept_leaked_exec_sets_go(
    version: str, containerds: dict[str, Containerd], tasks: list[tuple[Containerd, str]], tmp_path: Path
) -> None:
    c = containerds[version]
    host, fifo = fixture_host(tmp_path, c)
    cleaner = Cleaner(host, c)
    tag = secrets.token_hex(3)

    def start(role: str) -> str:
        name = f"rmd-test-{role}-{tag}"
        tasks.append((c, name))
        before = set(os.listdir(fifo))
        c.run_task(fifo, name, "sleep", "3600")
        wait_for(lambda: len(set(os.listdir(fifo)) - before) == 1, f"{name}'s fifo set")
        return name

    live = start("live")
    c.exec_detached(fifo, live, f"live-exec-{tag}", "sleep", "3600")
    c.exec_detached(fifo, live, f"done-exec-{tag}", "true")  # exits at once, never deleted
    paused = start("paused")
    c.ctr("tasks", "pause", paused)
    # A container whose task is being created: its client made the FIFO set (aged, as if the
    # image unpack took an hour), containerd knows the container, no process exists yet.
    creating = f"rmd-test-creating-{tag}"
    c.ctr("containers", "create", "docker.io/remediator-test/busybox:latest", creating, "true")
    tasks.append((c, creating))
    (fifo / "creating").mkdir(mode=0o700)
    for s in ("stdin", "stdout", "stderr"):
        os.mkfifo(fifo / "creating" / f"{creating}-{s}", 0o700)

    keep = snapshot(fifo)
    # The leak: detached execs of a task that is then deleted.
    leaker = start("leaker")
    leaker_dirs = set(os.listdir(fifo)) - set(keep)
    for i in range(4):
        c.exec_detached(fifo, leaker, f"leak-{i}-{tag}", "true")
    wait_for(lambda: "leak-" not in c.ctr("tasks", "ps", leaker).stdout, "the leaking execs to end")
    c.remove(leaker)
    leaked = set(os.listdir(fifo)) - set(keep)
    assert len(leaked) == 4, snapshot(fifo)  # the task's own set went with it, the execs' did not
    assert not leaked & leaker_dirs

    # The shim may hold an ended exec's stdin for a moment after the task is deleted.
    wait_for(lambda: cleaner.read().values.get("orphan_fifo_dirs", 0) >= 1, "the probe to see orphans")
    result = cleaner.clean()
    assert isinstance(result, ActionResult), result
    assert result.outcome is Outcome.APPLIED, result.message
    assert result.after["failed_dirs"] == 0
    after = snapshot(fifo)
    # Exactly the leak is gone, and every live, paused and creating set is intact. The exited,
    # never deleted exec's set is kept while its shim holds its stdin (it often does), and is
    # an orphan otherwise: nobody reads or writes it, containerd no longer lists its process.
    done = next(d for d, names in keep.items() if names and names[0].startswith(f"done-exec-{tag}"))
    assert {d: v for d, v in after.items() if d != done} == {d: v for d, v in keep.items() if d != done}
    assert not leaked & set(after)
    assert result.after["removed_dirs"] == 4 + (done not in after), result.after
    assert result.after["kept"].get("known_to_containerd", 0) >= 1  # "creating" at least

    # The exited exec can still be deleted, whether its set was removed or not.
    deleted = c.ctr("tasks", "delete", "--exec-id", f"done-exec-{tag}", live, check=False)
    assert deleted.returncode == 0 or "not found" in deleted.stderr, deleted.stderr

    # Still alive and still talking: stdio of a new exec in the live task works.
    out = c.ctr(
        "tasks", "exec", "--fifo-dir", str(fifo), "--exec-id", f"check-{tag}", live, "echo", "still-here"
    )
    assert out.stdout.strip() == "still-here"
    status = dict(line.split()[:3:2] for line in c.ctr("tasks", "ls").stdout.splitlines()[1:])
    assert status[live] == "RUNNING"
    assert status[paused] == "PAUSED"


@pytest.mark.parametrize("version", VERSIONS)
def test_an_answer_that_cannot_be_parsed_fails_closed_naming_the_socket(
    version: str, containerds: dict[str, Containerd], tasks: list[tuple[Containerd, str]], tmp_path: Path
) -> None:
    """A `ctr` printing something new (here: a wrapper turning exec ids into JSON) stops cleanup."""
    c = containerds[version]
    host, fifo = fixture_host(tmp_path, c)
    name = f"rmd-test-fmt-{secrets.token_hex(3)}"
    tasks.append((c, name))
    c.run_task(fifo, name, "sleep", "3600")
    c.exec_detached(fifo, name, "ex-live", "sleep", "3600")
    (fifo / "old").mkdir()
    os.mkfifo(fifo / "old" / "gone-stdout")
    wrapper = tmp_path / "ctr-new"
    wrapper.write_text(
        f'#!/bin/sh\n{c.ctr_binary} "$@" | sed -e \'s/exec_id:"\\(.*\\)"/{{"exec": "\\1"}}/\' '
        '-e \'s/&ProcessDetails{ExecID:\\([^,]*\\),.*/{"exec": "\\1"}/\'\n'
    )
    wrapper.chmod(0o755)
    cleaner = Cleaner(host, c)
    cleaner.ctr = CtrCli(binary=str(wrapper))
    # The probe lists no execs (its estimate does not need them); the walk's full query does,
    # cannot parse them, and so judges nothing, naming the socket and the task.
    result = cleaner.clean()
    assert isinstance(result, ActionResult), result
    assert result.outcome is Outcome.SKIPPED
    assert result.after["removed_dirs"] == 0
    (reason,) = result.after["skipped_roots"].values()
    assert reason.startswith("containerd could not be asked which ids it knows: ")
    sock = host.host_path("/srv/containerd.sock")  # the configured socket, a symlink to c's
    # (on the shared system containerd, the first task named may be another test's)
    assert f"{sock}: namespace " in reason and " task " in reason
    assert "exec details in no known format" in reason
    assert sorted(os.listdir(fifo / "old")) == ["gone-stdout"]


@pytest.mark.parametrize("version", VERSIONS)
def test_the_case_reports_loop_no_longer_leaks(
    version: str, containerds: dict[str, Containerd], tasks: list[tuple[Containerd, str]], tmp_path: Path
) -> None:
    """containerd #2421's loop: run -d, pause, resume, kill -9, containers delete. On 1.1.0 it left
    one directory per iteration; on every version here it leaves none (the exec leak above is
    what remains), so the cleanup above is tested on the leak that does reproduce."""
    c = containerds[version]
    fifo = tmp_path / "fifo"
    fifo.mkdir(mode=0o700)
    for _ in range(3):
        name = f"rmd-test-case-{secrets.token_hex(3)}"
        tasks.append((c, name))
        c.run_task(fifo, name, "sleep", "60")
        c.ctr("tasks", "pause", name)
        c.ctr("tasks", "resume", name)
        c.ctr("tasks", "kill", "-s", "SIGKILL", name)
        # As in the report: deleting a container whose task is still stopping fails; retry.
        wait_for(
            lambda n=name: c.ctr("containers", "delete", n, check=False).returncode == 0, f"{name} deleted"
        )
    wait_for(lambda: os.listdir(fifo) == [], "no fifo directory left")
