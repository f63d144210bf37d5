"""cap-memory: lower one container's memory limit (Docker adapter), restorably.

Why: kernel memory (dentries, inodes) is charged to the container's memory cgroup, so lowering
its limit makes the kernel reclaim the container's slab and caps how far it can grow back (the
dentry case report: a trasher's negative dentries are its own cgroup's charge). Not disruptive
as long as the limit stays above what the processes really use: the floor is the cgroup's
current anonymous memory (it cannot be reclaimed without swap) plus `headroom`.

What it does (`docker update --memory M --memory-swap S` over the API):

* M = max(`memory` if given, anonymous RSS + headroom), rounded up to a page; nothing to do if
  the container already has a limit at or below M;
* S keeps the swap allowance: unlimited (-1) stays unlimited; a set allowance (S - M) is kept;
  no swap limit before gives unlimited swap (as before);
* the original limits are recorded in the state database before the update (the first
  original is kept: capping twice still restores the limits from before the first cap);
* verify reads the cgroup's limit back (v1 memory.limit_in_bytes, v2 memory.max).

`remediator restore-memory CONTAINER` puts the recorded original back (`restore()`). Docker
cannot remove a memory limit once set (its API takes 0 as "unchanged" and refuses less than
6 MB), so an originally unlimited container gets the host's total memory as its limit, which
limits nothing, and the message says so.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import ConfigDict, field_validator

from remediator.actions.base import (
    Action,
    ApplyContext,
    ContainerTargetParams,
    PlanContext,
    register,
)
from remediator.actions.docker_config import name_of, orchestrator_refusal
from remediator.actions.docker_engine import DockerEngine
from remediator.host import HostRoot
from remediator.model import ActionResult, Outcome, Plan, Target, TargetKind
from remediator.probes.containers import memory_cgroup_path
from remediator.probes.dentries import find_memory_hierarchy
from remediator.quantity import parse_count

PAGE = 4096
# Docker refuses limits under 6 MB ("Minimum memory limit allowed is 6MB").
DOCKER_MIN_MEMORY = 6 * 1024 * 1024


class CapMemoryParams(ContainerTargetParams):
    model_config = ConfigDict(populate_by_name=True)

    memory: str | None = None
    """The limit to set, e.g. "256Mi". Default: the floor (anonymous memory + headroom), which
    squeezes out page cache and slab (dentries) and nothing the processes need."""
    headroom: str = "64Mi"
    """Kept above the container's current anonymous memory, so its processes can still
    allocate. 64Mi: a few allocation bursts of a typical service."""

    @field_validator("memory", "headroom")
    @classmethod
    def _size(cls, v: str | None) -> str | None:
        if v is not None:
            parse_count(v)
        return v


def _round_up(n: int) -> int:
    return -(-n // PAGE) * PAGE


def new_limits(
    old_memory: int, old_swap: int, anon: int, headroom: int, requested: int | None
) -> tuple[int, int] | str:
    """(memory, memory-swap) to set, or why not (pure)."""
    floor = _round_up(max(anon + headroom, DOCKER_MIN_MEMORY))
    memory = max(_round_up(requested), floor) if requested is not None else floor
    if old_memory > 0 and memory >= old_memory:
        return f"limit {old_memory} is already at or below {memory} (anonymous {anon} + headroom {headroom})"
    swap = -1 if old_swap in (-1, 0) or old_memory <= 0 else memory + max(old_swap - old_memory, 0)
    return memory, swap


class CgroupMemory:
    """A container's memory cgroup files on this host (v1 or v2)."""

    def __init__(self, host: HostRoot, pid: int) -> None:
        hierarchy = find_memory_hierarchy(host)
        if hierarchy is None:
            raise OSError("no memory cgroup hierarchy mounted")
        rel = memory_cgroup_path(host.read_text(host.proc / str(pid) / "cgroup"))
        if rel is None:
            raise OSError(f"pid {pid} has no memory cgroup")
        self.host = host
        self.version = hierarchy.version
        self.dir: Path = hierarchy.root.joinpath(*[p for p in rel.split("/") if p])

    def anon(self) -> int:
        stat = dict(
            (k, int(v))
            for k, v in (line.split() for line in self.host.read_text(self.dir / "memory.stat").splitlines())
        )
        # v1: total_rss is the hierarchy's anonymous memory (rss alone leaves out sub-cgroups).
        return stat.get("total_rss", stat.get("rss", 0)) if self.version == 1 else stat.get("anon", 0)

    def limit(self) -> int | None:
        name = "memory.limit_in_bytes" if self.version == 1 else "memory.max"
        text = self.host.read_text(self.dir / name).strip()
        return None if text == "max" else int(text)


def _engine(ctx: ApplyContext) -> DockerEngine:
    return DockerEngine(ctx.docker(), sleep=ctx.clock.sleep)


