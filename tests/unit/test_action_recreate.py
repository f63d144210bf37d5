"""recreate-container: configuration (pure), the journalled procedure and its recovery against a
fake Docker, and the refusals."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import docker.errors
import pytest
from pydantic import ValidationError

from remediator.actions.base import ApplyContext, Interrupted, MemoryJournal, PlanContext
from remediator.actions.docker_config import (
    anonymous_volumes,
    configuration,
    creation_spec,
    dependents,
    differences,
    layer_changes,
    orchestrator_refusal,
    redact_env,
)
from remediator.actions.recreate import RecreateContainer, RecreateContainerParams
from remediator.actions.recreate_procedure import PHASES
from remediator.clock import FakeClock
from remediator.model import ContainerRef, ContainerSample, Outcome, Plan, Reading
from tests.helpers import make_host

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "docker"
INSPECT: dict[str, Any] = json.loads((FIXTURES / "inspect.json").read_text())
CID = "5fed7652134bd8636559d9cfa0ce537d1d35ece4c49c5a944a3ee94faac7ec36"
IMAGE_ID = "sha256:" + "1" * 64
NEW_ID = "9" * 64


def rich() -> dict[str, Any]:
    a = copy.deepcopy(INSPECT[CID])
    a["Name"] = "/web"
    a["Image"] = IMAGE_ID
    a["Config"].update(Hostname=CID[:12], Env=["MODE=prod"], Labels={"app": "web"}, Volumes={"/cache": {}})
    a["HostConfig"].update(
        Binds=["/srv/web:/data:ro", "webvol:/vol/", "/anon"],
        NetworkMode="appnet",
        Links=["/db:/web/database"],
        Mounts=[{"Type": "volume", "Target": "/m"}],
        AutoRemove=False,
    )
    a["Mounts"] = [
        {"Type": "bind", "Source": "/srv/web", "Destination": "/data", "RW": False},
        {
            "Type": "volume",
            "Name": "webvol",
            "Source": "/v/webvol",
            "Destination": "/vol",
            "RW": True,
            "Driver": "local",
        },
        {
            "Type": "volume",
            "Name": "a" * 64,
            "Source": "/v/a",
            "Destination": "/cache",
            "RW": True,
            "Driver": "local",
        },
        {
            "Type": "volume",
            "Name": "b" * 64,
            "Source": "/v/b",
            "Destination": "/anon",
            "RW": True,
            "Driver": "local",
        },
        {
            "Type": "volume",
            "Name": "c" * 64,
            "Source": "/v/c",
            "Destination": "/m",
            "RW": True,
            "Driver": "local",
        },
    ]
    a["NetworkSettings"]["Networks"] = {
        "appnet": {
            "Aliases": ["web-alias", CID[:12]],
            "IPAMConfig": None,
            "NetworkID": "n1" * 32,
            "IPAddress": "10.1.0.5",
            "MacAddress": "02:42:0a:01:00:05",
        },
        "backnet": {"Aliases": [CID[:12]], "IPAMConfig": {"IPv4Address": "10.2.0.9"}, "NetworkID": "n2" * 32},
    }
    return a


# --- configuration (pure) ---------------------------------------------------------------------


def test_anonymous_volumes_are_the_ones_without_a_source() -> None:
    assert [v.destination for v in anonymous_volumes(rich())] == ["/anon", "/cache", "/m"]


def test_spec_posts_the_configuration_back_and_keeps_anonymous_volumes_anonymous() -> None:
    spec = creation_spec(rich(), "img:1")
    hc = spec.body["HostConfig"]
    assert hc["Binds"] == ["/srv/web:/data:ro", "webvol:/vol/", "/anon"]  # as given: no names added
    assert hc["Mounts"] == [{"Type": "volume", "Target": "/m"}]
    assert hc["Links"] == ["db:database"]
    assert "Hostname" not in spec.body and spec.body["Image"] == "img:1"
    assert spec.body["NetworkingConfig"] == {"EndpointsConfig": {"appnet": {"Aliases": ["web-alias"]}}}
    assert spec.extra_networks == {"backnet": {"IPAMConfig": {"IPv4Address": "10.2.0.9"}}}


def test_spec_on_api_1_44_creates_every_network_at_once() -> None:
    spec = creation_spec(rich(), "img:1", api_version="1.45")
    assert set(spec.body["NetworkingConfig"]["EndpointsConfig"]) == {"appnet", "backnet"}
    assert spec.extra_networks == {}


def test_spec_rewrites_references_to_a_recreated_target() -> None:
    a = rich()
    a["HostConfig"].update(NetworkMode="container:old", PidMode="container:old", VolumesFrom=["old:ro", "x"])
    a["Config"]["Hostname"] = "theirs"
    spec = creation_spec(a, "img", rewrite={"old": "new"})
    hc = spec.body["HostConfig"]
    assert (hc["NetworkMode"], hc["PidMode"], hc["VolumesFrom"]) == (
        "container:new",
        "container:new",
        ["new:ro", "x"],
    )
    assert "Hostname" not in spec.body and "NetworkingConfig" not in spec.body


def test_configuration_normalises_what_docker_normalises() -> None:
    a, b = rich(), rich()
    b["Id"] = NEW_ID
    b["Name"] = "/web.rmd-123"
    b["Config"]["Hostname"] = NEW_ID[:12]
    b["HostConfig"]["Binds"] = ["/srv/web:/data:ro", "webvol:/vol", "/anon"]  # trailing slash gone
    for m in b["Mounts"]:
        if m["Type"] == "volume" and m["Name"] != "webvol":
            m["Name"], m["Source"] = "f" * 64, "/v/f"  # its own anonymous volumes
    b["NetworkSettings"]["Networks"]["appnet"].update(
        Aliases=["web-alias", NEW_ID[:12]], IPAddress="10.1.0.6"
    )
    b["NetworkSettings"]["Networks"]["backnet"]["Aliases"] = [NEW_ID[:12], "web.rmd-123"]
    assert differences(configuration(a), configuration(b, extra_own=["web.rmd-123"])) == []


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (lambda b: b["HostConfig"].update(Memory=1), "HostConfig.Memory: 0 -> 1"),
        (lambda b: b["Config"].update(Env=["MODE=dev"]), "Config.Env: ['MODE=sha256:"),
        (
            lambda b: b["NetworkSettings"]["Networks"]["backnet"].update(IPAMConfig=None),
            "Networks.backnet.IPAMConfig",
        ),
        (lambda b: b["NetworkSettings"]["Networks"].pop("backnet"), "Networks.backnet: {"),
        (lambda b: b["Mounts"][1].update(Name="othervol"), "MountPoints: "),
        (lambda b: b.update(Image="sha256:" + "2" * 64), "Image: 'sha256:111"),
    ],
)
def test_differences_name_the_field(change: Any, expected: str) -> None:
    a, b = rich(), rich()
    change(b)
    found = differences(configuration(a), configuration(b))
    assert len(found) == 1 and found[0].startswith(expected), found


def test_redact_env_keeps_keys_hides_values() -> None:
    out = redact_env(["A=secret", "B=", "C"])
    assert out[0].startswith("A=sha256:") and "secret" not in out[0]
    assert out[1].startswith("B=sha256:") and out[2] == "C"


def test_dependents_by_id_or_name() -> None:
    target = {"Id": CID, "Name": "/web"}
    others = [
        {"Id": "1", "Name": "/side", "HostConfig": {"NetworkMode": f"container:{CID}"}},
        {"Id": "2", "Name": "/pid", "HostConfig": {"PidMode": "container:web", "IpcMode": "container:web"}},
        {"Id": "3", "Name": "/vols", "HostConfig": {"VolumesFrom": ["web:ro"]}},
        {"Id": "4", "Name": "/other", "HostConfig": {"NetworkMode": "container:webx", "VolumesFrom": ["x"]}},
    ]
    assert [str(d) for d in dependents(target, others)] == [
        "side (NetworkMode)",
        "pid (PidMode)",
        "pid (IpcMode)",
        "vols (VolumesFrom)",
    ]


def test_layer_changes_skip_disposable_paths_mount_points_and_parent_dirs() -> None:
    changes = [
        {"Path": "/tmp", "Kind": 0},
        {"Path": "/tmp/x", "Kind": 1},
        {"Path": "/etc", "Kind": 0},
        {"Path": "/etc/app.conf", "Kind": 0},
        {"Path": "/srv", "Kind": 1},
        {"Path": "/srv/data", "Kind": 1},
        {"Path": "/bin/sh", "Kind": 2},
    ]
    assert layer_changes(changes, ["/tmp"], ["/srv/data"]) == ["C /etc/app.conf", "D /bin/sh"]


def test_orchestrators() -> None:
    k8s = orchestrator_refusal({"io.kubernetes.pod.name": "web-0", "io.kubernetes.pod.namespace": "shop"})
    assert k8s is not None and "pod shop/web-0" in k8s and "API server" in k8s
    swarm = orchestrator_refusal({"com.docker.swarm.task.id": "t1"})
    assert swarm is not None and "swarm task" in swarm
    assert (
        orchestrator_refusal({"com.docker.compose.project": "shop", "com.docker.swarm.service.name": "s"})
        is None
    )


# --- params and plan --------------------------------------------------------------------------


def test_params() -> None:
    p = RecreateContainerParams.model_validate({"stopTimeout": "1.5s", "disposablePaths": ["/cache"]})
    assert p.stop_timeout_seconds == 2 and p.disposable_paths == ["/cache"] and p.allow_dependents is False


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"stopTimeout": "6m"}, "at most 5m"),
        ({"watchFor": "11m"}, "at most 10m"),
        ({"disposablePaths": ["/"]}, "absolute paths other than /"),
        ({"disposablePaths": ["tmp"]}, "absolute paths"),
        ({"allowDependents": "yes"}, "valid boolean"),
    ],
)
def test_params_reject(raw: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        RecreateContainerParams.model_validate(raw)


def plan_ctx(refs: list[ContainerRef], **params: Any) -> PlanContext:
    reading = Reading("dentries", 0.0, containers=tuple(ContainerSample(r, {"m": 1.0}) for r in refs))
    p = RecreateContainerParams.model_validate({"watchFor": "2s", **params})
    return PlanContext("p", "m", "host", reading, p, lambda c: True, 0.0)


def test_plan_says_what_is_lost_and_refuses_kubernetes() -> None:
    plan = RecreateContainer().plan(plan_ctx([ContainerRef(CID, "web")]))
    assert isinstance(plan, Plan)
    assert (
        "lost: the container id, its log history (docker logs), its restart count, its health state"
        in plan.summary
    )
    k8s = ContainerRef(CID, "k8s_web", labels={"io.kubernetes.pod.name": "w"})
    refused = RecreateContainer().plan(plan_ctx([k8s]))
    assert isinstance(refused, str) and "kubelet" in refused


def test_is_disruptive() -> None:
    assert RecreateContainer.spec().disruptive is True


# --- a fake Docker ----------------------------------------------------------------------------


class FakeAPI:
    """The Engine API calls recreate makes, on an in-memory table; records mutating calls."""

    api_version = "1.41"

    def __init__(self, containers: dict[str, dict[str, Any]], fail: tuple[str, ...] | None = None) -> None:
        self.containers = containers
        self.calls: list[tuple[Any, ...]] = []
        self.fail = fail
        self.exit_copy = False
        self.next_id = NEW_ID

    def _find(self, ident: str) -> dict[str, Any]:
        for c in self.containers.values():
            if ident in (c["Id"], c["Name"].lstrip("/")):
                return c
        raise docker.errors.NotFound(f"No such container: {ident}")

    def _maybe_fail(self, *call: Any) -> None:
        if self.fail is not None and call[: len(self.fail)] == self.fail:
            raise docker.errors.APIError(f"{call[0]} refused")

    def containers_list(self, all: bool = False) -> list[dict[str, Any]]:
        return [{"Id": c["Id"]} for c in self.containers.values()]

    def inspect_container(self, ident: str) -> dict[str, Any]:
        return copy.deepcopy(self._find(ident))

    def inspect_image(self, ref: str) -> dict[str, Any]:
        return {"Id": IMAGE_ID}

    def diff(self, ident: str) -> list[dict[str, Any]]:
        return list(self._find(ident).get("_diff", []))

    def create_container_from_config(self, body: dict[str, Any], name: str) -> dict[str, Any]:
        self.calls.append(("create", name.split(".rmd-")[0] + ".rmd-*"))
        self._maybe_fail("create")
        if any(c["Name"] == "/" + name for c in self.containers.values()):
            raise docker.errors.APIError("409 Conflict")
        old = self.containers[CID]
        new = {
            "Id": self.next_id,
            "Name": "/" + name,
            "Image": IMAGE_ID,
            "Config": {k: v for k, v in body.items() if k not in ("HostConfig", "NetworkingConfig")},
            "HostConfig": body["HostConfig"],
            "State": {"Running": False},
            "Mounts": [],
            "NetworkSettings": json.loads(
                json.dumps(old["NetworkSettings"]).replace(CID[:12], self.next_id[:12])
            ),
        }
        links = body["HostConfig"].get("Links") or []
        shown = [f"/{src}:/{name}/{alias}" for src, _, alias in (x.partition(":") for x in links)]
        new["HostConfig"] = {**body["HostConfig"], "Links": shown}
        new["Config"].setdefault("Hostname", self.next_id[:12])
        self.containers[self.next_id] = new
        return {"Id": self.next_id}

    def connect_container_to_network(self, ident: str, net: str, **kw: Any) -> None:
        self.calls.append(("connect", ident[:4], net))

    def stop(self, ident: str, timeout: int) -> None:
        self.calls.append(("stop", ident[:4], timeout))
        self._find(ident)["State"]["Running"] = False
        self._maybe_fail("stop", ident[:4])

    def rename(self, ident: str, name: str) -> None:
        self.calls.append(
            ("rename", ident[:4], name.split(".rmd-")[0] + (".rmd-*" if ".rmd-" in name else ""))
        )
        self._maybe_fail("rename", ident[:4])
        if any(c["Name"] == "/" + name for c in self.containers.values()):
            raise docker.errors.APIError("409 Conflict: name in use")
        self._find(ident)["Name"] = "/" + name

    def start(self, ident: str) -> None:
        self.calls.append(("start", ident[:4]))
        self._maybe_fail("start", ident[:4])
        c = self._find(ident)
        c["State"]["Running"] = not (self.exit_copy and c["Id"] == NEW_ID)
        if not c["State"]["Running"]:
            c["State"]["ExitCode"] = 3

    def remove_container(self, ident: str, v: bool = False, force: bool = False) -> None:
        self.calls.append(("remove", ident[:4], v, force))
        assert ident in self.containers, "remove by id only"
        del self.containers[ident]


def docker_with(attrs: dict[str, Any], fail: tuple[str, ...] | None = None) -> FakeAPI:
    attrs = copy.deepcopy(attrs)
    attrs["Id"] = CID
    attrs["State"] = {"Running": True, "Pid": 8082}
    attrs["Mounts"] = [m for m in attrs["Mounts"] if m["Type"] != "volume" or m["Name"] == "webvol"]
    attrs["HostConfig"]["Binds"] = ["/srv/web:/data:ro", "webvol:/vol/"]
    attrs["HostConfig"]["Mounts"] = []
    attrs["Config"]["Volumes"] = None
    api = FakeAPI({CID: attrs}, fail)
    return api


class Client:
    """docker.DockerClient's shape: `.api`; the fake's list call is `containers`."""

    def __init__(self, api: FakeAPI) -> None:
        self.api = _Api(api)


class _Api:
    def __init__(self, fake: FakeAPI) -> None:
        self._fake = fake

    def __getattr__(self, name: str) -> Any:
        if name == "containers":
            return self._fake.containers_list
        return getattr(self._fake, name)


def fake_mounts(api: FakeAPI) -> None:
    """The copy gets the original's (non-anonymous) mounts, as Docker does at create."""
    for c in api.containers.values():
        if not c["Mounts"]:
            c["Mounts"] = copy.deepcopy(api.containers[CID]["Mounts"])


