"""The `fifos` probe: inodes on the /run filesystem and containerd's orphaned fifo directories.

The case (containerd issue #2421, `../shared/seeds/containerd-fifo-inode-leak-issue.txt`): every
task or exec a containerd client starts gets a directory `<run>/containerd/fifo/<random>` holding
`<id>-stdin`, `<id>-stdout` and `<id>-stderr` FIFOs (4 inodes). When the client does not clean
up, the directory stays behind; /run is a tmpfs with a fixed inode count, so after ~10^5 leaked
directories every mkdir/mkfifo on /run fails with ENOSPC and no container can start, while
`df -h` still shows free space. With containerd 1.6.20 (our test host) the report's loop of
`ctr run -d` / `tasks kill` / `containers delete` no longer leaks, but every `ctr tasks exec -d`
still leaves its directory behind; while the task lives its shim often keeps the ended exec's
stdin FIFO open, so those become orphans when the task is deleted (tests/real/test_fifos_real.py).

The orphan rule
---------------
A directory `<run>/containerd/fifo/<name>` is an orphan only if ALL of these hold. Anything we
cannot check counts as "not an orphan": deleting a live container's stdio breaks its logging
and `docker logs`/`kubectl logs`; leaving a leaked directory for one more cycle costs 4 inodes.

(a) It is a real directory (lstat, not a symlink) on the same device as the fifo root.
    Why: we only ever remove FIFOs and then the directory itself; a symlink could point
    anywhere, and a different device means a mount we did not expect in a directory that only
    containerd's clients write.
(b) It holds only FIFOs, at least one and at most `MAX_ENTRIES` (16), and every FIFO name
    parses as `<id>-stdin|stdout|stderr`.
    Why: that is exactly what containerd's `cio.NewFIFOSetInDir` creates (3 FIFOs, 2 with a
    terminal). A subdirectory, a regular file, a socket or a name we do not recognise means
    someone else uses the directory; an empty directory names no container, so (e) cannot be
    checked (it costs one inode; we report it, not remove it); a directory with hundreds of
    entries is not a per-process stdio set.
(c) The directory and every FIFO in it were last modified more than `min_age` (10 minutes by
    default) ago.
    Why: the client creates the directory and the FIFOs *before* the task starts and before the
    shim opens them, so a young directory with nobody holding its FIFOs open is normal while a
    task is being created (image unpacking can take minutes). Writing to a FIFO also updates
    its mtime, so a FIFO still carrying output looks young.
(d) No process on the host has any of its FIFOs open: we stat every `<proc>/<pid>/fd/<n>` and
    compare (st_dev, st_ino) with the FIFOs' lstat (one scan per probe run, only when there
    are candidates; pids and fds that vanish mid-scan are skipped; any other error makes the
    scan incomplete and therefore nothing an orphan).
    Why: a live task's shim holds its stdin/stdout/stderr FIFOs open for the life of the
    process; comparing inodes rather than the link text is immune to mount namespaces and
    " (deleted)" suffixes.
    Exception: a process whose fd table even root may not read (EACCES: it lives in an
    ancestor user namespace, or an LSM forbids ptrace-read of it; on our Firecracker test VM
    the VM agent, pid 1, is such a process) is skipped and listed in
    `detail["open_fifo_scan"]["unreadable_pids"]`. Failing safe on it would make cleanup
    impossible on such hosts forever, and such a process is not one of containerd's shims or
    clients, which run as root in the host's namespaces; (e) still protects every task and
    exec containerd knows. Also not seen: a thread that left its process's fd table with
    unshare(CLONE_FILES); (e) covers it the same way.
(e) No containerd we can reach knows the ids the FIFOs are named after: we list namespaces,
    then containers and tasks in each, and, when an id is still unknown, the exec processes of
    every task (`ctr tasks ps`), on every containerd socket found (`<run>/containerd/
    containerd.sock`, which must exist, and dockerd's private `<run>/docker/containerd/
    containerd.sock` when present). If ANY socket cannot be queried, no candidate is an orphan.
    Why: a task that has been created but whose process has not opened its FIFOs yet (or a
    paused client) is known to containerd; fail safe when the answer is unknown.

Scope: only `<run>/containerd/fifo` is ever cleaned. Docker keeps its FIFOs in
`<run>/docker/containerd/<container id>/` (`init-stdout`, `<exec id>-stdout`, ...); those
directories are counted in `detail["docker"]` for people, not judged or removed.

Everything is read relative to one directory file descriptor (`openat` with O_NOFOLLOW), so a
symlink swapped in during the scan is seen as a symlink and never followed. The action
(`actions/fifo_cleanup.py`) reuses `open_dir_at`, `snapshot_open_dir`, `judge_static`,
`judge_dynamic`, `scan_open_fifos` and `query_known_ids` to re-check each directory right
before removing it.
"""

