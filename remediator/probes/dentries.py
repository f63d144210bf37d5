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
* The `dentry` slab cache's size (probes/slab.py): SLUB's `/sys/kernel/slab/dentry/` counters,
  else `/proc/slabinfo` (slabinfo(5), version 2.1; root-only, mode 0400). Without either,
  `slab_bytes` is absent, not an error; `detail.slab.source` says which one a reading used.
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
import functools
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from remediator import handles
from remediator.handles import HeldPath
from remediator.host import HostRoot
from remediator.model import ContainerRef, ContainerSample, Reading
from remediator.policy.catalog import MetricSpec
from remediator.probes.base import Probe, ProbeContext, register
from remediator.probes.canary import canary_values
from remediator.probes.cgroup_slab import COUNTERS, parse_flat_keyed, slab_reclaimable, slab_reclaimable_many
from remediator.probes.dentry_attribution import ebpf_counts, merge, parent_leftovers, wants_attribution
from remediator.probes.dentry_hash import (
    Sample,
    advance,
    forecast_seconds,
    growth_rate,
    kept_with,
)
from remediator.probes.ebpf import cgroup_ids
from remediator.probes.kmsg import dentry_hash_buckets
from remediator.probes.memory import (
    recall_samples,
    recall_samples_many,
    remember_samples,
    remember_samples_many,
)
from remediator.probes.slab import SlabCache, parse_slabinfo, read_slab_cache

DENTRY_SLAB = "dentry"  # the kmem_cache name fs/dcache.c creates (dcache_init)
# The harm line, in negatives per hash bucket: at ~2.4 per bucket the case report measured
# lookups of missing names 1.7-1.9x slower host-wide. `forecast_seconds` counts down to it, and
# the bundled policy acts on it (`above: 200%` of the bucket count).
HARM_PER_BUCKET = 2.0
# `negative_projected` looks this far ahead at the current rate: five minutes is less than any
# sane hold-down plus cooldown, so a policy on it acts before the harm line, not after.
PROJECTION_SECONDS = 300.0
# When nothing was remembered (first read, or no memory at all), a second read of dentry-state
# this much later gives a rate. dentry-state is one small file, so the pause is the only cost.
FIRST_RATE_SPAN = 1.0
_MEMORY_KEY = "dentries.negative"
_CONTAINER_KEY = "dentries.slab."


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


# The probe's look at the hierarchy, on the real host: kept a minute (three file lookups every
# cycle for an answer that changes only when cgroup filesystems are mounted or unmounted).
# Actions look again themselves, right before they act.
HIERARCHY_TTL = 60.0
_HIERARCHY: dict[Path, tuple[float, MemoryHierarchy | None]] = {}


