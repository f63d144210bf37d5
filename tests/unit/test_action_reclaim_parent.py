"""reclaim-parent-cgroup: leftovers of gone containers, guards, apply and verify on v1 and v2 trees."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from remediator.actions.base import ApplyContext, PlanContext
from remediator.actions.reclaim_parent import ReclaimParentCgroup, ReclaimParentParams
from remediator.clock import FakeClock
from remediator.host import HostRoot
from remediator.model import ContainerRef, ContainerSample, Outcome, Plan, Reading
from remediator.probes.dentry_attribution import parent_leftovers
from tests.helpers import make_host

A, B = "a" * 64, "b" * 64
MiB = 1 << 20


def v1_tree(tmp_path: Path, parent: int, children: dict[str, int], name: str = "docker") -> HostRoot:
    files: dict[str, str] = {
        "sys/fs/cgroup/memory/memory.stat": "cache 0\n",
        "proc/sys/fs/dentry-state": "10 5 45 0 1000 0\n",
        f"sys/fs/cgroup/memory/{name}/memory.stat": "cache 0\n",
        f"sys/fs/cgroup/memory/{name}/memory.kmem.usage_in_bytes": f"{parent}\n",
        f"sys/fs/cgroup/memory/{name}/memory.force_empty": "",
    }
    for cid, v in children.items():
        files[f"sys/fs/cgroup/memory/{name}/{cid}/memory.stat"] = "cache 0\n"
        files[f"sys/fs/cgroup/memory/{name}/{cid}/memory.kmem.usage_in_bytes"] = f"{v}\n"
    return make_host(tmp_path, files)


def ctx(detail: dict[str, Any], min_leftover: str = "64Mi") -> PlanContext:
    reading = Reading("dentries", 1000.0, detail=detail)
    return PlanContext(
        "negative-dentries",
        "negative",
        "host",
        reading,
        ReclaimParentParams.model_validate({"minLeftover": min_leftover}),
        lambda c: True,
        1000.0,
        {"dentries": reading},
    )


def test_parent_leftovers_subtracts_live_children() -> None:
    samples = [
        ContainerSample(
            ContainerRef(id=A, name="a", cgroup=f"/docker/{A}"), {"slab_reclaimable_bytes": 10 * MiB}
        ),
        ContainerSample(ContainerRef(id=B, name="b", cgroup="/"), {"slab_reclaimable_bytes": 5 * MiB}),
    ]
    got = parent_leftovers(samples, lambda cg: {"/docker": 110 * MiB}[cg])
    assert got == {
        "/docker": {"slab_bytes": 110 * MiB, "children_bytes": 10 * MiB, "leftover_bytes": 100 * MiB}
    }


def test_plan_needs_enough_leftover() -> None:
    small = {"parent_cgroups": {"/docker": {"leftover_bytes": MiB}}}
    assert "< 64Mi" in str(ReclaimParentCgroup().plan(ctx(small)))
    assert ReclaimParentCgroup().plan(ctx({})) == "no container parent cgroup in this reading"
    plan = ReclaimParentCgroup().plan(ctx({"parent_cgroups": {"/docker": {"leftover_bytes": 100 * MiB}}}))
    assert isinstance(plan, Plan) and plan.target.id == "/docker"


def test_v1_apply_writes_force_empty_and_verifies(tmp_path: Path) -> None:
    host = v1_tree(tmp_path, 110 * MiB, {A: 10 * MiB})
    plan = ReclaimParentCgroup().plan(ctx({"parent_cgroups": {"/docker": {"leftover_bytes": 100 * MiB}}}))
    assert isinstance(plan, Plan)
    actx = ApplyContext(host, FakeClock(), dry_run=False)
    result = ReclaimParentCgroup().apply(plan, actx)
    assert result.outcome is Outcome.APPLIED
    assert (tmp_path / "sys/fs/cgroup/memory/docker/memory.force_empty").read_text() == "0"
    assert result.before["children_bytes"] == 10 * MiB
    (tmp_path / "sys/fs/cgroup/memory/docker/memory.kmem.usage_in_bytes").write_text(f"{12 * MiB}\n")
    verified = ReclaimParentCgroup().verify(plan, result, actx)
    assert verified.verified and f"freed {98 * MiB} bytes" in verified.message


def test_recheck_refuses_system_slice_root_and_recovered(tmp_path: Path) -> None:
    host = v1_tree(tmp_path / "s", 500 * MiB, {}, name="system.slice")
    plan = ReclaimParentCgroup().plan(
        ctx({"parent_cgroups": {"/system.slice": {"leftover_bytes": 500 * MiB}}})
    )
    assert isinstance(plan, Plan)
    assert "not a container runtime's own parent" in str(
        ReclaimParentCgroup().recheck(plan, ApplyContext(host, FakeClock(), dry_run=False))
    )
    host = v1_tree(tmp_path / "d", 70 * MiB, {A: 60 * MiB})
    plan = ReclaimParentCgroup().plan(ctx({"parent_cgroups": {"/docker": {"leftover_bytes": 100 * MiB}}}))
    assert isinstance(plan, Plan)
    assert "under the minimum" in str(
        ReclaimParentCgroup().recheck(plan, ApplyContext(host, FakeClock(), dry_run=False))
    )


def test_dry_run_changes_nothing(tmp_path: Path) -> None:
    host = v1_tree(tmp_path, 110 * MiB, {A: 10 * MiB})
    plan = ReclaimParentCgroup().plan(ctx({"parent_cgroups": {"/docker": {"leftover_bytes": 100 * MiB}}}))
    assert isinstance(plan, Plan)
    result = ReclaimParentCgroup().execute(plan, ApplyContext(host, FakeClock(), dry_run=True))
    assert result.outcome is Outcome.WOULD_APPLY
    assert (tmp_path / "sys/fs/cgroup/memory/docker/memory.force_empty").read_text() == ""
