"""The `fifos` probe: inodes of the fifo filesystems and how many containerd fifo dirs pile up.

The case and the orphan rule are in `fifo_rule` (pure); the containerd queries in `containerd`;
reading through handles in `fifo_scan`; removing in `actions/fifo_walk`. This probe is the cheap
half of a cycle: per fifo root one streamed listing (no directory is opened), one statvfs, one
readlink per open fd on the host, and a containerd query without the exec listings (one `ctr`
per task, which the walk makes right before it judges): when containerd cannot be asked, the
reading says which socket and why, and no orphan count is given. The exact judgement of every
directory happens once, in `clean-fifos`, right before each removal, so the tree is read once
per cycle.

`orphan_fifo_dirs` is therefore an estimate: directories in the root minus those some process
holds a FIFO of open (one readlink per open fd on the host), never fewer than the orphans. It is
what policies trigger on; what was really an orphan is what `clean-fifos` reports it removed and
kept, with reasons.

Fifo roots: containerd's default `<run>/containerd/fifo`, judged against
`<run>/containerd/containerd.sock` (which must exist) and dockerd's private containerd when
present; more roots (a private containerd's, any `ctr --fifo-dir`) come from `--fifo-root`
(`HostRoot.extra_fifo_roots`), each with the sockets of every containerd whose clients may write
it, and are judged against those only. Docker keeps its FIFOs in
`<run>/docker/containerd/<container id>/`; those are counted in `detail["docker"]` for people,
never judged or removed.
"""

from __future__ import annotations

import dataclasses
import errno
import os
import stat
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

from remediator.host import HostRoot
from remediator.model import Reading
from remediator.policy.catalog import MetricSpec
from remediator.probes import shims
from remediator.probes.base import Probe, ProbeContext, register
from remediator.probes.containerd import MAX_TASK_QUERIES, CtrCli, CtrRunner, KnownIds, query_known_ids
from remediator.probes.fifo_rule import DEFAULT_MIN_AGE
from remediator.probes.fifo_scan import RATE_WINDOW, count, held_dirs, mount_id, open_root

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class FifoRoot:
    """A directory containerd clients put FIFO sets in, and every containerd that can own them."""

    path: Path
    sockets: tuple[Path, ...]

    def to_dict(self) -> dict[str, Any]:
        return {"path": str(self.path), "sockets": [str(s) for s in self.sockets]}


def fifo_root(host: HostRoot) -> Path:
    """containerd's default FIFO directory (`defaults.DefaultFIFODir`)."""
    return host.run / "containerd" / "fifo"


def docker_fifo_root(host: HostRoot) -> Path:
    """Where dockerd (20.10) puts each container's FIFOs: `<this>/<container id>/init-stdout`."""
    return host.run / "docker" / "containerd"


def containerd_sockets(host: HostRoot) -> tuple[Path, ...]:
    """Sockets whose containerd must be asked about the default root (clause e).

    The default socket is always listed, even when missing: containerd being down is no reason
    to call its FIFOs orphaned (the query then fails and nothing is an orphan). dockerd's own
    containerd (when it is not started with --containerd) is listed only when it exists.
    """
    sockets = [host.run / "containerd" / "containerd.sock"]
    docker_sock = host.run / "docker" / "containerd" / "containerd.sock"
    if docker_sock.exists():
        sockets.append(docker_sock)
    return tuple(sockets)


def default_roots(host: HostRoot) -> tuple[FifoRoot, ...]:
    """containerd's default root, then every configured one (`--fifo-root`)."""
    extra = tuple(
        FifoRoot(host.host_path(p), tuple(host.host_path(s) for s in socks))
        for p, socks in host.extra_fifo_roots
    )
    return (FifoRoot(fifo_root(host), containerd_sockets(host)), *extra)


