"""reclaim-parent-cgroup: free what containers that are gone left charged to their parent.

overlayfs keeps, besides the negative dentry in the container's own upper directory, one in
every image layer that holds the looked-up directory. Those are charged to the container that
made them and outlive it: after `docker rm` they are charged to the parent cgroup (`/docker`
with the cgroupfs driver), where `reclaim-cgroup` on any live container cannot reach them. The
dentries probe reports each parent's slab minus its live children's (`parent_cgroups`).

What it costs: reclaim of a parent reaches its children too (memcg reclaim is hierarchical).
On cgroup v2 the amount asked is the leftover, so the kernel takes about that much, spread over
the subtree; on cgroup v1 `memory.force_empty` reclaims all it can from the whole subtree, so
every container under the parent loses its page cache (not its anonymous memory). Less than a
host-wide `drop-caches` (host services keep theirs), more than `reclaim-cgroup`, hence its
place in the ladder.

Guards: only a parent directory named `docker` (the cgroupfs driver's; a systemd driver's parent
is `system.slice`, shared with every host service, and is refused), never the root, resolved
inside the memory hierarchy; the leftover is re-read right before acting.
"""

from __future__ import annotations

import errno
from pathlib import Path
from typing import Any

from pydantic import field_validator

from remediator.actions.base import Action, ActionParams, ApplyContext, PlanContext, register
from remediator.actions.reclaim import interface_of
from remediator.host import HostRoot
from remediator.model import ActionResult, Outcome, Plan, Target, TargetKind
from remediator.probes.dentries import (
    MemoryHierarchy,
    find_memory_hierarchy,
    parse_dentry_state,
    parse_flat_keyed,
)
from remediator.quantity import parse_count

PARENT_NAMES = ("docker",)


class ReclaimParentParams(ActionParams):
    minLeftover: str = "64Mi"
    """Act only when gone containers left at least this much slab charged to the parent (a size).
    64Mi is ~300k dentries: below it, reclaiming every container's cache is not worth it."""

    @field_validator("minLeftover")
    @classmethod
    def _check(cls, v: str) -> str:
        try:
            parse_count(v)
        except ValueError:
            raise ValueError(f"expected a size such as 64Mi, got {v!r}") from None
        return v

    @property
    def min_bytes(self) -> int:
        return int(parse_count(self.minLeftover))


def _directory(host: HostRoot, cgroup: str) -> tuple[MemoryHierarchy, Path] | str:
    parts = [p for p in cgroup.split("/") if p not in ("", ".", "..")]
    if not parts:
        return "refusing the root cgroup"
    if parts[-1] not in PARENT_NAMES:
        return f"parent cgroup {cgroup} is not a container runtime's own parent ({', '.join(PARENT_NAMES)})"
    hierarchy = find_memory_hierarchy(host)
    if hierarchy is None:
        return "no memory cgroup controller on this host"
    directory = hierarchy.root.joinpath(*parts)
    resolved, root = directory.resolve(), hierarchy.root.resolve()
    if resolved == root or root not in resolved.parents or directory.is_symlink():
        return f"cgroup {cgroup} resolves outside the memory hierarchy"
    if not (directory / interface_of(hierarchy.version)).exists():
        return f"{directory / interface_of(hierarchy.version)} does not exist"
    return hierarchy, directory


def _slab(host: HostRoot, hierarchy: MemoryHierarchy, directory: Path) -> int:
    stat = parse_flat_keyed(host.read_text(directory / "memory.stat"))
    if "slab_reclaimable" in stat:
        return stat["slab_reclaimable"]
    return int(host.read_text(directory / "memory.kmem.usage_in_bytes").strip())


def _children(host: HostRoot, hierarchy: MemoryHierarchy, directory: Path) -> int:
    total = 0
    for child in directory.iterdir():
        if child.is_dir() and not child.is_symlink() and (child / "memory.stat").exists():
            try:
                total += _slab(host, hierarchy, child)
            except (OSError, ValueError):
                continue
    return total


