"""The /proc/<pid>/fd scan behind the `limits` probe: who holds which fds, incrementally.

One pass over /proc/<pid>/fd finds, per process, its open fds (file handles per container),
inotify fds ("anon_inode:inotify", watches from fdinfo: proc(5)), epoll fds
("anon_inode:[eventpoll]", one "tfd:" fdinfo line per watched fd) and pipes ("pipe:[inode]").
Processes and fds vanish during the scan; those are skipped (ENOENT / ESRCH), never an error.

Incremental: a `ScanCache` keeps what each process held. On the next scan a process that is
the same one (the inode of /proc/<pid> in the listing of /proc: procfs gives every new process
a new one, so a reused pid is seen at no cost) and whose fd count (`stat(/proc/<pid>/fd).st_size`,
exact since Linux 6.2; 0 before, which means "unknown, re-examine" unless the process had no fds
at all) is unchanged is not re-read fd by fd: for most processes that one stat is all. Its known
inotify fds are re-read when it ran (watches on paths are added without the fd count changing),
and a container process's thread count is read (`st_nlink` of /proc/<pid>/task; threads move the
container's `tasks`); a process keeps its uid, name and container from the record. That misses
an fd closed and another opened under the same count, and epoll watches that pair fds and epolls
the process already held, so every `full_every`-th scan re-examines everything (and re-reads
each start time from /proc/<pid>/stat).

Those glances are one call to the reader (`survey`: in C, one system-call loop for the host),
which hands back only the processes whose glance differs from what their record expects; the
loop here runs over those. What the records add up to (`limits_totals.Totals`) is kept in the
cache too and changed only for them; the full scan counts it again from nothing.

Bounded: with a CPU `budget` (seconds of this process's CPU time per scan), every scan but a
cache's first (so that a one-shot `remediator once` sees everything) stops re-examining when
the budget is spent (the CPU clock, a system call, is read every `check_every` processes it
looks at); the processes left keep their previous record when they have one (the same
/proc/<pid> inode: `stale`), are counted as `unexamined` otherwise, and the next scan starts
where this one stopped, so every process is reached within a few scans.
"""

from __future__ import annotations

import dataclasses
import errno
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from remediator.host import HostRoot
from remediator.model import ContainerRef
from remediator.probes.base import Inventory, list_processes
from remediator.probes.limits_dedup import AnonFd, EpollFd, GroupMemo, InotifyFd, UidUsage
from remediator.probes.limits_fdread import (
    EPOLL_LINK,
    INOTIFY_LINK,
    S_HAD_FDS,
    S_KTHREAD,
    S_RUNTIME,
    S_THREADS,
    S_UNATTRIBUTED,
    Examined,
    Expectation,
    FdReader,
    Glance,
    Quick,
    default_reader,
)
from remediator.probes.limits_parse import (
    ProcStatus,
    WatchSet,
)
from remediator.probes.limits_totals import PIPE_DEF_PAGES, Totals


@dataclass(frozen=True)
class Consumer:
    """A program that relies on inotify: a process named `name` (its comm) whose arguments
    include one of `follow_flags` (any, when empty). Holding no inotify fd while its uid's pool
    is exhausted means it degraded (tail -f falls back to polling; kubelet fails to start)."""

    name: str
    follow_flags: tuple[str, ...] = ()

    def matches(self, comm: str, argv: Sequence[str]) -> bool:
        if comm != self.name[:15]:
            return False
        if not self.follow_flags:
            return True
        for arg in argv[1:]:
            if arg in self.follow_flags or any(
                arg.startswith(f + "=") for f in self.follow_flags if f[:2] == "--"
            ):
                return True
            # Combined short options: "-fn0", "-Fq".
            if (
                arg[:1] == "-"
                and arg[1:2] != "-"
                and any(f[1:] in arg[1:] for f in self.follow_flags if len(f) == 2)
            ):
                return True
        return False