from __future__ import annotations

import enum
import errno
import os
import re
import stat
import subprocess
from collections import Counter
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import structlog
import tenacity

from remediator.errors import PermanentError, TemporaryError
from remediator.host import HostRoot
from remediator.model import Reading
from remediator.policy.catalog import MetricSpec
from remediator.probes.base import Probe, ProbeContext, register

log = structlog.get_logger(__name__)

# Minimum age of a directory and its FIFOs, seconds: clause (c). containerd clients create the
# FIFO set before the task starts; 10 minutes covers slow image unpacking and shim start-up.
DEFAULT_MIN_AGE = 600.0
# Clause (b): containerd creates 3 FIFOs per process (2 with a terminal); 16 leaves room for any
# future stream while still rejecting directories used for something else.
MAX_ENTRIES = 16
# How many orphans the reading lists for the action (oldest first). A reading is stored and
# audited: an entry is ~150 bytes of JSON with ctr-style ids and ~330 with 64-hex container ids,
# so 10000 entries are 1.5-3.3 MB; the action takes at most `maxDirs` (default 1000) per run.
MAX_LISTED = 10_000
# Clause (e): a host running more tasks than this would need more `ctr tasks ps` calls per
# probe run than we want to spend (~10 ms each); above it the check is incomplete (fail safe).
MAX_TASK_QUERIES = 1000

# Every directory is opened like this: a symlink in its place fails instead of being followed.
DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC

# containerd's cio: filepath.Join(dir, id+"-stdin"), "-stdout", "-stderr".
_FIFO_NAME = re.compile(r"(?P<id>.+)-(?:stdin|stdout|stderr)")
# `ctr tasks ps` prints the exec id inside the task's process details:
# "6813    &ProcessDetails{ExecID:81d3...,XXX_unrecognized:[],}" (containerd 1.6).
_EXEC_ID = re.compile(r"ExecID:([^,}\s]+)")


def fifo_root(host: HostRoot) -> Path:
    """containerd's default FIFO directory (`defaults.DefaultFIFODir`)."""
    return host.run / "containerd" / "fifo"


def docker_fifo_root(host: HostRoot) -> Path:
    """Where dockerd (20.10) puts each container's FIFOs: `<this>/<container id>/init-stdout`."""
    return host.run / "docker" / "containerd"


def containerd_sockets(host: HostRoot) -> tuple[Path, ...]:
    """Sockets whose containerd must be asked (clause e).

    The default socket is always listed, even when missing: containerd being down is no reason
    to call its FIFOs orphaned (the query then fails and nothing is an orphan). dockerd's own
    containerd (when it is not started with --containerd) is listed only when it exists.
    """
    sockets = [host.run / "containerd" / "containerd.sock"]
    docker_sock = host.run / "docker" / "containerd" / "containerd.sock"
    if docker_sock.exists():
        sockets.append(docker_sock)
    return tuple(sockets)


