"""The plain containerd namespaces' inventory: parsing ctr's answers, skipping moby and k8s.io,
caching descriptions, cgroups from /proc, and attribution of processes by cgroup path (ctr ids
are not 64 hex digits)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import pytest

from remediator.errors import PermanentError, TemporaryError
from remediator.host import HostRoot
from remediator.probes.containerd import ContainerdNotFound
from remediator.probes.containerd_inventory import (
    ContainerdNamespacesSource,
    parse_container_info,
    parse_tasks_ls,
)
from remediator.probes.inventory import SnapshotInventory

SOCKET = "/run/containerd/containerd.sock"

TASKS_LS = """\
TASK        PID      STATUS
fifo-web    4242     RUNNING
stopped-one 0        STOPPED
paused      4300     PAUSED
"""


def v1_cgroup(path: str) -> str:
    return f"12:memory:{path}\n11:pids:{path}\n1:name=systemd:{path}\n0::/\n"


class FakeCtr:
    def __init__(self, answers: dict[tuple[str, ...], str | Exception]) -> None:
        self.answers = answers
        self.calls: list[tuple[str, ...]] = []

    def __call__(self, address: str, args: Sequence[str]) -> str:
        assert address == SOCKET
        key = tuple(args)
        self.calls.append(key)
        answer = self.answers[key]
        if isinstance(answer, Exception):
            raise answer
        return answer


def host_with(tmp_path: Path, cgroups: dict[int, str]) -> HostRoot:
    for pid, text in cgroups.items():
        (tmp_path / "proc" / str(pid)).mkdir(parents=True)
        (tmp_path / "proc" / str(pid) / "cgroup").write_text(text)
    return HostRoot(root=tmp_path)


def info(labels: dict[str, str], image: str) -> str:
    return json.dumps({"ID": "x", "Labels": labels, "Image": image, "Spec": {}})


def test_parse_tasks_ls() -> None:
    tasks = parse_tasks_ls(TASKS_LS)
    assert [(t.id, t.pid, t.status) for t in tasks] == [
        ("fifo-web", 4242, "RUNNING"),
        ("stopped-one", 0, "STOPPED"),
        ("paused", 4300, "PAUSED"),
    ]
    assert parse_tasks_ls("TASK    PID    STATUS    \n") == []
    assert parse_tasks_ls("") == []
    with pytest.raises(ValueError, match="header"):
        parse_tasks_ls("ID PID\nx 1\n")
    with pytest.raises(ValueError, match="row"):
        parse_tasks_ls("TASK PID STATUS\nx notapid RUNNING\n")


def test_parse_container_info() -> None:
    assert parse_container_info(info({"a": "1"}, "docker.io/library/busybox:1")) == (
        {"a": "1"},
        "docker.io/library/busybox:1",
    )
    assert parse_container_info('{"Labels": null}') == ({}, None)
    with pytest.raises(ValueError):
        parse_container_info("[]")


def test_snapshot_lists_running_tasks_of_plain_namespaces_only(tmp_path: Path) -> None:
    host = host_with(tmp_path, {4242: v1_cgroup("/default/fifo-web")})
    ctr = FakeCtr(
        {
            ("namespaces", "ls", "-q"): "default\nmoby\nk8s.io\n",
            ("--namespace", "default", "tasks", "ls"): TASKS_LS,
            ("--namespace", "default", "containers", "info", "fifo-web"): info({"app": "web"}, "img:1"),
        }
    )
    (ref,) = ContainerdNamespacesSource(host, ctr, SOCKET).snapshot()
    assert (ref.id, ref.name, ref.runtime, ref.pid, ref.cgroup, ref.image) == (
        "fifo-web",
        "default/fifo-web",
        "containerd",
        4242,
        "/default/fifo-web",
        "img:1",
    )
    assert dict(ref.labels) == {"app": "web"}
    # moby and k8s.io are the Docker and Kubernetes inventories' to describe: never asked.
    assert not [c for c in ctr.calls if "moby" in c or "k8s.io" in c]


def test_descriptions_are_asked_once_and_forgotten_when_the_container_stops(tmp_path: Path) -> None:
    host = host_with(tmp_path, {4242: v1_cgroup("/default/fifo-web")})
    answers: dict[tuple[str, ...], str | Exception] = {
        ("namespaces", "ls", "-q"): "default\n",
        ("--namespace", "default", "tasks", "ls"): TASKS_LS,
        ("--namespace", "default", "containers", "info", "fifo-web"): TemporaryError("busy"),
    }
    ctr = FakeCtr(answers)
    source = ContainerdNamespacesSource(host, ctr, SOCKET)
    (ref,) = source.snapshot()
    assert dict(ref.labels) == {} and ref.image is None  # containerd busy: asked again next time
    answers[("--namespace", "default", "containers", "info", "fifo-web")] = info({"app": "web"}, "img:1")
    source.snapshot()
    (ref,) = source.snapshot()
    assert ref.image == "img:1"
    info_calls = [c for c in ctr.calls if "info" in c]
    assert len(info_calls) == 2  # the failed one, then once
    answers[("--namespace", "default", "tasks", "ls")] = "TASK PID STATUS\n"
    assert source.snapshot() == ()
    answers[("--namespace", "default", "tasks", "ls")] = TASKS_LS
    source.snapshot()
    assert len([c for c in ctr.calls if "info" in c]) == 3  # a new container of the same name


def test_a_task_whose_process_went_and_a_vanished_namespace_are_left_out(tmp_path: Path) -> None:
    host = host_with(tmp_path, {})  # no /proc/4242: exited since the list
    ctr = FakeCtr(
        {
            ("namespaces", "ls", "-q"): "default\ngone\n",
            ("--namespace", "default", "tasks", "ls"): TASKS_LS,
            ("--namespace", "default", "containers", "info", "fifo-web"): info({}, "img:1"),
            ("--namespace", "gone", "tasks", "ls"): ContainerdNotFound("namespace gone: not found"),
        }
    )
    assert ContainerdNamespacesSource(host, ctr, SOCKET).snapshot() == ()


def test_errors_of_the_list_are_the_sources_errors(tmp_path: Path) -> None:
    host = host_with(tmp_path, {})
    busy = FakeCtr({("namespaces", "ls", "-q"): TemporaryError("no answer in 5s")})
    with pytest.raises(TemporaryError):
        ContainerdNamespacesSource(host, busy, SOCKET).snapshot()
    odd = FakeCtr({("namespaces", "ls", "-q"): "default\n", ("--namespace", "default", "tasks", "ls"): "?"})
    with pytest.raises(TemporaryError, match="unexpected header"):
        ContainerdNamespacesSource(host, odd, SOCKET).snapshot()
    missing = FakeCtr({("namespaces", "ls", "-q"): ContainerdNotFound("not found")})
    with pytest.raises(PermanentError):
        ContainerdNamespacesSource(host, missing, SOCKET).snapshot()


def test_processes_are_attributed_by_cgroup_path_including_sub_cgroups(tmp_path: Path) -> None:
    host = host_with(
        tmp_path,
        {
            4242: v1_cgroup("/default/fifo-web"),
            4250: v1_cgroup("/default/fifo-web/worker"),  # a sub-cgroup the container made
            4300: v1_cgroup("/default/fifo-webx"),  # a name that only starts the same
            1: v1_cgroup("/init.scope"),
        },
    )
    ctr = FakeCtr(
        {
            ("namespaces", "ls", "-q"): "default\n",
            ("--namespace", "default", "tasks", "ls"): "TASK PID STATUS\nfifo-web 4242 RUNNING\n",
            ("--namespace", "default", "containers", "info", "fifo-web"): info({}, "img:1"),
        }
    )
    inv = SnapshotInventory(ContainerdNamespacesSource(host, ctr, SOCKET).snapshot(), host)
    web = inv.container_of_pid(4242)
    assert web is not None and web.name == "default/fifo-web"
    assert inv.container_of_pid(4250) == web
    assert inv.container_of_pid(4300) is None
    assert inv.container_of_pid(1) is None
    assert inv.container_of_pid(99999) is None  # gone
    assert inv.container_of_cgroup("/default/fifo-web") == web
