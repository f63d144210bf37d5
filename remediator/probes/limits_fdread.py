"""How the fd scan reads one process: in C (`_fdscan`) when it built, the same in Python when not.

Two readers with one contract, so limits_fdscan decides (reuse, budget, attribution) without
knowing which one runs:

* `glance(pid_dir, threads=, runtime=)`: what the steady-state scan needs of a process it
  already knows: its fd count (`stat(/proc/<pid>/fd).st_size`, exact since Linux 6.2, 0
  before), and only when asked its thread count (`st_nlink` of /proc/<pid>/task is 2 + threads)
  and the CPU time of its thread-group leader (/proc/<pid>/schedstat field 1, nanoseconds; -1
  without CONFIG_SCHED_INFO). One stat(2) for most processes: who the process is comes from
  the scan's listing of /proc (the inode of /proc/<pid>, new for every new process), not from a
  read of /proc/<pid>/stat, which cost 4x the stat here. A process that did not run cannot have
  added an inotify or epoll watch: the scan re-reads the fdinfo of a single-threaded process
  only when that CPU time moved.
* `survey(proc, listing, expect, always)`: the glances of a whole steady-state scan at once,
  returning only the processes whose glance differs from what their record expects (new ones,
  reused pids, moved fd counts, threads, CPU time of watchers): in C one call for the host, so
  the Python loop runs over what changed, not over every process (`survey_py` is the contract).
* `examine(scan, pid_dir)`: readlink every fd; the watches of every inotify and epoll fd, as a
  `WatchSet` (how many, and an order-independent digest: limits_parse), not one object per
  watch: one 100 k-watch inotify fdinfo is 12 MB, and the C reader streams it through a fixed
  buffer, counting and hashing its lines in place.
* `refresh(scan, pid_dir, fd, kind)`: one known inotify/epoll fd again, if it still is one.
* `status(pid_dir)`: the Name, Uid and Threads lines of /proc/<pid>/status (ProcStatus).
* `whole(scan, pid_dir)`: a `Quick` (fd count, start time and thread count from
  /proc/<pid>/stat, leader CPU time) + status + examine, for a process with no record to reuse
  (every process in a full scan); the C reader does them through one open /proc/<pid> directory.

The C reader readlinks through one directory fd (readlinkat), which is what makes the full scan
cheaper than a path-based C loop; it never writes anything. Processes and fds that vanish are
skipped (ENOENT / ESRCH); other per-fd errors count as `denied_fds`, unknown fdinfo lines as
`unparsable`, exactly as in Python.
"""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Mapping
from dataclasses import dataclass
from types import ModuleType
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol

from remediator.probes.limits_parse import (
    ProcStatus,
    WatchSet,
    epoll_watch_set,
    inotify_watch_set,
    parse_epoll_fdinfo,
    parse_inotify_fdinfo,
    parse_proc_status,
    parse_stat_starttime,
)

if TYPE_CHECKING:
    from remediator.probes.limits_fdscan import ProcScan

_native: ModuleType | None
try:
    from remediator.probes import _fdscan as _native
except ImportError:  # not built (no compiler at install time): the Python reader does the same
    _native = None

INOTIFY_LINK = "anon_inode:inotify"
EPOLL_LINK = "anon_inode:[eventpoll]"
PIPE_PREFIX = "pipe:["
_UNPARSABLE, _NOT_THAT_KIND = -1, -2  # the C reader's codes besides errnos


@dataclass(frozen=True)
class Quick:
    fd_count: int  # 0: unknown before Linux 6.2 (or truly no fds)
    starttime: int
    threads: int | None  # None: unknown (stat said 0)
    runtime_ns: int  # -1: unknown, so every watch is re-read
    kthread: bool = False  # PF_KTHREAD in stat's flags: a kernel thread (never user code)


# include/linux/sched.h
PF_KTHREAD = 0x00200000


class Glance(NamedTuple):
    """One process's steady-state look (a tuple: made ~280 times a cycle at 100 containers,
    where a frozen dataclass cost more than the system call behind it)."""

    fd_count: int  # 0: unknown before Linux 6.2 (or truly no fds)
    threads: int | None  # None: not asked for, or unknown
    runtime_ns: int  # -1: not asked for, or unknown (so every watch is re-read)


