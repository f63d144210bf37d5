"""The `limits` probe: kernel limits that every container on the host shares.

Containers isolate names, not counters. One container that opens files, spawns threads or
watches directories without bound exhausts the host's limit for all of them (seed case
"shared-kernel-limits"):

* `fs.file-max` bounds open file handles host-wide. `/proc/sys/fs/file-nr` shows "allocated
  free max"; the free count is always 0 since Linux 2.6 (Documentation/admin-guide/sysctl/fs.rst,
  "file-max & file-nr").
* `fs.inotify.max_user_watches` / `max_user_instances` are per user, not per container:
  inotify(7) "/proc interfaces". The kernel charges an instance and its watches to the ucounts
  of the effective uid that called inotify_init (fs/notify/inotify/inotify_user.c), so every
  container running as root shares root's budget with the host. We do not see the creator's
  uid; we use the effective uid of the process holding the fd now, which is the same unless
  the process changed uid afterwards.
* `kernel.threads-max` bounds the number of tasks (threads) host-wide; fork fails with EAGAIN
  at the limit (fork(2)). `kernel.pid_max` bounds them too, as every thread takes a pid; the
  `tasks` limit is the smaller of the two (on small hosts pid_max, 32768, binds long before
  threads-max).

Host-wide counts come from cheap kernel counters (file-nr, the thread count in /proc/loadavg).
inotify usage and all per-container attribution come from one scan of /proc/<pid>/fd: an fd
whose link reads "anon_inode:inotify" is an inotify instance; its fdinfo lists one
"inotify wd:..." line per watch (proc(5), /proc/<pid>/fdinfo). Processes and fds vanish during
the scan; those are skipped (ENOENT / ESRCH), never an error.

One inotify instance can sit behind several fds (dup, or inherited across fork), while the
kernel counts it once. Every instance shows the same anonymous inode, so fds are compared with
kcmp(2) KCMP_FILE, and only when their watch lists are identical: different watch lists are
different instances. kcmp orders files (a total order on obfuscated kernel pointers, stable
within a boot), so fds with the same watch list are sorted with it and equal neighbours merged:
O(n log n) comparisons where pairwise checks would be O(n^2) (2,000 workers watching the same
files took 6.4 s pairwise). Without kcmp (unknown architecture, fixture trees) each fd counts as
one instance, which can only over-count.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import os
import platform
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from remediator.host import HostRoot
from remediator.model import ContainerRef, ContainerSample, Reading
from remediator.policy.catalog import MetricSpec
from remediator.probes.base import Inventory, Probe, ProbeContext, register

INOTIFY_LINK = "anon_inode:inotify"

SYSCTLS = (
    "fs.file-max",
    "fs.inotify.max_user_watches",
    "fs.inotify.max_user_instances",
    "kernel.threads-max",
    "kernel.pid_max",
)

# ---------------------------------------------------------------------------------------------
# Parsers (pure)
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FileNr:
    allocated: int
    free: int  # always 0 since Linux 2.6: freed handles are released, not kept in a pool
    maximum: int  # the same value as fs.file-max


def parse_file_nr(text: str) -> FileNr:
    fields = text.split()
    if len(fields) != 3:
        raise ValueError(f"file-nr: expected 3 numbers, got {text!r}")
    try:
        allocated, free, maximum = (int(f) for f in fields)
    except ValueError:
        raise ValueError(f"file-nr: expected 3 numbers, got {text!r}") from None
    return FileNr(allocated, free, maximum)


@dataclass(frozen=True)
class InotifyWatch:
    """One "inotify wd:..." line of an inotify fd's fdinfo (numbers are hex in the file)."""

    wd: int
    ino: int  # inode watched
    sdev: int  # its device, kernel-internal encoding
    mask: int