def memory_hierarchy(host: HostRoot, now: float | None = None) -> MemoryHierarchy | None:
    """`find_memory_hierarchy`, looked up again at most once a HIERARCHY_TTL on the real host
    (`now`: a monotonic clock's); a fixture tree is looked at every time."""
    if not host.is_real:
        return find_memory_hierarchy(host)
    now = time.monotonic() if now is None else now
    kept = _HIERARCHY.get(host.root)
    if kept is not None and 0 <= now - kept[0] < HIERARCHY_TTL:
        return kept[1]
    found = find_memory_hierarchy(host)
    _HIERARCHY[host.root] = (now, found)
    return found


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
            "Unused negative dentries (dentry-state nr_negative; Linux >= 5.0, else no data). "
            "Its limit is the dentry hash bucket count, so `above: 200%` means 2 per bucket.",
            limit="dentry hash buckets",
        ),
        MetricSpec(
            "negative_projected",
            "nr_negative expected 5 minutes from now at the current growth rate (never below "
            "nr_negative). Limit: the bucket count, like `negative`.",
            limit="dentry hash buckets",
        ),
        MetricSpec(
            "growth_per_second",
            "Change of nr_negative per second over the last minute, since its last fall (samples "
            "kept in the state directory, so the timer's runs count too).",
            unit="ratio",
        ),
        MetricSpec("hash_buckets", "Buckets of the dentry hash table (detail.hash_source says how known)."),
        MetricSpec(
            "negative_per_bucket", "nr_negative / hash_buckets: the extra chain length.", unit="ratio"
        ),
        MetricSpec(
            "forecast_seconds",
            "Seconds until nr_negative reaches 2 per bucket at the current rate (0: already "
            "there; absent: not growing).",
            unit="seconds",
        ),
        MetricSpec(
            "lookup_slowdown",
            "Failed lookups of fresh names in STATE_DIR/canary now, as a multiple of their healthy "
            "baseline (1.0 = as fast; the most reproducible sign of negative dentry harm).",
            unit="ratio",
        ),
        MetricSpec("lookup_ns", "The canary's ns per failed lookup now (its fastest batch).", unit="ratio"),
        MetricSpec("lookup_baseline_ns", "The canary's healthy baseline (persisted).", unit="ratio"),
        MetricSpec(
            "slab_bytes",
            "Bytes of the dentry slab cache (total objects * object size: SLUB sysfs, else /proc/slabinfo).",
            unit="bytes",
        ),
        MetricSpec(
            "slab_reclaimable_bytes",
            "Reclaimable slab charged to the container's memory cgroup (cgroup v2 memory.stat "
            "slab_reclaimable; on cgroup v1 all kernel memory, memory.kmem.usage_in_bytes).",
            unit="bytes",
            per_container=True,
        ),
        MetricSpec(
            "failed_lookups_per_second",
            "Failed path lookups (ENOENT) per second made in the container, counted by eBPF when "
            "attribution runs (see detail.attribution).",
            unit="ratio",
            per_container=True,
        ),
        MetricSpec(
            "slab_growth_bytes_per_second",
            "Change of the container's slab_reclaimable_bytes per second since earlier samples.",
            unit="ratio",
            per_container=True,
        ),
    )

    @classmethod
    def held_files(cls, host: HostRoot) -> list[HeldPath]:
        return [
            HeldPath(host.proc / "sys" / "fs" / "dentry-state"),
            HeldPath(host.sysctl_path("fs.dentry-negative")),
        ]

    def read(self, ctx: ProbeContext) -> Reading:
        host = ctx.host
        taken_at = ctx.clock.now()
        try:
            state = parse_dentry_state(handles.read_text(host, host.proc / "sys" / "fs" / "dentry-state"))
        except (OSError, ValueError) as exc:
            return Reading(self.name, taken_at, error=f"dentry-state: {exc}")

        values: dict[str, float] = {"total": state.nr_dentry, "unused": state.nr_unused}
        detail: dict[str, Any] = {"age_limit": state.age_limit, "want_pages": state.want_pages}
        limits: dict[str, float] = {}
        buckets, detail["hash_source"] = dentry_hash_buckets(ctx)
        if buckets is not None:
            values["hash_buckets"] = buckets
        if _has_nr_negative(host):
            self._negative_metrics(ctx, state, taken_at, buckets, values, limits, detail)
        else:
            detail["negative"] = "not reported by kernels before 5.0"

        # fs.dentry-negative (Linux 6.8+): 1 = drop a file's dentry on unlink instead of keeping
        # it as a negative one. Worth seeing next to a negative dentry count; absent before 6.8.
        with contextlib.suppress(OSError, ValueError):
            detail["dentry_negative_policy"] = int(handles.read_sysctl(host, "fs.dentry-negative"))

        try:
            cache, slab_source = read_slab_cache(host, DENTRY_SLAB, taken_at)
        except (OSError, ValueError) as exc:
            detail["slabinfo"] = f"unreadable: {exc}"
        else:
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
                    "source": slab_source,
                }

        per_bucket = values.get("negative_per_bucket")
        canary, detail["canary"] = canary_values(
            ctx, per_bucket, taken_at, dentries=float(state.nr_dentry), buckets=buckets
        )
        values.update(canary)
        want_rates = ctx.options.ebpf == "always" or wants_attribution(values)
        samples, containers_error = self._per_container(ctx, detail, taken_at, want_rates)
        samples = self._attribute(ctx, values, samples, detail, taken_at)
        if ctx.memory is not None:
            ctx.memory.flush()
        return Reading(
            self.name,
            taken_at,
            values=values,
            limits=limits,
            containers=samples,
            detail=detail,
            containers_error=containers_error,
        )

    def _negative_metrics(
        self,
        ctx: ProbeContext,
        state: DentryState,
        taken_at: float,
        buckets: int | None,
        values: dict[str, float],
        limits: dict[str, float],
        detail: dict[str, Any],
    ) -> None:
        negative = float(state.nr_negative)
        values["negative"] = negative
        current = Sample(taken_at, negative)
        past = recall_samples(ctx.memory, _MEMORY_KEY, taken_at)
        rate = growth_rate(past, current)
        if rate is None:
            # Nothing remembered (audit on a fresh state, first run), or nothing since the count
            # fell (a reclaim): two reads a moment apart.
            ctx.clock.sleep(FIRST_RATE_SPAN)
            with contextlib.suppress(OSError, ValueError):
                state_path = ctx.host.proc / "sys" / "fs" / "dentry-state"
                later = parse_dentry_state(handles.read_text(ctx.host, state_path))
                past = [*past, current]
                current = Sample(ctx.clock.now(), float(later.nr_negative))
                rate = growth_rate(past, current)
                negative = current.value
                values["negative"] = negative
        if ctx.memory is not None:
            remember_samples(ctx.memory, _MEMORY_KEY, kept_with(past, current))
        per_s = rate[0] if rate else None
        if rate is not None:
            values["growth_per_second"] = rate[0]
            detail["growth_span_seconds"] = round(rate[1], 3)
        values["negative_projected"] = negative + max(per_s or 0.0, 0.0) * PROJECTION_SECONDS
        if buckets is None:
            return
        limits["negative"] = limits["negative_projected"] = buckets
        values["negative_per_bucket"] = negative / buckets
        act_line = HARM_PER_BUCKET * buckets
        detail["harm_line"] = act_line
        eta = forecast_seconds(negative, act_line, per_s)
        if eta is not None:
            values["forecast_seconds"] = eta

    def _attribute(
        self,
        ctx: ProbeContext,
        values: dict[str, float],
        samples: tuple[ContainerSample, ...],
        detail: dict[str, Any],
        now: float,
    ) -> tuple[ContainerSample, ...]:
        counts, status = ebpf_counts(ctx, values, now)
        ids = cgroup_ids(ctx.host, [s.container for s in samples]) if counts is not None else {}
        merged, top = merge(samples, counts, ids)
        detail["attribution"] = {"ebpf": status, "top": top}
        if counts is not None:
            detail["attribution"]["ebpf_window_seconds"] = counts["window_seconds"]
            detail["attribution"]["failed_lookups_per_second"] = counts["total"] / max(
                counts["window_seconds"], 1e-9
            )
        return tuple(merged)

    def _per_container(
        self, ctx: ProbeContext, detail: dict[str, Any], taken_at: float, want_rates: bool
    ) -> tuple[tuple[ContainerSample, ...], str | None]:
        hierarchy = memory_hierarchy(ctx.host)
        detail["cgroup_version"] = hierarchy.version if hierarchy else None
        inventory = ctx.inventory()
        if hierarchy is None:
            return (), f"no memory cgroup hierarchy under {ctx.host.sys}/fs/cgroup"
        if inventory is None or inventory.error is not None:
            return (), ctx.inventory_error()
        read: list[tuple[ContainerRef, list[Sample], Sample]] = []
        sources: set[str] = set()
        unreadable: list[str] = []
        listed = []
        for container in inventory.containers():
            if container.cgroup and container.cgroup.strip("/"):
                listed.append(container)
            else:
                unreadable.append(container.name)  # no cgroup of its own: never the root's counters
        # Every container's counter in one go, and every container's samples (a few Python
        # frames a container, not a dozen: at 100 containers they were most of this probe).
        counters = slab_reclaimable_many(ctx.host, hierarchy, [str(c.cgroup) for c in listed])
        pasts = recall_samples_many(ctx.memory, [_CONTAINER_KEY + c.id for c in listed], taken_at)
        for container, got, past in zip(listed, counters, pasts, strict=True):
            if got is None:
                # Stopped since it was listed, or its cgroup is not readable.
                unreadable.append(container.name)
                continue
            sources.add(got[1])
            read.append((container, past, Sample(taken_at, float(got[0]))))
        # Each container's rate and the samples it keeps, in one pass over its samples.
        advanced = [advance(past, now) for _, past, now in read]
        if want_rates and any(rate is None for rate, _ in advanced):
            # Something to attribute and containers with no history (audit, a new container):
            # one short pause and a second read gives them all a rate.
            ctx.clock.sleep(FIRST_RATE_SPAN)
            again = ctx.clock.now()
            for i, (c, _, now) in enumerate(read):
                if advanced[i][0] is None:
                    with contextlib.suppress(OSError, ValueError):
                        later = slab_reclaimable(ctx.host, hierarchy, str(c.cgroup))[0]
                        read[i] = (c, [now], Sample(again, float(later)))
                        advanced[i] = advance(*read[i][1:])
        samples = []
        kept = []
        for (container, _, now), (rate, keep) in zip(read, advanced, strict=True):
            cvalues: dict[str, float] = {"slab_reclaimable_bytes": now.value}
            if rate is not None:
                cvalues["slab_growth_bytes_per_second"] = rate[0]
            kept.append((_CONTAINER_KEY + container.id, keep))
            samples.append(ContainerSample.owning(container, cvalues))
        if ctx.memory is not None:
            remember_samples_many(ctx.memory, kept)
            ctx.memory.forget_except(_CONTAINER_KEY, {k for k, _ in kept})
        parents = parent_leftovers(samples, lambda cg: slab_reclaimable(ctx.host, hierarchy, cg)[0])
        COUNTERS.sweep()  # the files of containers not read this time are let go
        if parents:
            detail["parent_cgroups"] = parents
        if sources:
            detail["slab_source"] = sorted(sources)[0] if len(sources) == 1 else sorted(sources)
        if unreadable:
            detail["containers_unreadable"] = sorted(unreadable)
        return tuple(samples), None


@functools.cache
def _running_kernel_release(sysctl: Path) -> tuple[int, int] | None:
    """The running kernel's release (it cannot change under a running process), asked once."""
    return parse_kernel_release(sysctl.read_text(encoding="ascii", errors="replace"))


def _has_nr_negative(host: HostRoot) -> bool:
    """Whether dentry-state's 5th field is nr_negative (Linux 5.0+)."""
    try:
        if host.is_real:
            release = _running_kernel_release(host.sysctl_path("kernel.osrelease"))
        else:
            release = parse_kernel_release(host.read_sysctl("kernel.osrelease"))
    except OSError:
        release = None  # not cached: asked again next time
    # Unknown release: trust the field. Every kernel still in support (>= 5.4) has it.
    return release is None or release >= (5, 0)


__all__ = [
    "HARM_PER_BUCKET",
    "DentriesProbe",
    "DentryState",
    "MemoryHierarchy",
    "SlabCache",
    "dentry_hash_buckets",
    "find_memory_hierarchy",
    "memory_hierarchy",
    "parse_dentry_state",
    "parse_flat_keyed",
    "parse_kernel_release",
    "parse_slabinfo",
]
