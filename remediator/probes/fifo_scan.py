"""Reading containerd FIFO roots through handles: what the `fifos` probe and `clean-fifos` share.

* `open_root()` opens a fifo root without following a symlink; `mount_id()` is its statx mount id.
* `count()` is the probe's cheap pass: one streamed listing of a root, one fstatat per directory
  (for the leak rate); nothing is opened.
* `scan_open_fifos()` is clause (d) of the orphan rule: one scan of every `/proc/<pid>/fd`,
  run once per walk; `held_dirs()` is the probe's version of it, by path, for its estimate.

Nothing here changes the host; the removing walk is `actions/fifo_walk.py`.
"""

from __future__ import annotations

import ctypes
import functools
import os
import stat
import struct
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Every directory is opened like this: a symlink in its place fails instead of being followed.
DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def open_root(path: Path) -> int:
    """Open a fifo root without following a symlink in its last component."""
    return os.open(path, DIR_FLAGS)


# ---------------------------------------------------------------------------------------------
# Mount ids: statx(2) STATX_MNT_ID (Linux 5.8). Python 3.11 has no os.statx, hence ctypes.
# ---------------------------------------------------------------------------------------------

_AT_EMPTY_PATH = 0x1000
_STATX_MNT_ID = 0x1000
_STX_MASK = struct.Struct("=I")  # stx_mask, offset 0
_STX_MNT_ID = struct.Struct("=Q")  # stx_mnt_id, offset 144 (linux/stat.h)


@functools.cache
def _statx() -> Any:
    """libc's statx, or None (glibc older than 2.28)."""
    return getattr(ctypes.CDLL(None, use_errno=True), "statx", None)


def mount_id(fd: int) -> int | None:
    """The mount id of the open file `fd` (as in /proc/self/mountinfo), None when unknown.

    Used once per walk for the root: the plan records it, the walk refuses a root that is now
    another mount (something mounted over it since the probe). Per directory the cheaper
    `d_ino` test of clause (a) is used instead (see `fifo_rule`): it needs no extra syscall.
    """
    statx = _statx()
    if statx is None:
        return None
    buf = ctypes.create_string_buffer(256)
    rc = statx(ctypes.c_int(fd), b"", ctypes.c_int(_AT_EMPTY_PATH), ctypes.c_uint(_STATX_MNT_ID), buf)
    if rc != 0:
        return None
    if not _STX_MASK.unpack_from(buf.raw, 0)[0] & _STATX_MNT_ID:  # kernel older than 5.8
        return None
    return int(_STX_MNT_ID.unpack_from(buf.raw, 144)[0])


# ---------------------------------------------------------------------------------------------
# The probe's cheap pass
# ---------------------------------------------------------------------------------------------


# The window of the leak rate: directories made within the last hour.
RATE_WINDOW = 3600.0
# Every directory's mtime is read up to this many; beyond, one in 2, then one in 4 after twice as
# many, and so on, each sample standing for as many directories: ~20,000 fstatat calls for a
# million directories instead of a million, and the rate exact below this.
RATE_EXACT = 4096


@dataclass(frozen=True)
class RootCount:
    entries: int  # names in the root
    dirs: int  # of which directories (d_type from the listing)
    recent: int  # of which modified within the last RATE_WINDOW seconds (sampled: RATE_EXACT)


def count(rootfd: int, now: float, exact: int = RATE_EXACT) -> RootCount:
    """One streamed listing of the root, and the mtimes of (a sample of) its directories.

    A fifo directory's mtime is when its client made its last FIFO (nothing else changes it
    while it lives or leaks), so `recent` is the rate at which directories are being made,
    read from the directories themselves: no state, and the same for a daemon or `once` runs.
    Exact up to `exact` directories; above, a sample spread over the whole listing (see
    RATE_EXACT), so the probe stays a small part of a cycle at a million directories.
    """
    entries = dirs = recent = 0
    stride, next_doubling = 1, exact
    with os.scandir(rootfd) as it:
        for de in it:
            entries += 1
            try:
                if not de.is_dir(follow_symlinks=False):
                    continue
                dirs += 1
                if dirs > next_doubling:
                    stride, next_doubling = stride * 2, next_doubling * 2
                if dirs % stride:
                    continue
                mtime = de.stat(follow_symlinks=False).st_mtime
            except FileNotFoundError:  # gone since the listing
                continue
            if now - mtime < RATE_WINDOW:
                recent += stride
    return RootCount(entries, dirs, min(recent, dirs))


