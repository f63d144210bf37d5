"""CRI containers found from a fixture kubepods cgroup tree, described by API, labels or cgroup."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from remediator.clock import FakeClock
from remediator.errors import TemporaryError
from remediator.host import HostRoot
from remediator.model import ContainerRef, PodRef
from remediator.probes.containers import StaticInventory
from remediator.probes.inventory_multi import MultiInventory
from remediator.probes.kube_api import PodInfo, parse_pod_list
from remediator.probes.kube_inventory import KubeInventorySource, scan_cri_cgroups

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "kube"
UID = "3f1e2d4c-5b6a-4789-8abc-def012345678"  # the trasher pod of podlist-node.json
NEW_UID = "77777777-8888-4999-8aaa-bbbbbbbbbbbb"  # a pod newer than the list
MAIN, SIDECAR, SANDBOX = "1" * 64, "3" * 64, "a" * 64
NEW = "b" * 64


def pods() -> dict[str, PodInfo]:
    return parse_pod_list(json.loads((FIXTURES / "podlist-node.json").read_text()))


def kube_host(tmp_path: Path, containers: Sequence[tuple[str, str, str, list[int]]]) -> HostRoot:
    """A cgroup v1 memory hierarchy with kubepods/<qos>/pod<uid>/<id> dirs and their pids."""
    memory = tmp_path / "sys" / "fs" / "cgroup" / "memory"
    memory.mkdir(parents=True)
    (memory / "memory.stat").write_text("cache 0\n")
    (memory / "docker" / ("f" * 64)).mkdir(parents=True)  # not Kubernetes: not listed
    for qos, uid, cid, pids in containers:
        d = memory / "kubepods" / qos / f"pod{uid}" / cid
        d.mkdir(parents=True)
        (d / "cgroup.procs").write_text("".join(f"{p}\n" for p in pids))
        (d / "memory.stat").write_text("cache 0\n")
    for qos, uid, cid, pids in containers:
        for pid in pids:
            proc = tmp_path / "proc" / str(pid)
            proc.mkdir(parents=True, exist_ok=True)
            (proc / "cgroup").write_text(f"4:memory:/kubepods/{qos}/pod{uid}/{cid}\n0::/\n")
    return HostRoot(tmp_path)


class FakeLister:
    def __init__(self, answers: list[dict[str, PodInfo] | Exception]) -> None:
        self.answers = answers
        self.calls = 0

    def node_pods(self, node: str) -> dict[str, PodInfo]:
        assert node == "node-1"
        self.calls += 1
        answer = self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]
        if isinstance(answer, Exception):
            raise answer
        return answer


def labels_ctr(known: dict[str, dict[str, str]]):  # type: ignore[no-untyped-def]
    calls: list[list[str]] = []

    def ctr(address: str, args: Sequence[str]) -> str:
        assert address == "/run/k8s-containerd.sock"
        calls.append(list(args))
        assert list(args[:4]) == ["--namespace", "k8s.io", "containers", "info"]
        cid = args[4]
        if cid not in known:
            raise TemporaryError(f"ctr: container {cid} not found")
        return json.dumps({"ID": cid, "Labels": known[cid], "Image": "docker.io/rmd-test/busybox:1"})

    ctr.calls = calls  # type: ignore[attr-defined]
    return ctr


def sandbox_labels(uid: str, name: str) -> dict[str, str]:
    return {
        "io.cri-containerd.kind": "sandbox",
        "io.kubernetes.pod.name": name,
        "io.kubernetes.pod.namespace": "shop",
        "io.kubernetes.pod.uid": uid,
    }


TREE = [
    ("besteffort", UID, MAIN, [4321, 4300]),
    ("besteffort", UID, SIDECAR, [4400]),
    ("besteffort", UID, SANDBOX, [4200]),
]


def source(host: HostRoot, clock: FakeClock, lister: FakeLister | None, ctr=None) -> KubeInventorySource:  # type: ignore[no-untyped-def]
    return KubeInventorySource(host, clock, lister, "node-1", ctr, "/run/k8s-containerd.sock")


def test_scan_finds_each_container_cgroup_with_its_lowest_pid(tmp_path: Path) -> None:
    host = kube_host(tmp_path, TREE)
    found = scan_cri_cgroups(host.cgroup / "memory")
    assert [(c.path, c.pid, c.parsed.container_id) for c in found] == sorted(
        (f"/kubepods/besteffort/pod{UID}/{cid}", min(pids), cid) for _, _, cid, pids in TREE
    )


def test_api_describes_pods_and_labels_name_the_sandbox(tmp_path: Path) -> None:
    host = kube_host(tmp_path, TREE)
    ctr = labels_ctr({SANDBOX: sandbox_labels(UID, "trasher-6d8f7c9b4-x2x7q")})
    inv = source(host, FakeClock(), FakeLister([pods()]), ctr)()
    assert inv.error is None
    by_id = {c.id: c for c in inv.containers()}
    main = by_id[MAIN]
    assert main.name == "shop/trasher-6d8f7c9b4-x2x7q/main"
    assert main.runtime == "cri"
    assert main.pid == 4300
    assert main.cgroup == f"/kubepods/besteffort/pod{UID}/{MAIN}"
    assert main.image == "docker.io/rmd-test/busybox:1"
    assert main.pod == PodRef(
        name="trasher-6d8f7c9b4-x2x7q",
        namespace="shop",
        uid=UID,
        container="main",
        owner_kind="ReplicaSet",
        owner_name="trasher-6d8f7c9b4",
        qos_class="BestEffort",
        node="node-1",
        source="api",
    )
    assert by_id[SIDECAR].pod is not None and by_id[SIDECAR].pod.container == "sidecar"
    sandbox = by_id[SANDBOX]
    assert sandbox.name == "shop/trasher-6d8f7c9b4-x2x7q/POD"
    assert (
        sandbox.pod is not None and sandbox.pod.container is None and sandbox.pod.owner_kind == "ReplicaSet"
    )
    assert ctr.calls == []  # type: ignore[attr-defined]  # the pod list named them all
    # lookups: a pid that is not a container's lowest, and a cgroup path
    assert inv.container_of_pid(4321) == main
    assert inv.container_of_cgroup(f"/kubepods/besteffort/pod{UID}/{MAIN}") == main
    # serialised for the audit log and back
    assert ContainerRef.from_dict(main.to_dict()) == main


def test_unreachable_api_falls_back_to_labels_and_is_said_once(tmp_path: Path) -> None:
    host = kube_host(tmp_path, [("burstable", UID, MAIN, [10])])
    labels = {
        **sandbox_labels(UID, "trasher-6d8f7c9b4-x2x7q"),
        "io.cri-containerd.kind": "container",
        "io.kubernetes.container.name": "main",
    }
    clock = FakeClock()
    lister = FakeLister([TemporaryError("kubernetes: GET /api/v1/pods: Connection refused")])
    src = source(host, clock, lister, labels_ctr({MAIN: labels}))
    ctr = src.ctr
    with capture_logs() as logs:
        for _ in range(3):
            inv = src()
            clock.advance(400)  # every cycle a relist is due: each one fails
    assert len(ctr.calls) == 1  # type: ignore[union-attr]  # labels asked once per container id
    (ref,) = inv.containers()
    assert inv.error is None  # every container is found: only the description is node-local
    assert ref.pod == PodRef(
        name="trasher-6d8f7c9b4-x2x7q",
        namespace="shop",
        uid=UID,
        container="main",
        qos_class="Burstable",
        source="labels",
    )
    assert ref.name == "shop/trasher-6d8f7c9b4-x2x7q/main"
    assert lister.calls == 3
    assert [e["event"] for e in logs if e["event"].startswith("kube_api")] == ["kube_api_unreachable"]
    lister.answers = [pods()]
    with capture_logs() as logs:
        inv = src()
    assert [e["event"] for e in logs if e["event"].startswith("kube_api")] == ["kube_api_reachable"]
    assert inv.containers()[0].pod is not None and inv.containers()[0].pod.source == "api"


def test_without_api_or_labels_the_cgroup_still_gives_pod_uid_and_qos(tmp_path: Path) -> None:
    host = kube_host(tmp_path, [("besteffort", UID, MAIN, [10])])
    (ref,) = source(host, FakeClock(), None, None)().containers()
    assert ref.pod == PodRef(name="", namespace="", uid=UID, qos_class="BestEffort", source="cgroup")
    assert ref.name == f"pod{UID}/{MAIN[:12]}"


def test_reads_are_bounded_relist_only_when_due_or_a_new_pod_appears(tmp_path: Path) -> None:
    host = kube_host(tmp_path, TREE)
    clock = FakeClock()
    lister = FakeLister([pods()])
    src = source(host, clock, lister, labels_ctr({}))
    src()
    assert lister.calls == 1
    for _ in range(10):  # a quiet node: no call until the relist interval
        clock.advance(25)
        src()
    assert lister.calls == 1
    clock.advance(60)  # 310 s since the list
    src()
    assert lister.calls == 2
    # a new pod's cgroup: listed again, but not sooner than MIN_RELIST_SECONDS after the last
    d = host.cgroup / "memory" / "kubepods" / "besteffort" / f"pod{NEW_UID}" / NEW
    d.mkdir(parents=True)
    (d / "cgroup.procs").write_text("99\n")
    clock.advance(3)
    src()
    assert lister.calls == 2
    clock.advance(7)
    src()
    assert lister.calls == 3


def test_no_memory_hierarchy_is_an_error_not_an_empty_node(tmp_path: Path) -> None:
    inv = source(HostRoot(tmp_path), FakeClock(), FakeLister([pods()]))()
    assert inv.containers() == []
    assert inv.error is not None and "no memory cgroup hierarchy" in inv.error


def test_multi_inventory_joins_runtimes_and_names_each_error() -> None:
    docker = ContainerRef(id="d" * 64, name="web", pid=5, cgroup="/docker/" + "d" * 64)
    cri = ContainerRef(id="c" * 64, name="ns/p/c", runtime="cri", pid=6, cgroup="/kubepods/x")
    multi = MultiInventory(
        [("docker", StaticInventory([docker], error=None)), ("kubernetes", StaticInventory([cri]))]
    )
    assert multi.containers() == [docker, cri]
    assert multi.error is None
    assert multi.container_of_pid(6) == cri
    assert multi.container_of_cgroup("/docker/" + "d" * 64) == docker
    assert multi.container_of_pid(7) is None
    down = MultiInventory(
        [
            ("docker", StaticInventory(error="docker: connection refused")),
            ("kubernetes", StaticInventory([cri])),
        ]
    )
    assert down.error == "docker: docker: connection refused"
    assert down.containers() == [cri]


@pytest.mark.parametrize("with_pod", [True, False])
def test_container_ref_dict_has_pod_only_when_set(with_pod: bool) -> None:
    pod = PodRef(
        name="p",
        namespace="n",
        uid="u",
        container="c",
        owner_kind="Job",
        owner_name="j",
        qos_class="Burstable",
    )
    ref = ContainerRef(id="e" * 64, name="n/p/c", runtime="cri", pod=pod if with_pod else None)
    d = ref.to_dict()
    assert ("pod" in d) is with_pod
    assert ContainerRef.from_dict(d) == ref