# FIFOs per dockerd container directory, by (path, inode, mtime): adding or removing an entry
# moves a directory's mtime, so an unchanged directory is counted with one stat instead of a
# listing and a stat per entry (a few milliseconds per read at 100 containers).
_DOCKER_FIFO_COUNTS: dict[str, tuple[tuple[int, int], int]] = {}
# The whole count, for people only, is redone at most this often while the root directory (its
# list of containers) is unchanged: a stat per container every 10 s was a sixth of this probe
# at 100 containers. Between, the last count stands, with its age.
DOCKER_RECOUNT_SECONDS = 60.0
_DOCKER_LAST: dict[str, tuple[float, tuple[int, int], dict[str, Any]]] = {}


def count_docker_fifos(host: HostRoot, now: float | None = None) -> dict[str, Any] | None:
    """Directories and FIFOs under dockerd's FIFO location, for people only (never cleaned).
    With `now`, a count less than DOCKER_RECOUNT_SECONDS old of an unchanged root is reused
    (`counted_seconds_ago` says how old)."""
    root = docker_fifo_root(host)
    dirs = fifos = 0
    try:
        st = os.stat(root)
    except FileNotFoundError:
        return None
    except OSError as e:
        return {"root": str(root), "error": e.strerror}
    stamp = (st.st_ino, st.st_mtime_ns)
    last = _DOCKER_LAST.get(str(root))
    if now is not None and last is not None:
        at, stamp_then, counted = last
        if stamp_then == stamp and 0 <= now - at < DOCKER_RECOUNT_SECONDS:
            return counted | {"counted_seconds_ago": round(now - at, 1)}
    try:
        with os.scandir(root) as it:
            subdirs = [e.path for e in it if e.is_dir(follow_symlinks=False)]
    except FileNotFoundError:
        return None
    except OSError as e:
        return {"root": str(root), "error": e.strerror}
    seen: dict[str, tuple[tuple[int, int], int]] = {}
    for path in subdirs:
        try:
            st = os.stat(path, follow_symlinks=False)
            key = (st.st_ino, st.st_mtime_ns)
            cached = _DOCKER_FIFO_COUNTS.get(path)
            if cached is not None and cached[0] == key:
                n = cached[1]
            else:
                with os.scandir(path) as inner:
                    modes = [f.stat(follow_symlinks=False).st_mode for f in inner]
                n = sum(1 for m in modes if stat.S_ISFIFO(m))
        except FileNotFoundError:  # the container went away while we counted
            continue
        seen[path] = (key, n)
        fifos += n
        dirs += 1
    _DOCKER_FIFO_COUNTS.clear()
    _DOCKER_FIFO_COUNTS.update(seen)
    result = {"root": str(root), "dirs": dirs, "fifos": fifos}
    if now is not None:
        _DOCKER_LAST[str(root)] = (now, stamp, result)
    return result


@dataclass(frozen=True)
class RootSurvey:
    """What the probe saw of one fifo root."""

    root: FifoRoot
    present: bool
    dev: int | None = None
    mount_id: int | None = None
    entries: int = 0
    dirs: int = 0
    recent: int = 0  # directories made within the last hour
    inodes_used: int | None = None
    inodes_total: int | None = None  # None: the filesystem has no inode limit (f_files 0)
    known: KnownIds | None = None  # None: not asked (no directories)
    problem: str | None = None
    held: int | None = None  # directories some process holds a FIFO of open; None: not known

    @property
    def complete(self) -> bool:
        return self.problem is None and (self.known is None or self.known.complete)

    @property
    def orphan_estimate(self) -> int | None:
        """Directories nobody holds a FIFO of open: at least every orphan (it also counts the
        live sets nobody holds, e.g. an exec that ended but was not deleted, and junk, which
        the walk keeps). Never fewer than the orphans, so a policy on it never waits too long."""
        if not self.complete or (self.dirs and self.held is None):
            return None
        return max(0, self.dirs - (self.held or 0))

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            **self.root.to_dict(),
            "present": self.present,
            "entries": self.entries,
            "dirs": self.dirs,
            "dirs_last_hour": self.recent,
            "dirs_held_open": self.held,
            "orphan_estimate": self.orphan_estimate,
            "orphan_check": "complete" if self.complete else "incomplete",
            "containerd": self.known.to_dict() if self.known else {"queried": False},
        }
        if self.dev is not None:
            d["dev"] = self.dev
            d["device"] = f"{os.major(self.dev)}:{os.minor(self.dev)}"
        if self.mount_id is not None:
            d["mount_id"] = self.mount_id
        if self.inodes_used is not None:
            d["inodes_used"] = self.inodes_used
            d["inodes_total"] = self.inodes_total
        if self.problem:
            d["problem"] = self.problem
        return d


