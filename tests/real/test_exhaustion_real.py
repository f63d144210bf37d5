"""The daemon keeps working under the exhaustion it repairs (issue 11), on the real kernel.

* file-max: `remediator run`, started without CAP_SYS_ADMIN (as the unit runs it: its
  CapabilityBoundingSet= leaves it out; here `setpriv --bounding-set=-sys_admin`), holds the
  limits probe's files and fs.file-max's /proc/sys file open from start (remediator/handles.py).
  Then fs.file-max is lowered a little above the handles in use and a root process of the test
  (CAP_SYS_ADMIN is exempt from the limit) opens files until more are allocated than the limit
  allows: a non-root host process now fails with ENFILE, and so would any open(2) of the daemon.
  Its next cycle still reads file-nr and file-max through the held descriptors, raises file-max
  in-process through the held read-write one, verifies the raise and persists it (in a temporary
  config root, never the real /etc); the non-root process can open files again.
* pids: the same daemon in a pids cgroup whose pids.max is what it already runs, so no fork or
  thread can start. A new container's shim makes the fifos probe ask containerd again (its
  answer is reused only while the shims are the same), `ctr` cannot start, and the reading says
  why (`ctr_cannot_start`, the orphan check incomplete: nothing is judged an orphan); the
  limits probe and every other policy keep running, cycle after cycle.

fs.file-max is restored at teardown, also on failure, and checked (`sysctl_guard`); the pids
cgroup is removed and the daemon moved out of it before. Runs under the shared flock: lowering
file-max affects every process on the host without CAP_SYS_ADMIN for a few seconds.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from remediator.host import HostRoot
from tests.real.conftest import CONTAINERD_SOCK, MakeContainer, unavailable

pytestmark = pytest.mark.real

HOST = HostRoot()
POOL_UID = 4344  # no host process and no other test uses it
CAP_SYS_ADMIN = 21
# Held by root past a limit of file-nr + 500: over it by ~200 however few files the host has open,
# and under the doubled limit (2 x file-nr + 1000) by file-nr + 300, so the raise relieves it and
# the daemon can open its sysctl.d file to persist it.
HELD = 700
OLD = 1_000_000_000  # mtime for the config tree: not changed just now (the owner check reuses a look)

POLICIES = """\
apiVersion: remediator.io/v1
kind: Policy
metadata:
  name: file-handles
spec:
  mode: enforce
  interval: 2s
  watch:
    probe: limits
    metric: file_handles
    above: 90%
  actions:
    - action: raise-sysctl
      settle: 1m
      params: {key: fs.file-max, factor: 2.0}
  cooldown: 30m
---
apiVersion: remediator.io/v1
kind: Policy
metadata:
  name: fifo-dirs
spec:
  mode: audit
  interval: 2s
  watch:
    probe: fifos
    metric: fifo_dirs
    above: 1000000
  actions:
    - action: clean-fifos
