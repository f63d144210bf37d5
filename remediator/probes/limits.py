"""The `limits` probe: kernel pools that every container on the host shares.

Containers isolate names, not counters. One container that opens files, spawns threads, watches
directories or fills the conntrack table exhausts the host's pool for all of them (seed case
"shared-kernel-limits"). Each pool is read as host-wide usage against the live host limit, per
uid where the kernel counts per uid, and per container where the usage can be attributed:

* `fs.file-max`: /proc/sys/fs/file-nr "allocated free max" (free is always 0 since 2.6,
  Documentation/admin-guide/sysctl/fs.rst). CAP_SYS_ADMIN processes are exempt from the limit,
  so file-nr can exceed file-max while root looks healthy: usage over 100 % is real.
* `fs.inotify.max_user_watches` / `max_user_instances`: per uid, charged to the euid that called
  inotify_init (inotify(7)), so root in every container shares root's budget with the host.
* `kernel.threads-max` / `kernel.pid_max`: nr_threads from /proc/loadavg; the limit is the
  smaller of the two. pid_max is per pid namespace since 6.14: only the host's /proc counts.
* `fs.aio-max-nr`: /proc/sys/fs/aio-nr, host-wide (not attributed: the rings are not fds).
* `kernel.keys.maxkeys` / `maxbytes`: /proc/key-users, per uid with each uid's own quota.
* `net.netfilter.nf_conntrack_max`: nf_conntrack_count of the reader's netns (the host's, when
  remediator runs in it); absent when the nf_conntrack module is not loaded, and said so. Per
  container (by the entries' source addresses) once the table is half full (limits_conntrack).
* `net.core.netdev_max_backlog`: packets dropped because a CPU's input queue was full
  (/proc/net/softnet_stat column 2); reported as new drops since this process's last reading.
* `fs.pipe-user-pages-soft`: per uid, estimated from the pipes each uid holds (16 pages each).
* `fs.epoll.max_user_watches`: per uid, from the fdinfo of eventpoll fds.

The fd-based pools come from one incremental, CPU-bounded scan (limits_fdscan); shared
instances are counted once (limits_dedup). Values that mean "no limit" (LONG_MAX in fs.file-max,
0 in the pipe limits) are not limits: no percentage of them is computed (limits_pools).
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Sequence
from typing import Any, ClassVar, cast

from remediator import handles
from remediator.clock import process_cpu_seconds
from remediator.handles import HeldPath
from remediator.host import HostRoot
from remediator.model import ContainerSample, Reading
from remediator.policy.catalog import MetricSpec
from remediator.probes.base import Inventory, Probe, ProbeContext, register
from remediator.probes.containers import connect, parse_proc_cgroup
from remediator.probes.limits_conntrack import conntrack_by_container
from remediator.probes.limits_consumers import (
    Systemctl,
    degraded_containers,
    degraded_units,
    run_systemctl,
)
from remediator.probes.limits_counters import read_counter_pools
from remediator.probes.limits_dedup import (
    AnonFd,
    EpollFd,
    F,
    FileOrder,
    InotifyFd,
    UidUsage,
    group_inotify_instances,
    group_instances,
    kcmp_file_order,
    usage_by_uid,
)
from remediator.probes.limits_exhausted import (
    Exhausted,
    boot_and_uptime,
    degraded_by_inotify,
    file_nr_slack,
    inotify_pool,
)
from remediator.probes.limits_exhausted import recall as recall_exhausted
from remediator.probes.limits_exhausted import remember as remember_exhausted
from remediator.probes.limits_exhausted import update as update_exhausted
from remediator.probes.limits_fdread import FdReader
from remediator.probes.limits_fdscan import (
    DEFAULT_CONSUMERS,
    Consumer,
    ContainerUsage,
    ProcScan,
    ScanCache,
    scan_processes,
)
from remediator.probes.limits_parse import (
    FileNr,
    InotifyWatch,
    parse_file_nr,
    parse_inotify_fdinfo,
    parse_loadavg_threads,
    parse_proc_status,
)
from remediator.probes.limits_pools import parse_mem_total, pool_key
from remediator.probes.memory import ProbeMemory

# Sysctls every host has: a missing one is a problem worth reporting.
SYSCTLS = (
    "fs.file-max",
    "fs.inotify.max_user_watches",
    "fs.inotify.max_user_instances",
    "kernel.threads-max",
    "kernel.pid_max",
)
# Sysctls of optional features (modules, config options): absent is "no data".
OPTIONAL_SYSCTLS = (
    "fs.aio-max-nr",
    "fs.aio-nr",
    "fs.epoll.max_user_watches",
    "fs.pipe-user-pages-soft",
    "fs.pipe-user-pages-hard",
    "kernel.keys.maxkeys",
    "kernel.keys.maxbytes",
    "net.netfilter.nf_conntrack_max",
    "net.netfilter.nf_conntrack_count",
    "net.core.netdev_max_backlog",
)
# CPU seconds one scan may spend re-examining processes (then it resumes next cycle). 0.5 s
# covers ~1,000 processes examined fd by fd at ~100 fds each; steady-state scans cost far less.
SCAN_CPU_BUDGET = 0.5
# State between scans, per host /proc: the daemon keeps it across cycles, `once` starts afresh.
_CACHES: dict[str, ScanCache] = {}

_HOST_LIMITS = (
    ("file_handles", "fs.file-max"),
    ("inotify_watches_max_uid", "fs.inotify.max_user_watches"),
    ("inotify_watches", "fs.inotify.max_user_watches"),
    ("inotify_instances_max_uid", "fs.inotify.max_user_instances"),
    ("inotify_instances", "fs.inotify.max_user_instances"),
    ("tasks", "kernel.threads-max"),
    ("aio_requests", "fs.aio-max-nr"),
    ("conntrack_entries", "net.netfilter.nf_conntrack_max"),
    ("epoll_watches_max_uid", "fs.epoll.max_user_watches"),
    ("epoll_watches", "fs.epoll.max_user_watches"),
    ("pipe_pages_max_uid", "fs.pipe-user-pages-soft"),
    ("pipe_pages", "fs.pipe-user-pages-soft"),
)


def _m(name: str, help: str, limit: str | None = None, per_container: bool = False) -> MetricSpec:
    return MetricSpec(name, help, limit=limit, per_container=per_container)


@register
class LimitsProbe(Probe):
    name = "limits"
    help = (
        "Shared kernel pools: file handles, inotify, tasks/pids, aio, keys, conntrack, netdev "
        "backlog drops, pipe pages, epoll watches; per uid and per container where attributable."
    )
    metrics: ClassVar[tuple[MetricSpec, ...]] = (
        _m(
            "file_handles",
            "Host: allocated file handles (file-nr). Container: open fds of its processes.",
            "fs.file-max",
            True,
        ),
        _m(
            "inotify_watches_max_uid",
            "inotify watches of the uid that holds the most (the kernel's limit is per uid).",
            "fs.inotify.max_user_watches",
        ),
        _m(
            "inotify_instances_max_uid",
            "inotify instances of the uid that holds the most (the kernel's limit is per uid).",
            "fs.inotify.max_user_instances",
        ),
        _m(
            "tasks",
            "Host: threads in the system (nr_threads). Container: threads of its processes.",
            "min(kernel.threads-max, kernel.pid_max)",
            True,
        ),
        _m(
            "inotify_watches",
            "inotify watches held by the container's processes.",
            "fs.inotify.max_user_watches",
            True,
        ),
        _m(
            "inotify_instances",
            "inotify instances held by the container's processes.",
            "fs.inotify.max_user_instances",
            True,
        ),
        _m("aio_requests", "Host: aio requests in flight (fs.aio-nr).", "fs.aio-max-nr"),
        _m(
            "keys_max_uid",
            "Keys of the uid closest to its key quota (/proc/key-users).",
            "that uid's maxkeys",
        ),
        MetricSpec(
            "key_bytes_max_uid",
            "Key bytes of the uid closest to its byte quota (/proc/key-users).",
            unit="bytes",
            limit="that uid's maxbytes",
        ),
        _m(
            "conntrack_entries",
            "Host: conntrack entries (nf_conntrack_count); absent without the module. Container: "
            "host entries from its addresses (counted once the table is half full).",
            "net.netfilter.nf_conntrack_max",
            True,
        ),
        _m(
            "netdev_backlog_drops",
            "Host: packets dropped since the previous reading because a CPU's input queue was full.",
        ),
        _m(
            "epoll_watches_max_uid",
            "epoll watches of the uid that holds the most.",
            "fs.epoll.max_user_watches",
        ),
        _m(
            "epoll_watches",
            "epoll watches held by the container's processes.",
            "fs.epoll.max_user_watches",
            True,
        ),
        _m(
            "pipe_pages_max_uid",
            "Pipe pages of the uid that holds the most (estimate: 16 pages a pipe).",
            "fs.pipe-user-pages-soft",
        ),
        _m(
            "pipe_pages",
            "Pipe pages held by the container's processes (estimate).",
            "fs.pipe-user-pages-soft",
            True,
        ),
        _m(
            "inotify_degraded",
            "Processes that rely on inotify (tail -f, kubelet, ...) holding no inotify fd "
            "while their uid's inotify pool is exhausted.",
        ),
        _m(
            "degraded_consumers",
            "inotify_degraded plus systemd services and containers that crash-looped or failed "
            "with ENFILE/EMFILE/EAGAIN while a pool was exhausted (limits_consumers).",
        ),
    )

    def __init__(
        self,
        consumers: Sequence[Consumer] = DEFAULT_CONSUMERS,
        budget: float | None = SCAN_CPU_BUDGET,
        cache: ScanCache | None = None,
        reader: FdReader | None = None,
        systemctl: Systemctl | None = None,
        units: Sequence[str] = ("kubelet.service",),
        docker: Callable[[], Any] | None = None,
    ) -> None:
        self.consumers = tuple(consumers)
        # Services judged for crash loops besides those systemd lists as failed/activating;
        # None: systemctl on the real host, nothing on a fixture tree.
        self.systemctl = systemctl
        self.units = tuple(units)
        # The Docker low-level API for crash-looping containers; None: from ctx.options.docker_url.
        self.docker = docker
        self.budget = budget
        self.cache = cache
        self.reader = reader  # None: C on the real host when built (limits_fdread.default_reader)

    @classmethod
    def held_files(cls, host: HostRoot) -> list[HeldPath]:
        return held_files(host)

    def read(self, ctx: ProbeContext) -> Reading:
        host = ctx.host
        taken_at = ctx.clock.now()
        values: dict[str, float] = {}
        limits: dict[str, float] = {}
        detail: dict[str, Any] = {}
        problems: list[str] = []

        sysctls = _read_sysctls(host, problems)
        detail["sysctls"] = sysctls
        unlimited = []
        for metric, key in _HOST_LIMITS:
            if key in sysctls:
                pool = pool_key(key)
                if pool is not None and pool.unlimited(sysctls[key]):
                    unlimited.append(key)
                    continue
                limits[metric] = sysctls[key]
        if unlimited:
            detail["no_limit"] = sorted(set(unlimited))
        if "kernel.pid_max" in sysctls:
            limits["tasks"] = min(limits.get("tasks", sysctls["kernel.pid_max"]), sysctls["kernel.pid_max"])
        try:
            detail["mem_total_bytes"] = parse_mem_total(handles.read_text(host, host.proc / "meminfo"))
        except (OSError, ValueError) as exc:
            problems.append(f"meminfo: {exc}")

        try:
            file_nr = parse_file_nr(handles.read_text(host, host.proc / "sys" / "fs" / "file-nr"))
        except (OSError, ValueError) as exc:
            problems.append(f"file-nr: {exc}")
        else:
            values["file_handles"] = file_nr.allocated
            if "fs.file-max" not in sysctls:
                limits["file_handles"] = file_nr.maximum
        try:
            values["tasks"] = parse_loadavg_threads(handles.read_text(host, host.proc / "loadavg"))
        except (OSError, ValueError) as exc:
            problems.append(f"loadavg: {exc}")
        read_counter_pools(host, sysctls, values, limits, detail, problems)

        samples: tuple[ContainerSample, ...] = ()
        inventory = ctx.inventory()
        containers_error = ctx.inventory_error()
        started = ctx.clock.now()
        cache = self.cache if self.cache is not None else _CACHES.setdefault(str(host.proc), ScanCache())
        try:
            scan = scan_processes(
                host,
                inventory,
                cache=cache,
                budget=self.budget,
                cpu=process_cpu_seconds,
                consumers=self.consumers,
                reader=self.reader,
                listing=ctx.processes(),
            )
        except OSError as exc:
            problems.append(f"/proc scan: {exc}")
            containers_error = f"/proc scan: {exc}"
        else:
            order = kcmp_file_order() if host.is_real else None
            if scan.full:
                cache.groups.clear()  # the periodic full scan also re-runs kcmp on every group
                cache.grouped.clear()
                cache.by_uid.clear()
            if "conntrack_entries" in values and inventory is not None:
                held = conntrack_by_container(
                    host,
                    inventory.containers(),
                    values["conntrack_entries"],
                    limits.get("conntrack_entries"),
                    detail,
                )
                for cid, n in held.items():
                    scan.containers.setdefault(cid, ContainerUsage()).conntrack_entries = n
            samples = _from_scan(
                host, scan, order, cache, inventory, values, limits, sysctls, detail, ctx.memory
            )
            self._degraded_others(ctx, values, detail, problems)
            if ctx.memory is not None:
                ctx.memory.flush()
            detail["scan"]["seconds"] = round(ctx.clock.now() - started, 4)

        if problems:
            detail["problems"] = problems
        error = "; ".join(problems) if not values else None
        return Reading(
            self.name,
            taken_at,
            values=values,
            limits=limits,
            containers=samples,
            detail=detail,
            error=error,
            containers_error=containers_error,
        )

    def _degraded_others(
        self, ctx: ProbeContext, values: dict[str, float], detail: dict[str, Any], problems: list[str]
    ) -> None:
        """Services and containers that crash-looped or failed with ENFILE & co. while a pool
        was exhausted (limits_consumers), next to the inotify consumers in `degraded_consumers`.
        Asks systemd and Docker nothing while no pool was exhausted this boot."""
        host, memory = ctx.host, ctx.memory
        boot, uptime = boot_and_uptime(host)
        # The pools exhausted this boot as _from_scan found them (remembered, plus this reading).
        exhausted = {
            k: Exhausted(v["first"], v["last"]) for k, v in detail.get("exhausted_pools", {}).items()
        }
        consumers = detail.setdefault("degraded_consumers", [])
        systemctl = self.systemctl
        if systemctl is None and host.is_real and (host.run / "systemd" / "system").is_dir():
            systemctl = run_systemctl  # sd_booted(3): only where systemd is the init system
        named = [*self.units, *(c["unit"] for c in consumers if c.get("unit"))]
        found: list[dict[str, Any]] = [
            u.to_dict() for u in degraded_units(systemctl, named, exhausted, memory, boot, uptime, problems)
        ]
        if exhausted and uptime is not None:
            api, client = self._docker_api(ctx, problems)
            try:
                found += [
                    c.to_dict()
                    for c in degraded_containers(
                        api, exhausted, memory, boot, uptime, ctx.clock.now(), problems
                    )
                    if c.state.id not in {d.get("container_id") for d in consumers}
                ]
            finally:
                if client is not None:
                    client.close()
        consumers += found
        values["degraded_consumers"] = values.get("inotify_degraded", 0) + len(found)

    def _docker_api(self, ctx: ProbeContext, problems: list[str]) -> tuple[Any, Any]:
        """(the low-level API, the client to close when done, if this connected it)."""
        if self.docker is not None:
            return self.docker(), None
        if ctx.options.docker_url is None:
            return None, None
        try:
            client = connect(ctx.options.docker_url, ctx.options.docker_timeout, attempts=1)
        except Exception as exc:  # Docker down: no container consumers this reading
            problems.append(f"docker: {exc}")
            return None, None
        return client.api, client


def held_files(host: HostRoot) -> list[HeldPath]:
    """The files a read of this probe needs for the pools it judges: the daemon holds them open
    (remediator/handles.py), so that they can be read when the host is out of file handles.
    key-users (a line per uid) and softnet_stat (a line per CPU) are seq_files of many records."""
    paths = [host.proc / "meminfo", host.proc / "sys" / "fs" / "file-nr", host.proc / "loadavg"]
    paths += [host.sysctl_path(k) for k in SYSCTLS + OPTIONAL_SYSCTLS]
    return [
        *(HeldPath(p) for p in paths),
        HeldPath(host.proc / "key-users", records=True),
        HeldPath(host.proc / "net" / "softnet_stat", records=True),
    ]


def _read_sysctls(host: HostRoot, problems: list[str]) -> dict[str, int]:
    sysctls: dict[str, int] = {}
    for key in SYSCTLS + OPTIONAL_SYSCTLS:
        try:
            sysctls[key] = int(handles.read_sysctl(host, key))
        except (OSError, ValueError) as exc:
            if key in SYSCTLS:
                problems.append(f"{key}: {exc}")
    return sysctls


def systemd_unit(host: HostRoot, pid: int) -> str | None:
    """The system service a host process runs in ("kubelet.service"), from its cgroup path;
    None for scopes (a login session's `tail -f`), slices, user units and unreadable processes."""
    try:
        paths = parse_proc_cgroup(host.read_text(host.proc / str(pid) / "cgroup"))
    except OSError:
        return None
    path = paths.get("name=systemd") or paths.get("") or ""
    if "/user@" in path:
        return None  # a user manager's unit: `systemctl restart` of the system would not find it
    last = path.rstrip("/").rsplit("/", 1)[-1]
    return last if last.endswith(".service") else None


def _from_scan(
    host: HostRoot,
    scan: ProcScan,
    order: FileOrder | None,
    cache: ScanCache,
    inventory: Inventory | None,
    values: dict[str, float],
    limits: dict[str, float],
    sysctls: dict[str, int],
    detail: dict[str, Any],
    memory: ProbeMemory | None = None,
) -> tuple[ContainerSample, ...]:
    inotify = _grouped(cache, "inotify", scan.inotify_fds, order)
    epoll = _grouped(cache, "epoll", scan.epoll_fds, order)
    ino_uid, ep_uid = _by_uid(cache, "inotify", inotify), _by_uid(cache, "epoll", epoll)
    values["inotify_watches_max_uid"] = max((u.watches for u in ino_uid.values()), default=0)
    values["inotify_instances_max_uid"] = max((u.instances for u in ino_uid.values()), default=0)
    values["epoll_watches_max_uid"] = max((u.watches for u in ep_uid.values()), default=0)
    values["pipe_pages_max_uid"] = max(scan.pipe_pages_by_uid.values(), default=0)
    detail["inotify_by_uid"] = {
        str(uid): {"instances": u.instances, "watches": u.watches} for uid, u in ino_uid.items()
    }
    detail["epoll_by_uid"] = {
        str(uid): {"instances": u.instances, "watches": u.watches} for uid, u in ep_uid.items()
    }
    detail["pipe_pages_by_uid"] = {str(uid): n for uid, n in scan.pipe_pages_by_uid.items()}

    # Degraded consumers: they rely on inotify and hold none, and their uid's pool is exhausted
    # now or was when this process last saw it (a raise does not heal them).
    max_w, max_i = sysctls.get("fs.inotify.max_user_watches"), sysctls.get("fs.inotify.max_user_instances")
    exhausted = {
        uid
        for uid, u in ino_uid.items()
        if (max_w is not None and u.watches >= max_w) or (max_i is not None and u.instances >= max_i)
    }
    cache.inotify_exhausted |= exhausted
    # Remembered in the state dir (limits_exhausted): a restarted daemon still knows which pools
    # ran dry this boot, and when, so consumers that started before that stay reported.
    boot, uptime = boot_and_uptime(host)
    known = recall_exhausted(memory, boot)
    now_ex = [inotify_pool(uid) for uid in sorted(exhausted)]
    # file-nr is a per-CPU counter that can read short of the truth (file_nr_slack).
    slack = {"file_handles": file_nr_slack(), "tasks": 0}
    now_ex += [m for m in slack if limits.get(m) and values.get(m, 0) >= limits[m] - slack[m]]
    if uptime is not None and now_ex:
        known = update_exhausted(known, now_ex, uptime)
        remember_exhausted(memory, boot, known)
    detail["exhausted_pools"] = {k: {"first": v.first, "last": v.last} for k, v in sorted(known.items())}
    degraded = degraded_by_inotify(scan.consumers, known, cache.inotify_exhausted)
    values["inotify_degraded"] = len(degraded)
    detail["inotify_exhausted_uids"] = sorted(exhausted)
    detail["degraded_consumers"] = [
        {
            "pid": c.pid,
            "starttime": c.starttime,
            "name": c.name,
            "uid": c.uid,
            "pool": "inotify",
            "container": c.container.name if c.container else None,
            "container_id": c.container.id if c.container else None,
            "unit": None if c.container else systemd_unit(host, c.pid),
        }
        for c in degraded
    ]
    detail["scan"] = {
        "pids": scan.pids,
        "fds": scan.fds,
        "inotify_fds": len(scan.inotify_fds),
        "inotify_instances": len(inotify),
        "epoll_instances": len(epoll),
        "vanished": scan.vanished,
        "denied": scan.denied,
        "denied_fds": scan.denied_fds,
        "unparsable": scan.unparsable,
        "examined": scan.examined,
        "reused": scan.reused,
        "refreshed": scan.refreshed,
        "stale": scan.stale,
        "unexamined": scan.unexamined,
        "full": scan.full,
        "budget_exhausted": scan.budget_exhausted,
        "fd_dedup": "kcmp" if order is not None else "none",
        "reader": scan.reader,
    }
    return _container_samples(inventory, scan, inotify, epoll)


def _grouped(cache: ScanCache, kind: str, fds: Sequence[F], order: FileOrder | None) -> list[tuple[F, ...]]:
    """group_instances, or its last answer when `fds` are the very objects it grouped then: the
    steady state, where every process kept its watches (limits_totals hands out the same fd
    objects, in the same tuple while none changed). Any watch list re-read and found different
    makes new ones, and a full grouping."""
    last = cache.grouped.get(kind)
    if last is not None and (
        last[0] is fds or (len(last[0]) == len(fds) and all(map(operator.is_, last[0], fds)))
    ):
        return cast("list[tuple[F, ...]]", last[1])
    instances = group_instances(fds, order, cache.groups.setdefault(kind, {}))
    kept = fds if isinstance(fds, tuple) else tuple(fds)
    cache.grouped[kind] = (kept, cast("list[tuple[AnonFd, ...]]", instances))
    return instances


def _by_uid(
    cache: ScanCache, kind: str, instances: Sequence[tuple[InotifyFd, ...]] | Sequence[tuple[EpollFd, ...]]
) -> dict[int, UidUsage]:
    """usage_by_uid, or its last answer when `instances` is the very grouping it counted then
    (`_grouped` hands the same list back while no watch list changed). Read, never changed."""
    last = cache.by_uid.get(kind)
    if last is not None and last[0] is instances:
        return last[1]
    usage = usage_by_uid(instances)
    cache.by_uid[kind] = (instances, usage)
    return usage


def _container_samples(
    inventory: Inventory | None,
    scan: ProcScan,
    inotify: Sequence[tuple[InotifyFd, ...]],
    epoll: Sequence[tuple[EpollFd, ...]],
) -> tuple[ContainerSample, ...]:
    if inventory is None:
        return ()
    for instance in inotify:
        container = scan.pid_container.get(instance[0].pid)
        if container is not None:
            usage = scan.containers[container.id]
            usage.inotify_instances += 1
            usage.inotify_watches += len(instance[0].watches)
    for ep in epoll:
        container = scan.pid_container.get(ep[0].pid)
        if container is not None:
            scan.containers[container.id].epoll_watches += len(ep[0].watches)
    samples = []
    for ref in inventory.containers():
        usage = scan.containers.get(ref.id) or _NO_USAGE
        samples.append(
            ContainerSample.owning(
                ref,
                {
                    "file_handles": usage.file_handles,
                    "tasks": usage.tasks,
                    "inotify_watches": usage.inotify_watches,
                    "inotify_instances": usage.inotify_instances,
                    "epoll_watches": usage.epoll_watches,
                    "pipe_pages": usage.pipe_pages,
                    "conntrack_entries": usage.conntrack_entries,
                },
            )
        )
    return tuple(samples)


_NO_USAGE = ContainerUsage()  # a container no process of which was seen: read, never changed

# Names the tests and the benchmark import from here (they predate the split).
inotify_by_uid = usage_by_uid

__all__ = [
    "OPTIONAL_SYSCTLS",
    "SCAN_CPU_BUDGET",
    "SYSCTLS",
    "ContainerUsage",
    "FileNr",
    "FileOrder",
    "InotifyFd",
    "InotifyWatch",
    "LimitsProbe",
    "ProcScan",
    "group_inotify_instances",
    "inotify_by_uid",
    "kcmp_file_order",
    "parse_file_nr",
    "parse_inotify_fdinfo",
    "parse_loadavg_threads",
    "parse_proc_status",
    "scan_processes",
]