def parse_inotify_fdinfo(text: str) -> tuple[InotifyWatch, ...]:
    """/proc/<pid>/fdinfo/<fd> of an inotify fd -> its watches.

    fs/notify/fdinfo.c prints "inotify wd:%x ino:%lx sdev:%x mask:%x ignored_mask:%x" followed by
    the file handle; all numbers hexadecimal. An instance without watches has no such lines.
    """
    watches = []
    for line in text.splitlines():
        if not line.startswith("inotify "):
            continue
        fields = dict(tok.split(":", 1) for tok in line.split()[1:] if ":" in tok)
        try:
            watches.append(
                InotifyWatch(
                    wd=int(fields["wd"], 16),
                    ino=int(fields["ino"], 16),
                    sdev=int(fields["sdev"], 16),
                    mask=int(fields["mask"], 16),
                )
            )
        except (KeyError, ValueError):
            raise ValueError(f"fdinfo: cannot parse inotify line {line!r}") from None
    return tuple(watches)


@dataclass(frozen=True)
class ProcStatus:
    """The lines of /proc/<pid>/status that remediator uses."""

    name: str
    uids: tuple[int, int, int, int]  # real, effective, saved set, filesystem (proc(5))
    threads: int

    @property
    def euid(self) -> int:
        return self.uids[1]


def parse_proc_status(text: str) -> ProcStatus:
    name = ""
    uids: tuple[int, int, int, int] | None = None
    threads = 1
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key == "Name":
            name = value.strip()
        elif key == "Uid":
            parts = value.split()
            if len(parts) != 4:
                raise ValueError(f"status: expected 4 uids, got {line!r}")
            uids = (int(parts[0]), int(parts[1]), int(parts[2]), int(parts[3]))
        elif key == "Threads":
            threads = int(value)
    if uids is None:
        raise ValueError("status: no Uid line")
    return ProcStatus(name, uids, threads)


def parse_loadavg_threads(text: str) -> int:
    """/proc/loadavg "0.12 0.08 0.03 1/145 8142" -> 145, the kernel's nr_threads.

    nr_threads is exactly what copy_process() compares against kernel.threads-max.
    """
    fields = text.split()
    if len(fields) < 4 or "/" not in fields[3]:
        raise ValueError(f"loadavg: unexpected format {text!r}")
    return int(fields[3].split("/", 1)[1])


# ---------------------------------------------------------------------------------------------
# inotify instances (pure, given a way to compare fds)
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class InotifyFd:
    pid: int
    fd: int
    uid: int  # effective uid of the holding process
    watches: tuple[InotifyWatch, ...]

    @property
    def signature(self) -> tuple[tuple[int, int, int, int], ...]:
        return tuple(sorted((w.wd, w.ino, w.sdev, w.mask) for w in self.watches))


# Orders the open files behind two fds: <0, 0 (the same file) or >0; None when it cannot tell
# (a process exited meanwhile), which counts as "not the same".
FileOrder = Callable[[InotifyFd, InotifyFd], int | None]


def _pid_fd(f: InotifyFd) -> tuple[int, int]:
    return f.pid, f.fd


def group_inotify_instances(
    fds: Sequence[InotifyFd], order: FileOrder | None = None
) -> list[tuple[InotifyFd, ...]]:
    """Group fds that are the same inotify instance: one tuple per instance, each sorted by
    (pid, fd), the instances by their first member.

    Two fds of one instance show the same watch list at the same instant, so only fds with
    equal watch lists are compared (`order`, kcmp on a real host): sorted by it, the fds of one
    file are neighbours. Without `order` every fd is its own instance.
    """
    by_signature: dict[tuple[tuple[int, int, int, int], ...], list[InotifyFd]] = defaultdict(list)
    for fd in fds:
        by_signature[fd.signature].append(fd)
    instances: list[tuple[InotifyFd, ...]] = []
    for group in by_signature.values():
        if order is None or len(group) == 1:
            instances.extend((fd,) for fd in group)
            continue

        ordered, unknown = _sort_files(group, order)
        instances.extend((fd,) for fd in unknown)  # cannot be compared: counted on their own
        current: list[InotifyFd] = []
        for fd in ordered:
            if current and order(current[0], fd) == 0:
                current.append(fd)
                continue
            if current:
                instances.append(tuple(sorted(current, key=_pid_fd)))
            current = [fd]
        if current:
            instances.append(tuple(sorted(current, key=_pid_fd)))
    return sorted(instances, key=lambda i: _pid_fd(i[0]))