"""


def events(log: Path) -> list[dict[str, Any]]:
    out = []
    for line in log.read_text(errors="replace").splitlines():
        with contextlib.suppress(ValueError):
            e = json.loads(line)
            if isinstance(e, dict):
                out.append(e)
    return out


def wait_for(log: Path, pred: Any, timeout: float, proc: subprocess.Popen[bytes]) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout
    while True:
        found = [e for e in events(log) if pred(e)]
        if found:
            return found
        assert proc.poll() is None, f"the daemon exited {proc.returncode}: {log.read_text()[-3000:]}"
        assert time.monotonic() < deadline, f"not seen in {timeout}s: {log.read_text()[-3000:]}"
        time.sleep(0.2)


def cap_eff(pid: int) -> int:
    for line in (HOST.proc / str(pid) / "status").read_text().splitlines():
        if line.startswith("CapEff:"):
            return int(line.split()[1], 16)
    raise AssertionError("no CapEff")


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], Path, Path]]:
    """`remediator run` without CAP_SYS_ADMIN; yields (process, its log, the config root)."""
    if shutil.which("setpriv") is None:
        unavailable("no setpriv to start the daemon without CAP_SYS_ADMIN", "apt-get install util-linux")
    policies, state, config = tmp_path / "policies", tmp_path / "state", tmp_path / "config"
    policies.mkdir()
    # A fifo root of the test's own, judged against the system containerd (whose shims run
    # Docker's containers): the fifos probe asks that containerd whenever its shims change. (On
    # a Docker host <run>/containerd/fifo may not exist, and without a root nothing is asked.)
    (tmp_path / "fifo").mkdir()
    (policies / "p.yaml").write_text(POLICIES)
    (config / "etc").mkdir(parents=True)
    for d in (config, config / "etc"):
        os.utime(d, (OLD, OLD))
    log = tmp_path / "daemon.log"
    argv = [
        "setpriv",
        "--inh-caps=-sys_admin",
        "--bounding-set=-sys_admin",
        "--",
        sys.executable,
        "-m",
        "remediator",
        "run",
        "--policies",
        str(policies),
        "--state-dir",
        str(state),
        "--config-root",
        str(config),
        "--fifo-root",
        f"{tmp_path / 'fifo'}={CONTAINERD_SOCK}",
        "--log-format",
        "json",
    ]
    with log.open("wb") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_for(log, lambda e: e.get("event") == "files_held", 60, proc)
        # The first cycle has run (its store and lock are open) before anything is exhausted.
        wait_for(log, lambda e: e.get("event") == "probe_read" and e.get("probe") == "limits", 60, proc)
        yield proc, log, config
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def run_as_pool_uid(*argv: str) -> tuple[int, str]:
    """Exit status and stderr of a non-root host process; (-1, why) when it cannot even start."""
    try:
        p = subprocess.run(
            list(argv), check=False, user=POOL_UID, group=POOL_UID, capture_output=True, text=True, timeout=20
        )
    except OSError as e:
        return -1, str(e)
    return p.returncode, p.stderr


@contextlib.contextmanager
def files_held_by_root(count: int) -> Iterator[int]:
    """This (root, CAP_SYS_ADMIN) process opens `count` files and holds them; closed at exit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, soft + count + 64), hard))
    fds: list[int] = []
    try:
        for _ in range(count):
            fds.append(os.open("/dev/null", os.O_RDONLY | os.O_CLOEXEC))
        yield len(fds)
    finally:
        for fd in fds:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_file_max_reached_the_daemon_without_cap_sys_admin_still_raises_it(
    daemon: tuple[subprocess.Popen[bytes], Path, Path], sysctl_guard: Any
) -> None:
    proc, log, config = daemon
    key = "fs.file-max"
    original = int(sysctl_guard(key))
    assert not cap_eff(proc.pid) & (1 << CAP_SYS_ADMIN)  # held to file-max like any user
    held = next(e for e in events(log) if e.get("event") == "files_held")
    assert str(HOST.sysctl_path(key)) in held["read_write"] and held["read_only"] >= 3
    assert held["problems"] == []
    ok_before = run_as_pool_uid("/bin/cat", "/etc/hostname")
    since = len(events(log))
    allocated = int(HOST.read_text(HOST.proc / "sys/fs/file-nr").split()[0])
    limit = allocated + 500
    try:
        HOST.sysctl_path(key).write_text(f"{limit}\n")
        with files_held_by_root(HELD) as opened:
            in_use = int(HOST.read_text(HOST.proc / "sys/fs/file-nr").split()[0])
            locked_out = run_as_pool_uid("/bin/cat", "/etc/hostname")
            applied = wait_for(
                log,
                lambda e: e.get("event") == "action_applied" and e.get("action") == "raise-sysctl",
                60,
                proc,
            )[0]
            raised = int(HOST.read_sysctl(key))
            after = run_as_pool_uid("/bin/cat", "/etc/hostname")
    finally:
        HOST.sysctl_path(key).write_text(f"{original}\n")
    assert ok_before[0] == 0, ok_before[1]
    assert opened == HELD and in_use > limit  # past the limit: only CAP_SYS_ADMIN may open now
    assert locked_out[0] != 0
    assert "23" in locked_out[1] or "Too many open files in system" in locked_out[1]
    # The cycles in between read the pool through the held descriptors: usage over the limit.
    reads = [e for e in events(log)[since:] if e.get("event") == "probe_read" and e.get("probe") == "limits"]
    assert any(e["values"]["file_handles"] > e["limits"]["file_handles"] for e in reads)
    assert raised == 2 * limit
    assert applied["before"]["value"] == limit and applied["verified"] is True, applied
    assert (config / "etc/sysctl.d/90-remediator.conf").read_text().count(f"{key} = {raised}\n") == 1
    assert after[0] == 0, after[1]
    assert proc.poll() is None


