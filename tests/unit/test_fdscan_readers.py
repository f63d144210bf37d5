"""The fd scan's two readers (C `_fdscan` and Python) agree, fd by fd, on fixture trees; and the
steady-state scan re-reads a process's inotify/epoll fdinfo only when it ran."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from remediator.probes.limits_fdread import (
    NATIVE_READER,
    PYTHON_READER,
    Examined,
    FdReader,
    Glance,
    PyReader,
    Quick,
)
from remediator.probes.limits_fdscan import ProcScan, ScanCache, scan_processes
from remediator.probes.limits_parse import (
    EpollWatch,
    InotifyWatch,
    epoll_watch_set,
    inotify_watch_set,
    parse_epoll_fdinfo,
    parse_inotify_fdinfo,
)
from tests.helpers import make_host

PROC = Path(__file__).resolve().parent.parent / "fixtures" / "proc" / "linux-6.18"
INOTIFY_3 = (PROC / "8082/fdinfo/3").read_text()  # three watches, captured on 6.18
EPOLL = (PROC / "epoll-fdinfo").read_text()


def native() -> FdReader:
    # Not a skip: the extension is part of the build (setup.py, install.sh installs gcc and
    # python3-dev). A missing one is a broken build, and the scan would silently be 2x slower.
    assert NATIVE_READER is not None, "remediator.probes._fdscan did not build: pip install -e ."
    return NATIVE_READER


def stat_line(pid: int, starttime: int, threads: int = 1, comm: str = "p (x) y") -> str:
    """/proc/<pid>/stat: num_threads is field 20, starttime field 22 (proc(5)); the command holds
    spaces and parentheses, as commands may."""
    fields = ["S", "1", str(pid), str(pid), "0", "-1", "4194560"] + ["0"] * 10
    fields += [str(threads), "0", str(starttime), "0", "0"]
    return f"{pid} ({comm}) " + " ".join(fields) + "\n"


def process(root: Path, pid: int, links: dict[int, str], fdinfo: dict[int, str], **kw: int) -> Path:
    d = root / "proc" / str(pid)
    (d / "fd").mkdir(parents=True)
    (d / "fdinfo").mkdir()
    (d / "stat").write_text(stat_line(pid, kw.get("starttime", 100 + pid), kw.get("threads", 1)))
    # procfs: /proc/<pid>/task holds a directory per thread, so its link count is 2 + threads,
    # as a real directory's with that many subdirectories.
    for tid in range(kw.get("threads", 1)):
        (d / "task" / str(pid + tid)).mkdir(parents=True)
    (d / "status").write_text(f"Name:\tp\nUid:\t0\t0\t0\t0\nThreads:\t{kw.get('threads', 1)}\n")
    (d / "cmdline").write_bytes(b"p\0")
    if "runtime" in kw:
        (d / "schedstat").write_text(f"{kw['runtime']} 1234 56\n")
    for fd, target in links.items():
        os.symlink(target, d / "fd" / str(fd))
    for fd, text in fdinfo.items():
        (d / "fdinfo" / str(fd)).write_text(text)
    return d


LINKS = {
    0: "/dev/null",
    3: "anon_inode:inotify",
    4: "anon_inode:[eventpoll]",
    5: "pipe:[4242]",
    6: "pipe:[4243]",
    7: "socket:[99]",
    8: "anon_inode:inotify",  # its fdinfo is gone: skipped, not an error
    9: "anon_inode:inotify",  # a format we do not know: counted as unparsable
}
FDINFO = {3: INOTIFY_3, 4: EPOLL, 9: "pos:\t0\ninotify wd:zz ino:1\n"}


@pytest.mark.parametrize("reader", [PYTHON_READER, "native"], ids=["python", "c"])
def test_examine_reads_every_fd_kind(tmp_path: Path, reader: FdReader | str) -> None:
    r = native() if reader == "native" else reader
    assert not isinstance(r, str)
    d = process(tmp_path, 40, LINKS, FDINFO)
    scan = ProcScan()
    ex = r.examine(scan, str(d))
    assert ex.fds == len(LINKS)
    assert ex.pipes == frozenset({4242, 4243})
    # The watch lists as a count and an order-independent digest of (wd, ino, sdev, mask).
    three = [
        InotifyWatch(3, 0x168115, 0x3D, 0x302),
        InotifyWatch(2, 0x1662D3, 0x3D, 0x302),
        InotifyWatch(1, 0x1662D2, 0x3D, 0x302),
    ]
    assert ex.inotify == ((3, inotify_watch_set(three)),)
    assert ex.inotify[0][1] == inotify_watch_set(three[::-1]) != inotify_watch_set(three[:2])
    assert len(ex.inotify[0][1]) == 3
    assert [fd for fd, _ in ex.epoll] == [4]
    assert ex.epoll[0][1] == epoll_watch_set(parse_epoll_fdinfo(EPOLL))
    assert len(ex.epoll[0][1]) == EPOLL.count("\ntfd:") == 59
    assert ex.epoll[0][1] != epoll_watch_set([EpollWatch(25, 0x49CD8)])
    assert (scan.unparsable, scan.denied_fds) == (1, 0)


def test_the_two_readers_agree_on_captured_fdinfo(tmp_path: Path) -> None:
    d = process(tmp_path, 40, LINKS, FDINFO)

    def key(ex: Examined) -> tuple[object, ...]:
        return (ex.fds, ex.pipes, dict(ex.inotify), dict(ex.epoll))

    py_scan, c_scan = ProcScan(), ProcScan()
    assert key(PYTHON_READER.examine(py_scan, str(d))) == key(native().examine(c_scan, str(d)))
    assert (py_scan.unparsable, py_scan.denied_fds) == (c_scan.unparsable, c_scan.denied_fds)


def test_refresh_rereads_only_a_fd_that_still_is_that_kind(tmp_path: Path) -> None:
    d = process(tmp_path, 40, LINKS, FDINFO)
    for reader in (PYTHON_READER, native()):
        scan = ProcScan()
        assert reader.refresh_inotify(scan, str(d), 3) is not None
        assert reader.refresh_inotify(scan, str(d), 4) is None  # an epoll fd now
        assert reader.refresh_epoll(scan, str(d), 4) == epoll_watch_set(parse_epoll_fdinfo(EPOLL))
        assert reader.refresh_inotify(scan, str(d), 77) is None  # closed
        assert (scan.unparsable, scan.denied_fds) == (0, 0)


def test_glance_reads_the_fd_count_and_only_what_is_asked(tmp_path: Path) -> None:
    d = process(tmp_path, 40, {}, {}, starttime=777, threads=5, runtime=123456789)
    bare = process(tmp_path, 41, {}, {}, starttime=888, threads=0)  # no schedstat, no threads
    size = os.stat(d / "fd").st_size
    for reader in (PYTHON_READER, native()):
        assert reader.glance(str(d), threads=True, runtime=True) == Glance(size, 5, 123456789)
        assert reader.glance(str(d), threads=False, runtime=True) == Glance(size, None, 123456789)
        assert reader.glance(str(d), threads=True, runtime=False) == Glance(size, 5, -1)
        assert reader.glance(str(d), threads=False, runtime=False) == Glance(size, None, -1)
        assert reader.glance(str(bare), threads=True, runtime=True) == Glance(size, None, -1)
        for threads, runtime in ((False, False), (True, True)):
            with pytest.raises(FileNotFoundError):
                reader.glance(str(tmp_path / "proc/99"), threads=threads, runtime=runtime)


def test_whole_tells_a_kernel_thread_by_its_stat_flags(tmp_path: Path) -> None:
    d = process(tmp_path, 2, {}, {}, starttime=26)
    stat = d / "stat"
    stat.write_text(stat.read_text().replace(" 4194560 ", " 2129984 "))  # kthreadd's flags, captured
    user = process(tmp_path, 40, {}, {})
    for reader in (PYTHON_READER, native()):
        assert reader.whole(ProcScan(), str(d))[0].kthread
        assert not reader.whole(ProcScan(), str(user))[0].kthread


def test_whole_reads_start_time_threads_and_cpu_time_from_stat(tmp_path: Path) -> None:
    d = process(tmp_path, 40, {}, {}, starttime=777, threads=5, runtime=123456789)
    bare = process(tmp_path, 41, {}, {}, starttime=888, threads=0)
    size = os.stat(d / "fd").st_size
    for reader in (PYTHON_READER, native()):
        assert reader.whole(ProcScan(), str(d))[0] == Quick(size, 777, 5, 123456789)
        assert reader.whole(ProcScan(), str(bare))[0] == Quick(size, 888, None, -1)
        with pytest.raises(FileNotFoundError):
            reader.whole(ProcScan(), str(tmp_path / "proc/99"))
    (d / "stat").write_text("40 (p) S 1\n")  # torn down mid-read
    for reader in (PYTHON_READER, native()):
        with pytest.raises(ValueError, match="stat"):
            reader.whole(ProcScan(), str(d))


class FixedCounts(PyReader):
    """The Python reader with stat(/proc/<pid>/fd).st_size as on Linux >= 6.2."""

    def __init__(self, counts: dict[int, int]) -> None:
        self.counts = counts
        self.refreshes = 0

    def quick(self, pid_dir: str) -> Quick:
        q = super().quick(pid_dir)
        return Quick(self.counts[int(pid_dir.rsplit("/", 1)[1])], q.starttime, q.threads, q.runtime_ns)

    def glance(self, pid_dir: str, *, threads: bool, runtime: bool) -> Glance:
        g = super().glance(pid_dir, threads=threads, runtime=runtime)
        return Glance(self.counts[int(pid_dir.rsplit("/", 1)[1])], g.threads, g.runtime_ns)

    def refresh_inotify(self, scan: ProcScan, pid_dir: str, fd: int) -> object:  # type: ignore[override]
        self.refreshes += 1
        return super().refresh_inotify(scan, pid_dir, fd)


def test_a_process_that_did_not_run_keeps_its_watches_unread(tmp_path: Path) -> None:
    host = make_host(tmp_path, {})
    sleeper = process(tmp_path, 40, {3: "anon_inode:inotify"}, {3: INOTIFY_3}, runtime=1000)
    threaded = process(tmp_path, 41, {3: "anon_inode:inotify"}, {3: INOTIFY_3}, runtime=5, threads=4)
    process(tmp_path, 42, {3: "anon_inode:inotify"}, {3: INOTIFY_3})  # no schedstat: unknown
    reader = FixedCounts({40: 1, 41: 1, 42: 1})
    cache = ScanCache()
    scan_processes(host, None, cache=cache, reader=reader)
    reader.refreshes = 0

    # A watch added by 41's second thread and by 42: both re-read. 40 did not run: its fdinfo is
    # not read, and its count is what the last read found.
    more = INOTIFY_3 + INOTIFY_3.splitlines()[-1].replace("wd:1", "wd:9") + "\n"
    for d in (sleeper, threaded, tmp_path / "proc/42"):
        (d / "fdinfo/3").write_text(more)
    scan = scan_processes(host, None, cache=cache, reader=reader)
    assert (scan.reused, scan.refreshed, reader.refreshes) == (3, 2, 2)
    assert {f.pid: len(f.watches) for f in scan.inotify_fds} == {40: 3, 41: 4, 42: 4}

    (sleeper / "schedstat").write_text("2000 1234 57\n")  # it ran
    scan = scan_processes(host, None, cache=cache, reader=reader)
    assert {f.pid: len(f.watches) for f in scan.inotify_fds} == {40: 4, 41: 4, 42: 4}


def test_the_periodic_full_scan_rereads_a_process_that_did_not_run(tmp_path: Path) -> None:
    host = make_host(tmp_path, {})
    sleeper = process(tmp_path, 40, {3: "anon_inode:inotify"}, {3: INOTIFY_3}, runtime=1000)
    reader = FixedCounts({40: 1})
    cache = ScanCache()
    scan_processes(host, None, cache=cache, reader=reader, full_every=3)
    # Another process added a watch to the instance 40 shares with it: 40 did not run.
    (sleeper / "fdinfo/3").write_text(INOTIFY_3 + INOTIFY_3.splitlines()[-1].replace("wd:1", "wd:9") + "\n")
    seen = [
        len(scan_processes(host, None, cache=cache, reader=reader, full_every=3).inotify_fds[0].watches)
        for _ in range(3)
    ]
    assert seen == [3, 3, 4]  # stale for at most full_every - 1 scans, then exact


def big_inotify_fdinfo(n: int, newline_at_end: bool = True) -> str:
    """An inotify fdinfo of `n` watches in the kernel's format (fs/notify/fdinfo.c), with the
    file handle the kernel prints after each: ~120 bytes a line, so 2,000 lines cross the C
    reader's 64 KiB buffer many times."""
    head = "pos:\t0\nflags:\t00\nmnt_id:\t15\nino:\t1057\n"
    lines = [
        f"inotify wd:{wd:x} ino:{0x100000 + wd:x} sdev:3d mask:fff ignored_mask:0 "
        f"fhandle-bytes:8 fhandle-type:1 f_handle:{0x100000 + wd:016x}"
        for wd in range(1, n + 1)
    ]
    return head + "\n".join(lines) + ("\n" if newline_at_end else "")


