"""Reading and removing containerd FIFO directories through handles, in one streaming pass.

`walk()` is what `clean-fifos` runs: it lists the fifo root once (getdents, streamed: no list of
every directory is ever held) and, for each directory in turn, reads it through a directory fd,
judges it with the orphan rule (`fifo_rule.judge`) and, when it is an orphan, removes it at once.
The re-check therefore *is* the judgement, made microseconds before the removal; the tree is
read once per cycle. `count()` is the probe's cheap pass (one getdents stream, one fstatat per
directory, for the leak rate). `scan_open_fifos()` is clause (d), run once per walk.

How a removal stays on what was judged (the kernel has handles for some steps, not all):

* The root is opened once (O_NOFOLLOW); every other name is resolved relative to a directory fd,
  one component at a time, so nothing outside the root is reachable through a swapped symlink.
* Each directory is opened with O_NOFOLLOW|O_DIRECTORY; before anything is read from it its
  device must be the root's and its inode the one the root's listing names (`d_ino`): at a mount
  point those differ, so a mount is never entered (`fifo_rule`, clause a). Its entries are read
  and unlinked through that fd, which pins the directory judged even if its name is moved.
* unlinkat and rmdir take names, not handles. Right before each call the name is looked up again
  (fstatat) and must still give the inode that was judged; ENOENT from either is the one error
  taken to mean "someone else removed it". Anything else (EBUSY from a mount point, EROFS, EPERM
  from an immutable file) is counted for that directory and the walk goes on: one failing
  directory never aborts the rest, and the tally always says what was removed.
* A directory emptied by us whose name was moved before its rmdir (the rename race) is marked
  through its fd with `fifo_rule.EMPTIED_XATTR`; the next walk removes it if it is still empty.

What remains: between a name's re-check and its unlinkat/rmdir (about a microsecond) another
root process could swap the name. Inside a root-only (0700) directory, on entries nobody has
touched for `min_age` and that no containerd knows, only an attacker with root would, and root
can remove those files itself.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import os
import stat
import struct
from collections import Counter
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from remediator.probes import _fifowalk
from remediator.probes.fifo_rule import EMPTIED_XATTR, RuleInputs, judge

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


@dataclass(frozen=True)
class RootCount:
    entries: int  # names in the root
    dirs: int  # of which directories (d_type from the listing)
    recent: int  # of which directories modified within the last RATE_WINDOW seconds


def count(rootfd: int, now: float) -> RootCount:
    """One streamed listing of the root and one fstatat per directory; nothing is opened.

    A fifo directory's mtime is when its client made its last FIFO (nothing else changes it
    while it lives or leaks), so `recent` is the rate at which directories are being made,
    read from the directories themselves: no state, and the same for a daemon or `once` runs.
    """
    entries = dirs = recent = 0
    with os.scandir(rootfd) as it:
        for de in it:
            entries += 1
            try:
                if not de.is_dir(follow_symlinks=False):
                    continue
                mtime = de.stat(follow_symlinks=False).st_mtime
            except FileNotFoundError:  # gone since the listing
                continue
            dirs += 1
            if now - mtime < RATE_WINDOW:
                recent += 1
    return RootCount(entries, dirs, recent)


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


# ---------------------------------------------------------------------------------------------
# The walk: judge and remove, one directory at a time
# ---------------------------------------------------------------------------------------------


@dataclass
class WalkTally:
    """What one walk saw and did. Counts only: memory does not grow with the tree."""

    entries: int = 0  # names of the root looked at
    orphans: int = 0  # directories judged orphans (removed, or would be without `remove`)
    removed_dirs: int = 0
    removed_fifos: int = 0
    kept: Counter[str] = field(default_factory=Counter)
    failed: Counter[str] = field(default_factory=Counter)  # errno name -> directories
    failures: list[dict[str, str]] = field(default_factory=list)  # the first few, described
    marked: int = 0  # emptied in a rename race and marked for the next walk
    stopped_at_max: bool = False

    @property
    def failed_total(self) -> int:
        return sum(self.failed.values())

    def to_dict(self) -> dict[str, Any]:
        return {
            "entries": self.entries,
            "orphans": self.orphans,
            "removed_dirs": self.removed_dirs,
            "removed_fifos": self.removed_fifos,
            "kept": dict(sorted(self.kept.items())),
            "failed": dict(sorted(self.failed.items())),
            "failures": list(self.failures),
            "marked": self.marked,
            "stopped_at_max": self.stopped_at_max,
        }


def walk(rootfd: int, rule: RuleInputs, *, remove: bool, max_dirs: int) -> WalkTally:
    """Judge every directory of the open root; remove each orphan right after judging it.

    Stops after `max_dirs` orphans. Raises OSError only for the root itself (its listing
    failing); every per-directory error is counted in the tally. The loop is `_fifowalk.walk`
    (C, see its header); the judgement is `fifo_rule.judge`, called once per directory.
    """
    raw = _fifowalk.walk(
        rootfd, rule.root_dev, rule.max_entries, max_dirs, remove, judge, rule, EMPTIED_XATTR
    )
    tally = WalkTally(
        entries=raw["entries"],
        orphans=raw["orphans"],
        removed_dirs=raw["removed_dirs"],
        removed_fifos=raw["removed_fifos"],
        kept=Counter({str(k): v for k, v in raw["kept"].items()}),
        failed=Counter({errno.errorcode.get(k, str(k)): v for k, v in raw["failed"].items()}),
        marked=raw["marked"],
        stopped_at_max=raw["stopped_at_max"],
    )
    for name, step, err in raw["failures"]:
        code = errno.errorcode.get(err, str(err))
        tally.failures.append({"dir": name, "step": step, "error": f"{code}: {os.strerror(err)}"})
    return tally
