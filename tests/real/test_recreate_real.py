"""recreate-container on the real dockerd: one test per defect of issue 7 and per property.

Each test makes its own containers (labelled, removed at teardown by the fixtures), runs the
action through `Action.execute` as the engine does, and checks the outcome by asking Docker
itself, with a bystander container that must come through untouched.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import docker
import docker.errors
import pytest
from docker.models.containers import Container
from docker.types import Healthcheck, Mount, Ulimit

from remediator.actions.base import ApplyContext, PlanContext
from remediator.actions.recreate import RecreateContainer, RecreateContainerParams
from remediator.actions.recreate_procedure import PHASES
from remediator.clock import SystemClock
from remediator.engine import Engine
from remediator.host import HostRoot
from remediator.model import ActionResult, ContainerRef, ContainerSample, Outcome, Plan, Reading
from remediator.policy.rules import PolicySet
from remediator.state import StateStore
from tests.real import engines
from tests.real.conftest import OWNER_LABEL, TEST_LABEL, MakeContainer

pytestmark = pytest.mark.real
# Every test here runs against each Docker engine (tests/real/engines.py).
engine = engines.engine
docker_client = engines.docker_client
busybox_image = engines.busybox_image
docker_url = engines.docker_url


HOST = HostRoot()
PROTECT = "remediator.protect"
FAST = {"stopTimeout": "1s", "watchFor": "2s"}


def ref_of(c: Container) -> ContainerRef:
    c.reload()
    return ContainerRef(id=c.id, name=c.name, labels=c.labels, pid=int(c.attrs["State"]["Pid"]))


def plan_for(c: Container, **params: Any) -> Plan:
    p = RecreateContainerParams.model_validate({**FAST, **params})
    reading = Reading("dentries", time.time(), containers=(ContainerSample(ref_of(c), {"m": 1.0}),))
    ctx = PlanContext("real-test", "m", "host", reading, p, lambda _: True, reading.taken_at)
    plan = RecreateContainer().plan(ctx)
    assert isinstance(plan, Plan), plan
    return plan


def ctx_of(client: docker.DockerClient, **kw: Any) -> ApplyContext:
    return ApplyContext(HOST, SystemClock(), dry_run=False, docker_factory=lambda: client, **kw)


def recreate(client: docker.DockerClient, c: Container, **params: Any) -> ActionResult:
    return RecreateContainer().execute(plan_for(c, **params), ctx_of(client))


def named(client: docker.DockerClient, prefix: str) -> list[Container]:
    """Every container whose name starts with `prefix` (the original, copies, asides)."""
    return [c for c in client.containers.list(all=True) if c.name.startswith(prefix)]


@pytest.fixture
def bystander(make_container: MakeContainer) -> Iterator[Container]:
    c = make_container()
    c.reload()
    started = c.attrs["State"]["StartedAt"]
    yield c
    c.reload()
    assert c.status == "running" and c.attrs["State"]["StartedAt"] == started, "bystander was touched"


@pytest.fixture
def resources(docker_client: docker.DockerClient) -> Iterator[Callable[..., Any]]:
    """Networks and volumes a test makes; removed at teardown, with the test's containers
    that still use them (this fixture's teardown runs before make_container's)."""
    made: list[tuple[str, Any]] = []

    def make(kind: str, name: str, **kw: Any) -> Any:
        obj = getattr(docker_client, kind).create(name, **kw)
        made.append((kind, obj))
        return obj

    yield make
    for kind, obj in reversed(made):
        flt = {"volume" if kind == "volumes" else "network": obj.name, "label": f"{TEST_LABEL}=1"}
        for c in docker_client.containers.list(all=True, filters=flt):
            with contextlib.suppress(docker.errors.NotFound):
                c.remove(force=True, v=True)
        with contextlib.suppress(docker.errors.NotFound):
            obj.remove(force=True) if kind == "volumes" else obj.remove()


def cleanup(client: docker.DockerClient, prefix: str) -> None:
    for c in named(client, prefix):
        with contextlib.suppress(docker.errors.NotFound):
            c.remove(force=True, v=True)


# --- configuration kept, by diff (defects 4, 5, 6) ------------------------------------------


def test_rich_configuration_is_kept_and_anonymous_volumes_stay_anonymous(
    docker_client: docker.DockerClient,
    make_container: MakeContainer,
    bystander: Container,
    resources: Any,
    tmp_path: Path,
) -> None:
    tag = secrets.token_hex(4)
    front = resources(
        "networks",
        f"rmd-test-front-{tag}",
        ipam=docker.types.IPAMConfig(
            pool_configs=[docker.types.IPAMPool(subnet=f"10.{200 + int(tag[:2], 16) % 50}.7.0/24")]
        ),
    )
    back = resources("networks", f"rmd-test-back-{tag}")
    vol = resources("volumes", f"rmd-test-vol-{tag}")
    bind = tmp_path / "bind"
    bind.mkdir()
    (bind / "hello").write_text("from the host\n")
    name = f"rmd-test-rich-{tag}"
    subnet = front.attrs["IPAM"]["Config"][0]["Subnet"]
    static_ip = subnet.rsplit(".", 1)[0] + ".77"
    try:
        web = make_container(
            name=name,
            labels={"app": "web", "com.docker.compose.project": "shop"},
            environment={"MODE": "prod", "SECRET": "s3cr3t"},
            # defect 5: a trailing slash on a named volume's target
            volumes={str(bind): {"bind": "/data", "mode": "ro"}, vol.name: {"bind": "/vol/", "mode": "rw"}},
            mounts=[Mount(target="/anon", source=None, type="volume")],
            tmpfs={"/scratch": "size=1m"},
            devices=["/dev/zero:/dev/myzero:rwm"],
            cap_add=["NET_ADMIN"],
            cap_drop=["MKNOD"],
            security_opt=["no-new-privileges:true"],
            ulimits=[Ulimit(name="nofile", soft=1024, hard=2048)],
            sysctls={"net.core.somaxconn": "512"},
            healthcheck=Healthcheck(test=["CMD", "true"], interval=500_000_000, retries=2),
            init=True,
            restart_policy={"Name": "on-failure", "MaximumRetryCount": 3},
            mem_limit="128m",
            cpu_shares=512,
            pids_limit=100,
            log_config={"Type": "json-file", "Config": {"max-size": "1m", "max-file": "2"}},
            ports={"8080/tcp": ("127.0.0.1", None)},
            network=front.name,
            # the `-v /path` form of an anonymous volume
            command=["sleep", "3600"],
        )
        # A static address and aliases on the primary network need the low-level connect.
        front.disconnect(web)
        front.connect(web, ipv4_address=static_ip, aliases=["web-front"])
        back.connect(web, aliases=["web-alias"])
        web.restart(timeout=1)
        assert web.exec_run(["sh", "-c", "echo kept > /vol/state && echo anon > /anon/state"]).exit_code == 0
        web.reload()
        old = web.attrs
        old_anon = next(m["Name"] for m in old["Mounts"] if m["Destination"] == "/anon")

        result = recreate(docker_client, web, watchFor="3s")
        assert result.outcome is Outcome.APPLIED, result.message
        assert result.verified is True, result.after.get("differences")
        assert result.after["differences"] == []

        new = docker_client.containers.get(name)
        assert new.id == result.after["id"] != web.id and new.status == "running"
        n = new.attrs
        for key in ("Env", "Labels", "Cmd", "Healthcheck", "ExposedPorts"):
            assert n["Config"].get(key) == old["Config"].get(key), key
        for key in (
            "Binds",
            "Tmpfs",
            "Devices",
            "CapAdd",
            "CapDrop",
            "SecurityOpt",
            "Ulimits",
            "Sysctls",
            "Init",
            "RestartPolicy",
            "Memory",
            "CpuShares",
            "PidsLimit",
            "LogConfig",
            "PortBindings",
        ):
            assert n["HostConfig"].get(key) == old["HostConfig"].get(key), key
        nets = n["NetworkSettings"]["Networks"]
        assert nets[front.name]["IPAddress"] == static_ip
        assert "web-front" in nets[front.name]["Aliases"] and "web-alias" in nets[back.name]["Aliases"]
        # Data came across: named volume, bind, and the anonymous volume's content.
        assert new.exec_run(["cat", "/vol/state", "/anon/state", "/data/hello"]).output == (
            b"kept\nanon\nfrom the host\n"
        )
        # Defect 4: the copy's anonymous volume is its own and anonymous: `rm -v` takes it.
        new_anon = next(m["Name"] for m in n["Mounts"] if m["Destination"] == "/anon")
        assert new_anon != old_anon
        with pytest.raises(docker.errors.NotFound):  # the original's went with it (rm -v)
            docker_client.volumes.get(old_anon)
        new.remove(force=True, v=True)
        with pytest.raises(docker.errors.NotFound):
            docker_client.volumes.get(new_anon)
        docker_client.volumes.get(vol.name)  # a named volume is never removed
        assert named(docker_client, name) == []
    finally:
        cleanup(docker_client, name)


# --- the copy that does not work (defect 2) --------------------------------------------------

# Starts once fine, the second time (the copy) exits 3, the third time (the original, restarted
# by the rollback) fine again: a counter in a shared volume, like a stale lock file.
FLAKY = (
    "n=$(cat /state/n 2>/dev/null || echo 0); echo $((n+1)) > /state/n; "
    '[ "$n" = 1 ] && exit 3; exec sleep 3600'
)


def test_a_copy_that_exits_restores_the_original(
    docker_client: docker.DockerClient, make_container: MakeContainer, bystander: Container, resources: Any
) -> None:
    tag = secrets.token_hex(4)
    vol = resources("volumes", f"rmd-test-state-{tag}")
    web = make_container(command=["sh", "-c", FLAKY], volumes={vol.name: {"bind": "/state"}})
    time.sleep(0.5)
    result = recreate(docker_client, web)
    assert result.outcome is Outcome.FAILED
    assert "the copy exited (code 3)" in result.message, result.message
    web.reload()
    assert web.status == "running", "the original must serve again"
    assert docker_client.containers.get(web.name).id == web.id
    assert [c.id for c in named(docker_client, web.name)] == [web.id]  # the copy is gone


# --- name collisions (defect 1) --------------------------------------------------------------


def test_a_foreign_container_holding_the_old_temporary_name_is_untouched(
    docker_client: docker.DockerClient, make_container: MakeContainer, tmp_path: Path
) -> None:
    tag = secrets.token_hex(4)
    name = f"rmd-test-web-{tag}"
    foreign = make_container(name=f"{name}.remediator-new", labels={PROTECT: "true"})
    source = tmp_path / "gone-soon"
    source.mkdir()
    web = make_container(name=name, mounts=[Mount(target="/m", source=str(source), type="bind")])
    source.rmdir()  # a --mount bind source must exist at create: creating the copy fails
    result = recreate(docker_client, web)
    assert result.outcome is Outcome.FAILED and "create copy" in result.message, result.message
    foreign.reload()
    web.reload()
    assert foreign.status == "running" and web.status == "running"
    assert {c.id for c in named(docker_client, name)} == {web.id, foreign.id}


class Hook:
    """A journal that runs `fn` when a phase is recorded: a failure point inside the procedure."""

    def __init__(self, phase: str, fn: Callable[[], None]) -> None:
        self.phase, self.fn = phase, fn

    def record(self, phase: str, data: Mapping[str, Any], at: float | None = None) -> None:
        if phase == self.phase:
            self.fn()

    def close(self, outcome: str, at: float | None = None) -> None:
        pass


def test_a_foreign_container_taking_the_name_meanwhile_is_untouched(
    docker_client: docker.DockerClient, make_container: MakeContainer, bystander: Container
) -> None:
    web = make_container()
    name = web.name
    foreign: list[Container] = []

    def squat() -> None:  # someone creates a container under the name while it is free
        foreign.append(make_container(name=name, labels={"x": "y"}))

    ctx = ctx_of(docker_client, journal_factory=lambda a, t: Hook("renaming_copy", squat))
    result = RecreateContainer().execute(plan_for(web), ctx)
    assert result.outcome is Outcome.FAILED, result.message
    assert "held by" in result.message, result.message
    (squatter,) = foreign
    squatter.reload()
    web.reload()
    try:
        assert squatter.status == "running" and squatter.name == name
        assert web.status == "running", "the original still serves, under its aside name"
        assert web.name.startswith(f"{name}.rmd-old-")
        # Our copy is gone; the squatter and the original remain.
        assert {c.id for c in named(docker_client, name)} == {squatter.id, web.id}
    finally:
        web.remove(force=True, v=True)  # make_container removes by the original name only


# --- dependents (defect 3) -------------------------------------------------------------------


def test_a_dependent_is_refused_then_recreated_against_the_new_target(
    docker_client: docker.DockerClient, make_container: MakeContainer, bystander: Container
) -> None:
    target = make_container()
    side = make_container(network_mode=f"container:{target.id}")
    refused = recreate(docker_client, target)
    assert refused.outcome is Outcome.SKIPPED
    assert f"has dependents: {side.name} (NetworkMode)" in refused.message

    result = recreate(docker_client, target, allowDependents=True)
    assert result.outcome is Outcome.APPLIED, result.message
    assert result.verified is True, result.after.get("differences")
    new_target = docker_client.containers.get(target.name)
    new_side = docker_client.containers.get(side.name)
    assert new_target.id != target.id and new_side.id != side.id
    assert new_side.attrs["HostConfig"]["NetworkMode"] == f"container:{new_target.id}"
    assert new_side.status == "running"
    # It shares the new target's network namespace: it sees eth0, not only lo.
    assert b"eth0" in new_side.exec_run(["ip", "link"]).output
    assert [c.id for c in named(docker_client, side.name)] == [new_side.id]


def test_a_dependent_whose_copy_fails_rolls_back_the_whole_group(
    docker_client: docker.DockerClient, make_container: MakeContainer, bystander: Container, resources: Any
) -> None:
    vol = resources("volumes", f"rmd-test-state-{secrets.token_hex(4)}")
    target = make_container()
    side = make_container(
        network_mode=f"container:{target.id}",
        command=["sh", "-c", FLAKY],
        volumes={vol.name: {"bind": "/state"}},
    )
    time.sleep(0.5)
    result = recreate(docker_client, target, allowDependents=True)
    assert result.outcome is Outcome.FAILED and "the copy exited (code 3)" in result.message, result.message
    assert "COULD NOT" not in result.message, result.message
    # The originals serve again, the dependent in the original target's network namespace.
    assert [c.id for c in named(docker_client, target.name)] == [target.id]
    assert [c.id for c in named(docker_client, side.name)] == [side.id]
    for c in (target, side):
        c.reload()
        assert c.status == "running", c.name
    assert side.attrs["HostConfig"]["NetworkMode"] == f"container:{target.id}"
    assert b"eth0" in side.exec_run(["ip", "link"]).output


# --- writable layer (defect 6) ---------------------------------------------------------------


def test_writable_layer_changes_are_refused_unless_disposable(
    docker_client: docker.DockerClient, make_container: MakeContainer
) -> None:
    web = make_container()
    assert web.exec_run(["sh", "-c", "echo scratch > /tmp/x"]).exit_code == 0
    plan = plan_for(web)
    dry = RecreateContainer().execute(plan, ApplyContext(HOST, SystemClock(), True, lambda: docker_client))
    assert dry.outcome is Outcome.WOULD_APPLY and "restart count 0" in dry.message, dry.message
    assert web.exec_run(["sh", "-c", "echo precious > /etc/precious"]).exit_code == 0
    refused = recreate(docker_client, web)
    assert refused.outcome is Outcome.SKIPPED
    assert "writable-layer changes a recreate would lose: A /etc/precious" in refused.message
    web.reload()
    assert web.status == "running" and docker_client.containers.get(web.name).id == web.id
    allowed = recreate(docker_client, web, disposablePaths=["/tmp", "/etc/precious"])
    assert allowed.outcome is Outcome.APPLIED, allowed.message


# --- orchestrators (defect 8) ----------------------------------------------------------------


def test_a_kubernetes_container_is_never_recreated(
    docker_client: docker.DockerClient, make_container: MakeContainer
) -> None:
    pod = make_container(labels={"io.kubernetes.pod.name": "web-0", "io.kubernetes.pod.namespace": "shop"})
    p = RecreateContainerParams.model_validate(FAST)
    reading = Reading("dentries", time.time(), containers=(ContainerSample(ref_of(pod), {"m": 1.0}),))
    planned = RecreateContainer().plan(PlanContext("t", "m", "host", reading, p, lambda _: True, 0.0))
    assert isinstance(planned, str) and "pod shop/web-0" in planned and "API server" in planned
    pod.reload()
    assert pod.status == "running"


# --- kill -9 in every phase ------------------------------------------------------------------

CHILD = """
import os, signal, sys
from remediator.actions.base import ApplyContext
from remediator.actions.recreate import RecreateContainer
from remediator.clock import SystemClock
from remediator.host import HostRoot
from remediator.model import Plan, Target, TargetKind
from remediator.state import StateStore, StoreJournal
import docker, json