# survey()'s flags in an expectation (ident, fd_count, flags, threads, runtime_ns): what of a
# process its record depends on (_fdscan.c has the same numbers).
S_KTHREAD = 1  # a kernel thread: never looked at
S_THREADS = 2  # its thread count matters (a container process, or one holding inotify)
S_RUNTIME = 4  # it holds inotify: a run (or a second thread) may have added watches
S_HAD_FDS = 8  # it had fds: a count of 0 is then "unknown" (Linux < 6.2), not "none"
S_UNATTRIBUTED = 16  # read with no inventory to say whose it is (reported while `always` has it)

Expectation = tuple[int, int, int, int, int]
# pid -> None (no expectation, or another process under the pid: read it whole), an errno (the
# glance failed), or the glance that differs.
Surveyed = dict[int, "Glance | int | None"]


@dataclass(frozen=True)
class Examined:
    fds: int
    pipes: frozenset[int]
    inotify: tuple[tuple[int, WatchSet], ...]
    epoll: tuple[tuple[int, WatchSet], ...]


class FdReader(Protocol):
    name: str

    def glance(self, pid_dir: str, *, threads: bool, runtime: bool) -> Glance: ...

    def survey(
        self, proc: str, listing: Mapping[int, int], expect: Mapping[int, Expectation], always: int
    ) -> Surveyed: ...

    def examine(self, scan: ProcScan, pid_dir: str) -> Examined: ...

    def refresh_inotify(self, scan: ProcScan, pid_dir: str, fd: int) -> WatchSet | None: ...

    def refresh_epoll(self, scan: ProcScan, pid_dir: str, fd: int) -> WatchSet | None: ...

    def status(self, pid_dir: str) -> ProcStatus: ...

    def whole(self, scan: ProcScan, pid_dir: str) -> tuple[Quick, ProcStatus, Examined]: ...


def _gone(code: int) -> bool:
    return code in (errno.ENOENT, errno.ESRCH)


def _read(path: str) -> str:
    with open(path, encoding="ascii", errors="replace") as f:
        return f.read()


def _stat_threads(text: str) -> int | None:
    fields = text.rpartition(")")[2].split()
    try:
        n = int(fields[17])  # field 20, num_threads
    except (IndexError, ValueError):
        return None
    return n if n > 0 else None


def _stat_kthread(text: str) -> bool:
    fields = text.rpartition(")")[2].split()
    try:
        return bool(int(fields[6]) & PF_KTHREAD)  # field 9, flags
    except (IndexError, ValueError):
        return False


def _runtime(pid_dir: str) -> int:
    """The leader's CPU time in ns from schedstat; -1 when there is none (so every known watch
    is re-read)."""
    try:
        with open(f"{pid_dir}/schedstat", "rb") as f:
            first = f.read(64).split(maxsplit=1)
        return int(first[0]) if first else -1
    except (OSError, ValueError):
        return -1


def survey_py(
    reader: FdReader, proc: str, listing: Mapping[int, int], expect: Mapping[int, Expectation], always: int
) -> Surveyed:
    """The processes of `listing` ({pid: inode of proc/<pid>}) a steady-state scan must look at,
    given what their records expect ({pid: (inode, fd_count, S_* flags, threads, runtime_ns)}):
    None for one with no expectation or another inode, an errno for one that could not be
    glanced, the glance for one whose fd count moved (or reads 0 where it had fds), whose
    thread count moved (S_THREADS), that ran or has a second thread (S_RUNTIME: it may have
    added a watch), or that has an `always` flag. Kernel threads are not looked at."""
    out: Surveyed = {}
    for pid, ident in listing.items():
        e = expect.get(pid)
        if e is None or e[0] != ident:
            out[pid] = None
            continue
        flags = e[2]
        if flags & S_KTHREAD:
            continue
        try:
            threads_too = bool(flags & (S_THREADS | S_RUNTIME))
            g = reader.glance(f"{proc}/{pid}", threads=threads_too, runtime=bool(flags & S_RUNTIME))
        except OSError as exc:
            out[pid] = exc.errno or errno.EIO
            continue
        threads = -1 if g.threads is None else g.threads
        if (
            g.fd_count != e[1]
            or (g.fd_count == 0 and flags & S_HAD_FDS)
            or flags & always
            or (flags & S_THREADS and threads != e[3])
            or (flags & S_RUNTIME and (e[4] < 0 or g.runtime_ns != e[4] or threads != 1))
        ):
            out[pid] = g
    return out