DEFAULT_CONSUMERS = (
    Consumer("tail", ("-f", "-F", "--follow")),
    Consumer("kubelet"),
    Consumer("inotifywait"),
    Consumer("systemd"),  # PID 1 and user managers watch unit dirs and path units with inotify
)


@dataclass(frozen=True)
class ProcRecord:
    """What one examination of a process found; reused while its fd count and start time hold."""

    starttime: int
    fd_count: int  # st_size of /proc/<pid>/fd; 0: unknown (Linux < 6.2)
    fds: int
    inotify: tuple[tuple[int, WatchSet], ...]
    epoll: tuple[tuple[int, WatchSet], ...]
    pipes: frozenset[int]
    status: ProcStatus
    container_id: str | None = None  # the container it runs in, when `attributed`
    attributed: bool = False  # whether an inventory was there to say (else: unknown)
    runtime_ns: int = -1  # its leader's CPU time when last read (-1: unknown)
    ident: int = 0  # the inode of /proc/<pid> in the scan's listing: new for a new process
    kthread: bool = False  # a kernel thread (PF_KTHREAD): holds nothing, ever


@dataclass
class ScanCache:
    """State kept between scans of one host (the probe's memory across cycles)."""

    records: dict[int, ProcRecord] = field(default_factory=dict)
    scans: int = 0
    resume_at: int = 0  # a budget-cut scan resumes at this pid
    groups: dict[str, GroupMemo] = field(default_factory=dict)  # instance dedup, per fd kind
    # The last grouping per fd kind, (its fds, its instances): a scan that handed back the very
    # same fd objects (every record reused) has the same instances, with no work at all.
    grouped: dict[str, tuple[tuple[AnonFd, ...], list[tuple[AnonFd, ...]]]] = field(default_factory=dict)
    # The last per-uid count per fd kind, (the instances it counted, the count): reused while
    # `grouped` hands back the same instances.
    by_uid: dict[str, tuple[Sequence[tuple[AnonFd, ...]], dict[int, UidUsage]]] = field(default_factory=dict)
    # uids whose inotify pool this process has seen exhausted: a consumer that came up without
    # inotify then stays degraded after the limit is raised (it needs a restart), so it is
    # reported until it holds inotify again or goes away.
    inotify_exhausted: set[int] = field(default_factory=set)
    # pid -> what its record expects of a glance (limits_fdread.survey_py), kept with `records`
    expect: dict[int, Expectation] = field(default_factory=dict)
    totals: Totals = field(default_factory=Totals)  # what `records` add up to


@dataclass(frozen=True)
class ConsumerProc:
    pid: int
    starttime: int  # with the pid, names the process for the boot (re-checked before a restart)
    name: str
    uid: int
    has_inotify: bool
    container: ContainerRef | None


@dataclass
class ContainerUsage:
    file_handles: int = 0
    tasks: int = 0
    inotify_watches: int = 0
    inotify_instances: int = 0
    epoll_watches: int = 0
    pipe_pages: int = 0
    conntrack_entries: int = 0  # set by the probe from the host's table (limits_conntrack)


@dataclass
class ProcScan:
    """What one pass over /proc/<pid>/fd found."""

    pids: int = 0
    fds: int = 0
    vanished: int = 0  # processes gone between listing /proc and reading them
    denied: int = 0  # processes whose fds we may not read (not root): counts are lower bounds
    denied_fds: int = 0  # single fds we may not inspect (EACCES, LSM): inotify counts are lower bounds
    unparsable: int = 0  # inotify/epoll fds whose fdinfo we could not parse
    examined: int = 0  # processes read fd by fd this scan
    refreshed: int = 0  # unchanged processes whose inotify/epoll fdinfo was re-read
    reader: str = ""  # which FdReader read the processes: "c" or "python"
    reused: int = 0  # processes unchanged since the last scan
    stale: int = 0  # processes the budget left on their previous record
    unexamined: int = 0  # processes the budget left with no record at all
    full: bool = True
    budget_exhausted: bool = False
    inotify_fds: Sequence[InotifyFd] = ()
    epoll_fds: Sequence[EpollFd] = ()
    pipe_pages_by_uid: dict[int, int] = field(default_factory=dict)
    pid_container: dict[int, ContainerRef] = field(default_factory=dict)  # container pids only
    containers: dict[str, ContainerUsage] = field(default_factory=dict)
    consumers: list[ConsumerProc] = field(default_factory=list)


