"""containerd issue #2421 on the real kernel and the real containerd: leaked FIFO directories
exhaust a fifo filesystem's inodes until `ctr run` fails, and `remediator once` gives them back
without touching live tasks; and the attack that once made the cleanup delete files outside
its root (a same-device bind mount inside it) now changes nothing outside it.

The host under test is a HostRoot whose `proc` is the real /proc and whose `run` is a small
dedicated tmpfs (`nr_inodes=` a few thousand), so exhaustion takes ~700 directories and no real
/run is touched. The system containerd is reached through `<run>/containerd/containerd.sock`, a
symlink to its real socket; `ctr run --fifo-dir` makes containerd's own client put the FIFO
sets of real tasks into our tmpfs. Leaked sets are backdated an hour (as a real pile is), so
the real CLI with the bundled policies and the real clock judges them old.
"""

from __future__ import annotations

import errno
import json
import os
import secrets
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from remediator.actions.base import ApplyContext, PlanContext
from remediator.actions.fifo_cleanup import CleanFifos, CleanFifosParams
from remediator.clock import FakeClock, SystemClock
from remediator.host import HostRoot
from remediator.model import ActionResult, Outcome, Plan, Reading
from remediator.probes.base import ProbeContext
from remediator.probes.fifos import FifosProbe
from remediator.settings import bundled_policies
from tests.real.conftest import CONTAINERD_SOCK, CTR_NAMESPACE, SmallTmpfs

pytestmark = pytest.mark.real

CTR = ["ctr", "--address", str(CONTAINERD_SOCK), "--namespace", CTR_NAMESPACE]
HOUR = 3600.0


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

    def inodes(self) -> tuple[int, int]:
        """(used, free) on the tmpfs."""
        vfs = os.statvfs(self.run)
        return vfs.f_files - vfs.f_ffree, vfs.f_ffree

    def dirs(self) -> set[str]:
        return set(os.listdir(self.fifo_root))

    def read(self, ahead: float = 0.0) -> Reading:
        return FifosProbe().read(ProbeContext(self.host, FakeClock(SystemClock().now() + ahead)))

    def clean(self, ahead: float = 0.0) -> ActionResult:
        now = SystemClock().now() + ahead
        reading = self.read(ahead)
        params = CleanFifosParams()
        ctx = PlanContext("fifos", "orphan_fifo_dirs", "host", reading, params, lambda c: True, now)
        plan = CleanFifos().plan(ctx)
        assert isinstance(plan, Plan), plan
        return CleanFifos().execute(plan, ApplyContext(self.host, FakeClock(now), dry_run=False))


def make_fake_run(small_tmpfs: SmallTmpfs, tmp_path: Path, nr_inodes: int) -> FakeRun:
    run = small_tmpfs(size="8M", nr_inodes=nr_inodes)
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
    for _ in range(50):  # a killed task must be reaped before it can be deleted
        deleted = ctr("tasks", "delete", name, check=False)
        if deleted.returncode == 0 or "not found" in deleted.stderr:
            break
        time.sleep(0.1)
    ctr("containers", "delete", name, check=False)


@pytest.fixture
def task_names() -> Iterator[list[str]]:
    names: list[str] = []
    yield names
    for name in names:
        remove_task(name)
    leftover = set(ctr("containers", "ls", "-q").stdout.split()) & set(names)
    assert not leftover, f"could not delete ctr containers {leftover}"


def backdate(d: Path, age: float) -> None:
    t = time.time() - age
    for p in d.iterdir():
        os.utime(p, (t, t), follow_symlinks=False)
    os.utime(d, (t, t), follow_symlinks=False)


def leak_until_enospc(fifo_root: Path) -> tuple[set[str], str | None]:
    """Leak FIFO sets like the case report until the filesystem has no inode left, then backdate
    them an hour. Returns the directories holding FIFOs and the last one when it got none."""
    made: set[str] = set()
    for i in range(100_000):
        d = fifo_root / f"{4_000_000_000 - i:09d}"
        try:
            d.mkdir(mode=0o700)
            made.add(d.name)
            for s in ("stdin", "stdout", "stderr"):
                os.mkfifo(d / f"test.{i}-{s}", 0o700)
        except OSError as e:
            assert e.errno == errno.ENOSPC, e
            break
    else:
        raise AssertionError("the tmpfs never ran out of inodes")
    empty = next((n for n in made if not os.listdir(fifo_root / n)), None)
    for n in made:
        backdate(fifo_root / n, HOUR)
    return made - {empty} if empty else made, empty