# ---------------------------------------------------------------------------------------------
# Clause (d): which FIFOs are open anywhere on the host
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class OpenFifos:
    """(st_dev, st_ino) of every FIFO some process holds open, from one /proc scan."""

    keys: frozenset[tuple[int, int]]
    complete: bool
    processes: int  # fd tables read
    error: str | None = None
    unreadable_pids: tuple[int, ...] = ()  # EACCES even for root: skipped, see below

    def to_dict(self) -> dict[str, Any]:
        return {
            "complete": self.complete,
            "processes": self.processes,
            "error": self.error,
            "unreadable_pids": list(self.unreadable_pids[:20]),
            "unreadable": len(self.unreadable_pids),
        }


def scan_open_fifos(proc: Path, devices: Collection[int] | None = None) -> OpenFifos:
    """stat every `<proc>/<pid>/fd/<n>` once; keep FIFOs (on `devices`, when given).

    stat() on the magic link reports the open file's own inode without opening it (proc(5),
    /proc/pid/fd), so a FIFO with no writer cannot block us. A pid or fd that disappears while
    we look is skipped: it no longer holds anything. A process whose fd table even root may not
    read (EACCES: an ancestor user namespace, or an LSM; on our Firecracker test VM the VM
    agent, pid 1) is skipped and named: failing safe on it would make cleanup impossible on such
    hosts forever, and it is not one of containerd's shims or clients, which run as root in the
    host's namespaces; (e) still protects every task and exec containerd knows. Any other error
    makes the scan incomplete, since then we cannot tell.
    """
    keys: set[tuple[int, int]] = set()
    unreadable: list[int] = []
    processes = 0
    try:
        pids = [e.name for e in os.scandir(proc) if e.name.isdigit()]
    except OSError as e:
        return OpenFifos(frozenset(), False, 0, f"cannot list {proc}: {e.strerror}")
    for pid in pids:
        fd_dir = f"{proc}/{pid}/fd"
        try:
            found = _fifos_of(fd_dir, devices)
        except (FileNotFoundError, ProcessLookupError):
            continue
        except PermissionError:
            unreadable.append(int(pid))
            continue
        except OSError as e:
            error = f"{e.filename}: {e.strerror}"
            return OpenFifos(frozenset(keys), False, processes, error, tuple(unreadable))
        processes += 1
        keys |= found
    return OpenFifos(frozenset(keys), True, processes, None, tuple(unreadable))


def held_dirs(proc: Path, roots: Sequence[Path]) -> tuple[dict[Path, set[str]], str | None]:
    """Per root, the names of its directories some process holds a FIFO of open (the probe's
    estimate; the walk decides with `scan_open_fifos`). One readlink per open fd on the host;
    the link names the path in the process's mount namespace, which for containerd's shims and
    clients is the host's. Returns (held, error): an error other than a vanished or unreadable
    process makes the answer unusable."""
    prefixes = {os.path.realpath(r) + "/": r for r in roots}
    held: dict[Path, set[str]] = {r: set() for r in roots}
    try:
        pids = [e.name for e in os.scandir(proc) if e.name.isdigit()]
    except OSError as e:
        return held, f"cannot list {proc}: {e.strerror}"
    for pid in pids:
        fd_dir = f"{proc}/{pid}/fd"
        try:
            fds = os.listdir(fd_dir)
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue
        except OSError as e:
            return held, f"{fd_dir}: {e.strerror}"
        for fd in fds:
            try:
                link = os.readlink(f"{fd_dir}/{fd}")
            except OSError:  # closed since the listing
                continue
            for prefix, root in prefixes.items():
                if link.startswith(prefix):
                    held[root].add(link[len(prefix) :].split("/", 1)[0])
    return held, None


def _fifos_of(fd_dir: str, devices: Collection[int] | None) -> set[tuple[int, int]]:
    """The FIFOs one process holds; raises what listing its fd table raises."""
    found: set[tuple[int, int]] = set()
    for fd in os.listdir(fd_dir):
        try:
            st = os.stat(f"{fd_dir}/{fd}")
        except FileNotFoundError:  # closed since the listing
            continue
        if stat.S_ISFIFO(st.st_mode) and (devices is None or st.st_dev in devices):
            found.add((st.st_dev, st.st_ino))
    return found