def _sort_files(group: list[InotifyFd], order: FileOrder) -> tuple[list[InotifyFd], list[InotifyFd]]:
    """Sort fds by their open file. Fds that cannot be compared (their process exited during the
    scan) are taken out and returned apart, so that they do not split a run of equal files."""
    gone: list[InotifyFd] = []
    newly_gone: set[InotifyFd] = set()

    def compare(a: InotifyFd, b: InotifyFd) -> int:
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


# kcmp(2) has no libc wrapper; syscall numbers from the kernel's syscall tables.
_KCMP_SYSCALL = {"x86_64": 312, "aarch64": 272, "riscv64": 272}
_KCMP_FILE = 0
_KCMP_RESULT = {0: 0, 1: -1, 2: 1}


def kcmp_file_order() -> FileOrder | None:
    """An ordering backed by kcmp(2) KCMP_FILE, or None when this architecture has no entry.

    kcmp needs PTRACE_MODE_READ on both processes: the same right that reading their
    /proc/<pid>/fd needs. It only compares; it changes nothing.
    """
    nr = _KCMP_SYSCALL.get(platform.machine())
    if nr is None:
        return None
    try:
        syscall = ctypes.CDLL(None, use_errno=True).syscall
    except (OSError, AttributeError):
        return None
    c_long = ctypes.c_long

    def order(a: InotifyFd, b: InotifyFd) -> int | None:
        # 0 = same file, 1 = a's is lower, 2 = a's is higher; -1 = error (a process exited),
        # 3 = different but unordered (not for KCMP_FILE on current kernels).
        args = (nr, a.pid, b.pid, _KCMP_FILE, a.fd, b.fd)
        # Pass every argument as a long: syscall(2) is variadic and kcmp's idx1/idx2 are
        # unsigned long, so a plain int could leave garbage in the upper half of the register.
        result = syscall(*(c_long(x) for x in args))
        return _KCMP_RESULT.get(result)

    return order


# ---------------------------------------------------------------------------------------------
# The /proc scan
# ---------------------------------------------------------------------------------------------


@dataclass
class ContainerUsage:
    file_handles: int = 0
    tasks: int = 0
    inotify_watches: int = 0
    inotify_instances: int = 0


@dataclass
class ProcScan:
    """What one pass over /proc/<pid>/fd found."""

    pids: int = 0
    fds: int = 0
    vanished: int = 0  # processes gone between listing /proc and reading them
    denied: int = 0  # processes whose fds we may not read (not root): counts are lower bounds
    denied_fds: int = 0  # single fds we may not inspect (EACCES, LSM): inotify counts are lower bounds
    unparsable: int = 0  # inotify fds whose fdinfo we could not parse
    inotify_fds: list[InotifyFd] = field(default_factory=list)
    pid_container: dict[int, ContainerRef] = field(default_factory=dict)  # container pids only
    containers: dict[str, ContainerUsage] = field(default_factory=dict)


def _gone(exc: OSError) -> bool:
    return exc.errno in (errno.ENOENT, errno.ESRCH)


