"""The fd scan's C and Python readers on the real /proc agree, and the steady-state scan sees a
watch added by a process that ran (and skips the fdinfo of one that did not).

A child process holds an inotify instance, an epoll instance watching a pipe, and plain fds; it
adds one more watch when told. Read-only on the host (the child's own instances count against
root's inotify pool by one: no limit is changed).
"""

from __future__ import annotations

import ctypes
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from remediator.host import HostRoot
from remediator.probes.limits_dedup import InotifyFd, _NativeOrder, group_instances, kcmp_file_order
from remediator.probes.limits_fdread import NATIVE_READER, PYTHON_READER
from remediator.probes.limits_fdscan import ProcScan, ScanCache, scan_processes
from remediator.probes.limits_parse import WatchSet, epoll_watch_set, parse_epoll_fdinfo

pytestmark = pytest.mark.real

CHILD = textwrap.dedent(
    """
    import ctypes, os, select, sys
    libc = ctypes.CDLL(None, use_errno=True)
    ifd = libc.inotify_init1(0)
    for p in (b"/", b"/tmp", b"/etc"):
        assert libc.inotify_add_watch(ifd, p, 0x100) >= 0
    r, w = os.pipe()
    ep = select.epoll()
    ep.register(r, select.EPOLLIN)
    files = [open("/dev/null") for _ in range(5)]
    print(ifd, ep.fileno(), flush=True)
    for line in sys.stdin:
        assert libc.inotify_add_watch(ifd, line.strip().encode(), 0x100) >= 0
        print("added", flush=True)
    """
)


@pytest.fixture
def child() -> Iterator[subprocess.Popen[str]]:
    p = subprocess.Popen(
        [sys.executable, "-c", CHILD], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    assert p.stdout is not None
    p.stdout.readline()  # ready
    try:
        yield p
    finally:
        p.kill()
        p.wait()


def test_both_readers_see_the_same_fds_of_a_live_process(child: subprocess.Popen[str]) -> None:
    assert NATIVE_READER is not None, "remediator.probes._fdscan did not build"
    pid_dir = f"/proc/{child.pid}"
    py, c = PYTHON_READER.examine(ProcScan(), pid_dir), NATIVE_READER.examine(ProcScan(), pid_dir)
    assert py == c
    assert [len(w) for _, w in c.inotify] == [3]
    assert [len(w) for _, w in c.epoll] == [1]
    ep_fd, ep_watches = c.epoll[0]
    parsed = parse_epoll_fdinfo(Path(f"{pid_dir}/fdinfo/{ep_fd}").read_text())
    assert ep_watches == epoll_watch_set(parsed)
    assert parsed[0].ino in c.pipes  # the pipe it watches (stdin/stdout are pipes too)
    assert c.fds >= 5 + 2 + 2
    qp, sp, _ = PYTHON_READER.whole(ProcScan(), pid_dir)
    qc, sc, _ = NATIVE_READER.whole(ProcScan(), pid_dir)
    assert (qp.fd_count, qp.starttime, qp.threads) == (qc.fd_count, qc.starttime, qc.threads)
    assert qc.fd_count == c.fds  # Linux >= 6.2: st_size of /proc/<pid>/fd is the fd count
    assert qc.runtime_ns > 0
    # The steady-state glance: the thread count from /proc/<pid>/task's link count is the one
    # stat and status say; the CPU time only moves forward.
    gp = PYTHON_READER.glance(pid_dir, threads=True, runtime=True)
    gc = NATIVE_READER.glance(pid_dir, threads=True, runtime=True)
    assert (gp.fd_count, gp.threads) == (gc.fd_count, gc.threads) == (qc.fd_count, qc.threads)
    assert gc.threads == sc.threads == sp.threads
    assert gc.runtime_ns >= qc.runtime_ns > 0
    bare = NATIVE_READER.glance(pid_dir, threads=False, runtime=False)
    assert (bare.fd_count, bare.threads, bare.runtime_ns) == (qc.fd_count, None, -1)


def test_steady_state_rereads_the_process_that_added_a_watch(child: subprocess.Popen[str]) -> None:
    assert NATIVE_READER is not None and child.stdin is not None and child.stdout is not None
    host, cache = HostRoot(), ScanCache()

    def watches(scan: ProcScan) -> int:
        return sum(len(f.watches) for f in scan.inotify_fds if f.pid == child.pid)

    first = scan_processes(host, None, cache=cache, reader=NATIVE_READER)
    assert first.reader == "c" and watches(first) == 3
    idle = scan_processes(host, None, cache=cache, reader=NATIVE_READER)
    assert watches(idle) == 3 and idle.refreshed < idle.reused  # sleepers were not re-read
    child.stdin.write("/usr\n")
    child.stdin.flush()
    assert child.stdout.readline().strip() == "added"
    # Same fd count (a watch is no fd), but the child ran: its fdinfo is re-read.
    after = scan_processes(host, None, cache=cache, reader=NATIVE_READER)
    assert not after.full and watches(after) == 4


def test_kcmp_in_bulk_groups_like_the_pairwise_sort() -> None:
    """60 inotify instances of this process with one watch list each, 20 of them dup'ed twice:
    the C sort-and-merge (kcmp_groups) and the pairwise Python sort find the same 60 instances;
    a closed fd is set apart as "cannot compare", not merged."""
    libc = ctypes.CDLL(None, use_errno=True)
    opened: list[int] = []
    try:
        for _ in range(60):
            fd = libc.inotify_init1(os.O_CLOEXEC)
            assert fd >= 0, os.strerror(ctypes.get_errno())
            opened.append(fd)
        dups = [os.dup(fd) for fd in opened[:20] for _ in range(2)]
        opened += dups
        closed = os.dup(opened[0])
        os.close(closed)  # in the list, but gone: kcmp fails on it
        same = WatchSet(0, 0)  # one signature for all: only kcmp tells them apart
        fds = [InotifyFd(os.getpid(), fd, 0, same) for fd in [*opened, closed]]
        order = kcmp_file_order()
        assert isinstance(order, _NativeOrder) and order.group is not None
        bulk = group_instances(fds, order)

        def pairwise(a: InotifyFd, b: InotifyFd) -> int | None:
            return order(a, b)  # a plain function: no `group`, the Python sort

        assert bulk == group_instances(fds, pairwise)
        assert len(bulk) == 61  # 60 instances and the closed fd on its own
        assert sorted(len(i) for i in bulk).count(3) == 20
        assert ((InotifyFd(os.getpid(), closed, 0, same),)) in bulk
    finally:
        for fd in opened:
            os.close(fd)


def test_both_readers_tell_kernel_threads_from_processes() -> None:
    """PF_KTHREAD from the flags in /proc/<pid>/stat: kthreadd (pid 2) and its children are
    kernel threads; this process and init are not. The readers agree on every pid."""
    assert NATIVE_READER is not None, "remediator.probes._fdscan did not build"
    seen: dict[int, bool] = {}
    for pid in sorted(int(e.name) for e in os.scandir("/proc") if e.name.isdigit()):
        try:
            qp = PYTHON_READER.whole(ProcScan(), f"/proc/{pid}")[0]
            qc = NATIVE_READER.whole(ProcScan(), f"/proc/{pid}")[0]
        except (OSError, ValueError):
            continue  # gone meanwhile
        assert qp.kthread == qc.kthread, pid
        seen[pid] = qc.kthread
    assert seen[2] and not seen[1] and not seen[os.getpid()]
    assert sum(seen.values()) > 1  # kthreadd's children too