def apply_ctx(
    tmp_path: Path,
    api: FakeAPI,
    dry_run: bool = False,
    journal: MemoryJournal | None = None,
) -> ApplyContext:
    host = make_host(tmp_path, {"proc/sys/fs/dentry-state": "2050186 2048392 45 0 2007232 0\n"})
    orig = api.create_container_from_config

    def create(body: dict[str, Any], name: str) -> dict[str, Any]:
        out = orig(body, name)
        fake_mounts(api)
        return out

    api.create_container_from_config = create  # type: ignore[method-assign]
    j = journal if journal is not None else MemoryJournal()
    return ApplyContext(host, FakeClock(), dry_run, lambda: Client(api), journal_factory=lambda a, t: j)


def the_plan(**params: Any) -> Plan:
    plan = RecreateContainer().plan(plan_ctx([ContainerRef(CID, "web")], **params))
    assert isinstance(plan, Plan)
    return plan


def test_apply_creates_first_and_removes_the_original_last(tmp_path: Path) -> None:
    api = docker_with(rich())
    journal = MemoryJournal()
    result = RecreateContainer().execute(the_plan(), apply_ctx(tmp_path, api, journal=journal))
    assert result.outcome is Outcome.APPLIED, result.message
    assert result.verified is True, result.after
    assert api.calls == [
        ("create", "web.rmd-*"),
        ("connect", "9999", "backnet"),
        ("stop", CID[:4], 10),
        ("rename", CID[:4], "web.rmd-*"),
        ("rename", "9999", "web"),
        ("start", "9999"),
        ("remove", CID[:4], True, False),
    ]
    phases = [p for p, _ in journal.phases]
    assert phases == [p for p in PHASES if p not in ("copying_volumes", "stopping_dependents")]
    assert journal.phases[0][1]["new_id"] is None and journal.phases[1][1]["new_id"] == NEW_ID
    assert journal.outcome == "applied"