class Keep(enum.StrEnum):
    """Why a directory is not removed. Counted in the probe's and the action's details."""

    SYMLINK = "symlink"  # (a)
    NOT_A_DIRECTORY = "not_a_directory"  # (a)
    OTHER_DEVICE = "other_device"  # (a)
    NOT_ONLY_FIFOS = "not_only_fifos"  # (b)
    TOO_MANY_ENTRIES = "too_many_entries"  # (b)
    EMPTY = "empty"  # (b)
    UNKNOWN_NAME = "unknown_name"  # (b)
    TOO_YOUNG = "too_young"  # (c)
    OPEN = "open"  # (d)
    KNOWN_TO_CONTAINERD = "known_to_containerd"  # (e)
    UNVERIFIED = "unverified"  # (d) or (e) could not be checked: fail safe
    UNREADABLE = "unreadable"  # lstat/open/readdir failed with something other than ENOENT
    GONE = "gone"  # vanished between listing (or planning) and checking
    CHANGED = "changed"  # action only: not the directory (inode, FIFO names) that was planned
    NOT_EMPTY = "not_empty"  # action only: rmdir found new entries


# ---------------------------------------------------------------------------------------------
# Pure parsers
# ---------------------------------------------------------------------------------------------


def parse_fifo_name(name: str) -> str | None:
    """'test.32583-stdout' -> 'test.32583'; None for a name containerd's cio does not make."""
    m = _FIFO_NAME.fullmatch(name)
    return m.group("id") if m else None


def parse_id_list(text: str) -> frozenset[str]:
    """The output of `ctr ... ls -q`: one id per line."""
    return frozenset(line.strip() for line in text.splitlines() if line.strip())


def parse_exec_ids(text: str) -> frozenset[str]:
    """Exec ids from `ctr tasks ps <task>` (the init process has none)."""
    return frozenset(_EXEC_ID.findall(text))


# ---------------------------------------------------------------------------------------------
# Snapshots of one directory, read through directory file descriptors
# ---------------------------------------------------------------------------------------------


def _kind(mode: int) -> str:
    if stat.S_ISFIFO(mode):
        return "fifo"
    if stat.S_ISDIR(mode):
        return "dir"
    if stat.S_ISLNK(mode):
        return "symlink"
    if stat.S_ISREG(mode):
        return "file"
    return "other"


@dataclass(frozen=True)
class Entry:
    """One entry inside a candidate directory, from lstat."""

    name: str
    kind: str  # fifo | dir | symlink | file | other
    dev: int
    ino: int
    mtime: float


@dataclass(frozen=True)
class DirSnapshot:
    """One entry of the fifo root and, when it is a directory, what it holds."""

    name: str
    kind: str  # of the entry itself, from lstat: dir | symlink | file | ...
    dev: int
    ino: int
    mtime: float
    entries: tuple[Entry, ...] = ()
    overflow: bool = False  # more than the max_entries it was read with; `entries` is cut

    @property
    def newest_mtime(self) -> float:
        return max([self.mtime, *(e.mtime for e in self.entries)])

    @property
    def fifo_keys(self) -> frozenset[tuple[int, int]]:
        return frozenset((e.dev, e.ino) for e in self.entries if e.kind == "fifo")

    @property
    def ids(self) -> frozenset[str]:
        return frozenset(i for e in self.entries if (i := parse_fifo_name(e.name)) is not None)


def read_entries(dfd: int, max_entries: int) -> tuple[tuple[Entry, ...], bool]:
    """lstat every entry of the open directory `dfd`; stop after `max_entries` + 1.

    Returns (entries, overflow). Entries that vanish while we look are left out.
    """
    entries: list[Entry] = []
    # scandir, not listdir: a directory with a million entries is read only as far as needed.
    with os.scandir(dfd) as it:
        for de in it:
            if len(entries) >= max_entries:
                return tuple(entries), True
            try:
                st = os.stat(de.name, dir_fd=dfd, follow_symlinks=False)
            except FileNotFoundError:
                continue
            entries.append(Entry(de.name, _kind(st.st_mode), st.st_dev, st.st_ino, st.st_mtime))
    return tuple(entries), False