db, crash, plan_json, url = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4]
store = StateStore(__import__("pathlib").Path(db))
client = docker.DockerClient(base_url=url)
when, _, phase = crash.partition(":")

class Crashing(StoreJournal):
    def record(self, p, data, at=None):
        if p == phase and when == "before":
            os.kill(os.getpid(), signal.SIGKILL)
        super().record(p, data, at)
        if p == phase and when == "after":
            os.kill(os.getpid(), signal.SIGKILL)

d = json.loads(plan_json)
plan = Plan(d["action"], Target(TargetKind.CONTAINER, d["target"]["id"], d["target"]["name"]),
            d["summary"], d["params"], d["expect"])
ctx = ApplyContext(HostRoot(), SystemClock(), False, lambda: client,
                   journal_factory=lambda a, t: Crashing(store, a, t, None, 0.0))
r = RecreateContainer().execute(plan, ctx)
print("NOT KILLED", r.outcome, r.message)
sys.exit(1)
"""

SINGLE = [p for p in PHASES if p != "stopping_dependents"]
CRASH_POINTS = [f"before:{SINGLE[1]}"] + [f"after:{p}" for p in SINGLE] + ["after:rolling_back"]


@pytest.mark.parametrize("crash", CRASH_POINTS)
def test_kill_9_in_any_phase_then_recovery_leaves_exactly_one(
    docker_client: docker.DockerClient,
    make_container: MakeContainer,
    bystander: Container,
    resources: Any,
    tmp_path: Path,
    crash: str,
    docker_url: str,
) -> None:
    web = make_container(mounts=[Mount(target="/anon", source=None, type="volume")])
    assert web.exec_run(["sh", "-c", "echo anon > /anon/state"]).exit_code == 0
    name = web.name
    db = tmp_path / "state.db"
    plan = plan_for(web, watchFor="1s")
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    if crash == "after:rolling_back":
        # A copy that exits makes the procedure roll back; kill it as the rollback begins.
        vol = resources("volumes", f"rmd-test-state-{secrets.token_hex(4)}")
        web.remove(force=True, v=True)
        web = make_container(name=name, command=["sh", "-c", FLAKY], volumes={vol.name: {"bind": "/state"}})
        time.sleep(0.5)
        plan = plan_for(web, watchFor="1s")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    child = subprocess.run(
        [sys.executable, str(script), str(db), crash, json.dumps(plan.to_dict()), docker_url],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        check=False,
    )
    assert child.returncode == -signal.SIGKILL, child.stdout + child.stderr

    store = StateStore(db)
    try:
        (entry,) = store.journal_open()
        engine = Engine(
            PolicySet("none"),
            host=HOST,
            clock=SystemClock(),
            store=store,
            docker_factory=lambda: docker_client,
        )
        (summary,) = engine.recover_interrupted()
        assert store.journal_open() == []
    finally:
        store.close()
    assert "COULD NOT" not in summary["message"], summary["message"]
    left = named(docker_client, name)
    assert len(left) == 1, [(c.name, c.status) for c in left]
    (survivor,) = left
    survivor.reload()
    assert survivor.name == name and survivor.status == "running", summary["message"]
    forward = entry.phase == "removing_old"
    assert (survivor.id != web.id) == forward, (entry.phase, summary["message"])
    if crash != "after:rolling_back":
        assert survivor.exec_run(["cat", "/anon/state"]).output == b"anon\n"
    # Test labels come across, so the fixture removes the survivor, whoever it is.
    assert survivor.labels[TEST_LABEL] == "1" and OWNER_LABEL in survivor.labels


@pytest.mark.parametrize("crash", ["after:stopping_dependents", "after:settling", "after:removing_old"])
def test_kill_9_with_a_dependent_then_recovery_decides_for_the_group(
    docker_client: docker.DockerClient,
    make_container: MakeContainer,
    bystander: Container,
    tmp_path: Path,
    crash: str,
    docker_url: str,
) -> None:
    target = make_container()
    side = make_container(network_mode=f"container:{target.id}")
    plan = plan_for(target, watchFor="1s", allowDependents=True)
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    db = tmp_path / "state.db"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    child = subprocess.run(
        [sys.executable, str(script), str(db), crash, json.dumps(plan.to_dict()), docker_url],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        check=False,
    )
    assert child.returncode == -signal.SIGKILL, child.stdout + child.stderr
    store = StateStore(db)
    try:
        engine = Engine(
            PolicySet("none"),
            host=HOST,
            clock=SystemClock(),
            store=store,
            docker_factory=lambda: docker_client,
        )
        summaries = engine.recover_interrupted()
        assert store.journal_open() == []
    finally:
        store.close()
    assert summaries and all("COULD NOT" not in s["message"] for s in summaries), summaries
    forward = crash == "after:removing_old"
    (t,) = named(docker_client, target.name)
    (d,) = named(docker_client, side.name)
    for c in (t, d):
        c.reload()
        assert c.status == "running", (c.name, summaries)
    assert (t.id != target.id) == forward and (d.id != side.id) == forward, summaries
    assert d.attrs["HostConfig"]["NetworkMode"] == f"container:{t.id}"
    assert b"eth0" in d.exec_run(["ip", "link"]).output