@pytest.fixture
def pids_cgroup() -> Iterator[Path]:
    """A new cgroup of the pids controller (v1 hierarchy or v2), removed at teardown."""
    root = HOST.cgroup / "pids"
    if not (root / "cgroup.procs").exists():
        root = HOST.cgroup
        if "pids" not in (root / "cgroup.controllers").read_text().split():
            unavailable("no pids cgroup controller", "boot with the pids controller enabled")
    cg = root / f"rmd-test-pids-{os.getpid()}"
    cg.mkdir()
    try:
        yield cg
    finally:
        # The daemon still runs (its fixture ends later) and may fork a child into the cgroup
        # between a read of cgroup.procs and the rmdir: move what is there until it is empty.
        for _ in range(50):
            for pid in (cg / "cgroup.procs").read_text().split():
                with contextlib.suppress(OSError):
                    (root / "cgroup.procs").write_text(pid)
            try:
                cg.rmdir()
                break
            except OSError as exc:
                if exc.errno != errno.EBUSY:
                    raise
                time.sleep(0.1)
        assert not cg.exists()


def test_no_pid_left_the_cycle_runs_on_and_forking_probes_say_why(
    daemon: tuple[subprocess.Popen[bytes], Path, Path], pids_cgroup: Path, make_container: MakeContainer
) -> None:
    proc, log, _ = daemon
    (pids_cgroup / "cgroup.procs").write_text(str(proc.pid))
    tasks = int((pids_cgroup / "pids.current").read_text())
    (pids_cgroup / "pids.max").write_text(str(tasks))  # no new process or thread for the daemon
    since = len(events(log))
    make_container()  # a new shim: the fifos probe must ask containerd again, which needs a fork
    warned = wait_for(log, lambda e: e.get("event") == "ctr_cannot_start", 60, proc)
    # Later cycles: the limits probe still reads, the fifos probe still reports the inodes.
    t = time.monotonic()
    wait_for(
        log,
        lambda e: e.get("event") == "probe_read" and e.get("timestamp", "") > warned[-1]["timestamp"],
        30,
        proc,
    )
    time.sleep(max(0.0, 5 - (time.monotonic() - t)))
    later = events(log)[since:]
    (pids_cgroup / "pids.max").write_text("max")
    assert int((pids_cgroup / "pids.events").read_text().split()[1]) > 0  # forks were refused
    assert "Resource temporarily unavailable" in warned[0]["error"] or "11" in warned[0]["error"]
    reads = [e for e in later if e.get("event") == "probe_read"]
    assert {"limits", "fifos"} <= {e["probe"] for e in reads}
    fifos = [e for e in reads if e["probe"] == "fifos" and e["timestamp"] > warned[0]["timestamp"]]
    assert fifos and all("orphan_fifo_dirs" not in e["values"] for e in fifos)  # nothing judged
    assert all("run_inodes_used" in e["values"] for e in fifos)
    incomplete = [e for e in later if e.get("event") == "fifo_orphan_check_incomplete"]
    assert incomplete and "cannot start" in json.dumps(incomplete[0])
    assert not [e for e in later if e.get("event") in ("cycle_failed", "probe_failed")]
    assert proc.poll() is None