# How long a containerd answer stands for the probe while nothing it can see has changed: the
# root's listing (its mtime and directory count), the shims serving its containerds (pid, id)
# and the containerds' sockets (inode: a restarted containerd makes a new one). Any change asks
# again at once: a new shim, a shim gone, a new or removed fifo directory, a containerd
# restart. The daemon reads this probe every 30 s; asking every containerd costs a few `ctr`
# processes each time (half the daemon's CPU at 200 containers), for an answer that only says
# the containerd could be asked and which shims it still knows. What no key shows is a task
# containerd forgot while its shim runs on (a leaked shim): that is reported up to this much
# later. Nothing is removed on this answer: the cleanup walk always asks afresh, execs
# included, right before it judges (actions/fifo_cleanup.py), whatever this cache holds.
KNOWN_IDS_TTL = 300.0
_MAX_CACHED_ROOTS = 64


@dataclass(frozen=True)
class _Seen:
    """What the probe saw of a root when containerd last answered for it."""

    root: Path
    sockets: tuple[Path, ...]
    mtime_ns: int
    dirs: int
    shims: frozenset[tuple[int, str]]
    sockets_seen: tuple[tuple[int, int] | None, ...] = ()  # (st_dev, st_ino) of each socket


class KnownIdsCache:
    """Recent complete containerd answers, reused while what the probe sees is unchanged.

    Process-wide (the engine makes a probe per read), bounded, keyed by everything an answer
    depends on that the probe can see without asking, and timed by the caller's clock.
    """

    def __init__(self, ttl: float = KNOWN_IDS_TTL) -> None:
        self.ttl = ttl
        self._answers: dict[_Seen, tuple[float, KnownIds]] = {}

    def get(self, seen: _Seen, now: float) -> KnownIds | None:
        hit = self._answers.get(seen)
        if hit is None or not 0 <= now - hit[0] < self.ttl:
            return None
        return hit[1]

    def put(self, seen: _Seen, now: float, known: KnownIds) -> None:
        for key in [k for k in self._answers if k.root == seen.root]:
            del self._answers[key]
        if not known.complete:
            return  # an incomplete answer is asked again at the next read
        if len(self._answers) >= _MAX_CACHED_ROOTS:
            self._answers.pop(next(iter(self._answers)))
        self._answers[seen] = (now, known)

    def clear(self) -> None:
        self._answers.clear()


KNOWN_IDS = KnownIdsCache()


def _sockets_seen(root: FifoRoot) -> tuple[tuple[int, int] | None, ...]:
    out: list[tuple[int, int] | None] = []
    for sock in root.sockets:
        try:
            st = os.stat(sock)
        except OSError:
            out.append(None)
        else:
            out.append((st.st_dev, st.st_ino))
    return tuple(out)


def _shims_of(root: FifoRoot, running: Sequence[shims.Shim]) -> frozenset[tuple[int, str]]:
    """The (pid, id) of the shims serving one of the root's containerds (`shims.serves`, with
    each socket and each distinct address resolved once, not once per shim)."""
    sockets = {os.path.realpath(s) for s in root.sockets}
    resolved: dict[str, str] = {}
    out = set()
    for s in running:
        address = resolved.get(s.address)
        if address is None:
            address = resolved[s.address] = os.path.realpath(s.address)
        if address in sockets:
            out.add((s.pid, s.id))
    return frozenset(out)