def start_sleeper(fifo_root: Path, names: list[str], ctr_image: str) -> subprocess.CompletedProcess[str]:
    name = f"rmd-test-fifo-{secrets.token_hex(4)}"
    names.append(name)
    return ctr("run", "-d", "--fifo-dir", str(fifo_root), ctr_image, name, "sleep", "3600", check=False)


def once(fake: FakeRun, tmp_path: Path) -> tuple[int, dict[str, Any]]:
    """`remediator once` with the bundled policies, configured for the fixture host's root."""
    policies = bundled_policies()
    assert policies is not None
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "remediator",
            "once",
            "--json",
            "--host-root",
            str(fake.host.root),
            "--policies",
            str(policies),
            "--state-dir",
            str(tmp_path / "state"),
            "--log-level",
            "error",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.stdout, proc.stderr
    doc: dict[str, Any] = json.loads(proc.stdout)
    return proc.returncode, doc


def test_containerd_2421_exhaustion_ctr_run_fails_enospc_and_remediator_once_frees_it(
    small_tmpfs: SmallTmpfs, tmp_path: Path, task_names: list[str], ctr_image: str
) -> None:
    fake = make_fake_run(small_tmpfs, tmp_path, nr_inodes=3000)
    started = start_sleeper(fake.fifo_root, task_names, ctr_image)
    assert started.returncode == 0, started.stderr
    live = task_names[-1]
    bystanders = fake.dirs()
    assert len(bystanders) == 1  # ctr run made one FIFO set; the shim holds it open
    junk = fake.fifo_root / "not-containerds"
    junk.mkdir()
    (junk / "notes").write_text("someone else's")
    backdate(junk, HOUR)
    bystanders.add(junk.name)

    leaked, empty = leak_until_enospc(fake.fifo_root)
    assert len(leaked) > 600
    if empty is not None:
        bystanders.add(empty)
    assert fake.inodes()[1] == 0
    # What the case report saw: containerd can no longer start anything here.
    refused = start_sleeper(fake.fifo_root, task_names, ctr_image)
    assert refused.returncode != 0
    assert "no space left on device" in refused.stderr

    used_before = fake.inodes()[0]
    code, doc = once(fake, tmp_path)
    assert code == 0, doc
    reading = doc["readings"]["fifos"]
    assert reading["values"]["fifo_fs_inodes_used"] == reading["limits"]["fifo_fs_inodes_used"]
    acted = [a for p in doc["policies"] for a in p["actions"] if a["result"]["outcome"] == "applied"]
    assert acted, json.dumps(doc["policies"], indent=1)[:3000]
    result = acted[0]["result"]
    assert result["after"]["removed_dirs"] == len(leaked)
    assert result["after"]["failed_dirs"] == 0
    assert result["verified"] is True
    # The live task's set is minutes old (and held open, and known); the junk is not FIFOs.
    expected = {"too_young": 1, "not_only_fifos": 1} | ({"empty": 1} if empty else {})
    assert result["after"]["kept"] == expected
    assert fake.dirs() == bystanders
    assert (junk / "notes").read_text() == "someone else's"
    used = fake.inodes()[0]
    assert used_before - used >= 4 * len(leaked) - 3  # the last set may have been partial
    status = dict(line.split()[:3:2] for line in ctr("tasks", "ls").stdout.splitlines()[1:])
    assert status[live] == "RUNNING"

    # Creation works again, and the live task still talks.
    again = start_sleeper(fake.fifo_root, task_names, ctr_image)
    assert again.returncode == 0, again.stderr
    out = ctr("tasks", "exec", "--fifo-dir", str(fake.fifo_root), "--exec-id", "check", live, "echo", "ok")
    assert out.stdout.strip() == "ok"


@pytest.fixture
def bind_mounts() -> Iterator[list[Path]]:
    mounts: list[Path] = []
    yield mounts
    for m in reversed(mounts):
        subprocess.run(["umount", str(m)], check=False)
    assert not [m for m in mounts if os.path.ismount(m)], "bind mounts left behind"


