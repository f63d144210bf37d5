"""The four actions on the real kernel and the real dockerd.

Each test makes the condition its action is for (negative dentries, a limit to raise, a trashing
container), runs the action through `Action.execute` exactly as the engine does, and checks the
effect by reading the host itself, plus that bystanders were left alone.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import docker
import docker.errors
import pytest
from docker.models.containers import Container
from docker.types import Mount

from remediator.actions.base import ActionParams, ApplyContext, PlanContext
from remediator.actions.drop_caches import DropCaches, DropCachesParams
from remediator.actions.reclaim import ReclaimCgroup, ReclaimCgroupParams
from remediator.actions.recreate import RecreateContainer, RecreateContainerParams
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


# --- recreate-container -----------------------------------------------------------------------


def endpoint_aliases(attrs: dict[str, Any], network: str) -> set[str]:
    return set(attrs["NetworkSettings"]["Networks"][network].get("Aliases") or [])


def mounts_of(attrs: dict[str, Any]) -> set[tuple[str, str, str, bool]]:
    return {(m["Type"], m.get("Name") or m["Source"], m["Destination"], m["RW"]) for m in attrs["Mounts"]}


def test_recreate_keeps_the_configuration(
    docker_client: docker.DockerClient, make_container: Any, tmp_path: Path
) -> None:
    tag = secrets.token_hex(4)
    front = docker_client.networks.create(f"rmd-test-front-{tag}")
    back = docker_client.networks.create(f"rmd-test-back-{tag}")
    volume = docker_client.volumes.create(f"rmd-test-vol-{tag}")
    bind = tmp_path / "bind"
    bind.mkdir()
    (bind / "hello").write_text("from the host\n")
    name = f"rmd-test-web-{tag}"
    names = [name]
    try:
        web = make_container(
            name=name,
            labels={"app": "web", "tier": "front"},
            environment={"MODE": "prod", "GREETING": "hello world"},
            volumes={str(bind): {"bind": "/data", "mode": "ro"}, volume.name: {"bind": "/vol", "mode": "rw"}},
            mounts=[Mount(target="/anon", source=None, type="volume")],
            restart_policy={"Name": "on-failure", "MaximumRetryCount": 3},
            network=front.name,
        )
        back.connect(web, aliases=["web-alias"])
        code, out = web.exec_run(["sh", "-c", "echo kept > /vol/state && echo anon > /anon/state"])
        assert code == 0, out
        bystander = make_container()
        protected = make_container(labels={PROTECT: "true"})
        names += [bystander.name, protected.name]
        web.reload()
        old = web.attrs

        refs = {c.id: ref_of(c) for c in (web, bystander, protected)}
        values = {web.id: 5.0, bystander.id: 1.0, protected.id: 100.0}
        ours = set(refs)

        def eligible(c: ContainerRef) -> bool:
            return c.id in ours and c.labels.get(PROTECT) != "true"

        params = RecreateContainerParams.model_validate({"stopTimeout": "2s"})
        plan = RecreateContainer().plan(plan_context(params, [(refs[i], values[i]) for i in refs], eligible))
        assert isinstance(plan, Plan)
        assert plan.target.id == web.id

        result = RecreateContainer().execute(plan, apply_ctx(docker_client))
        assert result.outcome is Outcome.APPLIED, result.message
        assert result.verified is True, result.after.get("differences")

        new = docker_client.containers.get(name)
        assert new.id == result.after["id"] != web.id
        assert new.status == "running"
        a, b = old, new.attrs
        assert b["Image"] == a["Image"]
        assert b["Config"]["Image"] == a["Config"]["Image"]
        assert b["Config"]["Labels"] == a["Config"]["Labels"]
        assert b["Config"]["Env"] == a["Config"]["Env"]
        assert b["Config"]["Cmd"] == a["Config"]["Cmd"]
        assert b["HostConfig"]["Binds"] == a["HostConfig"]["Binds"]
        assert b["HostConfig"]["RestartPolicy"] == a["HostConfig"]["RestartPolicy"]
        assert b["HostConfig"]["NetworkMode"] == a["HostConfig"]["NetworkMode"]
        assert mounts_of(b) == mounts_of(a)  # the anonymous volume too, by name
        assert set(b["NetworkSettings"]["Networks"]) == {front.name, back.name}
        assert "web-alias" in endpoint_aliases(b, back.name)
        assert web.id[:12] not in endpoint_aliases(b, back.name)
        assert new.exec_run(["cat", "/vol/state", "/anon/state", "/data/hello"]).output == (
            b"kept\nanon\nfrom the host\n"
        )
        with pytest.raises(docker.errors.NotFound):
            docker_client.containers.get(web.id)
        for c in (bystander, protected):
            c.reload()
            assert c.status == "running"
            assert docker_client.containers.get(c.name).id == c.id

        # A plan made on stale eligibility still cannot touch the protected container: the
        # recheck reads its labels live.
        forced = RecreateContainer().plan(plan_context(params, [(refs[protected.id], 100.0)], lambda c: True))
        assert isinstance(forced, Plan)
        skipped = RecreateContainer().execute(forced, apply_ctx(docker_client))
        assert (skipped.outcome, skipped.message) == (
            Outcome.SKIPPED,
            f"container {protected.name} is protected (label={PROTECT}=true)",
        )
        assert docker_client.containers.get(protected.name).id == protected.id
    finally:
        for n in names:  # before the networks: a network with endpoints cannot be removed
            with contextlib.suppress(docker.errors.NotFound):
                docker_client.containers.get(n).remove(force=True, v=True)
        front.remove()
        back.remove()
        volume.remove(force=True)


def test_recreate_rolls_back_when_the_copy_cannot_be_created(
    docker_client: docker.DockerClient, make_container: Any, tmp_path: Path
) -> None:
    source = tmp_path / "gone-soon"
    source.mkdir()
    web = make_container(mounts=[Mount(target="/m", source=str(source), type="bind")])
    source.rmdir()  # a --mount bind source must exist at create time: the copy will fail
    ref = ref_of(web)
    plan = RecreateContainer().plan(plan_context(RecreateContainerParams(), [(ref, 1.0)]))
    assert isinstance(plan, Plan)

    result = RecreateContainer().execute(plan, apply_ctx(docker_client))
    assert result.outcome is Outcome.FAILED
    assert "create copy" in result.message
    web.reload()
    assert web.status == "running"
    assert docker_client.containers.get(web.name).id == web.id
    with pytest.raises(docker.errors.NotFound):
        docker_client.containers.get(f"{web.name}.remediator-new")


def test_recreate_dry_run_changes_nothing(docker_client: docker.DockerClient, make_container: Any) -> None:
    web = make_container()
    plan = RecreateContainer().plan(plan_context(RecreateContainerParams(), [(ref_of(web), 1.0)]))
    assert isinstance(plan, Plan)
    ctx = ApplyContext(HOST, SystemClock(), dry_run=True, docker_factory=lambda: docker_client)
    assert RecreateContainer().execute(plan, ctx).outcome is Outcome.WOULD_APPLY
    web.reload()
    assert web.status == "running"
    assert docker_client.containers.get(web.name).id == web.id
