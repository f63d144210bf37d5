"""restart-degraded: plan from the limits reading, re-check by pid + start time, restart through
the container's or the service's owner, never signal a bare host process."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from remediator.actions.base import ApplyContext, PlanContext
from remediator.actions.restart_degraded import RestartDegraded, RestartDegradedParams
from remediator.clock import FakeClock
from remediator.host import HostRoot
from remediator.model import ContainerRef, ContainerSample, Outcome, Plan, Reading
from tests.helpers import make_host

CID = "5fed7652134bd8636559d9cfa0ce537d1d35ece4c49c5a944a3ee94faac7ec36"
APP = ContainerRef(id=CID, name="app", pid=200)


def stat_line(pid: int, starttime: int) -> str:
    return f"{pid} (p) S 1 {pid} {pid} 0 -1 4194560 " + "0 " * 12 + f"{starttime} 0 0\n"


def consumer(pid: int, **kw: Any) -> dict[str, Any]:
    base = {
        "pid": pid,
        "starttime": 100 + pid,
        "name": "tail",
        "uid": 0,
        "pool": "inotify",
        "container": None,
        "container_id": None,
        "unit": None,
    }
    return {**base, **kw}


def host_with(tmp_path: Path, pids: Sequence[int]) -> HostRoot:
    host = make_host(tmp_path, {f"proc/{pid}/stat": stat_line(pid, 100 + pid) for pid in pids})
    for pid in pids:
        (tmp_path / "proc" / str(pid) / "fd").mkdir()
        os.symlink("/dev/null", tmp_path / "proc" / str(pid) / "fd" / "0")
    return host


def plan_of(consumers: list[dict[str, Any]], eligible: bool = True, **params: Any) -> Plan | str:
    reading = Reading(
        "limits", 0.0, containers=(ContainerSample(APP, {}),), detail={"degraded_consumers": consumers}
    )
    return RestartDegraded().plan(
        PlanContext(
            "inotify-degraded",
            "inotify_degraded",
            "host",
            reading,
            RestartDegradedParams.model_validate(params),
            lambda c: eligible,
            0.0,
        )
    )


class FakeApi:
    def __init__(self, running: bool = True, labels: dict[str, str] | None = None) -> None:
        self.running, self.labels = running, labels or {}
        self.restarted: list[tuple[str, int]] = []

    def inspect_container(self, ident: str) -> dict[str, Any]:
        return {
            "Id": CID,
            "Name": "/app",
            "State": {"Running": self.running},
            "Config": {"Labels": self.labels},
        }

    def restart(self, ident: str, timeout: int) -> None:
        self.restarted.append((ident, timeout))


class FakeDocker:
    def __init__(self, api: FakeApi) -> None:
        self.api = api


def ctx(host: HostRoot, api: FakeApi | None = None, calls: list[list[str]] | None = None) -> ApplyContext:
    def systemctl(args: Sequence[str]) -> tuple[int, str]:
        (calls if calls is not None else []).append(list(args))
        return 0, ""

    c = ApplyContext(
        host, FakeClock(), dry_run=False, docker_factory=(lambda: FakeDocker(api)) if api else None
    )
    c.extra["systemctl"] = systemctl
    return c


def test_plan_restarts_containers_and_services_and_leaves_bare_processes_to_people() -> None:
    plan = plan_of(
        [
            consumer(30),  # tail -f in a login session
            consumer(40, name="kubelet", unit="kubelet.service"),
            consumer(41, name="kubelet", unit="kubelet.service"),  # same service: once
            consumer(50, container="app", container_id=CID),
        ]
    )
    assert isinstance(plan, Plan)
    assert [(t["kind"], t["id"]) for t in plan.expect["targets"]] == [
        ("unit", "kubelet.service"),
        ("container", CID),
    ]
    assert plan.expect["by_hand"] == [
        "pid 30 tail (uid 0): not in a container or a service, restart it by hand"
    ]
    assert plan.summary == "restart 2 degraded consumer(s): unit kubelet.service, container app"


def test_plan_respects_protection_and_the_bound() -> None:
    assert plan_of([consumer(50, container="app", container_id=CID)], eligible=False) == (
        "no restartable degraded consumer (pid 50 tail (uid 0) in container app: not eligible)"
    )
    units = [consumer(60 + i, unit=f"u{i}.service") for i in range(5)]
    plan = plan_of(units, maxRestarts=2)
    assert isinstance(plan, Plan) and len(plan.expect["targets"]) == 2
    assert plan_of([]) == "no restartable degraded consumer"


def test_execute_restarts_through_the_owners_and_verifies(tmp_path: Path) -> None:
    host = host_with(tmp_path, [40, 50])
    plan = plan_of([consumer(40, unit="kubelet.service"), consumer(50, container="app", container_id=CID)])
    assert isinstance(plan, Plan)
    api = FakeApi()
    calls: list[list[str]] = []
    c = ctx(host, api, calls)
    result = RestartDegraded().apply(plan, c)
    assert result.outcome is Outcome.APPLIED
    assert calls == [["restart", "kubelet.service"]] and api.restarted == [(CID, 10)]
    # The restarted processes are gone (their owners started new ones): verified.
    for pid in (40, 50):
        (tmp_path / "proc" / str(pid) / "stat").write_text(stat_line(pid, 999))
    assert RestartDegraded().verify(plan, result, c).verified is True


def test_recheck_by_pid_and_start_time(tmp_path: Path) -> None:
    host = host_with(tmp_path, [40])
    plan = plan_of([consumer(40, unit="kubelet.service")])
    assert isinstance(plan, Plan)
    calls: list[list[str]] = []
    (tmp_path / "proc/40/stat").write_text(stat_line(40, 7))  # the pid now names another process
    result = RestartDegraded().execute(plan, ctx(host, None, calls))
    assert result.outcome is Outcome.SKIPPED and "no planned consumer is still degraded" in result.message
    assert calls == []


def test_a_consumer_that_got_inotify_back_is_left_alone(tmp_path: Path) -> None:
    host = host_with(tmp_path, [40])
    os.symlink("anon_inode:inotify", tmp_path / "proc/40/fd/3")
    plan = plan_of([consumer(40, unit="kubelet.service")])
    assert isinstance(plan, Plan)
    assert RestartDegraded().execute(plan, ctx(host)).outcome is Outcome.SKIPPED


@pytest.mark.parametrize(
    ("running", "labels", "reason"),
    [
        (False, {}, "not the same running container"),
        (True, {"remediator.protect": "true"}, "protected"),
    ],
)
def test_container_rechecked_right_before_restart(
    tmp_path: Path, running: bool, labels: dict[str, str], reason: str
) -> None:
    host = host_with(tmp_path, [50])
    plan = plan_of([consumer(50, container="app", container_id=CID)])
    assert isinstance(plan, Plan)
    api = FakeApi(running=running, labels=labels)
    result = RestartDegraded().execute(plan, ctx(host, api))
    assert result.outcome is Outcome.SKIPPED and reason in result.message
    assert api.restarted == []


def test_dry_run_restarts_nothing(tmp_path: Path) -> None:
    host = host_with(tmp_path, [40])
    plan = plan_of([consumer(40, unit="kubelet.service")])
    assert isinstance(plan, Plan)
    calls: list[list[str]] = []
    c = ctx(host, None, calls)
    c.dry_run = True
    assert RestartDegraded().execute(plan, c).outcome is Outcome.WOULD_APPLY
    assert calls == []
