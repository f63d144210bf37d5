"""The four actions on the real kernel and the real dockerd.

Each test makes the condition its action is for (negative dentries, a limit to raise, a trashing
container), runs the action through `Action.execute` exactly as the engine does, and checks the
effect by reading the host itself, plus that bystanders were left alone.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import docker
import docker.errors
import pytest
from docker.models.containers import Container

from remediator.actions.base import ActionParams, ApplyContext, PlanContext
from remediator.actions.drop_caches import DropCaches, DropCachesParams
from remediator.actions.reclaim import ReclaimCgroup, ReclaimCgroupParams
from remediator.actions.sysctl import RaiseSysctl, RaiseSysctlParams
from remediator.clock import SystemClock
from remediator.host import HostRoot
from remediator.model import ContainerRef, ContainerSample, Outcome, Plan, Reading
from remediator.probes.containers import memory_cgroup_path
from remediator.probes.dentries import find_memory_hierarchy, parse_dentry_state

pytestmark = pytest.mark.real

HOST = HostRoot()
PROTECT = "remediator.protect"


def negative_dentries() -> int:
    return parse_dentry_state(HOST.read_sysctl("fs.dentry-state")).nr_negative


def make_negative_dentries(container: Container, count: int, tag: str) -> None:
    """`count` failed lookups inside the container (busybox `[` is a shell builtin: no forks)."""
    script = f"i=0; while [ $i -lt {count} ]; do [ -e /tmp/{tag}-$i ]; i=$((i+1)); done"
    code, out = container.exec_run(["sh", "-c", script])
    assert code == 0, out


def ref_of(container: Container) -> ContainerRef:
    container.reload()
    pid = int(container.attrs["State"]["Pid"])
    cgroup = memory_cgroup_path(HOST.read_text(HOST.proc / str(pid) / "cgroup"))
    return ContainerRef(id=container.id, name=container.name, labels=container.labels, pid=pid, cgroup=cgroup)


def plan_context(
    params: ActionParams,
    samples: Iterable[tuple[ContainerRef, float]] = (),
    eligible: Callable[[ContainerRef], bool] = lambda c: True,
    metric: str = "slab_reclaimable_bytes",
    detail: dict[str, Any] | None = None,
) -> PlanContext:
    reading = Reading(
        "dentries",
        SystemClock().now(),
        containers=tuple(ContainerSample(c, {metric: v}) for c, v in samples),
        detail=detail or {},
    )
    return PlanContext(
        policy="real-test",
        metric=metric,
        subject="host",
        reading=reading,
        params=params,
        eligible=eligible,
        now=reading.taken_at,
        readings={reading.probe: reading},
    )


def apply_ctx(client: docker.DockerClient | None = None) -> ApplyContext:
    return ApplyContext(
        HOST, SystemClock(), dry_run=False, docker_factory=(lambda: client) if client else None
    )


# --- drop-caches ------------------------------------------------------------------------------


def test_drop_caches_frees_negative_dentries(tmp_path: Path) -> None:
    for i in range(100_000):
        with contextlib.suppress(FileNotFoundError):
            os.stat(tmp_path / f"missing-{i}")
    assert negative_dentries() >= 100_000
    plan = DropCaches().plan(plan_context(DropCachesParams()))
    assert isinstance(plan, Plan)
    result = DropCaches().execute(plan, apply_ctx())
    assert result.outcome is Outcome.APPLIED, result.message
    assert result.verified is True
    assert result.after["nr_negative"] < result.before["nr_negative"] - 90_000
    assert negative_dentries() < result.before["nr_negative"] - 90_000


# --- raise-sysctl -----------------------------------------------------------------------------

# A pool no other real test reads; raised and restored by sysctl_guard.
SYSCTL = "fs.aio-max-nr"


def config_ctx(config: Path) -> ApplyContext:
    """The real kernel, but sysctl.d files in a temporary tree: never the real /etc."""
    (config / "etc").mkdir(parents=True, exist_ok=True)
    return ApplyContext(HostRoot(Path("/"), config_root=config), SystemClock(), dry_run=False)


def test_raise_sysctl_doubles_up_to_the_ceiling_and_persists(
    sysctl_guard: Callable[[str], str], tmp_path: Path
) -> None:
    original = int(sysctl_guard(SYSCTL))
    etc_before = sorted(os.listdir("/etc/sysctl.d"))
    params = RaiseSysctlParams.model_validate({"key": SYSCTL, "ceiling": original * 3})
    limits = {"sysctls": {SYSCTL: original}}
    plan = RaiseSysctl().plan(plan_context(params, detail=limits))
    assert isinstance(plan, Plan)

    result = RaiseSysctl().execute(plan, config_ctx(tmp_path))
    assert result.outcome is Outcome.APPLIED, result.message
    assert result.verified is True
    assert result.before["value"] == original
    assert int(HOST.read_sysctl(SYSCTL)) == original * 2
    own = tmp_path / "etc/sysctl.d/90-remediator.conf"
    assert f"\n{SYSCTL} = {original * 2}\n" in own.read_text()

    # Next step from the new value is capped at the ceiling; then there is nothing to do.
    limits = {"sysctls": {SYSCTL: original * 2}}
    plan = RaiseSysctl().plan(plan_context(params, detail=limits))
    assert isinstance(plan, Plan)
    assert RaiseSysctl().execute(plan, config_ctx(tmp_path)).outcome is Outcome.APPLIED
    assert int(HOST.read_sysctl(SYSCTL)) == original * 3
    assert f"\n{SYSCTL} = {original * 3}\n" in own.read_text()
    limits = {"sysctls": {SYSCTL: original * 3}}
    assert RaiseSysctl().plan(plan_context(params, detail=limits)) == (
        f"at ceiling: {SYSCTL} is {original * 3}, ceiling is {original * 3}"
    )
    assert sorted(os.listdir("/etc/sysctl.d")) == etc_before  # the real /etc is untouched


def test_raise_sysctl_stops_at_another_owner(sysctl_guard: Callable[[str], str], tmp_path: Path) -> None:
    before = sysctl_guard(SYSCTL)
    owner = tmp_path / "usr/lib/sysctl.d/60-aio.conf"
    owner.parent.mkdir(parents=True)
    owner.write_text(f"{SYSCTL} = {before}\n")
    params = RaiseSysctlParams.model_validate({"key": SYSCTL})
    plan = RaiseSysctl().plan(plan_context(params))
    assert isinstance(plan, Plan)
    result = RaiseSysctl().execute(plan, config_ctx(tmp_path))
    assert result.outcome is Outcome.SKIPPED
    assert result.message.startswith(f"{SYSCTL} is owned by /usr/lib/sysctl.d/60-aio.conf:1 (= {before})")
    assert HOST.read_sysctl(SYSCTL) == before
    assert not (tmp_path / "etc/sysctl.d").exists()


# --- reclaim-cgroup ---------------------------------------------------------------------------


def kmem_of(ref: ContainerRef) -> int:
    hierarchy = find_memory_hierarchy(HOST)
    assert hierarchy is not None and ref.cgroup is not None
    directory = hierarchy.root.joinpath(*[p for p in ref.cgroup.split("/") if p])
    name = "memory.kmem.usage_in_bytes" if hierarchy.version == 1 else "memory.current"
    return int(HOST.read_text(directory / name))


def test_reclaim_cgroup_frees_the_trashers_dentries_only(make_container: Any) -> None:
    trasher, bystander = make_container(), make_container()
    make_negative_dentries(trasher, 200_000, "trash")
    make_negative_dentries(bystander, 20_000, "own")
    t, b = ref_of(trasher), ref_of(bystander)
    hierarchy = find_memory_hierarchy(HOST)
    assert hierarchy is not None
    ours = {t.id, b.id}
    bystander_kmem = kmem_of(b)

    plan = ReclaimCgroup().plan(
        plan_context(
            ReclaimCgroupParams(),
            samples=[(t, kmem_of(t)), (b, bystander_kmem)],
            eligible=lambda c: c.id in ours,
            detail={"cgroup_version": hierarchy.version},
        )
    )
    assert isinstance(plan, Plan)
    assert plan.target.id == t.id
    expected = "memory.force_empty" if hierarchy.version == 1 else "memory.reclaim"
    assert expected in plan.summary

    result = ReclaimCgroup().execute(plan, apply_ctx())
    assert result.outcome is Outcome.APPLIED, result.message
    assert result.verified is True
    # 200k failed lookups through overlayfs leave ~400k negative dentries (~80 MB of kmem on
    # 6.18); reclaim gives back nearly all of it.
    slab = "kmem_bytes" if hierarchy.version == 1 else "slab_bytes"
    assert result.after[slab] < result.before[slab] / 4
    assert result.after["host_nr_negative"] < result.before["host_nr_negative"] - 300_000
    # The bystander kept its own cache.
    assert kmem_of(b) > bystander_kmem * 0.9


def test_reclaim_cgroup_skips_a_container_that_was_replaced(make_container: Any) -> None:
    """The planned pid now lives in another container's cgroup: recheck refuses."""
    a, b = make_container(), make_container()
    ra, rb = ref_of(a), ref_of(b)
    stale = ContainerRef(id=ra.id, name=ra.name, pid=rb.pid, cgroup=ra.cgroup)
    plan = ReclaimCgroup().plan(plan_context(ReclaimCgroupParams(), samples=[(stale, 1.0)]))
    assert isinstance(plan, Plan)
    result = ReclaimCgroup().execute(plan, apply_ctx())
    assert result.outcome is Outcome.SKIPPED
    assert f"which is not container {ra.id[:12]}" in result.message
