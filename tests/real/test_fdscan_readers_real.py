"""The fd scan's C and Python readers on the real /proc agree, and the steady-state scan sees a
watch added by a process that ran (and skips the fdinfo of one that did not).

A child process holds an inotify instance, an epoll instance watching a pipe, and plain fds; it
adds one more watch when told. Read-only on the host (the child's own instances count against
root's inotify pool by one: no limit is changed).
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from collections.abc import Iterator

import pytest

from remediator.host import HostRoot
from remediator.probes.limits_fdread import NATIVE_READER, PYTHON_READER
from remediator.probes.limits_fdscan import ProcScan, ScanCache, scan_processes

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
    assert c.epoll[0][1][0].ino in c.pipes  # the pipe it watches (stdin/stdout are pipes too)
    assert c.fds >= 5 + 2 + 2
    qp, qc = PYTHON_READER.quick(pid_dir), NATIVE_READER.quick(pid_dir)
    assert (qp.fd_count, qp.starttime, qp.threads) == (qc.fd_count, qc.starttime, qc.threads)
    assert qc.fd_count == c.fds  # Linux >= 6.2: st_size of /proc/<pid>/fd is the fd count
    assert qc.runtime_ns > 0


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