def scan_processes(host: HostRoot, inventory: Inventory | None) -> ProcScan:
    """Count fds and inotify fds per process, attributing processes to containers.

    Raises OSError only when /proc itself cannot be listed.
    """
    scan = ProcScan()
    refs = inventory.containers() if inventory is not None else []
    for ref in refs:
        scan.containers[ref.id] = ContainerUsage()
    with os.scandir(host.proc) as entries:
        pids = sorted(int(e.name) for e in entries if e.name.isdigit())
    proc = str(host.proc)
    for pid in pids:
        # Plain strings, not Path objects: this loop runs once per fd on the host, and pathlib's
        # joins cost as much as the readlink itself (benchmarks/limits_scan.py).
        pid_dir = f"{proc}/{pid}"
        fd_dir = f"{pid_dir}/fd"
        try:
            names = os.listdir(fd_dir)
        except OSError as exc:
            if _gone(exc):
                scan.vanished += 1
            else:
                scan.denied += 1
            continue
        scan.pids += 1
        scan.fds += len(names)

        inotify: list[tuple[int, tuple[InotifyWatch, ...]]] = []
        for name in names:
            try:
                if os.readlink(f"{fd_dir}/{name}") != INOTIFY_LINK:
                    continue
                watches = parse_inotify_fdinfo(host.read_text(Path(f"{pid_dir}/fdinfo/{name}")))
            except OSError as exc:
                if not _gone(exc):  # not merely closed since listed or the process exited
                    scan.denied_fds += 1
                continue
            except ValueError:
                scan.unparsable += 1  # a fdinfo format we do not know: skip, but say so
                continue
            inotify.append((int(name), watches))

        container = inventory.container_of_pid(pid) if refs and inventory is not None else None
        if container is None and not inotify:
            continue
        try:
            status = parse_proc_status(host.read_text(Path(f"{pid_dir}/status")))
        except (OSError, ValueError):
            scan.vanished += 1
            continue
        scan.inotify_fds.extend(InotifyFd(pid, fd, status.euid, w) for fd, w in inotify)
        if container is not None:
            scan.pid_container[pid] = container
            usage = scan.containers.setdefault(container.id, ContainerUsage())
            usage.file_handles += len(names)
            usage.tasks += status.threads
    return scan


@dataclass(frozen=True)
class InotifyUsage:
    instances: int
    watches: int


def inotify_by_uid(instances: Sequence[tuple[InotifyFd, ...]]) -> dict[int, InotifyUsage]:
    tally: dict[int, list[int]] = defaultdict(lambda: [0, 0])
    for instance in instances:
        owner = instance[0]
        tally[owner.uid][0] += 1
        tally[owner.uid][1] += len(owner.watches)
    return {uid: InotifyUsage(n, w) for uid, (n, w) in sorted(tally.items())}


# ---------------------------------------------------------------------------------------------
# The probe
# ---------------------------------------------------------------------------------------------