def survey(
    root: FifoRoot,
    ctr: CtrRunner,
    now: float,
    max_task_queries: int = MAX_TASK_QUERIES,
    *,
    serving: frozenset[tuple[int, str]] = frozenset(),
    cache: KnownIdsCache | None = None,
) -> RootSurvey:
    """The cheap pass over one root: listing, statvfs, and (when it holds dirs, or shims of its
    containerds run: `serving`, their (pid, id)) the containerd query, reused from `cache`
    while the root's listing and those shims are unchanged."""
    try:
        rootfd = open_root(root.path)
    except FileNotFoundError:
        return RootSurvey(root, present=False)
    except OSError as e:
        if e.errno in (errno.ELOOP, errno.ENOTDIR):
            return RootSurvey(root, present=False, problem=f"{root.path} is not a directory")
        return RootSurvey(root, present=False, problem=f"{root.path}: {e.strerror}")
    try:
        st = os.fstat(rootfd)
        mnt = mount_id(rootfd)
        vfs = os.fstatvfs(rootfd)
        counted = count(rootfd, now)
    except OSError as e:
        return RootSurvey(root, present=True, problem=f"{root.path}: {e.strerror}")
    finally:
        os.close(rootfd)
    used = total = None
    if vfs.f_files > 0:
        used, total = vfs.f_files - vfs.f_ffree, vfs.f_files
    # Without exec listings (one `ctr` per task): the estimate does not need them, and the walk
    # makes the full query, exec formats included, right before it judges anything.
    known = None
    if counted.dirs or serving:
        seen = _Seen(root.path, root.sockets, st.st_mtime_ns, counted.dirs, serving, _sockets_seen(root))
        known = cache.get(seen, now) if cache is not None else None
        if known is None:
            known = query_known_ids(ctr, root.sockets, max_task_queries, execs=False)
            if cache is not None:
                cache.put(seen, now, known)
    return RootSurvey(
        root, True, st.st_dev, mnt, counted.entries, counted.dirs, counted.recent, used, total, known
    )


# A FIFO set: the directory and its 3 FIFOs (2 with a terminal; counting 4 errs early).
INODES_PER_DIR = 4


def _forecast(s: RootSurvey) -> tuple[float, float]:
    """(inodes the last hour's directories will need in the next hour, free inodes now)."""
    free = float((s.inodes_total or 0) - (s.inodes_used or 0))
    return float(s.recent * INODES_PER_DIR), free