def open_dir_at(rootfd: int, name: str) -> int:
    """openat(rootfd, name, O_DIRECTORY|O_NOFOLLOW): never follows a symlink.

    Raises NotADirectoryError for anything but a real directory: Linux reports ENOTDIR for a
    symlink under O_DIRECTORY|O_NOFOLLOW (ELOOP without O_DIRECTORY; open(2)), and both mean
    the same to us.
    """
    try:
        return os.open(name, DIR_FLAGS, dir_fd=rootfd)
    except OSError as e:
        if e.errno in (errno.ELOOP, errno.ENOTDIR):
            raise NotADirectoryError(e.errno, e.strerror, name) from None
        raise


def snapshot_open_dir(dfd: int, name: str, max_entries: int) -> DirSnapshot:
    """A snapshot of a directory already opened (with O_NOFOLLOW) as `dfd`."""
    st = os.fstat(dfd)
    entries, overflow = read_entries(dfd, max_entries)
    return DirSnapshot(name, "dir", st.st_dev, st.st_ino, st.st_mtime, entries, overflow)


def snapshot_dir(rootfd: int, name: str, max_entries: int = MAX_ENTRIES) -> DirSnapshot:
    """lstat `name` in the open directory `rootfd` and, when it is a directory, read it.

    Raises FileNotFoundError when it vanished, OSError when it cannot be read.
    """
    st = os.stat(name, dir_fd=rootfd, follow_symlinks=False)
    if not stat.S_ISDIR(st.st_mode):
        return DirSnapshot(name, _kind(st.st_mode), st.st_dev, st.st_ino, st.st_mtime)
    try:
        dfd = open_dir_at(rootfd, name)
    except NotADirectoryError:  # swapped for a symlink or a file since the lstat
        st = os.stat(name, dir_fd=rootfd, follow_symlinks=False)
        return DirSnapshot(name, _kind(st.st_mode), st.st_dev, st.st_ino, st.st_mtime)
    try:
        return snapshot_open_dir(dfd, name, max_entries)
    finally:
        os.close(dfd)


# ---------------------------------------------------------------------------------------------
# The orphan rule (pure)
# ---------------------------------------------------------------------------------------------


def judge_static(
    snap: DirSnapshot, *, root_dev: int, now: float, min_age: float, max_entries: int = MAX_ENTRIES
) -> Keep | None:
    """Clauses (a), (b) and (c): what one snapshot shows by itself. None: still a candidate."""
    if snap.kind == "symlink":
        return Keep.SYMLINK
    if snap.kind != "dir":
        return Keep.NOT_A_DIRECTORY
    if snap.dev != root_dev:
        return Keep.OTHER_DEVICE
    if snap.overflow or len(snap.entries) > max_entries:
        return Keep.TOO_MANY_ENTRIES
    if not snap.entries:
        return Keep.EMPTY
    for e in snap.entries:
        if e.kind != "fifo" or e.dev != root_dev:
            return Keep.NOT_ONLY_FIFOS
        if parse_fifo_name(e.name) is None:
            return Keep.UNKNOWN_NAME
    if now - snap.newest_mtime < min_age:
        return Keep.TOO_YOUNG
    return None


def judge_dynamic(
    snap: DirSnapshot, open_fifos: Collection[tuple[int, int]], known_ids: Collection[str]
) -> Keep | None:
    """Clauses (d) and (e), given one /proc scan and one containerd query."""
    if any(k in open_fifos for k in snap.fifo_keys):
        return Keep.OPEN
    if any(i in known_ids for i in snap.ids):
        return Keep.KNOWN_TO_CONTAINERD
    return None


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
    unreadable_pids: tuple[int, ...] = ()  # EACCES even for root: skipped, see clause (d)

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
    we look is skipped: it no longer holds anything. A process root may not inspect (EACCES,
    ptrace access mode check) is skipped and named (clause d); any other error makes the scan
    incomplete, since then we cannot tell.
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
# Clause (e): the containerd adapter
# ---------------------------------------------------------------------------------------------


