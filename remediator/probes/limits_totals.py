"""What the fd scan's processes add up to, kept between scans and changed where a process did.

A steady-state scan reuses almost every process's record (limits_fdscan): adding every record up
again each scan (its fds, its threads in its container, its inotify and epoll fds, its pipes)
was most of what the scan cost once the glances moved to C. `Totals` keeps each process's
`Share` (what its record added) and the sums; a scan swaps the shares of the processes whose
record changed and drops those that went, so its cost follows what changed. A record is an
immutable value, so "changed" is "another record object" (`is`).

What is derived from many shares is rebuilt only when one of them changed: the lists of inotify
and epoll fds (which the instance grouping compares by identity: the same fd objects are handed
out while the records hold), and the pipe pages per uid (a pipe is charged once, to its
lowest-pid holder's uid). The periodic full scan starts the totals over (`reset`), so a mistake
here could not outlive `full_every` scans; a real-tier test compares them, scan after scan while
processes come and go, with a count from nothing over the same records
(tests/real/test_cycle_fast_paths_real.py).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from remediator.probes.limits_dedup import EpollFd, InotifyFd

if TYPE_CHECKING:
    from remediator.probes.limits_fdscan import ConsumerProc, ProcRecord

# A pipe's default ring is PIPE_DEF_BUFFERS (16) pages, charged to its creator's user against
# fs.pipe-user-pages-soft/hard (pipe(7)). Resized pipes (F_SETPIPE_SZ) cannot be seen from
# /proc without taking the fd: pipe pages are an estimate.
PIPE_DEF_PAGES = 16


@dataclass(frozen=True, slots=True)
class Share:
    """What one process's record adds to the totals."""

    rec: ProcRecord
    inotify: tuple[InotifyFd, ...]
    epoll: tuple[EpollFd, ...]
    consumer: ConsumerProc | None  # with no container: the scan names it from the inventory


class Totals:
    def __init__(self) -> None:
        self.shares: dict[int, Share] = {}
        self.fds = 0
        # container id -> [file handles, tasks, pipe pages, processes] of its processes
        self.usage: dict[str, list[int]] = {}
        self.in_containers: dict[int, str] = {}  # pid -> its container's id
        self.consumers: dict[int, ConsumerProc] = {}  # pid -> it, for the consumers among them
        self._inotify: tuple[InotifyFd, ...] | None = ()
        self._epoll: tuple[EpollFd, ...] | None = ()
        self._pipe_pages: dict[int, int] | None = {}

    def reset(self) -> None:
        self.__init__()  # type: ignore[misc]

    def count(self, pid: int, rec: ProcRecord, consumer: Callable[[ProcRecord], ConsumerProc | None]) -> None:
        """Make `rec` the record `pid` adds; `consumer` is asked only when it is a new one."""
        old = self.shares.get(pid)
        if old is not None:
            if old.rec is rec:
                return
            self._take(pid, old.rec)
        uid = rec.status.euid
        # The fd objects stay the same while the watches do (a refresh that found the same
        # watches keeps the record's tuple), so that the grouping's signatures and its
        # by-identity reuse hold across records that only changed CPU time or threads.
        same_uid = old is not None and old.rec.status.euid == uid
        if old is not None and same_uid and old.rec.inotify is rec.inotify:
            inotify = old.inotify
        else:
            inotify = tuple(InotifyFd(pid, fd, uid, w) for fd, w in rec.inotify)
        if old is not None and same_uid and old.rec.epoll is rec.epoll:
            epoll = old.epoll
        else:
            epoll = tuple(EpollFd(pid, fd, uid, w) for fd, w in rec.epoll)
        before = (old.inotify, old.epoll) if old is not None else ((), ())
        if inotify is not before[0] or epoll is not before[1]:
            self._inotify = self._epoll = None
        had = (old.rec.pipes, old.rec.status.euid) if old is not None else (frozenset(), uid)
        if (rec.pipes or had[0]) and had != (rec.pipes, uid):
            self._pipe_pages = None
        share = self.shares[pid] = Share(rec, inotify, epoll, consumer(rec))
        if share.consumer is not None:
            self.consumers[pid] = share.consumer
        else:
            self.consumers.pop(pid, None)
        self._add(pid, rec)

    def drop(self, pid: int) -> None:
        old = self.shares.pop(pid, None)
        if old is None:
            return
        self._take(pid, old.rec)
        self.consumers.pop(pid, None)
        if old.inotify or old.epoll:
            self._inotify = self._epoll = None
        if old.rec.pipes:
            self._pipe_pages = None

    def _add(self, pid: int, rec: ProcRecord) -> None:
        self.fds += rec.fds
        if rec.container_id is not None:
            self.in_containers[pid] = rec.container_id
            u = self.usage.setdefault(rec.container_id, [0, 0, 0, 0])
            u[0] += rec.fds
            u[1] += rec.status.threads
            u[2] += PIPE_DEF_PAGES * len(rec.pipes)
            u[3] += 1

    def _take(self, pid: int, rec: ProcRecord) -> None:
        self.fds -= rec.fds
        if rec.container_id is not None:
            del self.in_containers[pid]
            u = self.usage[rec.container_id]
            u[0] -= rec.fds
            u[1] -= rec.status.threads
            u[2] -= PIPE_DEF_PAGES * len(rec.pipes)
            u[3] -= 1
            if u[3] == 0:
                del self.usage[rec.container_id]

    def anon_fds(self) -> tuple[tuple[InotifyFd, ...], tuple[EpollFd, ...]]:
        """Every inotify fd and every epoll fd, in pid order: the very same tuples while no
        share holding one changed."""
        if self._inotify is None or self._epoll is None:
            shares = sorted(self.shares.items())
            self._inotify = tuple(f for _, s in shares for f in s.inotify)
            self._epoll = tuple(f for _, s in shares for f in s.epoll)
        return self._inotify, self._epoll

    def pipe_pages_by_uid(self) -> dict[int, int]:
        """Pipe pages per uid, each pipe once, for the uid of its lowest-pid holder (near enough
        its creator: pids ascend)."""
        if self._pipe_pages is None:
            owner: dict[int, int] = {}
            for _, s in sorted(self.shares.items()):
                for ino in s.rec.pipes:
                    owner.setdefault(ino, s.rec.status.euid)
            pages: dict[int, int] = {}
            for uid in owner.values():
                pages[uid] = pages.get(uid, 0) + PIPE_DEF_PAGES
            self._pipe_pages = dict(sorted(pages.items()))
        return dict(self._pipe_pages)


__all__ = ["PIPE_DEF_PAGES", "Share", "Totals"]
