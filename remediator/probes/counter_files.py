"""Kernel counter files held open and read again with pread(2) at offset 0.

A cgroup, sysfs or /proc counter produces its value afresh on each read at offset 0 (they are
seq_files, as handles.py explains for the daemon's /proc files), so a file read every cycle needs
its open(2) once: the path walk of an open and the close after it cost 5-10x the read of an
8-byte counter (open+read+close 9.4 us, pread 1.0 us, for a container's kmem counter here; 13 us
and 1.6-2 us for a SLUB sysfs counter). A held descriptor keeps no cgroup or slab cache alive:
the cgroup's rmdir goes through, and a read of the removed file fails (ENODEV), after which the
path is opened once more (a restarted container gets a new cgroup under the same path).

Only for files whose content is a function of the path's object (never replaced by rename); the
callers use them on the real host only (tests rewrite their fixture trees). Bounded: at most
`LIMIT` descriptors; `sweep` closes those not read since the previous sweep.
"""

from __future__ import annotations

import errno
import os
import threading
from collections.abc import Sequence
from types import ModuleType

MAX_READ = 1 << 16  # memory.stat is ~1.5 KiB on cgroup v2

_native: ModuleType | None
try:
    from remediator.probes import _batch as _native
except ImportError:  # not built: the same loop in Python
    _native = None


def _pread_many_py(fds: list[int], size: int) -> list[bytes | int]:
    out: list[bytes | int] = []
    for fd in fds:
        try:
            out.append(os.pread(fd, size, 0) if fd >= 0 else errno.EBADF)
        except OSError as exc:
            out.append(exc.errno or errno.EIO)
    return out


_pread_many = _native.pread_many if _native is not None else _pread_many_py


class CounterFiles:
    """Counter files held open between reads, each read with pread(2) at offset 0."""

    LIMIT = 4096

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._fds: dict[str, int] = {}
        self._read: set[str] = set()  # paths read since the last sweep

    def read(self, path: str) -> bytes:
        """The file's content now. Raises OSError when it cannot be opened or read."""
        with self._lock:
            self._read.add(path)
            fd = self._fds.get(path)
            if fd is not None:
                try:
                    return _pread_all(fd)
                except OSError:  # removed (ENODEV): perhaps a new object under the same path
                    del self._fds[path]
                    os.close(fd)
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            try:
                data = _pread_all(fd)
            except OSError:
                os.close(fd)
                raise
            if len(self._fds) < self.LIMIT:
                self._fds[path] = fd
            else:
                os.close(fd)
            return data

    def read_many(self, paths: Sequence[str]) -> list[bytes | OSError]:
        """`read` of every path, the held ones in one C call (one system call each, no Python
        frame: at 100 containers the frames cost more than the reads); an OSError in the place
        of a file that cannot be read."""
        with self._lock:
            self._read.update(paths)
            got: list[bytes | int] = _pread_many([self._fds.get(p, -1) for p in paths], MAX_READ)
        out: list[bytes | OSError] = []
        for path, r in zip(paths, got, strict=True):
            if type(r) is bytes and len(r) < MAX_READ:
                out.append(r)
                continue
            try:  # not held yet, removed since (ENODEV), or longer than one read
                out.append(self.read(path))
            except OSError as exc:
                out.append(exc)
        return out

    def sweep(self) -> None:
        """Close every file not read since the last sweep (containers gone from the inventory)."""
        with self._lock:
            for path in [p for p in self._fds if p not in self._read]:
                os.close(self._fds.pop(path))
            self._read.clear()

    def held(self) -> int:
        with self._lock:
            return len(self._fds)

    def close(self) -> None:
        with self._lock:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()
            self._read.clear()


def _pread_all(fd: int) -> bytes:
    """All of it from offset 0. A short read is the end for the files held here: a cgroup file
    (one kernfs record) and a sysfs attribute (one page) make their whole text in one go and
    hand out as much as was asked, so the usual second call that returns nothing is saved (it
    was a third of a counter's read). Not so a /proc seq_file of many records, which gives at
    most a page per read (handles.py holds those with `records=True`)."""
    chunk = os.pread(fd, MAX_READ, 0)
    if len(chunk) < MAX_READ:
        return chunk
    chunks = [chunk]
    offset = len(chunk)
    while offset < 16 * MAX_READ:
        chunk = os.pread(fd, MAX_READ, offset)
        if not chunk:
            break
        chunks.append(chunk)
        offset += len(chunk)
    return b"".join(chunks)


__all__ = ["MAX_READ", "CounterFiles"]
