"""The `dentries` probe: the dentry cache, host-wide and per container memory cgroup.

A container that stats or opens millions of names that do not exist (a cache probing for
files, a `PATH` search loop) leaves millions of *negative* dentries behind. They are reclaimable,
so nothing limits them until memory pressure, and every tenant pays for the long hash chains and
the reclaim work (seed case "dentry-cache-isolation-story").

Sources:

* `/proc/sys/fs/dentry-state`: six longs, Documentation/admin-guide/sysctl/fs.rst
  ("dentry-state"): nr_dentry, nr_unused, age_limit (seconds), want_pages, nr_negative, dummy.
  nr_negative exists since Linux 5.0 (commit af0c9af1b3f6, "fs/dcache: Track & report number of
  negative dentries"); before that the field was a dummy 0, so we report no `negative` metric on
  older kernels rather than a false 0.
* `/proc/slabinfo` (slabinfo(5), version 2.1): the `dentry` cache's size. Root-only (mode 0400);
  without it `slab_bytes` is absent, not an error.
* The container's memory cgroup, for `slab_reclaimable_bytes`:
  - cgroup v2: `memory.stat` key `slab_reclaimable` (Documentation/admin-guide/cgroup-v2.rst):
    reclaimable slab charged to the cgroup and its descendants. Dentries and inodes are most of
    it, but it is every reclaimable cache, not only dentries.
  - cgroup v1: `memory.stat` has no slab keys (checked on Linux 6.18: cache, rss, shmem,
    mapped_file, ... only; v1 never got the per-memcg slab counters that v2 shows). We still use
    `slab_reclaimable` if a kernel ever offers it there, else `memory.kmem.usage_in_bytes`: all
    kernel memory charged to the cgroup (slab, reclaimable or not, kernel stacks, page tables),
    hierarchical like the v2 value. It is an upper bound of the reclaimable slab, and it is 0
    when kmem accounting is off (boot option `cgroup.memory=nokmem`). `detail["slab_source"]`
    says which one a reading used.
"""

from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from remediator.host import HostRoot
from remediator.model import ContainerSample, Reading
from remediator.policy.catalog import MetricSpec
from remediator.probes.base import Probe, ProbeContext, register

DENTRY_SLAB = "dentry"  # the kmem_cache name fs/dcache.c creates (dcache_init)


@dataclass(frozen=True)
class DentryState:
    """/proc/sys/fs/dentry-state, field for field."""

    nr_dentry: int  # allocated dentries
    nr_unused: int  # on the LRU lists: cached, no user, reclaimable
    age_limit: int  # seconds; historical, the kernel does not use it
    want_pages: int  # historical, always 0
    nr_negative: int  # unused negative dentries (Linux >= 5.0; a dummy 0 before)
    dummy: int


def parse_dentry_state(text: str) -> DentryState:
    fields = text.split()
    if len(fields) != 6:
        raise ValueError(f"dentry-state: expected 6 numbers, got {len(fields)}: {text!r}")
    try:
        numbers = [int(f) for f in fields]
    except ValueError:
        raise ValueError(f"dentry-state: expected 6 numbers: {text!r}") from None
    return DentryState(*numbers)


@dataclass(frozen=True)
class SlabCache:
    """One line of /proc/slabinfo 2.1 (the tunables are SLAB-only and not kept)."""

    name: str
    active_objs: int
    num_objs: int
    objsize: int  # bytes per object
    objperslab: int
    pagesperslab: int
    active_slabs: int
    num_slabs: int

    @property
    def size_bytes(self) -> int:
        """Bytes in allocated objects. Slab pages also hold slack, so the pages used are more."""
        return self.num_objs * self.objsize


_SLABINFO_HEADER = re.compile(r"^slabinfo - version: 2\.\d+\s*$")


