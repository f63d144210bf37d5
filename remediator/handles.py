"""Files the daemon opens once, at start, and keeps: reading and raising the pools it repairs
must work when the host has no file handle left.

At fs.file-max every open(2), socket(2) and pipe(2) of a process without CAP_SYS_ADMIN fails
with ENFILE (fs/file_table.c, alloc_empty_file: only CAP_SYS_ADMIN may pass the limit), and the
units drop CAP_SYS_ADMIN (systemd/remediator.service). A descriptor opened before that keeps
working: pread(2) and pwrite(2) at offset 0 allocate no file, and /proc/sys files (like the
seq_file ones: /proc/loadavg, /proc/meminfo) produce their current value afresh on each read at
offset 0. So the daemon holds, read-only, the files its probes read every cycle (each probe's
`held_files`: the limits probe's file-nr, loadavg, meminfo and the sysctls of its limits, the
dentries probe's dentry-state) and, read-write, the /proc/sys file of every key a raise-sysctl
step of the policy set may raise; the probes and the action read and write through them
(`read_text`, `read_sysctl`, `write_sysctl`), and fall back to a plain open for paths nobody
holds (one-shot runs, tests on fixture trees). Held, a read is also a pread instead of an
open, a read and a close: 20-55 us less per file here.

A sysctl, or a seq_file of one record (single_open: meminfo, loadavg), hands out its whole text
to one read at offset 0. A seq_file of many records (key-users, one line per uid; softnet_stat,
one per CPU) fills at most one buffer (a page) per read, so it is held with `records=True` and
read on at the offset reached until a read returns nothing.

Process-wide (one registry, like the probes' scan caches), keyed by absolute path; the daemon
holds again after a reload, so new keys are covered and keys no policy names any more are let go.
"""

from __future__ import annotations

import errno
import os
import threading
from collections.abc import Iterable
from pathlib import Path
from typing import NamedTuple

from remediator.host import HostRoot

# A held file bigger than this is not one we read (meminfo is ~1.5 KiB, a sysctl a few bytes).
_MAX_READ = 1 << 16
# A held file of many records (key-users: a line per uid with keys, ~50 bytes; softnet_stat: a
# line per CPU) may be longer: read up to this much, and a longer one is an error, not a cut.
_MAX_RECORDS = 1 << 24


class HeldPath(NamedTuple):
    """A file a probe reads every cycle; `records`: a seq_file of many records (read to its end)."""

    path: Path
    records: bool = False


class HeldFiles:
    """Descriptors opened in advance, read and written at offset 0."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._fds: dict[str, tuple[int, bool, bool]] = {}  # path -> (fd, writable, records)

    def hold(self, path: Path, *, writable: bool = False, records: bool = False) -> str | None:
        """Open `path` (O_RDWR when `writable`) unless it is held so already; None, or why not.
        `records`: a seq_file of many records, which a read takes to its end (module docstring)."""
        key = str(path)
        with self._lock:
            held = self._fds.get(key)
            if held is not None and (held[1] or not writable):
                self._fds[key] = (held[0], held[1], records)
                return None
            try:
                fd = os.open(path, (os.O_RDWR if writable else os.O_RDONLY) | os.O_CLOEXEC)
            except OSError as e:
                return f"{path}: {e.strerror or e}"
            if held is not None:
                os.close(held[0])
            self._fds[key] = (fd, writable, records)
            return None

    def keep_only(self, paths: Iterable[Path]) -> None:
        """Close every held file not in `paths` (a reload dropped the policy that needed it)."""
        keep = {str(p) for p in paths}
        with self._lock:
            for key in [k for k in self._fds if k not in keep]:
                os.close(self._fds.pop(key)[0])

    def held(self) -> dict[str, bool]:
        """{path: writable} of every held file."""
        with self._lock:
            return {k: w for k, (_, w, _) in self._fds.items()}

    def read(self, path: Path) -> str | None:
        """The file's content now, through its held descriptor; None when it is not held."""
        # Under the lock: a reload's keep_only() must not close the descriptor (and an open
        # elsewhere reuse its number) between the lookup and the read.
        with self._lock:
            held = self._fds.get(str(path))
            if held is None:
                return None
            # One pread: a sysctl or a one-record seq_file makes its whole text at offset 0 and
            # hands out all that was asked, so a short read is the end (a second call to see
            # nothing was half the cost of a sysctl's read); larger than _MAX_READ is not such a
            # file. A file of many records is read on from where the last read ended until a
            # read gives nothing, up to _MAX_RECORDS.
            data = os.pread(held[0], _MAX_READ, 0)
            if held[2]:
                parts = [data]
                size = len(data)
                while data:
                    if size > _MAX_RECORDS:
                        raise OSError(errno.EFBIG, f"longer than {_MAX_RECORDS} bytes", str(path))
                    data = os.pread(held[0], _MAX_READ, size)
                    parts.append(data)
                    size += len(data)
                data = b"".join(parts)
        return data.decode("ascii", errors="replace")

    def write(self, path: Path, data: bytes) -> bool:
        """Write `data` at offset 0 in one pwrite(2); False when not held writable. Raises
        OSError when the kernel refuses the value (EINVAL) or takes only part of it."""
        with self._lock:
            held = self._fds.get(str(path))
            if held is None or not held[1]:
                return False
            n = os.pwrite(held[0], data, 0)
        if n != len(data):
            raise OSError(f"{path}: wrote {n} of {len(data)} bytes")
        return True

    def close(self) -> None:
        self.keep_only(())


HELD = HeldFiles()


def read_text(host: HostRoot, path: Path) -> str:
    """`host.read_text(path)`, through the held descriptor when there is one."""
    text = HELD.read(path)
    return text if text is not None else host.read_text(path)


def read_sysctl(host: HostRoot, key: str) -> str:
    return read_text(host, host.sysctl_path(key)).strip()


def write_sysctl(host: HostRoot, key: str, value: int) -> None:
    """One write(2) of the whole value (proc_dointvec / proc_doulongvec parse it in one go),
    through the held read-write descriptor when there is one."""
    path = host.sysctl_path(key)
    data = f"{value}\n".encode("ascii")
    if not HELD.write(path, data):
        with open(path, "wb", buffering=0) as f:
            f.write(data)


__all__ = ["HELD", "HeldFiles", "HeldPath", "read_sysctl", "read_text", "write_sysctl"]