class PyReader:
    """The fallback, and the reader of fixture trees (whose fd counts tests fake via os.stat)."""

    name = "python"

    def quick(self, pid_dir: str) -> Quick:
        fd_count = os.stat(f"{pid_dir}/fd").st_size
        stat = _read(f"{pid_dir}/stat")
        return Quick(
            fd_count, parse_stat_starttime(stat), _stat_threads(stat), _runtime(pid_dir), _stat_kthread(stat)
        )

    def glance(self, pid_dir: str, *, threads: bool, runtime: bool) -> Glance:
        fd_count = os.stat(f"{pid_dir}/fd").st_size
        n = None
        if threads:
            with contextlib.suppress(OSError):
                links = os.stat(f"{pid_dir}/task").st_nlink
                n = links - 2 if links > 2 else None
        return Glance(fd_count, n, _runtime(pid_dir) if runtime else -1)

    def survey(
        self, proc: str, listing: Mapping[int, int], expect: Mapping[int, Expectation], always: int
    ) -> Surveyed:
        return survey_py(self, proc, listing, expect, always)

    def _fdinfo(self, scan: ProcScan, pid_dir: str, fd: int) -> str | None:
        try:
            return _read(f"{pid_dir}/fdinfo/{fd}")
        except OSError as exc:
            if not _gone(exc.errno or 0):
                scan.denied_fds += 1
            return None

    def _inotify(self, scan: ProcScan, pid_dir: str, fd: int) -> WatchSet | None:
        text = self._fdinfo(scan, pid_dir, fd)
        try:
            return None if text is None else inotify_watch_set(parse_inotify_fdinfo(text))
        except ValueError:
            scan.unparsable += 1  # a fdinfo format we do not know: skip, but say so
            return None

    def _epoll(self, scan: ProcScan, pid_dir: str, fd: int) -> WatchSet | None:
        text = self._fdinfo(scan, pid_dir, fd)
        try:
            return None if text is None else epoll_watch_set(parse_epoll_fdinfo(text))
        except ValueError:
            scan.unparsable += 1
            return None

    def examine(self, scan: ProcScan, pid_dir: str) -> Examined:
        names = os.listdir(f"{pid_dir}/fd")  # OSError: the caller counts vanished / denied
        inotify: list[tuple[int, WatchSet]] = []
        epoll: list[tuple[int, WatchSet]] = []
        pipes: set[int] = set()
        fd_dir = f"{pid_dir}/fd"
        for name in names:
            try:
                # Plain strings, not Path objects: this runs once per fd on the host.
                link = os.readlink(f"{fd_dir}/{name}")
            except OSError as exc:
                if not _gone(exc.errno or 0):  # not merely closed since listed
                    scan.denied_fds += 1
                continue
            if link.startswith(PIPE_PREFIX):
                if link[-1] == "]" and link[6:-1].isdigit():
                    pipes.add(int(link[6:-1]))
            elif link == INOTIFY_LINK:
                if (iw := self._inotify(scan, pid_dir, int(name))) is not None:
                    inotify.append((int(name), iw))
            elif link == EPOLL_LINK and (ew := self._epoll(scan, pid_dir, int(name))) is not None:
                epoll.append((int(name), ew))
        return Examined(len(names), frozenset(pipes), tuple(inotify), tuple(epoll))

    def _still(self, pid_dir: str, fd: int, link: str) -> bool:
        try:
            return os.readlink(f"{pid_dir}/fd/{fd}") == link
        except OSError:
            return False

    def refresh_inotify(self, scan: ProcScan, pid_dir: str, fd: int) -> WatchSet | None:
        return self._inotify(scan, pid_dir, fd) if self._still(pid_dir, fd, INOTIFY_LINK) else None

    def refresh_epoll(self, scan: ProcScan, pid_dir: str, fd: int) -> WatchSet | None:
        return self._epoll(scan, pid_dir, fd) if self._still(pid_dir, fd, EPOLL_LINK) else None

    def status(self, pid_dir: str) -> ProcStatus:
        return parse_proc_status(_read(f"{pid_dir}/status"))

    def whole(self, scan: ProcScan, pid_dir: str) -> tuple[Quick, ProcStatus, Examined]:
        return self.quick(pid_dir), self.status(pid_dir), self.examine(scan, pid_dir)