@pytest.mark.parametrize("newline_at_end", [True, False])
def test_c_reader_counts_a_large_fdinfo_across_its_buffer(tmp_path: Path, newline_at_end: bool) -> None:
    text = big_inotify_fdinfo(2000, newline_at_end)
    assert len(text) > 3 * 64 * 1024
    d = process(tmp_path, 40, {3: "anon_inode:inotify"}, {3: text})
    expected = inotify_watch_set(parse_inotify_fdinfo(text))
    assert len(expected) == 2000
    for reader in (PYTHON_READER, native()):
        scan = ProcScan()
        assert reader.examine(scan, str(d)).inotify == ((3, expected),)
        assert reader.refresh_inotify(scan, str(d), 3) == expected
        assert (scan.unparsable, scan.denied_fds) == (0, 0)


def test_a_bad_line_deep_in_a_large_fdinfo_is_unparsable(tmp_path: Path) -> None:
    lines = big_inotify_fdinfo(2000).splitlines()
    lines[1500] = "inotify wd:zz ino:1"
    d = process(tmp_path, 40, {3: "anon_inode:inotify"}, {3: "\n".join(lines) + "\n"})
    for reader in (PYTHON_READER, native()):
        scan = ProcScan()
        assert reader.examine(scan, str(d)).inotify == ()
        assert scan.unparsable == 1


