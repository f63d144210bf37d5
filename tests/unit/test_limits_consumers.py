"""Degraded consumers beyond inotify (limits_consumers): systemd services and containers that
crash-looped or failed with ENFILE / EMFILE / EAGAIN while a pool was exhausted, judged on
`systemctl show` text and Docker inspect documents, with a fake systemctl and a fake Docker API;
and restart-degraded acting on them with a re-check of the same loop."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from remediator.actions.base import ApplyContext, PlanContext
from remediator.actions.restart_degraded import RestartDegraded, RestartDegradedParams
from remediator.clock import FakeClock
from remediator.model import Outcome, Plan, Reading
from remediator.probes.limits_consumers import (
    MAX_UNITS,
    ContainerState,
    UnitState,
    degraded_containers,
    degraded_units,
    judge_containers,
    judge_units,
    parse_docker_time,
    parse_list_units,
    parse_systemctl_show,
)
from remediator.probes.limits_exhausted import Exhausted
from remediator.probes.memory import DictMemory
from tests.helpers import make_host

SHOW = """\
Id=kubelet.service
InvocationID=1b0c9b3a7f2d4c0e9a1b2c3d4e5f6071
ActiveState=activating
SubState=auto-restart
Result=exit-code
NRestarts=7
StatusErrno=0
StateChangeTimestampMonotonic=1510000000

Id=web.service
InvocationID=aa
ActiveState=failed
SubState=failed
Result=exit-code
NRestarts=0
StatusErrno=23
StateChangeTimestampMonotonic=900000000