class ContainerdNotFound(PermanentError):
    """containerd answered "not found" (e.g. a task deleted between `ls` and `ps`)."""


class CtrRunner(Protocol):
    """Runs one `ctr --address <address> <args...>` and returns its standard output.

    Raises TemporaryError when containerd did not answer in time, ContainerdNotFound when it
    said "not found", PermanentError when ctr cannot run at all.
    """

    def __call__(self, address: str, args: Sequence[str]) -> str: ...


class CtrCli:
    """The real `CtrRunner`: the `ctr` binary, bounded by a timeout, retried with tenacity.

    `--connect-timeout` matters: without it a missing socket costs ctr's 10 s default dial
    timeout per call.
    """

    def __init__(
        self,
        binary: str = "ctr",
        timeout: float = 5.0,
        attempts: int = 3,
        backoff: float = 0.2,
        sleep: Callable[[float], None] | None = None,
    ) -> None:
        self.binary = binary
        self.timeout = timeout  # seconds per call; containerd answers a list in milliseconds
        self.attempts = attempts  # 3 attempts: a containerd restart takes about a second
        self.backoff = backoff
        self._sleep = sleep if sleep is not None else tenacity.nap.sleep

    def __call__(self, address: str, args: Sequence[str]) -> str:
        def before_sleep(state: tenacity.RetryCallState) -> None:
            exc = state.outcome.exception() if state.outcome else None
            log.debug("ctr_retry", args=list(args), attempt=state.attempt_number, error=str(exc))

        retrying = tenacity.Retrying(
            stop=tenacity.stop_after_attempt(self.attempts),
            wait=tenacity.wait_exponential(multiplier=self.backoff, max=2.0),
            retry=tenacity.retry_if_exception_type(TemporaryError),
            before_sleep=before_sleep,
            sleep=self._sleep,
            reraise=True,
        )
        return retrying(self._once, address, args)

    def _once(self, address: str, args: Sequence[str]) -> str:
        seconds = f"{self.timeout:g}s"
        cmd = [self.binary, "--address", address, "--connect-timeout", seconds, "--timeout", seconds, *args]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=self.timeout + 1, check=False)
        except FileNotFoundError:
            raise PermanentError(f"{self.binary}: not found") from None
        except subprocess.TimeoutExpired:
            raise TemporaryError(f"ctr {' '.join(args)}: no answer in {seconds}") from None
        if proc.returncode != 0:
            message = proc.stderr.strip().splitlines()[-1:] or [f"exit {proc.returncode}"]
            if "not found" in message[0]:
                raise ContainerdNotFound(message[0])
            raise TemporaryError(f"ctr {' '.join(args)}: {message[0]}")
        return proc.stdout


@dataclass(frozen=True)
class KnownIds:
    """Every container, task and exec id the reachable containerds know."""

    ids: frozenset[str]
    complete: bool
    sockets: tuple[str, ...]
    errors: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {
            "queried": True,
            "complete": self.complete,
            "sockets": list(self.sockets),
            "errors": list(self.errors),
        }