def parse_slabinfo(text: str) -> dict[str, SlabCache]:
    """/proc/slabinfo version 2.x -> {cache name: SlabCache}.

    Line format (slabinfo(5)): "name active_objs num_objs objsize objperslab pagesperslab
    : tunables limit batchcount sharedfactor : slabdata active_slabs num_slabs sharedavail".
    """
    lines = text.splitlines()
    if not lines or not _SLABINFO_HEADER.match(lines[0]):
        head = lines[0] if lines else ""
        raise ValueError(f"slabinfo: expected 'slabinfo - version: 2.x', got {head!r}")
    caches: dict[str, SlabCache] = {}
    for line in lines[1:]:
        if not line.strip() or line.startswith("#"):
            continue
        sections = [s.split() for s in line.split(":")]
        if len(sections) != 3 or len(sections[0]) != 6 or len(sections[2]) != 4:
            raise ValueError(f"slabinfo: cannot parse line {line!r}")
        name, *counts = sections[0]
        slabdata = sections[2]  # ["slabdata", active_slabs, num_slabs, sharedavail]
        try:
            active_objs, num_objs, objsize, objperslab, pagesperslab = (int(c) for c in counts)
            active_slabs, num_slabs = int(slabdata[1]), int(slabdata[2])
        except ValueError:
            raise ValueError(f"slabinfo: cannot parse line {line!r}") from None
        caches[name] = SlabCache(
            name, active_objs, num_objs, objsize, objperslab, pagesperslab, active_slabs, num_slabs
        )
    return caches


def parse_flat_keyed(text: str) -> dict[str, int]:
    """A cgroup "flat keyed" file such as memory.stat: one "key value" per line."""
    out: dict[str, int] = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 2:
            try:
                out[parts[0]] = int(parts[1])
            except ValueError:
                continue
    return out


def parse_kernel_release(text: str) -> tuple[int, int] | None:
    """/proc/sys/kernel/osrelease "6.18.44-fc-v595" -> (6, 18)."""
    m = re.match(r"\s*(\d+)\.(\d+)", text)
    return (int(m.group(1)), int(m.group(2))) if m else None


@dataclass(frozen=True)
class MemoryHierarchy:
    """Where the memory controller is mounted and which cgroup version it is."""

    version: int  # 1 or 2
    root: Path

    def stat_path(self, cgroup: str) -> Path:
        return self._dir(cgroup) / "memory.stat"

    def kmem_usage_path(self, cgroup: str) -> Path:
        return self._dir(cgroup) / "memory.kmem.usage_in_bytes"

    def _dir(self, cgroup: str) -> Path:
        return self.root.joinpath(*[p for p in cgroup.split("/") if p not in ("", ".", "..")])


def find_memory_hierarchy(host: HostRoot) -> MemoryHierarchy | None:
    """Pure v2 (memory listed in <cgroup>/cgroup.controllers), else v1 (<cgroup>/memory).

    A hybrid host (systemd's "hybrid" mode, this project's test VM) mounts cgroup2 at
    <cgroup>/unified without controllers and the memory controller on v1, so v1 wins there.
    """
    if "memory" in _controllers(host, host.cgroup):
        return MemoryHierarchy(2, host.cgroup)
    if (host.cgroup / "memory" / "memory.stat").is_file():
        return MemoryHierarchy(1, host.cgroup / "memory")
    # Hybrid with the memory controller given to v2 instead: unusual, but valid.
    if "memory" in _controllers(host, host.cgroup / "unified"):
        return MemoryHierarchy(2, host.cgroup / "unified")
    return None


def _controllers(host: HostRoot, v2_root: Path) -> list[str]:
    try:
        return host.read_text(v2_root / "cgroup.controllers").split()
    except OSError:
        return []