Id=ok.service
InvocationID=bb
ActiveState=active
SubState=running
Result=success
NRestarts=3
StatusErrno=24
StateChangeTimestampMonotonic=10000000
"""

# file-max was exhausted from 1,500 s to 1,520 s after boot.
FILES = {"file_handles": Exhausted(1500.0, 1520.0)}


def unit(name: str, **kw: Any) -> UnitState:
    base: dict[str, Any] = {
        "unit": name,
        "invocation": "inv",
        "active": "failed",
        "sub": "failed",
        "result": "exit-code",
        "restarts": 0,
        "status_errno": 0,
        "changed_at": None,
    }
    return UnitState(**{**base, **kw})


def test_parse_systemctl_show_reads_every_block() -> None:
    states = parse_systemctl_show(SHOW)
    assert [s.unit for s in states] == ["kubelet.service", "web.service", "ok.service"]
    k = states[0]
    assert (k.active, k.sub, k.restarts, k.status_errno, k.changed_at) == (
        "activating",
        "auto-restart",
        7,
        0,
        1510.0,
    )
    assert states[2].running and not k.running
    assert parse_systemctl_show("\n\nNRestarts=3\n") == []  # no Id: skipped


def test_parse_list_units_skips_bullets_and_other_types() -> None:
    text = (
        "● web.service loaded failed failed Web\n"
        "kubelet.service loaded activating auto-restart K\n"
        "x.socket l a r\n"
    )
    assert parse_list_units(text) == ["web.service", "kubelet.service"]


@pytest.mark.parametrize(
    ("state", "previous", "reason"),
    [
        # NRestarts grew from 2 (read at 1,490 s) to 7 while file-max was exhausted.
        (
            unit("k.service", active="activating", sub="auto-restart", restarts=7),
            (2, 1490.0),
            "NRestarts 2 -> 7",
        ),
        (unit("w.service", status_errno=23), None, "StatusErrno=23 (ENFILE)"),
        (unit("w.service", active="activating", sub="auto-restart", status_errno=11), None, "(EAGAIN)"),
        (unit("w.service", changed_at=1515.0), None, "failed (exit-code) while the pool was exhausted"),
    ],
)
def test_judge_units_finds_each_kind_of_degraded_service(
    state: UnitState, previous: tuple[int, float] | None, reason: str
) -> None:
    prev = {state.unit: ("inv", previous[0], previous[1])} if previous else {}
    (found,) = judge_units([state], FILES, prev, 1530.0)
    assert reason in found.reason
    d = found.to_dict()
    assert (d["kind"], d["unit"], d["pool"], d["invocation"]) == ("unit", state.unit, "file_handles", "inv")


@pytest.mark.parametrize(
    ("state", "previous", "exhausted"),
    [
        (unit("ok.service", active="active", sub="running", status_errno=24, restarts=9), (1, 1490.0), FILES),
        (unit("old.service", changed_at=100.0), None, FILES),  # failed long before the outage
        (unit("w.service", status_errno=23), None, {}),  # no pool exhausted this boot
        # Restarts grew, but the pool was last exhausted long before the previous reading.
        (unit("k.service", active="activating", restarts=7), (2, 3000.0), FILES),
        (unit("w.service", status_errno=2), None, FILES),  # ENOENT: not a pool's errno
        # Failed during an inotify outage, with no counter or errno to blame it: not blamed.
        (unit("w.service", changed_at=1515.0), None, {"inotify:0": Exhausted(1500.0, 1520.0)}),
    ],
)
def test_judge_units_leaves_healthy_and_unrelated_services(
    state: UnitState, previous: tuple[int, float] | None, exhausted: dict[str, Exhausted]
) -> None:
    prev = {state.unit: ("inv", previous[0], previous[1])} if previous else {}
    assert judge_units([state], exhausted, prev, 3100.0) == []


class FakeSystemctl:
    def __init__(self, listed: str = "", show: str = SHOW, code: int = 0) -> None:
        self.listed, self.show, self.code = listed, show, code
        self.calls: list[list[str]] = []

    def __call__(self, args: Sequence[str]) -> tuple[int, str]:
        self.calls.append(list(args))
        if args[0] == "list-units":
            return self.code, self.listed
        if args[0] == "show":
            return self.code, self.show
        return 0, ""


def test_degraded_units_asks_nothing_until_a_pool_was_exhausted() -> None:
    fake = FakeSystemctl()
    problems: list[str] = []
    assert degraded_units(fake, ["kubelet.service"], {}, DictMemory(), "boot", 10.0, problems) == []
    assert fake.calls == [] and problems == []


def test_degraded_units_queries_a_bounded_list_and_remembers_restarts() -> None:
    listed = "".join(f"u{i}.service loaded failed failed U\n" for i in range(100))
    fake = FakeSystemctl(listed=listed)
    memory, problems = DictMemory(), []
    found = degraded_units(fake, ["kubelet.service"], FILES, memory, "boot", 1530.0, problems)
    show = fake.calls[1]
    units = show[show.index("--") + 1 :]
    assert units[0] == "kubelet.service" and len(units) == MAX_UNITS
    # kubelet is auto-restarting with no errno and no previous count: not (yet) degraded; web
    # failed with ENFILE; ok runs.
    assert [d.state.unit for d in found] == ["web.service"]
    # The next reading sees kubelet's NRestarts grow while the pool is still exhausted.
    fake.show = SHOW.replace("NRestarts=7", "NRestarts=9")
    found = degraded_units(fake, ["kubelet.service"], FILES, memory, "boot", 1560.0, problems)
    assert [d.state.unit for d in found] == ["kubelet.service", "web.service"]
    assert "NRestarts 7 -> 9" in found[0].reason
    assert problems == []
    # A new boot forgets the counts.
    assert [d.state.unit for d in degraded_units(fake, [], FILES, memory, "other", 1560.0, [])] == [
        "web.service"
    ]


def test_degraded_units_without_systemctl_is_no_data_with_a_problem() -> None:
    problems: list[str] = []
    fake = FakeSystemctl(code=1, listed="Failed to connect to bus")
    assert degraded_units(fake, [], FILES, None, "boot", 1530.0, problems) == []
    assert problems == ["systemctl list-units: Failed to connect to bus"]


# --- containers ----------------------------------------------------------------------------

BOOT_AT = 1_796_190_000.0  # the boot's wall-clock time; the outage was at 1,500-1,520 s


def inspect(cid: str, status: str = "exited", **kw: Any) -> dict[str, Any]:
    finished = kw.pop("finished", "2026-12-02T05:25:05.5Z")
    return {
        "Id": cid,
        "Name": f"/{cid}-name",
        "RestartCount": kw.pop("restarts", 0),
        "Config": {"Labels": kw.pop("labels", {})},
        "State": {
            "Status": status,
            "Restarting": status == "restarting",
            "ExitCode": kw.pop("exit_code", 1),
            "Error": kw.pop("error", ""),
            "FinishedAt": finished,
            "StartedAt": kw.pop("started", "2026-12-02T05:25:05Z"),
        },
    }


def test_parse_docker_time() -> None:
    assert parse_docker_time("2026-12-02T05:25:05.5Z") == pytest.approx(1_796_189_105.5)
    assert parse_docker_time("2026-12-02T07:25:05+02:00") == 1_796_189_105.0
    assert parse_docker_time("0001-01-01T00:00:00Z") is None
    assert parse_docker_time("yesterday") is None


def test_judge_containers() -> None:
    at = parse_docker_time("2026-12-02T05:25:05.5Z")
    assert at is not None
    boot_at = at - 1510.0  # so that it finished 1,510 s after boot: during the outage
    states = [
        ContainerState.from_inspect(inspect("loop", "restarting", restarts=5)),
        ContainerState.from_inspect(
            inspect("enfile", error="open /x: too many open files in system", finished="")
        ),
        ContainerState.from_inspect(inspect("during")),
        ContainerState.from_inspect(inspect("clean", exit_code=0)),  # exited 0: by choice
        ContainerState.from_inspect(inspect("later", finished="2026-12-02T06:25:05Z")),  # an hour after
        ContainerState.from_inspect(inspect("up", "running", restarts=9)),
    ]
    found = judge_containers(states, FILES, {"loop": (2, 1490.0), "up": (1, 1490.0)}, 1530.0, boot_at)
    reasons = {d.state.id: d.reason for d in found}
    assert list(reasons) == ["loop", "enfile", "during"]
    assert reasons["loop"].startswith("RestartCount 2 -> 5")
    assert "too many open files in system" in reasons["enfile"]
    assert reasons["during"] == "exited (exit 1) since the pool was exhausted"
    d = found[0].to_dict()
    assert (d["kind"], d["container_id"], d["container"], d["restarts"]) == (
        "container",
        "loop",
        "loop-name",
        5,
    )
    assert judge_containers(states, {}, {}, 1530.0, boot_at) == []


class FakeApi:
    def __init__(self, docs: dict[str, dict[str, Any]]) -> None:
        self.docs = docs
        self.lists: list[dict[str, Any]] = []
        self.inspected: list[str] = []
        self.restarted: list[tuple[str, int]] = []

    def containers(self, **kw: Any) -> list[dict[str, Any]]:
        self.lists.append(kw)
        return [{"Id": cid} for cid in self.docs]

    def inspect_container(self, cid: str) -> dict[str, Any]:
        self.inspected.append(cid)
        return self.docs[cid]

    def restart(self, cid: str, timeout: int) -> None:
        self.restarted.append((cid, timeout))
        self.docs[cid] = inspect(cid, "running", restarts=0, started="2026-12-02T05:40:00Z")


def test_degraded_containers_one_list_call_and_remembered_counts() -> None:
    api = FakeApi({"loop": inspect("loop", "restarting", restarts=1, finished="")})
    memory = DictMemory()
    assert degraded_containers(api, {}, memory, "b", 1500.0, BOOT_AT + 1500, []) == []
    assert api.lists == []  # nothing asked while no pool was exhausted
    assert degraded_containers(api, FILES, memory, "b", 1505.0, BOOT_AT + 1505, []) == []
    assert api.lists == [{"all": True, "filters": {"status": ["restarting", "exited"]}}]
    api.docs["loop"] = inspect("loop", "restarting", restarts=4, finished="")
    (found,) = degraded_containers(api, FILES, memory, "b", 1535.0, BOOT_AT + 1535, [])
    assert found.reason.startswith("RestartCount 1 -> 4")


# --- restart-degraded on them --------------------------------------------------------------


def plan_for(consumers: list[dict[str, Any]], eligible: bool = True) -> Plan | str:
    reading = Reading("limits", 0.0, detail={"degraded_consumers": consumers})
    return RestartDegraded().plan(
        PlanContext(
            "degraded",
            "degraded_consumers",
            "host",
            reading,
            RestartDegradedParams(stopTimeout=1),
            lambda c: eligible and c.labels.get("remediator.protect") != "true",
            0.0,
        )
    )


class Docker:
    def __init__(self, api: FakeApi) -> None:
        self.api = api


def apply_ctx(tmp_path: Path, systemctl: FakeSystemctl, api: FakeApi | None = None) -> ApplyContext:
    c = ApplyContext(
        make_host(tmp_path, {}),
        FakeClock(),
        dry_run=False,
        docker_factory=(lambda: Docker(api)) if api else None,
    )
    c.extra["systemctl"] = systemctl
    return c


def test_restart_a_crash_looping_service_rechecks_the_loop_and_verifies(tmp_path: Path) -> None:
    (web,) = [
        d for d in judge_units(parse_systemctl_show(SHOW), FILES, {}, 1530.0) if d.state.unit == "web.service"
    ]
    plan = plan_for([web.to_dict()])
    assert isinstance(plan, Plan)
    assert plan.expect["targets"] == [
        {
            "kind": "unit",
            "id": "web.service",
            "name": "web.service",
            "why": "crash",
            "invocation": "aa",
            "restarts": 0,
        }
    ]
    fake = FakeSystemctl(show=SHOW.split("\n\n")[1])
    c = apply_ctx(tmp_path, fake)
    result = RestartDegraded().apply(plan, c)
    assert result.outcome is Outcome.APPLIED, result.message
    assert [a[0] for a in fake.calls] == ["show", "reset-failed", "restart"]
    assert fake.calls[-1] == ["restart", "web.service"]
    # Still the old invocation: not verified. A new one, running: verified.
    assert RestartDegraded().verify(plan, result, c).verified is False
    fake.show = "Id=web.service\nInvocationID=cc\nActiveState=active\nSubState=running\n"
    assert RestartDegraded().verify(plan, result, c).verified is True


def test_a_service_that_recovered_before_acting_is_left_alone(tmp_path: Path) -> None:
    (web,) = [
        d for d in judge_units(parse_systemctl_show(SHOW), FILES, {}, 1530.0) if d.state.unit == "web.service"
    ]
    plan = plan_for([web.to_dict()])
    assert isinstance(plan, Plan)
    fake = FakeSystemctl(show="Id=web.service\nInvocationID=zz\nActiveState=active\nSubState=running\n")
    result = RestartDegraded().execute(plan, apply_ctx(tmp_path, fake))
    assert result.outcome is Outcome.SKIPPED and "no planned consumer is still degraded" in result.message
    assert [a[0] for a in fake.calls] == ["show"]  # re-checked; no reset-failed, no restart


def test_restart_a_crash_looping_container_and_leave_a_protected_one(tmp_path: Path) -> None:
    api = FakeApi(
        {
            "loop": inspect("loop", "restarting", restarts=5, finished=""),
            "kept": inspect(
                "kept", "restarting", restarts=5, finished="", labels={"remediator.protect": "true"}
            ),
        }
    )
    states = [ContainerState.from_inspect(d) for d in api.docs.values()]
    found = judge_containers(states, FILES, {"loop": (1, 1490.0), "kept": (1, 1490.0)}, 1530.0, BOOT_AT)
    plan = plan_for([d.to_dict() for d in found])
    assert isinstance(plan, Plan)
    assert [t["id"] for t in plan.expect["targets"]] == ["loop"]
    assert plan.expect["by_hand"] == [
        "container kept-name: RestartCount 1 -> 5 while the pool was exhausted (file_handles): not eligible"
    ]
    c = apply_ctx(tmp_path, FakeSystemctl(), api)
    result = RestartDegraded().execute(plan, c)
    assert (result.outcome, result.verified) == (Outcome.APPLIED, True), result.message
    assert api.restarted == [("loop", 1)]


def test_a_container_running_again_is_not_restarted(tmp_path: Path) -> None:
    api = FakeApi({"loop": inspect("loop", "restarting", restarts=5, finished="")})
    (found,) = judge_containers(
        [ContainerState.from_inspect(api.docs["loop"])], FILES, {"loop": (1, 1490.0)}, 1530.0, BOOT_AT
    )
    plan = plan_for([found.to_dict()])
    assert isinstance(plan, Plan)
    api.docs["loop"] = inspect("loop", "running", restarts=6)
    result = RestartDegraded().execute(plan, apply_ctx(tmp_path, FakeSystemctl(), api))
    assert result.outcome is Outcome.SKIPPED and api.restarted == []
