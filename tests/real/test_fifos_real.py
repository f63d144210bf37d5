"""containerd issue #2421 on the real kernel and the real containerd: leaked FIFO directories
exhaust the inodes of /run, and clean-fifos gives them back without touching live tasks.

The host under test is a HostRoot whose `proc` is the real /proc and whose `run` is a small
dedicated tmpfs (`nr_inodes=2000`), so exhaustion takes ~500 directories and no real /run is
touched. The real containerd is reached through `<run>/containerd/containerd.sock`, a symlink to
its real socket; `ctr run --fifo-dir` / `ctr tasks exec --fifo-dir` make containerd's own client
put the FIFO sets of real tasks into our tmpfs. The probe and the action see time one hour ahead
(FakeClock), so the 10-minute minimum age does not make the test wait.
"""

from __future__ import annotations

import errno
import os
import secrets
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from remediator.actions.base import ApplyContext, PlanContext
from remediator.actions.fifo_cleanup import CleanFifos, CleanFifosParams
from remediator.clock import FakeClock, SystemClock
from remediator.host import HostRoot
from remediator.model import ActionResult, Outcome, Plan, Reading
from remediator.probes.base import ProbeContext
from remediator.probes.fifos import FifosProbe
from tests.real.conftest import CONTAINERD_SOCK, CTR_NAMESPACE, SmallTmpfs

pytestmark = pytest.mark.real

CTR = ["ctr", "--address", str(CONTAINERD_SOCK), "--namespace", CTR_NAMESPACE]
AHEAD = 3600.0  # the probe's and action's clock runs this far ahead of the files' mtimes


