"""Who makes the negative dentries: two sources merged into one ranked list.

1. memcg slab (always, when cgroups are readable): the reclaimable slab charged to each
   container and its growth per second between samples. It says who *holds* dentries, and it
   survives the process (overlayfs's image-layer negatives stay charged to the container).
2. eBPF (when there is something to attribute and BCC can load): failed path lookups per
   container and per process in a short window. It says who is *making* them now, and which
   process.

`merge` is pure; `ebpf_counts` decides whether to pay for BCC and remembers the last run.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from remediator.audit import get_logger
from remediator.model import ContainerRef, ContainerSample
from remediator.probes.base import ProbeContext
from remediator.probes.ebpf import LookupCounts, count_failed_lookups

# Run BCC only when the dentry cache is at least half way to the harm line, or will reach it
# within this many seconds at the current rate: otherwise there is nothing to attribute, and
# the daemon stays at its healthy footprint.
ATTRIBUTE_PER_BUCKET = 1.0
ATTRIBUTE_FORECAST_SECONDS = 600.0
# One BCC run per this many seconds at most in one process; within it the last counts are
# reused (the daemon's next cycles, the re-read right before an action). Kept in process memory
# only: another process (the timer, audit) measures for itself rather than trust old counts.
EBPF_MIN_INTERVAL = 30.0
TOP = 5
_said: set[str] = set()
_last: dict[str, dict[str, Any]] = {}
log = get_logger()


def wants_attribution(values: Mapping[str, float]) -> bool:
    per_bucket = values.get("negative_per_bucket")
    eta = values.get("forecast_seconds")
    return (per_bucket is not None and per_bucket >= ATTRIBUTE_PER_BUCKET) or (
        eta is not None and eta <= ATTRIBUTE_FORECAST_SECONDS
    )


def ebpf_counts(
    ctx: ProbeContext, values: Mapping[str, float], now: float
) -> tuple[dict[str, Any] | None, str]:
    """(counts as stored JSON, status) for this read: fresh, reused, or none and why."""
    mode = ctx.options.ebpf
    if mode == "off":
        return None, "off (REMEDIATOR_EBPF=off)"
    if mode == "auto" and not wants_attribution(values):
        return None, "not needed: below half the harm line and no forecast within 10 minutes"
    last = _last.get(str(ctx.host.root))
    if last is not None and 0 <= now - last["at"] < EBPF_MIN_INTERVAL:
        return last, f"reused from {now - last['at']:.0f}s ago"
    result = count_failed_lookups(ctx.host, ctx.options.ebpf_seconds, ctx.options.bcc_dir)
    if isinstance(result, str):
        if result not in _said:  # say exactly why once per process, then carry on without it
            _said.add(result)
            log.warning("ebpf_unavailable", reason=result, fallback="memcg slab attribution only")
        return None, f"unavailable: {result}"
    stored = _store(result, now)
    _last[str(ctx.host.root)] = stored
    return stored, "measured"


def _store(counts: LookupCounts, now: float) -> dict[str, Any]:
    return {
        "at": now,
        "window_seconds": counts.window_seconds,
        "load_seconds": counts.load_seconds,
        "total": counts.total,
        "maps_full": counts.maps_full,
        "by_cgroup": {str(k): v for k, v in counts.by_cgroup.items()},
        "by_pid": [
            {"pid": p.pid, "comm": p.comm, "cgroup_id": p.cgroup_id, "count": p.count}
            for p in counts.by_process
        ],
    }


def merge(
    samples: Sequence[ContainerSample], counts: Mapping[str, Any] | None, ids: Mapping[int, ContainerRef]
) -> tuple[list[ContainerSample], list[dict[str, Any]]]:
    """Samples with `failed_lookups_per_second` added, and the top contributors, ranked by
    failed lookups when eBPF counted them, else by slab growth, else by slab held."""
    window = float(counts["window_seconds"]) if counts else 0.0
    total = int(counts["total"]) if counts else 0
    per_cid: dict[str, float] = {}
    procs: dict[str, list[dict[str, Any]]] = {}
    if counts and window > 0:
        for key, n in dict(counts["by_cgroup"]).items():
            c = ids.get(int(key))
            if c is not None:
                per_cid[c.id] = per_cid.get(c.id, 0.0) + n / window
        for p in counts["by_pid"]:
            c = ids.get(int(p["cgroup_id"]))
            if c is not None:
                procs.setdefault(c.id, []).append(
                    {"pid": p["pid"], "comm": p["comm"], "per_second": round(p["count"] / window, 1)}
                )
    out: list[ContainerSample] = []
    for s in samples:
        if s.container.id in per_cid:
            out.append(
                ContainerSample(
                    s.container, {**s.values, "failed_lookups_per_second": per_cid[s.container.id]}
                )
            )
        elif counts is not None:
            out.append(ContainerSample(s.container, {**s.values, "failed_lookups_per_second": 0.0}))
        else:
            out.append(s)
    slab_total = sum(s.values.get("slab_reclaimable_bytes", 0.0) for s in out) or 1.0

    def rank(s: ContainerSample) -> tuple[float, float, float]:
        v = s.values
        return (
            v.get("failed_lookups_per_second", 0.0),
            v.get("slab_growth_bytes_per_second", 0.0),
            v.get("slab_reclaimable_bytes", 0.0),
        )

    top = []
    for s in sorted(out, key=rank, reverse=True)[:TOP]:
        v = s.values
        entry: dict[str, Any] = {
            "container": s.container.name,
            "id": s.container.short_id,
            "image": s.container.image,
            "slab_bytes": v.get("slab_reclaimable_bytes"),
            "slab_share": round(v.get("slab_reclaimable_bytes", 0.0) / slab_total, 3),
            "slab_growth_bytes_per_second": v.get("slab_growth_bytes_per_second"),
            "sources": ["memcg"],
        }
        if (pod := s.container.pod) is not None:  # a Kubernetes container: say which pod
            entry["pod"] = pod.name
            entry["namespace"] = pod.namespace
        if counts is not None:
            rate = v.get("failed_lookups_per_second", 0.0)
            entry["failed_lookups_per_second"] = round(rate, 1)
            entry["share"] = round(rate * window / total, 3) if total else 0.0
            entry["processes"] = sorted(procs.get(s.container.id, []), key=lambda p: -p["per_second"])[:3]
            entry["sources"].append("ebpf")
        top.append(entry)
    return out, top


def parent_leftovers(
    samples: Sequence[ContainerSample], read_slab: Callable[[str], int]
) -> dict[str, dict[str, int]]:
    """Slab charged to each container parent cgroup (e.g. /docker) beyond its live containers.

    overlayfs leaves a negative dentry in every image layer that holds the looked-up directory;
    those are charged to the container that made them and, once it is gone, to its parent
    cgroup (issue 9's measurements). Parent minus the sum of live children is what gone
    containers left behind (an estimate: a child cgroup that is not a known container counts
    as leftover too). `read_slab(cgroup)` reads the same counter the children were read with.
    """
    by_parent: dict[str, int] = {}
    for s in samples:
        cg = (s.container.cgroup or "").rstrip("/")
        parent = cg.rsplit("/", 1)[0] if "/" in cg else ""
        if parent.strip("/") == "":
            continue  # never the root cgroup
        by_parent[parent] = by_parent.get(parent, 0) + int(s.values.get("slab_reclaimable_bytes", 0))
    out = {}
    for parent, children in by_parent.items():
        try:
            total = read_slab(parent)
        except (OSError, ValueError):
            continue
        out[parent] = {
            "slab_bytes": total,
            "children_bytes": children,
            "leftover_bytes": max(0, total - children),
        }
    return out


__all__ = ["ATTRIBUTE_PER_BUCKET", "ebpf_counts", "merge", "parent_leftovers", "wants_attribution"]
