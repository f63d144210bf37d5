"""Leaked containerd shims and stale shim sockets: reported, never removed.

The same leaks that leave FIFO directories behind can leave a runc shim running with no task
(a client that crashed between creating and deleting), or a shim's socket file in
`<run>/containerd/s/` with nobody listening on it (a shim killed without cleanup). Both cost
little and killing a shim takes its container's processes with it, so remediator only says
what it sees and why; the runbook says how to check by hand.

* A shim is a process whose argv[0] is `containerd-shim-runc-v2` (or `containerd-shim*`) with
  `-namespace`, `-id` and `-address`. It is **leaked** when its `-address` is a containerd we
  asked, and that containerd knows no container or task with its `-id`. Shims of containerds we
  did not ask are counted as unchecked, never called leaked.
* A file socket in `<run>/containerd/s/` is **stale** when no socket is listening on that path:
  `/proc/net/unix` (proc(5)) lists every bound unix socket of our network namespace, the one
  shims run in, with the listening flag `__SO_ACCEPTCON` (0x10000). Nothing is connected to.

The daemon reads this every 30 s: `ShimScan` reads each process's cmdline once (known by pid
and /proc inode), and `SocketWatch` checks the sockets again only when the directory or the
running shims moved (and every 10th read).
"""

from __future__ import annotations

import functools
import os
import stat
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from remediator.probes.base import list_processes

_SO_ACCEPTCON = 0x10000  # linux/net.h: a listening socket
MAX_LISTED = 50  # reports list at most this many of each kind (the counts cover all)


@dataclass(frozen=True)
class Shim:
    pid: int
    namespace: str
    id: str
    address: str


def parse_shim_cmdline(pid: int, raw: bytes) -> Shim | None:
    """`/proc/<pid>/cmdline` of a containerd shim -> Shim; None for any other process."""
    argv = [a.decode(errors="replace") for a in raw.split(b"\0") if a]
    if not argv or not os.path.basename(argv[0]).startswith("containerd-shim"):
        return None
    flags: dict[str, str] = {}
    for i, a in enumerate(argv[1:-1], start=1):
        if a in ("-namespace", "-id", "-address"):
            flags[a[1:]] = argv[i + 1]
    if len(flags) != 3:
        return None
    return Shim(pid, flags["namespace"], flags["id"], flags["address"])


def parse_listening_unix(text: str) -> frozenset[str]:
    """Paths of listening unix sockets from `/proc/net/unix`."""
    paths: set[str] = set()
    for line in text.splitlines()[1:]:
        fields = line.split(None, 7)
        if len(fields) == 8:
            try:
                flags = int(fields[3], 16)
            except ValueError:
                continue
            if flags & _SO_ACCEPTCON:
                paths.add(fields[7].strip())
    return frozenset(paths)


def scan_shims(proc: Path) -> list[Shim]:
    shims: list[Shim] = []
    try:
        pids = [int(e.name) for e in os.scandir(proc) if e.name.isdigit()]
    except OSError:
        return shims
    for pid in pids:
        try:
            raw = (proc / str(pid) / "cmdline").read_bytes()
        except OSError:  # gone, or a kernel thread we may not read
            continue
        shim = parse_shim_cmdline(pid, raw)
        if shim is not None:
            shims.append(shim)
    return shims


@dataclass(frozen=True)
class ShimReport:
    shims: int
    leaked: tuple[dict[str, Any], ...]
    unchecked: int
    sockets: int
    stale: tuple[dict[str, str], ...]
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "shims": self.shims,
            "leaked": len(self.leaked),
            "leaked_shims": list(self.leaked[:MAX_LISTED]),
            "unchecked": self.unchecked,
            "sockets": self.sockets,
            "stale": len(self.stale),
            "stale_sockets": list(self.stale[:MAX_LISTED]),
            "error": self.error,
        }


@dataclass(frozen=True)
class SocketCheck:
    """The socket files of a shim socket directory and those nobody listens on."""

    sockets: int
    stale: tuple[dict[str, str], ...]
    error: str | None = None


def check_sockets(proc: Path, socket_dir: Path) -> SocketCheck:
    """Which socket files in `socket_dir` no socket listens on (/proc/net/unix)."""
    resolved = functools.lru_cache(maxsize=None)(os.path.realpath)
    stale: list[dict[str, str]] = []
    sockets = 0
    try:
        bound = parse_listening_unix((proc / "net" / "unix").read_text(errors="replace"))
        # A bound name's last component is the socket itself (bind(2) made it), so only its
        # directory can be a symlink: resolved once per directory.
        listening = {os.path.join(resolved(os.path.dirname(p)), os.path.basename(p)) for p in bound}
        here = resolved(str(socket_dir))
        with os.scandir(socket_dir) as it:
            for e in it:
                try:
                    if not stat.S_ISSOCK(e.stat(follow_symlinks=False).st_mode):
                        continue
                except FileNotFoundError:
                    continue
                sockets += 1
                if os.path.join(here, e.name) not in listening:  # a socket, not a symlink (lstat)
                    stale.append({"path": e.path, "reason": "no socket listens on it (/proc/net/unix)"})
    except FileNotFoundError:
        pass
    except OSError as e:
        return SocketCheck(sockets, tuple(stale), f"{e.filename}: {e.strerror}")
    return SocketCheck(sockets, tuple(stale))


def serves(shim: Shim, sockets: Collection[Path]) -> bool:
    """Whether the shim belongs to one of these containerd sockets (paths compared resolved)."""
    return os.path.realpath(shim.address) in {os.path.realpath(s) for s in sockets}