@register
class DentriesProbe(Probe):
    name = "dentries"
    help = "The dentry cache: allocated, unused and negative dentries and their slab memory."
    metrics: ClassVar[tuple[MetricSpec, ...]] = (
        MetricSpec("total", "Allocated dentries (dentry-state nr_dentry)."),
        MetricSpec("unused", "Unused (cached, reclaimable) dentries (dentry-state nr_unused)."),
        MetricSpec(
            "negative",
            "Unused negative dentries (dentry-state nr_negative; Linux >= 5.0, else no data).",
        ),
        MetricSpec(
            "slab_bytes",
            "Bytes of the dentry slab cache (num_objs * objsize from /proc/slabinfo).",
            unit="bytes",
        ),
        MetricSpec(
            "slab_reclaimable_bytes",
            "Reclaimable slab charged to the container's memory cgroup (cgroup v2 memory.stat "
            "slab_reclaimable; on cgroup v1 all kernel memory, memory.kmem.usage_in_bytes).",
            unit="bytes",
            per_container=True,
        ),
    )

    def read(self, ctx: ProbeContext) -> Reading:
        host = ctx.host
        taken_at = ctx.clock.now()
        try:
            state = parse_dentry_state(host.read_text(host.proc / "sys" / "fs" / "dentry-state"))
        except (OSError, ValueError) as exc:
            return Reading(self.name, taken_at, error=f"dentry-state: {exc}")

        values: dict[str, float] = {"total": state.nr_dentry, "unused": state.nr_unused}
        detail: dict[str, Any] = {"age_limit": state.age_limit, "want_pages": state.want_pages}
        if _has_nr_negative(host):
            values["negative"] = state.nr_negative
        else:
            detail["negative"] = "not reported by kernels before 5.0"

        # fs.dentry-negative (Linux 6.8+): 1 = drop a file's dentry on unlink instead of keeping
        # it as a negative one. Worth seeing next to a negative dentry count; absent before 6.8.
        with contextlib.suppress(OSError, ValueError):
            detail["dentry_negative_policy"] = int(host.read_sysctl("fs.dentry-negative"))

        try:
            caches = parse_slabinfo(host.read_text(host.proc / "slabinfo"))
        except (OSError, ValueError) as exc:
            detail["slabinfo"] = f"unreadable: {exc}"
        else:
            cache = caches.get(DENTRY_SLAB)
            if cache is None:
                # SLUB may merge caches of equal size and flags; slabinfo then shows only the
                # first cache's name. dcache_init runs early, so this is rare.
                detail["slabinfo"] = "no 'dentry' cache (merged with another cache?)"
            else:
                values["slab_bytes"] = cache.size_bytes
                detail["slab"] = {
                    "active_objs": cache.active_objs,
                    "num_objs": cache.num_objs,
                    "objsize": cache.objsize,
                    "active_slabs": cache.active_slabs,
                    "num_slabs": cache.num_slabs,
                    "pagesperslab": cache.pagesperslab,
                }

        samples, containers_error = self._per_container(ctx, detail)
        return Reading(
            self.name,
            taken_at,
            values=values,
            containers=samples,
            detail=detail,
            containers_error=containers_error,
        )

    def _per_container(
        self, ctx: ProbeContext, detail: dict[str, Any]
    ) -> tuple[tuple[ContainerSample, ...], str | None]:
        hierarchy = find_memory_hierarchy(ctx.host)
        detail["cgroup_version"] = hierarchy.version if hierarchy else None
        inventory = ctx.inventory()
        if hierarchy is None:
            return (), f"no memory cgroup hierarchy under {ctx.host.sys}/fs/cgroup"
        if inventory is None or inventory.error is not None:
            return (), ctx.inventory_error()
        samples = []
        sources: set[str] = set()
        unreadable: list[str] = []
        for container in inventory.containers():
            if not container.cgroup:
                unreadable.append(container.name)
                continue
            try:
                value, source = _slab_reclaimable(ctx.host, hierarchy, container.cgroup)
            except (OSError, ValueError):
                # The container stopped since it was listed, or its cgroup is not readable.
                unreadable.append(container.name)
                continue
            sources.add(source)
            samples.append(ContainerSample(container, {"slab_reclaimable_bytes": value}))
        if sources:
            detail["slab_source"] = sorted(sources)[0] if len(sources) == 1 else sorted(sources)
        if unreadable:
            detail["containers_unreadable"] = sorted(unreadable)
        return tuple(samples), None


def _has_nr_negative(host: HostRoot) -> bool:
    try:
        release = parse_kernel_release(host.read_sysctl("kernel.osrelease"))
    except OSError:
        release = None
    # Unknown release: trust the field. Every kernel still in support (>= 5.4) has it.
    return release is None or release >= (5, 0)


def _slab_reclaimable(host: HostRoot, hierarchy: MemoryHierarchy, cgroup: str) -> tuple[int, str]:
    stat = parse_flat_keyed(host.read_text(hierarchy.stat_path(cgroup)))
    if "slab_reclaimable" in stat:
        return stat["slab_reclaimable"], "memory.stat:slab_reclaimable"
    if hierarchy.version == 2:
        raise ValueError("memory.stat has no slab_reclaimable")  # kernels before 4.x
    usage = host.read_text(hierarchy.kmem_usage_path(cgroup)).strip()
    return int(usage), "memory.kmem.usage_in_bytes"


__all__ = [
    "DentriesProbe",
    "DentryState",
    "MemoryHierarchy",
    "SlabCache",
    "find_memory_hierarchy",
    "parse_dentry_state",
    "parse_flat_keyed",
    "parse_kernel_release",
    "parse_slabinfo",
]