def test_a_copy_that_exits_restores_the_original(tmp_path: Path) -> None:
    api = docker_with(rich())
    api.exit_copy = True
    result = RecreateContainer().execute(the_plan(), apply_ctx(tmp_path, api))
    assert result.outcome is Outcome.FAILED
    assert "the copy exited (code 3)" in result.message
    assert api.calls[-4:] == [
        ("start", "9999"),
        ("remove", "9999", True, True),
        ("rename", CID[:4], "web"),
        ("start", CID[:4]),
    ]
    assert list(api.containers) == [CID] and api.containers[CID]["State"]["Running"]


def test_a_failed_create_touches_nothing_else(tmp_path: Path) -> None:
    api = docker_with(rich(), fail=("create",))
    foreign = {
        "Id": "f" * 64,
        "Name": "/web.remediator-new",
        "State": {"Running": True},
        "HostConfig": {},
        "Config": {"Labels": {"remediator.protect": "true"}},
    }
    api.containers["f" * 64] = foreign
    result = RecreateContainer().execute(the_plan(), apply_ctx(tmp_path, api))
    assert result.outcome is Outcome.FAILED and "create copy" in result.message
    assert [c[0] for c in api.calls] == ["create"]
    assert "f" * 64 in api.containers and api.containers[CID]["State"]["Running"]


