"""drop-caches: write to `vm.drop_caches`, the host-wide last resort against a dentry flood.

Documentation/admin-guide/sysctl/vm.rst ("drop_caches"): 1 frees the page cache, 2 reclaimable
slab objects (dentries and inodes), 3 both. It is disruptive: every tenant loses its warm
caches, not only the container that flooded them, so policies should try `reclaim-cgroup` or
`recreate-container` first.

No `sync` first, on purpose. vm.rst says dirty objects are not freeable and suggests `sync` to
free as much as possible; but negative dentries, the reason this action exists, are never
dirty, so `sync` adds nothing for them. For the page cache it would force writeback of every
tenant's dirty data and can block without bound (a hung NFS or FUSE mount), which is worse than
leaving dirty pages to the normal writeback that cleans them within
`vm.dirty_expire_centisecs` anyway.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

from remediator.actions.base import Action, ActionParams, ApplyContext, PlanContext, register
from remediator.host import HostRoot
from remediator.model import ActionResult, Outcome, Plan, Target, TargetKind
from remediator.probes.dentries import parse_dentry_state

CONTROL = "vm.drop_caches"
DENTRY_STATE = "fs.dentry-state"

What = Literal["dentries-inodes", "pagecache", "all"]
# vm.rst: "To free pagecache: echo 1", "To free reclaimable slab objects (includes dentries and
# inodes): echo 2", "To free slab objects and pagecache: echo 3".
VALUES: Mapping[str, int] = {"pagecache": 1, "dentries-inodes": 2, "all": 3}


class DropCachesParams(ActionParams):
    what: What = "dentries-inodes"
    """What to drop: "dentries-inodes" (2, the default: what a negative dentry flood needs),
    "pagecache" (1) or "all" (3)."""


def _dentries(host: HostRoot) -> dict[str, int]:
    state = parse_dentry_state(host.read_sysctl(DENTRY_STATE))
    return {"nr_dentry": state.nr_dentry, "nr_unused": state.nr_unused, "nr_negative": state.nr_negative}


def parse_meminfo_kb(text: str, key: str) -> int | None:
    """One field of /proc/meminfo ("Cached:  123456 kB") in KiB, None when absent (proc(5))."""
    for line in text.splitlines():
        name, _, rest = line.partition(":")
        if name == key:
            fields = rest.split()
            return int(fields[0]) if fields and fields[0].isdigit() else None
    return None


def _snapshot(host: HostRoot, what: str) -> dict[str, Any]:
    out: dict[str, Any] = dict(_dentries(host))
    if what != "dentries-inodes":
        out["cached_kb"] = parse_meminfo_kb(host.read_text(host.proc / "meminfo"), "Cached")
    return out


@register
class DropCaches(Action):
    name = "drop-caches"
    help = "Drop the host's clean caches via vm.drop_caches (hurts every tenant's caches)."
    Params = DropCachesParams
    disruptive = True

    def plan(self, ctx: PlanContext) -> Plan | str:
        p = ctx.params
        assert isinstance(p, DropCachesParams)
        value = VALUES[p.what]
        return Plan(
            self.name,
            Target(TargetKind.HOST, id="host", name="host", detail={"sysctl": CONTROL}),
            f"write {value} to {CONTROL} (drop {p.what.replace('-', ' and ')} host-wide)",
            params={"what": p.what, "value": value},
        )

    def recheck(self, plan: Plan, ctx: ApplyContext) -> str | None:
        # Nothing about a host can "move away"; what can be missing is the knob itself (a
        # read-only /proc/sys in a container) or the dentry counters verify needs.
        if not ctx.host.sysctl_path(CONTROL).exists():
            return f"no {CONTROL} on this host"
        try:
            _dentries(ctx.host)  # an OSError here fails the action (Action.execute)
        except ValueError as e:
            return f"cannot judge the effect: {e}"
        return None

    def apply(self, plan: Plan, ctx: ApplyContext) -> ActionResult:
        what, value = str(plan.params["what"]), int(plan.params["value"])
        before = _snapshot(ctx.host, what)
        # vm.drop_caches is write-only (mode 0200): there is no original value to save; the
        # "original" worth keeping is the cache state, in `before`.
        with open(ctx.host.sysctl_path(CONTROL), "w", encoding="ascii") as f:
            f.write(f"{value}\n")
        return ActionResult(Outcome.APPLIED, f"wrote {value} to {CONTROL}", before)

    def verify(self, plan: Plan, result: ActionResult, ctx: ApplyContext) -> ActionResult:
        what = str(plan.params["what"])
        after = _snapshot(ctx.host, what)
        before = result.before
        if what == "pagecache":
            # Dentries are not touched by 1; judge by the page cache.
            ok = (after["cached_kb"] or 0) < (before["cached_kb"] or 0)
            effect = f"Cached {before['cached_kb']} -> {after['cached_kb']} kB"
        else:
            # Nothing to drop counts as success: 0 stays 0.
            ok = after["nr_negative"] < before["nr_negative"] or after["nr_negative"] == 0
            effect = f"negative dentries {before['nr_negative']} -> {after['nr_negative']}"
        return ActionResult(Outcome.APPLIED, f"{result.message}; {effect}", before, after, verified=ok)