def query_known_ids(
    ctr: CtrRunner,
    sockets: Iterable[Path],
    wanted: Collection[str],
    max_task_queries: int = MAX_TASK_QUERIES,
) -> KnownIds:
    """Ask every containerd which ids it knows; exec ids only while some of `wanted` is unknown.

    Incomplete (fail safe) when a socket is missing or any query fails, except a task that
    vanished between `tasks ls` and `tasks ps` (its execs went with it).
    """
    ids: set[str] = set()
    errors: list[str] = []
    names: list[str] = []
    tasks: list[tuple[str, str, str]] = []  # (address, namespace, task id)
    for sock in sockets:
        address = str(sock)
        names.append(address)
        try:
            if not stat.S_ISSOCK(os.stat(sock).st_mode):
                errors.append(f"{address}: not a socket")
                continue
        except OSError as e:
            errors.append(f"{address}: {e.strerror}")
            continue
        try:
            for ns in sorted(parse_id_list(ctr(address, ["namespaces", "ls", "-q"]))):
                ids |= parse_id_list(ctr(address, ["-n", ns, "containers", "ls", "-q"]))
                ns_tasks = parse_id_list(ctr(address, ["-n", ns, "tasks", "ls", "-q"]))
                ids |= ns_tasks
                tasks.extend((address, ns, t) for t in sorted(ns_tasks))
        except (TemporaryError, PermanentError) as e:
            errors.append(f"{address}: {e}")
    if errors:
        return KnownIds(frozenset(ids), False, tuple(names), tuple(errors))
    if all(w in ids for w in wanted):
        return KnownIds(frozenset(ids), True, tuple(names))
    if len(tasks) > max_task_queries:
        errors.append(f"{len(tasks)} tasks: more than {max_task_queries} exec listings")
        return KnownIds(frozenset(ids), False, tuple(names), tuple(errors))
    for address, ns, task in tasks:
        try:
            ids |= parse_exec_ids(ctr(address, ["-n", ns, "tasks", "ps", task]))
        except ContainerdNotFound:
            continue
        except (TemporaryError, PermanentError) as e:
            errors.append(f"{address}: {e}")
            break
    return KnownIds(frozenset(ids), not errors, tuple(names), tuple(errors))


# ---------------------------------------------------------------------------------------------
# The whole assessment, shared by the probe and (for its re-check) the action
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class OrphanDir:
    """One orphan as the reading lists it and the action plans from it."""

    name: str
    ino: int
    dev: int
    mtime: float  # the newest mtime of the directory and its FIFOs
    fifos: tuple[str, ...]

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "ino": self.ino,
            "dev": self.dev,
            "mtime": self.mtime,
            "fifos": list(self.fifos),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> OrphanDir:
        """Raises ValueError on anything but the shape `to_dict` writes."""
        try:
            fifos = tuple(d["fifos"])
            o = cls(d["name"], d["ino"], d["dev"], float(d["mtime"]), fifos)
        except (KeyError, TypeError) as e:
            raise ValueError(f"not an orphan fifo dir: {d!r}") from e
        if not (
            isinstance(o.name, str)
            and isinstance(o.ino, int)
            and isinstance(o.dev, int)
            and all(isinstance(f, str) for f in fifos)
        ):
            raise ValueError(f"not an orphan fifo dir: {d!r}")
        return o

    @classmethod
    def of(cls, snap: DirSnapshot) -> OrphanDir:
        fifos = tuple(sorted(e.name for e in snap.entries))
        return cls(snap.name, snap.ino, snap.dev, snap.newest_mtime, fifos)


@dataclass(frozen=True)
class Assessment:
    root: Path
    present: bool
    dev: int | None = None
    entries: int = 0
    orphans: tuple[DirSnapshot, ...] = ()  # oldest first
    kept: Mapping[str, int] = field(default_factory=dict)
    open_scan: OpenFifos | None = None  # None: not needed (no candidates)
    known: KnownIds | None = None  # None: not needed
    problem: str | None = None  # why the root could not be judged at all

    @property
    def complete(self) -> bool:
        """Whether every candidate could be checked against (d) and (e)."""
        scans_ok = (self.open_scan is None or self.open_scan.complete) and (
            self.known is None or self.known.complete
        )
        return self.problem is None and scans_ok