def test_a_same_device_bind_mount_inside_the_root_changes_nothing_outside_it(
    small_tmpfs: SmallTmpfs, tmp_path: Path, bind_mounts: list[Path]
) -> None:
    """The attack from issue 8: `mount --bind $RUN/victim $ROOT/d`, the victim holding 3 aged FIFOs
    on the same tmpfs, beside 3,000 aged orphans; and a FIFO bind-mounted over an orphan's FIFO."""
    fake = make_fake_run(small_tmpfs, tmp_path, nr_inodes=20_000)
    victim = fake.run / "victim"
    victim.mkdir()
    for s in ("stdin", "stdout", "stderr"):
        os.mkfifo(victim / f"gone.1-{s}", 0o700)
    backdate(victim, HOUR)
    for i in range(3000):
        d = fake.fifo_root / f"{i:06d}"
        d.mkdir()
        for s in ("stdin", "stdout", "stderr"):
            os.mkfifo(d / f"leak.{i}-{s}", 0o700)
        backdate(d, HOUR)
    target = fake.fifo_root / "d"
    target.mkdir()
    subprocess.run(["mount", "--bind", str(victim), str(target)], check=True)
    bind_mounts.append(target)
    lone = fake.run / "lone-fifo"
    os.mkfifo(lone)
    over = fake.fifo_root / "f"
    over.mkdir()
    for s in ("stdin", "stdout", "stderr"):
        os.mkfifo(over / f"f.1-{s}", 0o700)
    backdate(over, HOUR)
    os.utime(lone, (time.time() - HOUR, time.time() - HOUR))
    subprocess.run(["mount", "--bind", str(lone), str(over / "f.1-stdout")], check=True)
    bind_mounts.append(over / "f.1-stdout")

    result = fake.clean()
    assert result.outcome is Outcome.APPLIED, result.message
    assert result.after["removed_dirs"] == 3000
    assert result.after["failed_dirs"] == 0
    assert result.after["kept"] == {"mount_point": 2}
    assert sorted(os.listdir(victim)) == [f"gone.1-{s}" for s in ("stderr", "stdin", "stdout")]
    assert lone.exists()
    assert sorted(os.listdir(over)) == [f"f.1-{s}" for s in ("stderr", "stdin", "stdout")]
    assert fake.dirs() == {"d", "f"}


def test_the_case_reports_pile_of_126064_goes_in_one_remediator_once(
    small_tmpfs: SmallTmpfs, tmp_path: Path, task_names: list[str], ctr_image: str
) -> None:
    """126,064 aged orphans (the case report's count) beside a live task, on a tmpfs they fill to
    over 90% of its inodes: one `remediator once` with the bundled policies removes all of them,
    reading the tree once (the probe lists, the walk judges and removes)."""
    n = 126_064
    fake = make_fake_run(small_tmpfs, tmp_path, nr_inodes=int(4 * n / 0.95))
    started = start_sleeper(fake.fifo_root, task_names, ctr_image)
    assert started.returncode == 0, started.stderr
    live_dirs = fake.dirs()
    rootfd = os.open(fake.fifo_root, os.O_RDONLY | os.O_DIRECTORY)
    old = time.time() - HOUR
    try:
        for i in range(n):
            name = f"{i:010d}"
            os.mkdir(name, 0o700, dir_fd=rootfd)
            dfd = os.open(name, os.O_RDONLY | os.O_DIRECTORY, dir_fd=rootfd)
            try:
                for s in ("stdin", "stdout", "stderr"):
                    os.mkfifo(f"case.{i}-{s}", 0o700, dir_fd=dfd)
                    os.utime(f"case.{i}-{s}", (old, old), dir_fd=dfd, follow_symlinks=False)
            finally:
                os.close(dfd)
            os.utime(name, (old, old), dir_fd=rootfd, follow_symlinks=False)
    finally:
        os.close(rootfd)
    assert fake.inodes()[0] > 0.9 * (fake.inodes()[0] + fake.inodes()[1])

    code, doc = once(fake, tmp_path)
    assert code == 0, doc
    applied = [a for p in doc["policies"] for a in p["actions"] if a["result"]["outcome"] == "applied"]
    assert len(applied) == 1, json.dumps(doc["policies"], indent=1)[:3000]
    after = applied[0]["result"]["after"]
    assert after["removed_dirs"] == n
    assert after["failed_dirs"] == 0
    assert fake.dirs() == live_dirs