def test_a_name_taken_meanwhile_is_never_touched(tmp_path: Path) -> None:
    api = docker_with(rich())
    squatter = {"Id": "e" * 64, "Name": "/web", "State": {"Running": True}, "HostConfig": {}, "Config": {}}

    class Squat(MemoryJournal):
        def record(self, phase: str, data: Any, at: float | None = None) -> None:
            super().record(phase, data, at)
            if phase == "renaming_copy":
                api.containers["e" * 64] = squatter

    result = RecreateContainer().execute(the_plan(), apply_ctx(tmp_path, api, journal=Squat()))
    assert result.outcome is Outcome.FAILED
    assert "web is now held by eeeeeeeeeeee, not ours" in result.message
    assert api.containers["e" * 64] is squatter
    assert NEW_ID not in api.containers and api.containers[CID]["State"]["Running"]
    assert not any(c[0] == "remove" and c[1] == "eeee" for c in api.calls)


@pytest.mark.parametrize(
    ("attrs", "reason"),
    [
        ({"Name": "/web2"}, f"container {CID[:12]} was renamed from web to web2"),
        ({"State": {"Running": False}}, "container web is not running"),
        ({"Config": {"Labels": {"remediator.protect": "true"}}}, "container web is protected"),
        ({"Config": {"Labels": {"com.docker.swarm.task.id": "t"}}}, "container web is a swarm task"),
        ({"HostConfig": {"AutoRemove": True}}, "started with --rm"),
        (
            {"_diff": [{"Path": "/etc/x", "Kind": 1}]},
            "writable-layer changes a recreate would lose: A /etc/x",
        ),
    ],
)
def test_recheck_refuses(tmp_path: Path, attrs: dict[str, Any], reason: str) -> None:
    api = docker_with(rich())
    c = api.containers[CID]
    for k, v in attrs.items():
        if isinstance(v, dict):
            c[k].update(v)
        else:
            c[k] = v
    result = RecreateContainer().execute(the_plan(), apply_ctx(tmp_path, api))
    assert result.outcome is Outcome.SKIPPED and reason in result.message, result.message
    assert api.calls == []


