"""recreate-container: the create body, recheck, the swap and its rollback against a fake Docker."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import docker.errors
import pytest
from pydantic import ValidationError

from remediator.actions.base import ApplyContext, PlanContext
from remediator.actions.recreate import (
    RecreateContainer,
    RecreateContainerParams,
    config_differences,
    config_snapshot,
    creation_spec,
    redact_env,
)
from remediator.clock import FakeClock
from remediator.model import ContainerRef, ContainerSample, Outcome, Plan, Reading, TargetKind
from remediator.policy.rules import Match
from tests.helpers import make_host

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "docker"
INSPECT: dict[str, Any] = json.loads((FIXTURES / "inspect.json").read_text())
CID = "5fed7652134bd8636559d9cfa0ce537d1d35ece4c49c5a944a3ee94faac7ec36"
IMAGE_ID = "sha256:" + "1" * 64
NEW_ID = "9" * 64


def captured() -> dict[str, Any]:
    return copy.deepcopy(INSPECT[CID])


def rich() -> dict[str, Any]:
    """A container with the settings people care about: a custom network with aliases, a second
    network, a bind mount, a named and an anonymous volume, a restart policy, a legacy link."""
    a = captured()
    a["Name"] = "/web"
    a["Image"] = IMAGE_ID
    a["Config"].update(
        Hostname=CID[:12],
        Env=["MODE=prod", "PATH=/bin"],
        Labels={"app": "web", "tier": "front"},
        Volumes={"/cache": {}},
    )
    a["HostConfig"].update(
        Binds=["/srv/web:/data:ro", "webvol:/vol"],
        NetworkMode="appnet",
        RestartPolicy={"Name": "on-failure", "MaximumRetryCount": 3},
        Links=["/db:/web/database"],
    )
    a["Mounts"] = [
        {"Type": "bind", "Source": "/srv/web", "Destination": "/data", "RW": False},
        {
            "Type": "volume",
            "Name": "webvol",
            "Source": "/var/lib/docker/volumes/webvol/_data",
            "Destination": "/vol",
            "RW": True,
        },
        {
            "Type": "volume",
            "Name": "a" * 64,
            "Source": "/var/lib/docker/volumes/aaa/_data",
            "Destination": "/cache",
            "RW": True,
        },
    ]
    a["NetworkSettings"]["Networks"] = {
        "appnet": {
            "Aliases": ["web-alias", CID[:12]],
            "IPAMConfig": None,
            "Links": None,
            "NetworkID": "n1" * 32,
            "IPAddress": "10.1.0.5",
            "MacAddress": "02:42:0a:01:00:05",
            "EndpointID": "e" * 64,
            "DriverOpts": None,
        },
        "backnet": {
            "Aliases": [CID[:12]],
            "IPAMConfig": {"IPv4Address": "10.2.0.9"},
            "Links": None,
            "NetworkID": "n2" * 32,
            "IPAddress": "10.2.0.9",
        },
    }
    return a


# --- the create body (pure) -----------------------------------------------------------------


def test_spec_of_the_captured_container() -> None:
    spec = creation_spec(captured(), "remediator-test/busybox:latest")
    body = spec.body
    assert "Hostname" not in body  # it was Docker's default (the short id)
    assert body["Image"] == "remediator-test/busybox:latest"
    assert body["Cmd"] == ["/ih/holder", "2", "/tmp", "/bin", "/etc"]
    assert body["HostConfig"]["Binds"] == ["/tmp/ih:/ih:ro"]
    assert "Mounts" not in body["HostConfig"]
    assert body["NetworkingConfig"] == {"EndpointsConfig": {"bridge": {}}}
    assert spec.extra_networks == {}


def test_spec_keeps_what_the_user_chose() -> None:
    spec = creation_spec(rich(), IMAGE_ID)
    body, hc = spec.body, spec.body["HostConfig"]
    assert body["Env"] == ["MODE=prod", "PATH=/bin"]
    assert body["Labels"] == {"app": "web", "tier": "front"}
    assert hc["RestartPolicy"] == {"Name": "on-failure", "MaximumRetryCount": 3}
    assert hc["Binds"] == ["/srv/web:/data:ro", "webvol:/vol"]
    assert hc["Links"] == ["db:database"]
    # The anonymous volume is re-attached by name, or the copy would start empty.
    assert hc["Mounts"] == [{"Type": "volume", "Source": "a" * 64, "Target": "/cache", "ReadOnly": False}]
    # Primary network at create with the user's alias only; the other connected afterwards.
    assert body["NetworkingConfig"] == {"EndpointsConfig": {"appnet": {"Aliases": ["web-alias"]}}}
    assert spec.extra_networks == {"backnet": {"IPAMConfig": {"IPv4Address": "10.2.0.9"}}}


def test_spec_names_a_sourceless_volume_mount() -> None:
    """`--mount type=volume,target=/anon` has no source in HostConfig: the copy must reuse the
    volume the old container got, not make a new one."""
    a = captured()
    a["HostConfig"]["Mounts"] = [{"Type": "volume", "Target": "/anon"}]
    a["Mounts"] = [{"Type": "volume", "Name": "f" * 64, "Destination": "/anon", "RW": True}]
    hc = creation_spec(a, "img").body["HostConfig"]
    assert hc["Mounts"] == [{"Type": "volume", "Source": "f" * 64, "Target": "/anon"}]


def test_spec_keeps_a_chosen_hostname() -> None:
    a = captured()
    a["Config"]["Hostname"] = "web-1"
    assert creation_spec(a, "img").body["Hostname"] == "web-1"


@pytest.mark.parametrize("mode", ["host", "none", "container:" + "f" * 64])
def test_spec_shared_network_modes_have_no_endpoints(mode: str) -> None:
    a = captured()
    a["HostConfig"]["NetworkMode"] = mode
    spec = creation_spec(a, "img")
    assert "NetworkingConfig" not in spec.body
    assert spec.extra_networks == {}


def test_spec_does_not_modify_the_inspected_attrs() -> None:
    a = rich()
    before = copy.deepcopy(a)
    creation_spec(a, "img")
    assert a == before


def test_snapshot_and_differences() -> None:
    old = config_snapshot(rich())
    assert old["mounts"] == sorted(
        [
            ["bind", "/srv/web", "/data", False],
            ["volume", "webvol", "/vol", True],
            ["volume", "a" * 64, "/cache", True],
        ]
    )
    assert old["networks"] == ["appnet", "backnet"]
    new_attrs = rich()
    new_attrs["Id"] = NEW_ID
    assert config_differences(old, config_snapshot(new_attrs)) == []
    new_attrs["Config"]["Env"] = ["MODE=dev"]
    new_attrs["HostConfig"]["RestartPolicy"] = {"Name": "no", "MaximumRetryCount": 0}
    assert config_differences(old, config_snapshot(new_attrs)) == ["env", "restart_policy"]


# --- params and plan ------------------------------------------------------------------------


def test_params() -> None:
    p = RecreateContainerParams.model_validate({"stopTimeout": "1500ms", "target": "subject"})
    assert (p.target, p.stop_timeout, p.stop_timeout_seconds) == ("subject", "1500ms", 2)
    assert RecreateContainerParams().stop_timeout_seconds == 10


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"stopTimeout": "10"}, "expected a duration such as 30s"),
        ({"stopTimeout": 10}, "Input should be a valid string"),
        ({"stopTimeout": "1h"}, "at most 5m"),
        ({"target": "all"}, "Input should be 'subject' or 'top'"),
        ({"timeout": "10s"}, "Extra inputs are not permitted"),
    ],
)
def test_params_reject(raw: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError) as err:
        RecreateContainerParams.model_validate(raw)
    assert message in str(err.value)


def web_ref(**labels: str) -> ContainerRef:
    return ContainerRef(id=CID, name="web", labels=labels, pid=8082, cgroup=f"/docker/{CID}")


def plan_ctx(samples: list[tuple[ContainerRef, float]], **params: Any) -> PlanContext:
    reading = Reading("dentries", 1000.0, containers=tuple(ContainerSample(c, {"m": v}) for c, v in samples))
    return PlanContext(
        policy="trasher",
        metric="m",
        subject="host",
        reading=reading,
        params=RecreateContainerParams.model_validate(params),
        eligible=lambda c: c.labels.get("remediator.protect") != "true",
        now=1000.0,
    )


def planned() -> Plan:
    plan = RecreateContainer().plan(plan_ctx([(web_ref(), 5.0)]))
    assert isinstance(plan, Plan)
    return plan


def test_plan_picks_the_top_unprotected() -> None:
    guarded = ContainerRef(id="c" * 64, name="db", labels={"remediator.protect": "true"})
    plan = RecreateContainer().plan(plan_ctx([(web_ref(), 5.0), (guarded, 1e9)], stopTimeout="3s"))
    assert isinstance(plan, Plan)
    assert (plan.target.kind, plan.target.id, plan.target.name) == (TargetKind.CONTAINER, CID, "web")
    assert "stop the old one (timeout 3s)" in plan.summary
    assert plan.params["stop_timeout_s"] == 3


def test_plan_only_docker() -> None:
    other = ContainerRef(id=CID, name="web", runtime="containerd")
    assert RecreateContainer().plan(plan_ctx([(other, 5.0)])) == (
        "container web runs on containerd; recreate supports docker"
    )


def test_is_disruptive() -> None:
    assert RecreateContainer.spec().disruptive is True


# --- a fake Docker ----------------------------------------------------------------------------


class FakeAPI:
    """The Engine API calls recreate makes, on an in-memory table; records mutating calls."""

    def __init__(self, containers: dict[str, dict[str, Any]], fail: tuple[str, ...] | None = None) -> None:
        self.containers = containers
        self.calls: list[tuple[Any, ...]] = []
        self.fail = fail

    def _find(self, ident: str) -> dict[str, Any]:
        for c in self.containers.values():
            if ident in (c["Id"], c["Name"].lstrip("/")):
                return c
        raise docker.errors.NotFound(f"No such container: {ident}")

    def _maybe_fail(self, *call: Any) -> None:
        """Fail calls that start with the `fail` tuple, e.g. ("start", "9999")."""
        if self.fail is not None and call[: len(self.fail)] == self.fail:
            raise docker.errors.APIError(f"{call[0]} refused")

    def inspect_container(self, ident: str) -> dict[str, Any]:
        return copy.deepcopy(self._find(ident))

    def inspect_image(self, ref: str) -> dict[str, Any]:
        return {"Id": IMAGE_ID}

    def create_container_from_config(self, body: dict[str, Any], name: str) -> dict[str, Any]:
        self.calls.append(("create", name))
        self._maybe_fail("create")
        new = {
            "Id": NEW_ID,
            "Name": "/" + name,
            "Image": IMAGE_ID,
            "Config": {k: v for k, v in body.items() if k not in ("HostConfig", "NetworkingConfig")},
            "HostConfig": body["HostConfig"],
            "State": {"Running": False},
            "Mounts": copy.deepcopy(self.containers[CID]["Mounts"]),
            "NetworkSettings": copy.deepcopy(self.containers[CID]["NetworkSettings"]),
        }
        self.containers[NEW_ID] = new
        return {"Id": NEW_ID}

    def connect_container_to_network(self, ident: str, net: str, **kw: Any) -> None:
        self.calls.append(("connect", ident[:4], net))
        self._maybe_fail("connect", ident[:4])

    def stop(self, ident: str, timeout: int) -> None:
        self.calls.append(("stop", ident[:4], timeout))
        self._find(ident)["State"]["Running"] = False
        self._maybe_fail("stop", ident[:4])  # stopped, then timed out answering

    def rename(self, ident: str, name: str) -> None:
        self.calls.append(("rename", ident[:4], name))
        self._maybe_fail("rename", ident[:4])
        self._find(ident)["Name"] = "/" + name

    def start(self, ident: str) -> None:
        self.calls.append(("start", ident[:4]))
        self._maybe_fail("start", ident[:4])
        self._find(ident)["State"]["Running"] = True

    def remove_container(self, ident: str, v: bool = False, force: bool = False) -> None:
        self.calls.append(("remove", ident[:4], v, force))
        c = self._find(ident)
        del self.containers[c["Id"]]


class FakeClient:
    def __init__(self, api: FakeAPI) -> None:
        self.api = api


def docker_with(attrs: dict[str, Any], fail: tuple[str, ...] | None = None) -> FakeAPI:
    attrs = copy.deepcopy(attrs)
    attrs["Id"] = CID
    attrs["State"] = {"Running": True, "Pid": 8082}
    return FakeAPI({CID: attrs}, fail)


def apply_ctx(tmp_path: Path, api: FakeAPI, dry_run: bool = False, **extra: Any) -> ApplyContext:
    host = make_host(tmp_path, {"proc/sys/fs/dentry-state": "2050186 2048392 45 0 2007232 0\n"})
    return ApplyContext(host, FakeClock(), dry_run, lambda: FakeClient(api), extra=dict(extra))


MUTATING = {"create", "connect", "stop", "rename", "start", "remove"}


# --- recheck ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"Name": "/web2"}, f"container {CID[:12]} was renamed from web to web2"),
        ({"State": {"Running": False}}, "container web is not running"),
        (
            {"Config": {"Labels": {"remediator.protect": "true"}}},
            "container web is protected (label=remediator.protect=true)",
        ),
        (
            {"HostConfig": {"AutoRemove": True}},
            "container web was started with --rm (AutoRemove): not recreating",
        ),
    ],
)
def test_recheck_skips(tmp_path: Path, change: dict[str, Any], reason: str) -> None:
    api = docker_with(rich())
    api.containers[CID].update(change)
    result = RecreateContainer().execute(planned(), apply_ctx(tmp_path, api))
    assert (result.outcome, result.message) == (Outcome.SKIPPED, reason)
    assert not [c for c in api.calls if c[0] in MUTATING]


def test_recheck_uses_the_configured_protect_label(tmp_path: Path) -> None:
    api = docker_with(rich())
    api.containers[CID]["Config"]["Labels"] = {"ops/keep": "yes"}
    ctx = apply_ctx(tmp_path, api)
    ctx.protect = (Match.label("ops/keep=yes"),)
    result = RecreateContainer().execute(planned(), ctx)
    assert (result.outcome, result.message) == (
        Outcome.SKIPPED,
        "container web is protected (label=ops/keep=yes)",
    )


@pytest.mark.parametrize(
    ("matchers", "protected"),
    [
        ((Match.label("ops/keep"),), "label=ops/keep"),  # a bare key: present with any value
        ((Match(name="we*"),), "name=we*"),  # the controller's protect list may name containers
        ((Match.label("remediator.protect=true"), Match.label("ops/keep")), "label=ops/keep"),
    ],
)
def test_recheck_applies_every_protect_matcher(
    tmp_path: Path, matchers: tuple[Match, ...], protected: str
) -> None:
    api = docker_with(rich())
    api.containers[CID]["Config"]["Labels"] = {"ops/keep": ""}
    ctx = apply_ctx(tmp_path, api)
    ctx.protect = matchers
    result = RecreateContainer().execute(planned(), ctx)
    assert (result.outcome, result.message) == (Outcome.SKIPPED, f"container web is protected ({protected})")
    assert not [c for c in api.calls if c[0] in MUTATING]


def test_recheck_container_gone(tmp_path: Path) -> None:
    api = FakeAPI({})
    result = RecreateContainer().execute(planned(), apply_ctx(tmp_path, api))
    assert (result.outcome, result.message) == (Outcome.SKIPPED, f"container {CID[:12]} is gone")


def test_dry_run_changes_nothing(tmp_path: Path) -> None:
    api = docker_with(rich())
    result = RecreateContainer().execute(planned(), apply_ctx(tmp_path, api, dry_run=True))
    assert result.outcome is Outcome.WOULD_APPLY
    assert result.message.startswith("would recreate container web")
    assert api.calls == []
    assert list(api.containers) == [CID]
    assert api.containers[CID]["Name"] == "/web"


# --- apply / verify / rollback ------------------------------------------------------------


SWAP = [
    ("create", "web.remediator-new"),
    ("connect", "9999", "backnet"),
    ("stop", "5fed", 10),
    ("rename", "5fed", "web.remediator-old"),
    ("rename", "9999", "web"),
    ("start", "9999"),
]


def test_apply_swaps_in_order_and_verifies(tmp_path: Path) -> None:
    api = docker_with(rich())
    result = RecreateContainer().execute(planned(), apply_ctx(tmp_path, api))
    assert api.calls == [*SWAP, ("remove", "5fed", False, False)]  # never the volumes
    assert result.outcome is Outcome.APPLIED
    assert result.verified is True, result.after["differences"]
    assert result.after["id"] == NEW_ID
    assert result.before["id"] == CID
    assert result.before["host_nr_negative"] == 2007232
    assert result.message == f"recreated web: {CID[:12]} -> {NEW_ID[:12]}"
    assert list(api.containers) == [NEW_ID]
    # The new container has the real environment; the record of it only keys and digests.
    assert api.containers[NEW_ID]["Config"]["Env"] == ["MODE=prod", "PATH=/bin"]
    assert result.before["env"] == result.after["env"] == redact_env(["MODE=prod", "PATH=/bin"])
    assert "prod" not in json.dumps(result.to_dict())


def test_redact_env_keeps_keys_hides_values() -> None:
    redacted = redact_env(["TOKEN=s3cret", "EMPTY=", "BARE", "URL=a=b"])
    assert [e.split("=", 1)[0] for e in redacted] == ["TOKEN", "EMPTY", "BARE", "URL"]
    assert redacted[2] == "BARE" and all(len(e.split(":", 1)[1]) == 12 for e in (redacted[0], redacted[3]))
    assert "s3cret" not in str(redacted) and redacted[0] != redact_env(["TOKEN=other"])[0]


def test_apply_pins_the_image_id_when_the_tag_moved(tmp_path: Path) -> None:
    api = docker_with(rich())
    api.inspect_image = lambda ref: {"Id": "sha256:" + "2" * 64}  # type: ignore[method-assign]
    result = RecreateContainer().execute(planned(), apply_ctx(tmp_path, api))
    assert api.containers[NEW_ID]["Config"]["Image"] == IMAGE_ID
    assert "pinned to image" in result.message


REMOVE_COPY = ("remove", "9999", False, True)


@pytest.mark.parametrize(
    ("fail", "expected"),
    [
        # The copy may exist even though create failed (lost answer): removed by its name.
        (("create",), [SWAP[0], ("remove", "web.", False, True)]),
        (("connect", "9999"), [*SWAP[:2], REMOVE_COPY]),
        # A refused stop may still have stopped it: rollback reads the state and starts it.
        (("stop", "5fed"), [*SWAP[:3], REMOVE_COPY, ("start", "5fed")]),
        (("rename", "9999"), [*SWAP[:5], REMOVE_COPY, ("rename", "5fed", "web"), ("start", "5fed")]),
        (("start", "9999"), [*SWAP, REMOVE_COPY, ("rename", "5fed", "web"), ("start", "5fed")]),
    ],
)
def test_failure_rolls_back(tmp_path: Path, fail: tuple[str, ...], expected: list[tuple[Any, ...]]) -> None:
    api = docker_with(rich(), fail=fail)
    result = RecreateContainer().execute(planned(), apply_ctx(tmp_path, api))
    assert result.outcome is Outcome.FAILED
    assert f"{fail[0]} refused" in result.message
    assert api.calls == expected
    # The original is back: same id, same name, running; the copy is gone.
    assert list(api.containers) == [CID]
    assert api.containers[CID]["Name"] == "/web"
    assert api.containers[CID]["State"]["Running"] is True


def test_failed_rollback_says_so(tmp_path: Path) -> None:
    api = docker_with(rich(), fail=("start",))  # the copy and the original both refuse
    result = RecreateContainer().execute(planned(), apply_ctx(tmp_path, api))
    assert result.outcome is Outcome.FAILED
    assert "COULD NOT start old" in result.message


def test_verify_reports_differences(tmp_path: Path) -> None:
    api = docker_with(rich())
    action, plan, c = RecreateContainer(), planned(), apply_ctx(tmp_path, api)
    applied = action.apply(plan, c)
    api.containers[NEW_ID]["Config"]["Labels"] = {"app": "other"}
    result = action.verify(plan, applied, c)
    assert result.verified is False
    assert result.after["differences"] == ["labels"]
    assert "the copy differs in: labels" in result.message