@register
class FifosProbe(Probe):
    name = "fifos"
    help = (
        "Inodes of the filesystems holding /run and the containerd fifo roots, and how many "
        "containerd FIFO directories (<run>/containerd/fifo) pile up there"
    )
    metrics = (
        MetricSpec(
            "run_inodes_used",
            "inodes in use on the filesystem holding /run (statvfs f_files - f_ffree)",
            limit="inodes of that filesystem (statvfs f_files)",
        ),
        MetricSpec("run_inodes_free", "free inodes on the filesystem holding /run (f_ffree)"),
        MetricSpec(
            "fifo_fs_inodes_used",
            "inodes in use on the fullest filesystem holding a fifo root",
            limit="inodes of that filesystem (statvfs f_files)",
        ),
        MetricSpec("fifo_dirs", "directories in the fifo roots (one listing, nothing opened)"),
        MetricSpec(
            "leaked_shims",
            "containerd shim processes whose containerd (one we asked) knows no task or container "
            "of their -id; reported, never killed",
        ),
        MetricSpec(
            "stale_shim_sockets",
            "socket files in <run>/containerd/s with nobody listening on them; reported, never removed",
        ),
        MetricSpec(
            "fifo_dirs_per_hour",
            "directories in the fifo roots made within the last hour (their mtimes): the leak rate",
        ),
        MetricSpec(
            "fifo_inodes_needed_next_hour",
            "inodes the last hour's rate of new fifo dirs needs in the next hour (4 per dir), on "
            "the filesystem that runs out first; above 100% of its limit: exhaustion within an hour",
            limit="free inodes on that filesystem (statvfs f_ffree)",
        ),
        MetricSpec(
            "fifo_inodes_exhausted_in_seconds",
            "seconds until that filesystem has no free inode at the last hour's rate (absent: no new dirs)",
            unit="seconds",
        ),
        MetricSpec(
            "orphan_fifo_dirs",
            "estimate of orphaned fifo dirs: directories in the fifo roots that no process holds a "
            "FIFO of open, never fewer than the orphans (absent when a containerd could not be "
            "asked or understood)",
        ),
    )

    def __init__(
        self,
        ctr: CtrRunner | None = None,
        roots: Sequence[FifoRoot] | None = None,
        min_age: float = DEFAULT_MIN_AGE,
        max_task_queries: int = MAX_TASK_QUERIES,
        cache: KnownIdsCache | None = KNOWN_IDS,
    ) -> None:
        self.ctr: CtrRunner = ctr if ctr is not None else CtrCli()
        # None: ask containerd at every read (tests that count the questions).
        self.cache = cache
        self.roots = tuple(roots) if roots is not None else None
        self.min_age = min_age
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
        roots = self.roots if self.roots is not None else default_roots(ctx.host)
        try:
            running = shims.SHIM_SCAN(ctx.host.proc, ctx.processes())
        except OSError:  # /proc cannot be listed: no shim seen
            running = []
        surveys = [
            survey(
                r,
                self.ctr,
                now,
                self.max_task_queries,
                serving=_shims_of(r, running),
                cache=self.cache,
            )
            for r in roots
        ]
        with_dirs = [s.root.path for s in surveys if s.dirs]
        if with_dirs:
            held, held_error = held_dirs(ctx.host.proc, with_dirs)
            if held_error is None:
                surveys = [
                    dataclasses.replace(s, held=len(held[s.root.path])) if s.dirs else s for s in surveys
                ]
            else:
                log.warning("fifo_held_scan_incomplete", error=held_error)
        readable = [s for s in surveys if s.problem is None]
        if readable:
            values["fifo_dirs"] = float(sum(s.dirs for s in readable))
        estimates = [s.orphan_estimate for s in surveys]
        if all(e is not None for e in estimates):
            values["orphan_fifo_dirs"] = float(sum(e for e in estimates if e is not None))
        if readable:
            values["fifo_dirs_per_hour"] = float(sum(s.recent for s in readable))
        limited = [s for s in readable if s.inodes_total and s.inodes_used is not None]
        if limited:
            fullest = max(limited, key=lambda s: (s.inodes_used or 0) / (s.inodes_total or 1))
            used, total = float(fullest.inodes_used or 0), float(fullest.inodes_total or 0)
            values["fifo_fs_inodes_used"] = used
            limits["fifo_fs_inodes_used"] = total
            # The forecast, per filesystem: inodes the last hour's rate needs in the next hour
            # (INODES_PER_DIR each) against the free ones; the soonest exhaustion wins.
            forecasts = [_forecast(s) for s in limited]
            need, free = max(forecasts, key=lambda f: f[0] / max(f[1], 1.0))
            values["fifo_inodes_needed_next_hour"] = need
            limits["fifo_inodes_needed_next_hour"] = free
            if need > 0:
                values["fifo_inodes_exhausted_in_seconds"] = RATE_WINDOW * free / need
        complete = all(s.complete for s in surveys)
        detail: dict[str, Any] = {
            "min_age": self.min_age,
            "roots": [s.to_dict() for s in surveys],
            "orphan_check": "complete" if complete else "incomplete",
        }
        asked = [
            (sock, s.known.ids)
            for s in surveys
            if s.known is not None and s.known.complete
            for sock in s.root.sockets
        ]
        socket_dir = ctx.host.run / "containerd" / "s"
        sockets, reused = shims.SOCKET_WATCH(ctx.host.proc, socket_dir, running)
        shim_report = shims.report(ctx.host.proc, socket_dir, asked, running, sockets)
        detail["shims"] = shim_report.to_dict() | {"sockets_checked": "reused" if reused else "now"}
        values["leaked_shims"] = float(len(shim_report.leaked))
        if shim_report.error is None:
            values["stale_shim_sockets"] = float(len(shim_report.stale))
        docker = count_docker_fifos(ctx.host, now)
        if docker is not None:
            detail["docker"] = docker
        for s in surveys:
            if not s.complete:
                log.warning(
                    "fifo_orphan_check_incomplete",
                    root=str(s.root.path),
                    problem=s.problem,
                    containerd=s.known.to_dict() if s.known else None,
                )
        return Reading(self.name, now, values, limits, detail=detail)