def test_recheck_refuses_dependents_unless_allowed(tmp_path: Path) -> None:
    api = docker_with(rich())
    api.containers["d" * 64] = {
        "Id": "d" * 64,
        "Name": "/side",
        "State": {"Running": True},
        "HostConfig": {"NetworkMode": f"container:{CID}"},
        "Config": {},
    }
    result = RecreateContainer().execute(the_plan(), apply_ctx(tmp_path, api))
    assert result.outcome is Outcome.SKIPPED
    assert "has dependents: side (NetworkMode)" in result.message and "allowDependents" in result.message


def test_dry_run_previews_the_losses_and_changes_nothing(tmp_path: Path) -> None:
    api = docker_with(rich())
    api.containers[CID]["_diff"] = [{"Path": "/tmp/x", "Kind": 1}]
    api.containers[CID]["RestartCount"] = 4
    result = RecreateContainer().execute(the_plan(), apply_ctx(tmp_path, api, dry_run=True))
    assert result.outcome is Outcome.WOULD_APPLY
    assert "restart count 4" in result.message
    assert api.calls == []


# --- recovery ---------------------------------------------------------------------------------


def interrupted_at(phase: str, api: FakeAPI, tmp_path: Path, *, with_id: bool = True) -> ApplyContext:
    """Run the procedure until `phase` is recorded, then "crash" (stop taking steps)."""

    class Crash(Exception):
        pass

    class Stop(MemoryJournal):
        def record(self, p: str, data: Any, at: float | None = None) -> None:
            super().record(p, data, at)
            if p == phase:
                raise Crash

    journal = Stop()
    ctx = apply_ctx(tmp_path, api, journal=journal)
    plan = the_plan()
    action = RecreateContainer()
    from remediator.actions import recreate as rc

    def crash(jobs: Any) -> list[str]:
        raise Crash

    # Crash means no rollback: the process dies where the journal was last written.
    real_rollback = rc.rollback_group
    rc.rollback_group = crash  # type: ignore[assignment]
    try:
        with pytest.raises(Crash):
            action.apply(plan, ctx)
    finally:
        rc.rollback_group = real_rollback
    data = dict(journal.phases[-1][1])
    if not with_id:
        data["new_id"] = None
    ctx.extra["interrupted"] = Interrupted(1, "recreate-container", CID, phase, data, 0.0)
    return ctx