def assess(
    host: HostRoot,
    ctr: CtrRunner,
    now: float,
    *,
    min_age: float = DEFAULT_MIN_AGE,
    max_entries: int = MAX_ENTRIES,
    max_task_queries: int = MAX_TASK_QUERIES,
) -> Assessment:
    """Apply the orphan rule to every entry of the fifo root, cheap clauses first.

    (a)-(c) cost a few syscalls per directory; (d) is one /proc scan and (e) a handful of ctr
    calls, so both run only when some directory passed (a)-(c).
    """
    root = fifo_root(host)
    try:
        rootfd = os.open(root, DIR_FLAGS)
    except FileNotFoundError:
        return Assessment(root, present=False)
    except OSError as e:
        if e.errno in (errno.ELOOP, errno.ENOTDIR):
            return Assessment(root, present=False, problem=f"{root} is not a directory")
        raise
    kept: Counter[str] = Counter()
    try:
        dev = os.fstat(rootfd).st_dev
        entries, candidates = _static_candidates(
            rootfd, root, dev, kept, now=now, min_age=min_age, max_entries=max_entries
        )
    finally:
        os.close(rootfd)
    if not candidates:
        return Assessment(root, True, dev, entries, (), dict(kept))

    orphans: list[DirSnapshot] = []
    known: KnownIds | None = None
    open_scan = scan_open_fifos(host.proc, {dev})
    if open_scan.complete:
        unheld = []
        for snap in candidates:
            if judge_dynamic(snap, open_scan.keys, ()) is Keep.OPEN:
                kept[Keep.OPEN] += 1
            else:
                unheld.append(snap)
        candidates = unheld
    if candidates and open_scan.complete:
        wanted = frozenset(i for snap in candidates for i in snap.ids)
        known = query_known_ids(ctr, containerd_sockets(host), wanted, max_task_queries)
        if known.complete:
            for snap in candidates:
                reason = judge_dynamic(snap, open_scan.keys, known.ids)
                if reason is None:
                    orphans.append(snap)
                else:
                    kept[reason] += 1
            candidates = []
    # Whatever is left could not be checked against (d) or (e): not an orphan.
    kept[Keep.UNVERIFIED] += len(candidates)
    orphans.sort(key=lambda s: (s.newest_mtime, s.name))
    kept_counts = {k: v for k, v in kept.items() if v}
    return Assessment(root, True, dev, entries, tuple(orphans), kept_counts, open_scan, known)


def _static_candidates(
    rootfd: int,
    root: Path,
    dev: int,
    kept: Counter[str],
    *,
    now: float,
    min_age: float,
    max_entries: int,
) -> tuple[int, list[DirSnapshot]]:
    """(entries in the root, the directories that pass (a)-(c)); counts the rest in `kept`."""
    with os.scandir(rootfd) as it:
        names = [e.name for e in it]
    candidates: list[DirSnapshot] = []
    for name in names:
        try:
            snap = snapshot_dir(rootfd, name, max_entries)
        except FileNotFoundError:
            kept[Keep.GONE] += 1
            continue
        except OSError as e:
            log.warning("fifo_dir_unreadable", dir=str(root / name), error=e.strerror)
            kept[Keep.UNREADABLE] += 1
            continue
        reason = judge_static(snap, root_dev=dev, now=now, min_age=min_age, max_entries=max_entries)
        if reason is None:
            candidates.append(snap)
        else:
            kept[reason] += 1
    return len(names), candidates


def count_docker_fifos(host: HostRoot) -> dict[str, Any] | None:
    """Directories and FIFOs under dockerd's FIFO location, for people only (never cleaned)."""
    root = docker_fifo_root(host)
    dirs = fifos = 0
    try:
        with os.scandir(root) as it:
            subdirs = [e.path for e in it if e.is_dir(follow_symlinks=False)]
    except FileNotFoundError:
        return None
    except OSError as e:
        return {"root": str(root), "error": e.strerror}
    for path in subdirs:
        try:
            with os.scandir(path) as inner:
                modes = [f.stat(follow_symlinks=False).st_mode for f in inner]
            fifos += sum(1 for m in modes if stat.S_ISFIFO(m))
        except FileNotFoundError:  # the container went away while we counted
            continue
        dirs += 1
    return {"root": str(root), "dirs": dirs, "fifos": fifos}


# ---------------------------------------------------------------------------------------------
# The probe
# ---------------------------------------------------------------------------------------------