def ctr(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([*CTR, *args], capture_output=True, text=True, timeout=60, check=False)
    if check and result.returncode:
        raise AssertionError(f"ctr {' '.join(args)}: {result.stderr.strip()}")
    return result


@dataclass
class FakeRun:
    host: HostRoot
    run: Path
    fifo_root: Path

    def read(self) -> Reading:
        ctx = ProbeContext(self.host, FakeClock(SystemClock().now() + AHEAD))
        return FifosProbe().read(ctx)

    def execute(self, plan: Plan, *, dry_run: bool) -> ActionResult:
        ctx = ApplyContext(self.host, FakeClock(SystemClock().now() + AHEAD), dry_run=dry_run)
        return CleanFifos().execute(plan, ctx)

    def plan(self, reading: Reading) -> Plan:
        ctx = PlanContext(
            policy="run-inodes",
            metric="run_inodes_used",
            subject="host",
            reading=reading,
            params=CleanFifosParams(),
            eligible=lambda c: True,
            now=SystemClock().now() + AHEAD,
        )
        plan = CleanFifos().plan(ctx)
        assert isinstance(plan, Plan), plan
        return plan

    def inodes(self) -> tuple[int, int]:
        """(used, free) on the tmpfs."""
        vfs = os.statvfs(self.run)
        return vfs.f_files - vfs.f_ffree, vfs.f_ffree

    def dirs(self) -> set[str]:
        return set(os.listdir(self.fifo_root))


@pytest.fixture
def fake_run(small_tmpfs: SmallTmpfs, tmp_path: Path) -> FakeRun:
    run = small_tmpfs(size="4M", nr_inodes=2000)
    root = tmp_path / "host"
    root.mkdir()
    (root / "proc").symlink_to(HostRoot().proc)
    (root / "run").symlink_to(run)
    fifo_root = run / "containerd" / "fifo"
    fifo_root.mkdir(parents=True, mode=0o700)
    (run / "containerd" / "containerd.sock").symlink_to(CONTAINERD_SOCK)
    return FakeRun(HostRoot(root), run, fifo_root)


def remove_task(name: str) -> None:
    """Kill and delete a ctr task and its container, as an orchestrator would."""
    ctr("tasks", "kill", "-s", "SIGKILL", name, check=False)
    # A killed task must be reaped before it can be deleted: retry for up to 5 s.
    for _ in range(50):
        deleted = ctr("tasks", "delete", name, check=False)
        if deleted.returncode == 0 or "not found" in deleted.stderr:
            break
        time.sleep(0.1)
    ctr("containers", "delete", name, check=False)


@pytest.fixture
def start_task(fake_run: FakeRun, ctr_image: str) -> Iterator[Callable[[], str]]:
    """Start busybox tasks whose FIFO sets containerd's client puts into our tmpfs."""
    names: list[str] = []

    def start() -> str:
        name = f"rmd-test-fifo-{secrets.token_hex(4)}"
        names.append(name)
        fifo_dir = str(fake_run.fifo_root)
        ctr("run", "-d", "--fifo-dir", fifo_dir, ctr_image, name, "sleep", "3600")
        return name

    yield start
    for name in names:
        remove_task(name)
    leftover = set(ctr("containers", "ls", "-q").stdout.split()) & set(names)
    assert not leftover, f"could not delete ctr containers {leftover}"


@pytest.fixture
def live_task(start_task: Callable[[], str]) -> str:
    return start_task()


@pytest.fixture
def holder(fake_run: FakeRun) -> Iterator[Callable[[str], Path]]:
    """Start `sleep` processes holding a FIFO of a fresh directory as their stdin."""
    procs: list[subprocess.Popen[bytes]] = []

    def hold(name: str) -> Path:
        d = fake_run.fifo_root / name
        d.mkdir()
        for s in ("stdin", "stdout", "stderr"):
            os.mkfifo(d / f"{name}.1-{s}", 0o700)
        # O_RDWR on a FIFO never blocks on Linux (fifo(7)); the child keeps it as stdin.
        fd = os.open(d / f"{name}.1-stdin", os.O_RDWR)
        try:
            procs.append(subprocess.Popen(["sleep", "3600"], stdin=fd))
        finally:
            os.close(fd)
        return d

    yield hold
    for p in procs:
        p.kill()
        p.wait(timeout=10)


def leak_until_enospc(fifo_root: Path) -> tuple[int, str | None]:
    """Leak FIFO sets like the case report until the filesystem has no inode left.

    Returns how many directories hold FIFOs (the last may hold fewer than 3) and the name of
    the last directory when it got no FIFO at all (the inode count decides; (b) keeps it).
    """
    for i in range(100_000):
        d = fifo_root / f"{4_000_000_000 - i:09d}"
        try:
            d.mkdir(mode=0o700)
            for s in ("stdin", "stdout", "stderr"):
                os.mkfifo(d / f"test.{i}-{s}", 0o700)
        except OSError as e:
            assert e.errno == errno.ENOSPC, e
            if not d.exists():
                return i, None
            return (i + 1, None) if os.listdir(d) else (i, d.name)
    raise AssertionError("the tmpfs never ran out of inodes")


def wait_for(predicate: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def test_containerd_2421_leaked_fifo_dirs_exhaust_run_inodes_and_clean_fifos_frees_them(
    fake_run: FakeRun, live_task: str, holder: Callable[[str], Path]
) -> None:
    task_dirs = fake_run.dirs()
    assert len(task_dirs) == 1  # ctr run made one FIFO set; the shim holds it open
    held = holder("held")
    bystanders = task_dirs | {held.name}

    leaked, empty = leak_until_enospc(fake_run.fifo_root)
    assert leaked > 400
    kept = {"open": 2}  # the task's set and the one `sleep` holds
    if empty is not None:
        bystanders.add(empty)
        kept["empty"] = 1
    assert fake_run.inodes()[1] == 0
    # What the case report saw: containerd can no longer start anything on this /run.
    refused = ctr(
        "tasks",
        "exec",
        "-d",
        "--fifo-dir",
        str(fake_run.fifo_root),
        "--exec-id",
        "after-leak",
        live_task,
        "true",
        check=False,
    )
    assert refused.returncode != 0
    assert "no space left on device" in refused.stderr

    reading = fake_run.read()
    assert reading.values["run_inodes_free"] == 0
    assert reading.values["run_inodes_used"] == reading.limits["run_inodes_used"]
    assert reading.values["fifo_dirs"] == leaked + len(bystanders)
    assert reading.values["orphan_fifo_dirs"] == leaked
    assert reading.detail["kept"] == kept
    assert not bystanders & {o["name"] for o in reading.detail["orphans"]}

    plan = fake_run.plan(reading)
    assert len(plan.expect["dirs"]) == leaked

    before = (fake_run.inodes(), fake_run.dirs())
    dry = fake_run.execute(plan, dry_run=True)
    assert dry.outcome is Outcome.WOULD_APPLY
    assert (fake_run.inodes(), fake_run.dirs()) == before

    result = fake_run.execute(plan, dry_run=False)
    assert result.outcome is Outcome.APPLIED, result.message
    assert result.verified is True
    assert result.after["removed_dirs"] == leaked
    assert result.after["skipped_dirs"] == 0
    used, free = fake_run.inodes()
    assert before[0][0] - used >= 4 * leaked - 3  # the last directory may have been partial
    assert free >= 4 * leaked - 3
    assert fake_run.dirs() == bystanders
    assert len(os.listdir(held)) == 3
    assert "RUNNING" in ctr("tasks", "ls").stdout.split(live_task, 1)[1].splitlines()[0]

    # Creation works again.
    ctr(
        "tasks",
        "exec",
        "-d",
        "--fifo-dir",
        str(fake_run.fifo_root),
        "--exec-id",
        "after-cleanup",
        live_task,
        "true",
    )
    os.mkfifo(held / "extra-stdout")


def exec_detached(fake_run: FakeRun, task: str, exec_id: str) -> None:
    fifo_dir = str(fake_run.fifo_root)
    ctr("tasks", "exec", "-d", "--fifo-dir", fifo_dir, "--exec-id", exec_id, task, "true")


def test_ctr_exec_detach_leaks_fifo_dirs_and_clean_fifos_removes_exactly_those(
    fake_run: FakeRun, live_task: str, start_task: Callable[[], str]
) -> None:
    """The leak as it is with containerd 1.6.20 (observed while writing this test):

    * `ctr run -d` + `tasks kill` + `containers delete` (the case report's loop) no longer leaks:
      deleting the task removes its FIFO directory.
    * Every `ctr tasks exec -d` leaves its FIFO directory behind. While the task lives, its shim
      often keeps an ended exec's stdin FIFO open (4 fds per exec; not always, it is a race in
      the shim), so clause (d) keeps those; once the task is deleted and the shim exits they
      are orphans nobody holds.
    """
    bystanders = fake_run.dirs()  # the live task's own FIFO set
    leaker = start_task()
    leaker_dirs = fake_run.dirs() - bystanders
    for i in range(5):
        exec_detached(fake_run, leaker, f"leak-{i}")
    wait_for(lambda: "ExecID" not in ctr("tasks", "ps", leaker).stdout, "the execs to end")
    assert len(fake_run.dirs() - bystanders - leaker_dirs) == 5

    remove_task(leaker)
    leaked = fake_run.dirs() - bystanders
    assert len(leaked) == 5  # the task's own set went with it; its execs' sets did not
    assert not leaked & leaker_dirs
    for d in leaked:
        assert sorted(os.listdir(fake_run.fifo_root / d))[0].startswith("leak-")

    wait_for(lambda: fake_run.read().values.get("orphan_fifo_dirs") == 5, "the shim to exit")
    reading = fake_run.read()
    assert {o["name"] for o in reading.detail["orphans"]} == leaked
    assert reading.detail["kept"] == {"open": 1}  # the live task's own set
    assert reading.detail["containerd"]["complete"] is True

    result = fake_run.execute(fake_run.plan(reading), dry_run=False)
    assert result.outcome is Outcome.APPLIED, result.message
    assert result.after["removed_dirs"] == 5
    assert result.verified is True
    assert fake_run.dirs() == bystanders
    assert "RUNNING" in ctr("tasks", "ls").stdout.split(live_task, 1)[1].splitlines()[0]