@pytest.mark.parametrize("phase", [p for p in PHASES if p not in ("copying_volumes", "stopping_dependents")])
def test_recovery_from_every_phase_leaves_exactly_one(tmp_path: Path, phase: str) -> None:
    api = docker_with(rich())
    ctx = interrupted_at(phase, api, tmp_path)
    result = RecreateContainer().recover(ctx.extra["interrupted"], ctx)
    assert "COULD NOT" not in result.message, result.message
    named = [c for c in api.containers.values() if c["Name"].startswith("/web")]
    assert len(named) == 1 and named[0]["Name"] == "/web" and named[0]["State"]["Running"], api.containers
    assert (named[0]["Id"] == NEW_ID) == (phase == "removing_old"), result.message


def test_recovery_finds_a_copy_whose_id_was_never_recorded(tmp_path: Path) -> None:
    api = docker_with(rich())
    ctx = interrupted_at("created", api, tmp_path, with_id=False)
    assert NEW_ID in api.containers
    result = RecreateContainer().recover(ctx.extra["interrupted"], ctx)
    assert "removed copy 999999999999" in result.message
    assert list(api.containers) == [CID]


def test_recovery_never_removes_a_look_alike(tmp_path: Path) -> None:
    """Without a recorded id, only the journalled temporary name's holder is the copy."""
    api = docker_with(rich())
    ctx = interrupted_at("creating", api, tmp_path, with_id=False)
    api.containers.pop(NEW_ID, None)
    api.containers["f" * 64] = {
        "Id": "f" * 64,
        "Name": "/web.remediator-new",
        "State": {"Running": True},
        "HostConfig": {},
        "Config": {},
    }
    RecreateContainer().recover(ctx.extra["interrupted"], ctx)
    assert "f" * 64 in api.containers and api.containers[CID]["State"]["Running"]


def test_the_copy_is_pinned_to_the_image_when_the_tag_moved(tmp_path: Path) -> None:
    api = docker_with(rich())
    bodies: list[dict[str, Any]] = []
    create = api.create_container_from_config

    def spy(body: dict[str, Any], name: str) -> dict[str, Any]:
        bodies.append(body)
        return create(body, name)

    api.create_container_from_config = spy  # type: ignore[method-assign]
    api.inspect_image = lambda ref: {"Id": "sha256:" + "2" * 64}  # type: ignore[method-assign]
    result = RecreateContainer().execute(the_plan(), apply_ctx(tmp_path, api))
    assert result.outcome is Outcome.APPLIED, result.message
    assert bodies[0]["Image"] == IMAGE_ID and "pinned to image sha256:11111111111" in result.message


def test_the_original_gets_its_own_stop_timeout(tmp_path: Path) -> None:
    api = docker_with(rich())
    api.containers[CID]["Config"]["StopTimeout"] = 42
    RecreateContainer().execute(the_plan(stopTimeout="3s"), apply_ctx(tmp_path, api))
    assert ("stop", CID[:4], 42) in api.calls
