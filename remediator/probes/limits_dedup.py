"""One kernel object behind several fds: counting inotify and epoll instances once.

An inotify or epoll instance can sit behind several fds (dup, or inherited across fork), while
the kernel counts it once. Every instance shows the same anonymous inode, so fds are compared
with kcmp(2) KCMP_FILE, and only when their watch lists are identical: different watch lists
are different instances. kcmp orders files (a total order on obfuscated kernel pointers, stable
within a boot), so fds with the same watch list are sorted with it and equal neighbours merged:
O(n log n) comparisons where pairwise checks would be O(n^2) (2,000 workers watching the same
files took 6.4 s pairwise). Without kcmp (unknown architecture, fixture trees) each fd counts as
one instance, which can only over-count.
"""

from __future__ import annotations

import ctypes
import functools
import os
import platform
from collections import defaultdict
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from types import ModuleType
from typing import Protocol, TypeVar

from remediator.probes.limits_parse import (
    EpollWatch,
    InotifyWatch,
    WatchSet,
    epoll_watch_set,
    inotify_watch_set,
)


class AnonFd(Protocol):
    """An fd of an anonymous-inode instance: who holds it and what it watches."""

    @property
    def pid(self) -> int: ...

    @property
    def fd(self) -> int: ...

    @property
    def signature(self) -> Hashable: ...


@dataclass(frozen=True)
class InotifyFd:
    """`watches`: what the scan read (a WatchSet: count and digest), or the parsed watches
    themselves (tests, tools); `len()` is the number of watches either way."""

    pid: int
    fd: int
    uid: int  # effective uid of the holding process
    watches: WatchSet | tuple[InotifyWatch, ...]

    @functools.cached_property  # works on a frozen dataclass: it writes __dict__ directly
    def signature(self) -> WatchSet:
        w = self.watches
        return w if isinstance(w, WatchSet) else inotify_watch_set(w)


@dataclass(frozen=True)
class EpollFd:
    pid: int
    fd: int
    uid: int  # effective uid of the holding process (epoll charges the creator's user)
    watches: WatchSet | tuple[EpollWatch, ...]

    @functools.cached_property
    def signature(self) -> WatchSet:
        w = self.watches
        return w if isinstance(w, WatchSet) else epoll_watch_set(w)


F = TypeVar("F", bound=AnonFd)


# Orders the open files behind two fds: <0, 0 (the same file) or >0; None when it cannot tell
# (a process exited meanwhile), which counts as "not the same".
FileOrder = Callable[[AnonFd, AnonFd], int | None]


def _pid_fd(f: AnonFd) -> tuple[int, int]:
    return f.pid, f.fd


# What grouping found last time, per watch list: the (pid, fd)s of the group and how they split
# into instances. Kept by the caller between scans (limits_fdscan.ScanCache.groups).
GroupMemo = dict[Hashable, tuple[frozenset[tuple[int, int]], tuple[tuple[tuple[int, int], ...], ...]]]