@register
class LimitsProbe(Probe):
    name = "limits"
    help = (
        "Shared kernel limits: file handles (fs.file-max), inotify watches and instances per "
        "uid (fs.inotify.max_user_*), tasks (kernel.threads-max), with per-container usage."
    )
    metrics: ClassVar[tuple[MetricSpec, ...]] = (
        MetricSpec(
            "file_handles",
            "Host: allocated file handles (file-nr). Container: open fds of its processes.",
            limit="fs.file-max",
            per_container=True,
        ),
        MetricSpec(
            "inotify_watches_max_uid",
            "inotify watches of the uid that holds the most (the kernel's limit is per uid).",
            limit="fs.inotify.max_user_watches",
        ),
        MetricSpec(
            "inotify_instances_max_uid",
            "inotify instances of the uid that holds the most (the kernel's limit is per uid).",
            limit="fs.inotify.max_user_instances",
        ),
        MetricSpec(
            "tasks",
            "Host: threads in the system (nr_threads). Container: threads of its processes.",
            limit="min(kernel.threads-max, kernel.pid_max)",
            per_container=True,
        ),
        MetricSpec(
            "inotify_watches",
            "inotify watches held by the container's processes.",
            limit="fs.inotify.max_user_watches",
            per_container=True,
        ),
        MetricSpec(
            "inotify_instances",
            "inotify instances held by the container's processes.",
            limit="fs.inotify.max_user_instances",
            per_container=True,
        ),
    )

    def read(self, ctx: ProbeContext) -> Reading:
        host = ctx.host
        taken_at = ctx.clock.now()
        values: dict[str, float] = {}
        limits: dict[str, float] = {}
        detail: dict[str, Any] = {}
        problems: list[str] = []

        sysctls: dict[str, int] = {}
        for key in SYSCTLS:
            try:
                sysctls[key] = int(host.read_sysctl(key))
            except (OSError, ValueError) as exc:
                problems.append(f"{key}: {exc}")
        detail["sysctls"] = sysctls
        for metric, key in (
            ("file_handles", "fs.file-max"),
            ("inotify_watches_max_uid", "fs.inotify.max_user_watches"),
            ("inotify_watches", "fs.inotify.max_user_watches"),
            ("inotify_instances_max_uid", "fs.inotify.max_user_instances"),
            ("inotify_instances", "fs.inotify.max_user_instances"),
            ("tasks", "kernel.threads-max"),
        ):
            if key in sysctls:
                limits[metric] = sysctls[key]
        if "kernel.pid_max" in sysctls:
            limits["tasks"] = min(limits.get("tasks", sysctls["kernel.pid_max"]), sysctls["kernel.pid_max"])

        try:
            file_nr = parse_file_nr(host.read_text(host.proc / "sys" / "fs" / "file-nr"))
        except (OSError, ValueError) as exc:
            problems.append(f"file-nr: {exc}")
        else:
            values["file_handles"] = file_nr.allocated
            limits.setdefault("file_handles", file_nr.maximum)

        try:
            values["tasks"] = parse_loadavg_threads(host.read_text(host.proc / "loadavg"))
        except (OSError, ValueError) as exc:
            problems.append(f"loadavg: {exc}")

        samples: tuple[ContainerSample, ...] = ()
        inventory = ctx.inventory()
        containers_error = ctx.inventory_error()
        started = ctx.clock.now()
        try:
            scan = scan_processes(host, inventory)
        except OSError as exc:
            problems.append(f"/proc scan: {exc}")
            containers_error = f"/proc scan: {exc}"
        else:
            order = kcmp_file_order() if host.is_real else None
            instances = group_inotify_instances(scan.inotify_fds, order)
            by_uid = inotify_by_uid(instances)
            values["inotify_watches_max_uid"] = max((u.watches for u in by_uid.values()), default=0)
            values["inotify_instances_max_uid"] = max((u.instances for u in by_uid.values()), default=0)
            detail["inotify_by_uid"] = {
                str(uid): {"instances": u.instances, "watches": u.watches} for uid, u in by_uid.items()
            }
            detail["scan"] = {
                "pids": scan.pids,
                "fds": scan.fds,
                "inotify_fds": len(scan.inotify_fds),
                "inotify_instances": len(instances),
                "vanished": scan.vanished,
                "denied": scan.denied,
                "denied_fds": scan.denied_fds,
                "unparsable": scan.unparsable,
                "fd_dedup": "kcmp" if order is not None else "none",
                "seconds": round(ctx.clock.now() - started, 4),
            }
            samples = _container_samples(inventory, scan, instances)

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


def _container_samples(
    inventory: Inventory | None, scan: ProcScan, instances: Sequence[tuple[InotifyFd, ...]]
) -> tuple[ContainerSample, ...]:
    if inventory is None:
        return ()
    for instance in instances:
        container = scan.pid_container.get(instance[0].pid)
        if container is not None:
            usage = scan.containers[container.id]
            usage.inotify_instances += 1
            usage.inotify_watches += len(instance[0].watches)
    samples = []
    for ref in inventory.containers():
        usage = scan.containers.get(ref.id, ContainerUsage())
        samples.append(
            ContainerSample(
                ref,
                {
                    "file_handles": usage.file_handles,
                    "tasks": usage.tasks,
                    "inotify_watches": usage.inotify_watches,
                    "inotify_instances": usage.inotify_instances,
                },
            )
        )
    return tuple(samples)


__all__ = [
    "SYSCTLS",
    "ContainerUsage",
    "FileNr",
    "InotifyFd",
    "InotifyUsage",
    "InotifyWatch",
    "LimitsProbe",
    "ProcScan",
    "ProcStatus",
    "group_inotify_instances",
    "inotify_by_uid",
    "kcmp_file_order",
    "parse_file_nr",
    "parse_inotify_fdinfo",
    "parse_loadavg_threads",
    "parse_proc_status",
    "scan_processes",
]