def _device_name(dev: int) -> str:
    return f"{os.major(dev)}:{os.minor(dev)}"


@register
class FifosProbe(Probe):
    name = "fifos"
    help = (
        "Inodes of the filesystem holding /run, and containerd FIFO directories "
        "(<run>/containerd/fifo) left behind by exited tasks and execs"
    )
    metrics = (
        MetricSpec(
            "run_inodes_used",
            "inodes in use on the filesystem holding /run (statvfs f_files - f_ffree)",
            limit="inodes of that filesystem (statvfs f_files)",
        ),
        MetricSpec("run_inodes_free", "free inodes on the filesystem holding /run (f_ffree)"),
        MetricSpec("fifo_dirs", "entries in <run>/containerd/fifo"),
        MetricSpec(
            "orphan_fifo_dirs",
            "directories in <run>/containerd/fifo that are orphans by the conservative rule "
            "(absent when containerd or /proc could not be checked)",
        ),
    )

    def __init__(
        self,
        ctr: CtrRunner | None = None,
        min_age: float = DEFAULT_MIN_AGE,
        max_entries: int = MAX_ENTRIES,
        max_listed: int = MAX_LISTED,
        max_task_queries: int = MAX_TASK_QUERIES,
    ) -> None:
        self.ctr: CtrRunner = ctr if ctr is not None else CtrCli()
        self.min_age = min_age
        self.max_entries = max_entries
        self.max_listed = max_listed
        self.max_task_queries = max_task_queries

    def read(self, ctx: ProbeContext) -> Reading:
        now = ctx.clock.now()
        values: dict[str, float] = {}
        limits: dict[str, float] = {}
        try:
            vfs = os.statvfs(ctx.host.run)
        except OSError as e:
            return Reading(self.name, now, error=f"statvfs {ctx.host.run}: {e.strerror}")
        # Some filesystems (btrfs) report f_files = 0: they have no inode limit, so no data.
        if vfs.f_files > 0:
            values["run_inodes_used"] = float(vfs.f_files - vfs.f_ffree)
            values["run_inodes_free"] = float(vfs.f_ffree)
            limits["run_inodes_used"] = float(vfs.f_files)
        try:
            a = assess(
                ctx.host,
                self.ctr,
                now,
                min_age=self.min_age,
                max_entries=self.max_entries,
                max_task_queries=self.max_task_queries,
            )
        except OSError as e:
            root = fifo_root(ctx.host)
            return Reading(self.name, now, values, limits, error=f"{root}: {e.strerror}")
        detail: dict[str, Any] = {
            "root": str(a.root),
            "present": a.present,
            "min_age": self.min_age,
            "max_entries": self.max_entries,
            "orphans": [OrphanDir.of(s).to_dict() for s in a.orphans[: self.max_listed]],
            "truncated": len(a.orphans) > self.max_listed,
            "kept": {str(k): v for k, v in sorted(a.kept.items())},
            "open_fifo_scan": a.open_scan.to_dict() if a.open_scan else None,
            "containerd": a.known.to_dict() if a.known else {"queried": False},
            "orphan_check": "complete" if a.complete else "incomplete",
        }
        if a.dev is not None:
            detail["dev"] = a.dev
            detail["device"] = _device_name(a.dev)
        if a.problem:
            detail["problem"] = a.problem
        docker = count_docker_fifos(ctx.host)
        if docker is not None:
            detail["docker"] = docker
        if a.problem is None:
            values["fifo_dirs"] = float(a.entries)
            # Unknown is not zero: when (d) or (e) could not be checked the metric is absent.
            if a.complete:
                values["orphan_fifo_dirs"] = float(len(a.orphans))
        if not a.complete:
            log.warning(
                "fifo_orphan_check_incomplete",
                root=str(a.root),
                problem=a.problem,
                open_fifo_scan=detail["open_fifo_scan"],
                containerd=detail["containerd"],
            )
        return Reading(self.name, now, values, limits, detail=detail)