def report(
    proc: Path,
    socket_dir: Path,
    asked: Sequence[tuple[Path, Collection[str]]],
    shims: Sequence[Shim] | None = None,
    socket_check: SocketCheck | None = None,
) -> ShimReport:
    """Leaked shims and stale sockets. `asked`: (socket, the ids its containerd knows) for every
    containerd whose answer was complete; `shims`: from `scan_shims` (scanned when None);
    `socket_check`: from `check_sockets` (checked when None)."""
    # Paths compared resolved: /var/run is /run, and a test host's run may be a symlink.
    known = {os.path.realpath(s): ids for s, ids in asked}
    shims = scan_shims(proc) if shims is None else shims
    leaked: list[dict[str, Any]] = []
    unchecked = 0
    # Resolved once per distinct path: every shim of a containerd names the same address, and
    # a realpath per shim and per socket was most of this report's cost at 200 containers.
    resolved = functools.lru_cache(maxsize=None)(os.path.realpath)
    for s in shims:
        ids = known.get(resolved(s.address))
        if ids is None:
            unchecked += 1
        elif s.id not in ids:
            reason = f"containerd at {s.address} knows no container or task {s.id} (namespace {s.namespace})"
            leaked.append({"pid": s.pid, "namespace": s.namespace, "id": s.id, "reason": reason})
    check = socket_check if socket_check is not None else check_sockets(proc, socket_dir)
    return ShimReport(len(shims), tuple(leaked), unchecked, check.sockets, check.stale, check.error)


class ShimScan:
    """`shims.scan_shims` that reads each process's cmdline once: a process is known by its
    pid and the inode number of its /proc/<pid> directory (from the listing, no extra call),
    which a new process under a reused pid never shares (procfs makes a new inode for it).
    At ~1,000 processes that is 1,000 opens saved per read; only new processes are read.

    An exec keeps the pid and the inode: a process read between its fork and its exec of a
    shim binary would stay "not a shim". runc's shims are forked from a shim (`... start`)
    whose command line already names the same namespace, id and address, so that window shows
    the same shim; for anything else every `REFRESH_EVERY`th scan reads every process again."""

    REFRESH_EVERY = 10

    def __init__(self) -> None:
        self._known: dict[tuple[str, int, int], Shim | None] = {}
        self._empty: set[tuple[str, int, int]] = set()  # seen with an empty cmdline once
        self._scans = 0

    def __call__(self, proc: Path, listing: Mapping[int, int] | None = None) -> list[Shim]:
        """The shims running now; `listing`: {pid: inode of /proc/<pid>} when the caller has
        listed /proc this cycle (`ProbeContext.processes`)."""
        self._scans += 1
        if self._scans % self.REFRESH_EVERY == 0:
            self._known.clear()
            self._empty.clear()
        if listing is None:
            try:
                listing = list_processes(proc)
            except OSError:
                return []
        pids = listing.items()
        where = str(proc)
        known: dict[tuple[str, int, int], Shim | None] = {}
        empty: set[tuple[str, int, int]] = set()
        found = []
        for pid, ino in pids:
            key = (where, pid, ino)
            if key in self._known:
                shim = self._known[key]
            else:
                try:
                    raw = (proc / str(pid) / "cmdline").read_bytes()
                except OSError:  # gone, or a kernel thread we may not read: read again next time
                    continue
                # An empty cmdline is a kernel thread or a zombie (or one in the middle of an
                # exec): read again next time, so a process seen mid-exec is not taken for a
                # non-shim. Empty at two reads in a row (seconds apart) is a kernel thread or a
                # zombie, neither ever a shim: kept as one, which saves a read per kernel
                # thread (most of /proc on a small host) per scan.
                shim = parse_shim_cmdline(pid, raw)
                if not raw and key not in self._empty:
                    empty.add(key)
                    continue
            known[key] = shim
            if shim is not None:
                found.append(shim)
        # Other roots' entries (tests) stay; this root's are replaced by what exists now.
        self._known = {k: v for k, v in self._known.items() if k[0] != where} | known
        self._empty = {k for k in self._empty if k[0] != where} | empty
        return found


SHIM_SCAN = ShimScan()


class SocketWatch:
    """`check_sockets`, again only when something it depends on moved: reading and
    parsing /proc/net/unix (every unix socket of the netns: 50 kB at 100 containers) was half of
    this probe's cost. A socket file goes stale when its listener dies: the shim that served it
    leaves the running shims, or the file comes or goes (the directory's mtime moves). Either
    makes the next read check again; so does every `REFRESH_EVERY`th read (a listener that
    closed its socket and lives on), and any read after a check that failed."""

    REFRESH_EVERY = 10

    def __init__(self) -> None:
        self._key: object = None
        self._last: SocketCheck | None = None
        self._age = 0

    def __call__(self, proc: Path, socket_dir: Path, running: Sequence[Shim]) -> tuple[SocketCheck, bool]:
        """(the check, whether it was reused)."""
        try:
            st = os.stat(socket_dir)
            where: tuple[int, int, int] | None = (st.st_dev, st.st_ino, st.st_mtime_ns)
        except OSError:
            where = None
        key = (str(proc), str(socket_dir), where, frozenset((s.pid, s.id, s.address) for s in running))
        last = self._last
        if last is not None and last.error is None and key == self._key and self._age < self.REFRESH_EVERY:
            self._age += 1
            return last, True
        check = check_sockets(proc, socket_dir)
        self._key, self._last, self._age = key, check, 1
        return check, False


SOCKET_WATCH = SocketWatch()