def group_instances(
    fds: Sequence[F], order: FileOrder | None = None, memo: GroupMemo | None = None
) -> list[tuple[F, ...]]:
    """Group fds that are the same inotify instance: one tuple per instance, each sorted by
    (pid, fd), the instances by their first member.

    Two fds of one instance show the same watch list at the same instant, so only fds with
    equal watch lists are compared (`order`, kcmp on a real host): sorted by it, the fds of one
    file are neighbours. Without `order` every fd is its own instance.

    With `memo`, a watch list whose fds are exactly those of the last call is split as it was
    then, with no kcmp at all (2,000 fds of one watch list cost ~22,000 kcmp calls, 0.7 s); the
    memo is updated. An fd closed and reopened under the same number with the same watch list
    between calls is then missed: callers clear the memo on their periodic full scans.
    """
    by_signature: dict[Hashable, list[F]] = defaultdict(list)
    for fd in fds:
        by_signature[fd.signature].append(fd)
    instances: list[tuple[F, ...]] = []
    fresh: GroupMemo = {}
    for signature, group in by_signature.items():
        if order is None or len(group) == 1:
            instances.extend((fd,) for fd in group)
            continue
        members = frozenset(_pid_fd(fd) for fd in group)
        if memo is not None and (hit := memo.get(signature)) is not None and hit[0] == members:
            by_key = {_pid_fd(fd): fd for fd in group}
            instances.extend(tuple(by_key[k] for k in split) for split in hit[1])
            fresh[signature] = hit
            continue
        before = len(instances)
        bulk = getattr(order, "group", None)
        if isinstance(bulk, BulkGrouping) and (split := bulk.split(group)) is not None:
            same, unknown = split  # the whole sort in one call (C): no Python per comparison
            instances.extend((fd,) for fd in unknown)
            instances.extend(tuple(sorted(files, key=_pid_fd)) for files in same)
            fresh[signature] = (members, tuple(tuple(_pid_fd(fd) for fd in i) for i in instances[before:]))
            continue
        ordered, unknown = _sort_files(group, order)
        instances.extend((fd,) for fd in unknown)  # cannot be compared: counted on their own
        current: list[F] = []
        for fd in ordered:
            if current and order(current[0], fd) == 0:
                current.append(fd)
                continue
            if current:
                instances.append(tuple(sorted(current, key=_pid_fd)))
            current = [fd]
        if current:
            instances.append(tuple(sorted(current, key=_pid_fd)))
        fresh[signature] = (members, tuple(tuple(_pid_fd(fd) for fd in i) for i in instances[before:]))
    if memo is not None:
        memo.clear()
        memo.update(fresh)
    return sorted(instances, key=lambda i: _pid_fd(i[0]))


def _sort_files(group: list[F], order: FileOrder) -> tuple[list[F], list[F]]:
    """Sort fds by their open file. Fds that cannot be compared (their process exited during the
    scan) are taken out and returned apart, so that they do not split a run of equal files."""
    gone: list[F] = []
    newly_gone: set[F] = set()

    def compare(a: F, b: F) -> int:
        result = order(a, b)
        if result is None:
            # Which one is gone? An fd compares equal to itself while its process lives.
            newly_gone.add(a if order(a, a) is None else b)
            return -1 if _pid_fd(a) < _pid_fd(b) else 1
        return result

    while True:
        ordered = sorted(group, key=functools.cmp_to_key(compare))
        if not newly_gone:
            return ordered, sorted(gone, key=_pid_fd)
        gone.extend(newly_gone)
        group = [fd for fd in group if fd not in newly_gone]  # shrinks: the loop ends
        newly_gone.clear()


_native: ModuleType | None
try:
    from remediator.probes import _kcmp as _native  # kcmp without ctypes' per-call cost
except ImportError:
    _native = None


@dataclass(frozen=True)
class _Self:
    """Our own stdin (fd 0, or whichever: kcmp of an fd with itself is 0 while it is open)."""

    pid: int = field(default_factory=os.getpid)
    fd: int = 0

    @property
    def signature(self) -> Hashable:
        return ()


class BulkGrouping:
    """kcmp's whole sort-and-merge of one group of fds in one C call (_kcmp.kcmp_groups).

    The same result as sorting with the pairwise `FileOrder` and merging equal neighbours, but
    with no Python frame per comparison: 2,000 fds of one watch list take ~22,000 comparisons,
    which cost 3-4 us each through Python and ~1 us in C (the system call itself)."""

    def __init__(self, groups: Callable[[list[tuple[int, int]]], tuple[list[list[int]], list[int]] | None]):
        self._groups = groups

    def split(self, fds: Sequence[F]) -> tuple[list[list[F]], list[F]] | None:
        """(fds of the same file, in kcmp order), fds that could not be compared; None: no kcmp."""
        got = self._groups([_pid_fd(fd) for fd in fds])
        if got is None:
            return None
        same, unknown = got
        return [[fds[i] for i in g] for g in same], sorted((fds[i] for i in unknown), key=_pid_fd)