def _negative(host: HostRoot) -> int | None:
    try:
        return parse_dentry_state(host.read_sysctl("fs.dentry-state")).nr_negative
    except (OSError, ValueError):
        return None


@register
class ReclaimParentCgroup(Action):
    name = "reclaim-parent-cgroup"
    help = "Reclaim the containers' parent cgroup for slab that removed containers left charged there."
    Params = ReclaimParentParams
    disruptive = False

    def plan(self, ctx: PlanContext) -> Plan | str:
        p = ctx.params
        assert isinstance(p, ReclaimParentParams)
        parents = ctx.reading.detail.get("parent_cgroups") or {}
        best = max(parents.items(), key=lambda kv: kv[1].get("leftover_bytes", 0), default=None)
        if best is None:
            return "no container parent cgroup in this reading"
        cgroup, facts = best
        leftover = int(facts.get("leftover_bytes", 0))
        if leftover < p.min_bytes:
            return f"parent {cgroup} holds {leftover} bytes beyond its live containers (< {p.minLeftover})"
        return Plan(
            self.name,
            Target(TargetKind.CGROUP, id=cgroup, name=cgroup, detail={"cgroup": cgroup}),
            f"reclaim parent cgroup {cgroup} for {leftover} bytes that removed containers left "
            "(reaches its live containers' page cache too)",
            params={"min_bytes": p.min_bytes, "leftover_bytes": leftover},
            expect={"cgroup": cgroup},
        )

    def recheck(self, plan: Plan, ctx: ApplyContext) -> str | None:
        found = _directory(ctx.host, str(plan.target.detail["cgroup"]))
        if isinstance(found, str):
            return found
        hierarchy, directory = found
        leftover = _slab(ctx.host, hierarchy, directory) - _children(ctx.host, hierarchy, directory)
        if leftover < int(plan.params["min_bytes"]):
            return f"leftover is now {leftover} bytes, under the minimum"
        return None

    def apply(self, plan: Plan, ctx: ApplyContext) -> ActionResult:
        found = _directory(ctx.host, str(plan.target.detail["cgroup"]))
        if isinstance(found, str):
            return ActionResult(Outcome.SKIPPED, found)
        hierarchy, directory = found
        before: dict[str, Any] = {
            "interface": interface_of(hierarchy.version),
            "slab_bytes": _slab(ctx.host, hierarchy, directory),
            "children_bytes": _children(ctx.host, hierarchy, directory),
            "host_nr_negative": _negative(ctx.host),
        }
        amount = max(4096, before["slab_bytes"] - before["children_bytes"])
        payload = str(amount) if hierarchy.version == 2 else "0"
        partial = False
        started = ctx.clock.now()
        try:
            with open(directory / interface_of(hierarchy.version), "w", encoding="ascii") as f:
                f.write(payload)
        except OSError as e:
            if e.errno != errno.EAGAIN or hierarchy.version != 2:
                raise
            partial = True
        after = {"partial": partial, "elapsed_s": round(ctx.clock.now() - started, 3)}
        return ActionResult(
            Outcome.APPLIED, f"wrote {interface_of(hierarchy.version)} on {plan.target.id}", before, after
        )

    def verify(self, plan: Plan, result: ActionResult, ctx: ApplyContext) -> ActionResult:
        found = _directory(ctx.host, str(plan.target.detail["cgroup"]))
        if isinstance(found, str):
            return ActionResult(
                Outcome.APPLIED,
                f"{result.message}; read-back skipped: {found}",
                result.before,
                result.after,
                verified=False,
            )
        hierarchy, directory = found
        after = {
            **result.after,
            "slab_bytes": _slab(ctx.host, hierarchy, directory),
            "host_nr_negative": _negative(ctx.host),
        }
        freed = int(result.before["slab_bytes"]) - int(after["slab_bytes"])
        return ActionResult(
            Outcome.APPLIED,
            f"{result.message}; freed {freed} bytes of slab",
            result.before,
            after,
            verified=freed > 0,
        )