@register
class CapMemory(Action):
    name = "cap-memory"
    help = "Lower a container's memory limit (never below its anonymous memory + headroom); restorable."
    Params = CapMemoryParams
    disruptive = False

    def plan(self, ctx: PlanContext) -> Plan | str:
        p = ctx.params
        assert isinstance(p, CapMemoryParams)
        chosen = p.choose(ctx)
        if isinstance(chosen, str):
            return chosen
        if chosen.runtime != "docker":
            return f"container {chosen.name} runs on {chosen.runtime}; cap-memory supports docker"
        refusal = orchestrator_refusal(chosen.labels)
        if refusal is not None:
            return f"container {chosen.name} is {refusal}"
        to = p.memory or "its anonymous memory"
        return Plan(
            self.name,
            Target(TargetKind.CONTAINER, id=chosen.id, name=chosen.name),
            f"lower the memory limit of container {chosen.name} ({chosen.short_id}) to {to} "
            f"(never below anonymous memory + {p.headroom}); the original is recorded for "
            f"`remediator restore-memory {chosen.name}`",
            params=p.model_dump(mode="json"),
        )

    def _live(self, plan: Plan, ctx: ApplyContext) -> tuple[dict[str, Any], str | None]:
        e = _engine(ctx)
        attrs = e.find(plan.target.id)
        if attrs is None:
            return {}, f"container {plan.target.id[:12]} is gone"
        if not (attrs.get("State") or {}).get("Running"):
            return attrs, f"container {name_of(attrs)} is not running"
        labels = (attrs.get("Config") or {}).get("Labels") or {}
        protected = ctx.protected_by(name_of(attrs), labels)
        if protected is not None:
            return attrs, f"container {name_of(attrs)} is protected ({protected})"
        refusal = orchestrator_refusal(labels)
        if refusal is not None:
            return attrs, f"container {name_of(attrs)} is {refusal}"
        return attrs, None

    def recheck(self, plan: Plan, ctx: ApplyContext) -> str | None:
        return self._live(plan, ctx)[1]

    def apply(self, plan: Plan, ctx: ApplyContext) -> ActionResult:
        attrs, reason = self._live(plan, ctx)
        if reason is not None:
            return ActionResult(Outcome.SKIPPED, reason)
        p = CapMemoryParams.model_validate(dict(plan.params))
        cg = CgroupMemory(ctx.host, int(attrs["State"]["Pid"]))
        hc = attrs.get("HostConfig") or {}
        old_memory, old_swap = int(hc.get("Memory") or 0), int(hc.get("MemorySwap") or 0)
        anon = cg.anon()
        limits = new_limits(
            old_memory,
            old_swap,
            anon,
            int(parse_count(p.headroom)),
            int(parse_count(p.memory)) if p.memory is not None else None,
        )
        if isinstance(limits, str):
            return ActionResult(Outcome.SKIPPED, f"container {name_of(attrs)}: {limits}")
        memory, swap = limits
        original = {"memory": old_memory, "memory_swap": old_swap, "cgroup_limit": cg.limit()}
        if ctx.record_undo is not None:  # saved before the change: it must survive a crash after
            ctx.record_undo(self.name, plan.target.id, name_of(attrs), original)
        _engine(ctx).update_memory(plan.target.id, memory, swap)
        return ActionResult(
            Outcome.APPLIED,
            f"lowered the memory limit of {name_of(attrs)} from {old_memory or 'none'} to {memory} "
            f"(anonymous {anon}); restore with `remediator restore-memory {name_of(attrs)}`",
            before={**original, "anon": anon},
            after={"memory": memory, "memory_swap": swap, "pid": int(attrs["State"]["Pid"])},
        )

    def verify(self, plan: Plan, result: ActionResult, ctx: ApplyContext) -> ActionResult:
        cg = CgroupMemory(ctx.host, int(result.after["pid"]))
        got = cg.limit()
        ok = got == result.after["memory"]
        after = {**result.after, "cgroup_limit": got}
        message = result.message if ok else f"{result.message}; but the cgroup reads {got}"
        return ActionResult(Outcome.APPLIED, message, result.before, after, verified=ok)


def restore(
    engine: DockerEngine, host: HostRoot, container: str, original: Mapping[str, Any]
) -> ActionResult:
    """Put a recorded original limit back and read the cgroup to check (restore-memory)."""
    attrs = engine.find(container)
    if attrs is None:
        return ActionResult(Outcome.SKIPPED, f"container {container} is gone: nothing to restore")
    memory, swap = int(original.get("memory") or 0), int(original.get("memory_swap") or 0)
    note = ""
    if memory <= 0:
        memory = _round_up(_mem_total(host))
        swap = -1
        note = (
            " (it had no limit; Docker cannot remove one, so the limit is the host's memory, "
            "which limits nothing)"
        )
    engine.update_memory(str(attrs["Id"]), memory, swap if swap != 0 else -1)
    running = (attrs.get("State") or {}).get("Running")
    got = CgroupMemory(host, int(attrs["State"]["Pid"])).limit() if running else None
    ok = got is None or got == memory or (note and got is not None and got >= memory)
    return ActionResult(
        Outcome.APPLIED,
        f"restored the memory limit of {name_of(attrs)} to {memory}{note}",
        before={},
        after={"memory": memory, "memory_swap": swap, "cgroup_limit": got},
        verified=bool(ok) if running else None,
    )


def _mem_total(host: HostRoot) -> int:
    for line in host.read_text(host.proc / "meminfo").splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) * 1024
    raise OSError("MemTotal missing from /proc/meminfo")