BUDGET_CHECK_EVERY = 16


def _gone(exc: OSError) -> bool:
    return exc.errno in (errno.ENOENT, errno.ESRCH)


def _lost(scan: ProcScan, exc: OSError | ValueError) -> None:
    """Count a process that could not be read: gone (or a zombie's half-torn-down files, the
    readers' ValueError) or denied."""
    if isinstance(exc, ValueError) or _gone(exc):
        scan.vanished += 1
    else:
        scan.denied += 1


def _refresh(reader: FdReader, scan: ProcScan, pid_dir: str, rec: ProcRecord) -> ProcRecord:
    """Re-read only the known inotify fds of an unchanged process: watches on paths need no new
    fd, so a process can grow them without its fd count moving.

    Its epoll fds are not re-read here: an epoll watch is one (epoll, open file) pair, so a
    process grows them past what it had only by opening files or epolls (its fd count moves and
    it is examined whole), or by pairing ones it already holds, which the next full scan finds.
    Re-reading them was most of a steady-state scan (every multi-threaded shim, dockerd and
    containerd, every scan)."""
    inotify = []
    for fd, _ in rec.inotify:
        if (iw := reader.refresh_inotify(scan, pid_dir, fd)) is not None:
            inotify.append((fd, iw))
    if tuple(inotify) == rec.inotify:
        return rec  # the same watches: the same record, and the same fd objects downstream
    return dataclasses.replace(rec, inotify=tuple(inotify))


def _argv(pid_dir: str) -> list[str]:
    try:
        with open(f"{pid_dir}/cmdline", "rb") as f:
            return [a.decode(errors="replace") for a in f.read(4096).split(b"\0") if a]
    except OSError:
        return []