class _NativeOrder:
    """kcmp through the C extension: pairwise (a FileOrder) and in bulk (`group`)."""

    def __init__(self, module: ModuleType) -> None:
        self._kcmp = module.kcmp_file
        self.group = BulkGrouping(module.kcmp_groups) if hasattr(module, "kcmp_groups") else None

    def __call__(self, a: AnonFd, b: AnonFd) -> int | None:
        return _KCMP_RESULT.get(self._kcmp(a.pid, b.pid, a.fd, b.fd))


# kcmp(2) has no libc wrapper; syscall numbers from the kernel's syscall tables.
_KCMP_SYSCALL = {"x86_64": 312, "aarch64": 272, "riscv64": 272}
_KCMP_FILE = 0
_KCMP_RESULT = {0: 0, 1: -1, 2: 1}


@functools.cache
def _native_order() -> _NativeOrder | None:
    """kcmp through the C extension when it built and this kernel has kcmp (CONFIG_KCMP): the
    kernel's answer, asked once (the limits probe asks every read)."""
    if _native is None or not hasattr(_native, "kcmp_file"):
        return None
    native_order = _NativeOrder(_native)
    return native_order if native_order(_Self(), _Self()) == 0 else None


def kcmp_file_order() -> FileOrder | None:
    """An ordering backed by kcmp(2) KCMP_FILE, or None when this architecture has no entry.

    kcmp needs PTRACE_MODE_READ on both processes: the same right that reading their
    /proc/<pid>/fd needs. It only compares; it changes nothing.
    """
    native_order = _native_order()
    if native_order is not None:
        return native_order
    nr = _KCMP_SYSCALL.get(platform.machine())
    if nr is None:
        return None
    try:
        # A handle of our own: the argtypes set below must not change anyone else's syscall().
        syscall = ctypes.CDLL(None, use_errno=True).syscall
    except (OSError, AttributeError):
        return None
    # Every argument as a long: syscall(2) is variadic and kcmp's idx1/idx2 are unsigned long,
    # so a plain int could leave garbage in the upper half of the register. Declared once, the
    # conversion costs 2.5 us a call instead of 6.6 us for six c_long objects built per call.
    syscall.argtypes = [ctypes.c_long] * 6
    syscall.restype = ctypes.c_long

    def order(a: AnonFd, b: AnonFd) -> int | None:
        # 0 = same file, 1 = a's is lower, 2 = a's is higher; -1 = error (a process exited),
        # 3 = different but unordered (not for KCMP_FILE on current kernels).
        return _KCMP_RESULT.get(syscall(nr, a.pid, b.pid, _KCMP_FILE, a.fd, b.fd))

    return order


# The name the inotify-only code used; the tests and the benchmark know it.
group_inotify_instances = group_instances


@dataclass(frozen=True)
class UidUsage:
    instances: int
    watches: int


def usage_by_uid(
    instances: Sequence[tuple[InotifyFd, ...]] | Sequence[tuple[EpollFd, ...]],
) -> dict[int, UidUsage]:
    """Instances and watches per uid, each instance counted once (for the uid of its first fd)."""
    tally: dict[int, list[int]] = defaultdict(lambda: [0, 0])
    for instance in instances:
        owner = instance[0]
        tally[owner.uid][0] += 1
        tally[owner.uid][1] += len(owner.watches)
    return {uid: UidUsage(n, w) for uid, (n, w) in sorted(tally.items())}


__all__ = [
    "AnonFd",
    "BulkGrouping",
    "EpollFd",
    "FileOrder",
    "GroupMemo",
    "InotifyFd",
    "UidUsage",
    "group_inotify_instances",
    "group_instances",
    "kcmp_file_order",
    "usage_by_uid",
]