def test_whole_is_quick_status_and_examine_in_one_call(tmp_path: Path) -> None:
    d = process(tmp_path, 40, LINKS, FDINFO, starttime=777, threads=3, runtime=42)
    (d / "status").write_text("Name:\ttail\nUmask:\t0022\nUid:\t1000\t1001\t1002\t1003\nThreads:\t3\n")
    for reader in (PYTHON_READER, native()):
        scan, apart = ProcScan(), ProcScan()
        q, status, ex = reader.whole(scan, str(d))
        size = os.stat(d / "fd").st_size
        expected = (Quick(size, 777, 3, 42), reader.status(str(d)), reader.examine(apart, str(d)))
        assert (q, status, ex) == expected
        assert (status.name, status.uids, status.euid, status.threads) == (
            "tail",
            (1000, 1001, 1002, 1003),
            1001,
            3,
        )
        assert (scan.unparsable, scan.denied_fds) == (apart.unparsable, apart.denied_fds) == (1, 0)
    (d / "status").write_text("Name:\tx\nThreads:\t1\n")  # torn down: no Uid line
    for reader in (PYTHON_READER, native()):
        with pytest.raises(ValueError, match="Uid"):
            reader.whole(ProcScan(), str(d))


def test_epoll_watches_of_an_unchanged_process_wait_for_the_full_scan(tmp_path: Path) -> None:
    """Pairing fds it already holds is the only way to add epoll watches without a new fd: the
    steady-state scan does not re-read epolls, the full scan (every `full_every`) does."""
    host = make_host(tmp_path, {})
    busy = process(tmp_path, 50, {4: "anon_inode:[eventpoll]"}, {4: EPOLL}, runtime=5, threads=4)
    reader = FixedCounts({50: 1})
    cache = ScanCache()
    first = scan_processes(host, None, cache=cache, reader=reader, full_every=3)
    before = {f.pid: len(f.watches) for f in first.epoll_fds}
    paired = "tfd:       99 events: 8000201d data:     7fe93c549491  pos:0 ino:abcdef sdev:9\n"
    (busy / "fdinfo/4").write_text(EPOLL + paired)
    steady = scan_processes(host, None, cache=cache, reader=reader, full_every=3)
    assert steady.reused == 1 and {f.pid: len(f.watches) for f in steady.epoll_fds} == before
    scan_processes(host, None, cache=cache, reader=reader, full_every=3)
    full = scan_processes(host, None, cache=cache, reader=reader, full_every=3)
    assert full.full and {f.pid: len(f.watches) for f in full.epoll_fds} == {50: before[50] + 1}