def scan_processes(
    host: HostRoot,
    inventory: Inventory | None,
    *,
    cache: ScanCache | None = None,
    budget: float | None = None,
    cpu: Callable[[], float] | None = None,
    full_every: int = 10,
    check_every: int = BUDGET_CHECK_EVERY,
    consumers: Sequence[Consumer] = DEFAULT_CONSUMERS,
    reader: FdReader | None = None,
    listing: Mapping[int, int] | None = None,
) -> ProcScan:
    """Count fds, inotify, epoll and pipes per process, attributing processes to containers.

    `reader`: how one process is read (limits_fdread); by default the C reader on the real host
    when it built, Python otherwise. `listing`: {pid: inode of /proc/<pid>} when the caller
    listed /proc already this cycle (`ProbeContext.processes`). Raises OSError only when /proc
    itself cannot be listed.

    A steady-state scan asks the reader to `survey` every known process against what its record
    expects, in one call, and looks only at those that differ (new, moved, ran while watching);
    the rest keep their record and their share of the totals (limits_totals) untouched.
    """
    proc = str(host.proc)
    reader = reader if reader is not None else default_reader(host.is_real)
    consumer_names = frozenset(c.name[:15] for c in consumers)
    cache = cache if cache is not None else ScanCache()
    scan = ProcScan(reader=reader.name)
    scan.full = cache.scans % max(1, full_every) == 0
    if cache.scans == 0:
        budget = None  # a process's first scan is complete: `once` and `audit` see everything
    cache.scans += 1
    refs = inventory.containers() if inventory is not None else []
    idents = listing if listing is not None else list_processes(proc)
    started = cpu() if cpu is not None and budget is not None else 0.0
    records, expect, totals = cache.records, cache.expect, cache.totals
    inv = inventory if refs else None
    by_id = {r.id: r for r in refs}

    def consumer(pid: int) -> Callable[[ProcRecord], ConsumerProc | None]:
        def of(rec: ProcRecord) -> ConsumerProc | None:
            if rec.status.name not in consumer_names:
                return None
            argv = _argv(f"{proc}/{pid}")
            if not any(c.matches(rec.status.name, argv) for c in consumers):
                return None
            return ConsumerProc(pid, rec.starttime, rec.status.name, rec.status.euid, bool(rec.inotify), None)

        return of

    def keep(pid: int, rec: ProcRecord) -> None:
        if records.get(pid) is not rec:
            records[pid] = rec
            expect[pid] = _expectation(rec)
        totals.count(pid, rec, consumer(pid))

    def forget(pid: int) -> None:
        records.pop(pid, None)
        expect.pop(pid, None)
        totals.drop(pid)

    def lose(pid: int, exc: OSError | ValueError) -> None:
        """It could not be read (gone, denied): counted so, and no record of it kept."""
        _lost(scan, exc)
        forget(pid)

    def whole(pid: int, pid_dir: str) -> None:
        """Everything at once (the C reader opens /proc/<pid> once), for a process with no
        record to reuse."""
        try:
            q, status, ex = reader.whole(scan, pid_dir)
            # A kernel thread is in no container (and reading its cgroup was a tenth of a full
            # scan at 100 containers).
            container = inv.container_of_pid(pid) if inv is not None and not q.kthread else None
        except (OSError, ValueError) as exc:
            lose(pid, exc)
            return
        scan.examined += 1
        keep(pid, _record(q, ex, status, container, inv is not None, idents[pid]))

    for gone in records.keys() - idents.keys():
        forget(gone)
    glances: Mapping[int, Glance | int | None]
    if scan.full:
        # Every process read again, and the totals counted again from nothing: whatever the
        # incremental bookkeeping got wrong lasts at most `full_every` scans.
        totals.reset()
        glances = dict.fromkeys(idents)
    else:
        glances = reader.survey(proc, idents, expect, S_UNATTRIBUTED if inv is not None else 0)
    scan.reused = len(idents) - len(glances)  # the same, by their glance: nothing to do
    todo = sorted(glances)
    # Resume where a budget-cut scan stopped, so that every process is reached.
    first = next((i for i, p in enumerate(todo) if p >= cache.resume_at), 0)
    todo = todo[first:] + todo[:first]
    for i, pid in enumerate(todo):
        # The CPU clock is a system call (~30 us here, more than most processes' glance): looked
        # at every `check_every` processes, so a scan overshoots its budget by at most that
        # many processes.
        if (
            budget is not None
            and cpu is not None
            and i % max(1, check_every) == 0
            and cpu() - started > budget
        ):
            # Spent: the rest keep their previous record untouched (no syscall at all) while
            # the listing shows the same process, and the next scan starts here.
            scan.budget_exhausted = True
            cache.resume_at = pid
            for rest in todo[i:]:
                old = records.get(rest)
                if old is None or old.ident != idents[rest]:
                    scan.unexamined += 1
                    forget(rest)
                    continue
                scan.stale += 1
                keep(rest, old)  # (counted again after a full scan's reset)
            break
        pid_dir = f"{proc}/{pid}"
        rec = records.get(pid)
        g = glances[pid]
        if rec is None or rec.ident != idents[pid] or g is None:
            whole(pid, pid_dir)  # new, or the pid was reused, or the periodic full scan
            continue
        if isinstance(g, int):
            lose(pid, OSError(g, os.strerror(g)))
            continue
        # st_size 0 is "no fds" on Linux >= 6.2 and "unknown" before: trust it only for a
        # process that had no fds when last examined (kernel threads, mostly).
        if g.fd_count != rec.fd_count or (g.fd_count == 0 and rec.fds != 0):
            whole(pid, pid_dir)
            continue
        if not rec.attributed and inv is not None:
            # Read when there was no inventory to say: attributed now, once.
            try:
                container = inv.container_of_pid(pid)
            except (OSError, ValueError) as exc:
                lose(pid, exc)
                continue
            rec = dataclasses.replace(
                rec, container_id=container.id if container is not None else None, attributed=True
            )
        # An unchanged process keeps its status (uid, name): re-reading every status was a
        # third of a steady-state scan. A container process's thread count (its `tasks`) comes
        # from the glance; where that does not say, its status is read again.
        status = rec.status
        if rec.container_id in by_id and g.threads is None:
            try:
                status = reader.status(pid_dir)
            except (OSError, ValueError) as exc:
                lose(pid, exc)
                continue
        elif g.threads is not None and g.threads != status.threads:
            status = dataclasses.replace(status, threads=g.threads)
        # A process that did not run cannot have added a watch: the fdinfo of a single-threaded
        # process is re-read only when its CPU time moved. (schedstat is the leader's alone, so
        # a multi-threaded one is always re-read; so is one whose CPU time is unknown.) What
        # this misses until the next full scan: watches another process added to an instance
        # it shares, and watches the kernel dropped itself (the watched inode was deleted):
        # counts can then be high, never low, for at most `full_every` scans.
        watching = bool(rec.inotify)
        runtime = g.runtime_ns if watching else rec.runtime_ns
        if watching and (rec.runtime_ns < 0 or runtime != rec.runtime_ns or g.threads != 1):
            rec = _refresh(reader, scan, pid_dir, rec)
            scan.refreshed += 1
        if status is not rec.status or runtime != rec.runtime_ns:
            rec = dataclasses.replace(rec, status=status, runtime_ns=runtime)
        scan.reused += 1
        keep(pid, rec)
    if not scan.budget_exhausted:
        cache.resume_at = 0
    _fill(scan, totals, by_id)
    return scan