Raw = tuple[int, int] | int  # the C reader's (count, digest), or an errno / code


def _failed(scan: ProcScan, code: int) -> None:
    if code == _UNPARSABLE:
        scan.unparsable += 1
    elif code != _NOT_THAT_KIND and not _gone(code):
        scan.denied_fds += 1


def _watch_set(scan: ProcScan, raw: Raw) -> WatchSet | None:
    if isinstance(raw, int):
        _failed(scan, raw)
        return None
    return WatchSet(raw[0], raw[1])


class NativeReader:
    """The C reader (`_fdscan`); only constructed when the extension imported."""

    name = "c"

    def __init__(self, module: ModuleType) -> None:
        self._m = module

    def glance(self, pid_dir: str, *, threads: bool, runtime: bool) -> Glance:
        fd_count, n, ns = self._m.glance(pid_dir, threads, runtime)
        return Glance(fd_count, n if n > 0 else None, ns)

    def survey(
        self, proc: str, listing: Mapping[int, int], expect: Mapping[int, Expectation], always: int
    ) -> Surveyed:
        out: Surveyed = self._m.survey(proc, listing, expect, always)
        for pid, got in out.items():
            if type(got) is tuple:  # only what changed: a few per scan
                fd_count, n, ns = got
                out[pid] = Glance(fd_count, n if n > 0 else None, ns)
        return out

    def examine(self, scan: ProcScan, pid_dir: str) -> Examined:
        return self._examined(scan, self._m.examine(pid_dir))

    def status(self, pid_dir: str) -> ProcStatus:
        name, uids, threads = self._m.status(pid_dir)
        return ProcStatus(name, uids, threads)

    def whole(self, scan: ProcScan, pid_dir: str) -> tuple[Quick, ProcStatus, Examined]:
        (fd_count, starttime, threads, runtime, kthread), (name, uids, n), raw = self._m.whole(pid_dir)
        quick = Quick(fd_count, starttime, threads if threads > 0 else None, runtime, kthread)
        return quick, ProcStatus(name, uids, n), self._examined(scan, raw)

    @staticmethod
    def _examined(scan: ProcScan, examined: Any) -> Examined:
        nfds, denied, pipes, inotify_raw, epoll_raw = examined
        scan.denied_fds += denied
        inotify = []
        for fd, raw in inotify_raw:
            if (iw := _watch_set(scan, raw)) is not None:
                inotify.append((fd, iw))
        epoll = []
        for fd, raw in epoll_raw:
            if (ew := _watch_set(scan, raw)) is not None:
                epoll.append((fd, ew))
        return Examined(nfds, frozenset(pipes), tuple(inotify), tuple(epoll))

    def refresh_inotify(self, scan: ProcScan, pid_dir: str, fd: int) -> WatchSet | None:
        return _watch_set(scan, self._m.refresh(pid_dir, fd, "inotify"))

    def refresh_epoll(self, scan: ProcScan, pid_dir: str, fd: int) -> WatchSet | None:
        return _watch_set(scan, self._m.refresh(pid_dir, fd, "epoll"))


PYTHON_READER = PyReader()
NATIVE_READER: FdReader | None = NativeReader(_native) if _native is not None else None


def default_reader(real_host: bool) -> FdReader:
    """The C reader on the real host when it built; Python otherwise (fixture trees fake fd
    counts through os.stat, which the C reader does not call)."""
    if real_host and NATIVE_READER is not None:
        return NATIVE_READER
    return PYTHON_READER


__all__ = [
    "EPOLL_LINK",
    "INOTIFY_LINK",
    "NATIVE_READER",
    "PIPE_PREFIX",
    "PYTHON_READER",
    "S_HAD_FDS",
    "S_KTHREAD",
    "S_RUNTIME",
    "S_THREADS",
    "S_UNATTRIBUTED",
    "Examined",
    "Expectation",
    "FdReader",
    "NativeReader",
    "PyReader",
    "Quick",
    "Surveyed",
    "default_reader",
    "survey_py",
]