def _expectation(rec: ProcRecord) -> Expectation:
    """What a glance of this process must show for its record to hold (limits_fdread.survey_py)."""
    flags = S_KTHREAD if rec.kthread else 0
    if rec.inotify:
        flags |= S_THREADS | S_RUNTIME
    elif rec.container_id is not None:
        flags |= S_THREADS
    if rec.fds:
        flags |= S_HAD_FDS
    if not rec.attributed:
        flags |= S_UNATTRIBUTED
    return (rec.ident, rec.fd_count, flags, rec.status.threads, rec.runtime_ns)


def _fill(scan: ProcScan, totals: Totals, by_id: Mapping[str, ContainerRef]) -> None:
    """The scan's sums, from the totals its records add up to."""
    scan.pids = len(totals.shares)
    scan.fds = totals.fds
    scan.inotify_fds, scan.epoll_fds = totals.anon_fds()
    scan.pipe_pages_by_uid = totals.pipe_pages_by_uid()
    for cid in by_id:
        u = totals.usage.get(cid)
        scan.containers[cid] = ContainerUsage(u[0], u[1], pipe_pages=u[2]) if u else ContainerUsage()
    for pid, cid in totals.in_containers.items():
        if (ref := by_id.get(cid)) is not None:
            scan.pid_container[pid] = ref
    scan.consumers = [
        dataclasses.replace(c, container=by_id.get(totals.in_containers.get(pid, "")))
        for pid, c in sorted(totals.consumers.items())
    ]


def _record(
    q: Quick,
    ex: Examined,
    status: ProcStatus,
    container: ContainerRef | None,
    attributed: bool,
    ident: int,
) -> ProcRecord:
    return ProcRecord(
        q.starttime,
        q.fd_count,
        ex.fds,
        ex.inotify,
        ex.epoll,
        ex.pipes,
        status,
        container.id if container is not None else None,
        attributed,
        q.runtime_ns,
        ident,
        q.kthread,
    )


__all__ = [
    "DEFAULT_CONSUMERS",
    "EPOLL_LINK",
    "INOTIFY_LINK",
    "PIPE_DEF_PAGES",
    "Consumer",
    "ConsumerProc",
    "ContainerUsage",
    "ProcRecord",
    "ProcScan",
    "ScanCache",
    "scan_processes",
]
