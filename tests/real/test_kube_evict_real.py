"""evict-pod on a real Kubernetes node: the trasher's pod is evicted through the API server, its
ReplicaSet's replacement runs, a bystander pod keeps its uid, and a DaemonSet pod is refused.

The trasher floods negative dentries once (a marker on a hostPath under the node's directory
makes the replacement idle instead of flooding again). A policy whose only step is `evict-pod`
(allowDisruptive) fires after its 10 s hold-down; `remediator once` evicts the pod (policy/v1beta1
Eviction with a uid precondition) and verifies it terminating. A DaemonSet pod holding more slab
than anyone is refused at planning time with the reason, and nothing else is evicted.

The host is restored: the negatives the evicted pod left charged to kubepods/besteffort are
reclaimed there (our own pods' parent only), and the count is checked.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from remediator.host import HostRoot
from remediator.probes.dentries import find_memory_hierarchy, parse_dentry_state
from tests.helpers import remediator_json
from tests.real.kube_node import BUSYBOX_IMAGE, KubeNode, kube_node_running

pytestmark = [pytest.mark.real, pytest.mark.slow, pytest.mark.timeout(1800)]

HOST = HostRoot()
NS = "rmd-evict"
FLOOD = 1_200_000  # failed lookups, two negatives each
ACT_ABOVE = 1_500_000
CLEAR_BELOW = 700_000

POLICY = """\
apiVersion: remediator.io/v1
kind: Policy
metadata:
  name: negative-dentries-evict
  description: Evict the pod that holds the most dentry slab (test).
spec:
  mode: enforce
  interval: 10s
  watch:
    probe: dentries
    metric: negative
    above: {above}
    clearBelow: {clear}
    for: 10s
  actions:
    - action: evict-pod
      allowDisruptive: true
      settle: 20s
      params:
        target: top
        rankBy: slab_reclaimable_bytes
"""


def negatives() -> int:
    return parse_dentry_state(HOST.read_sysctl("fs.dentry-state")).nr_negative


def pod_template(name: str, command: list[str], marker: Path | None = None) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "terminationGracePeriodSeconds": 0,
        "automountServiceAccountToken": False,
        "containers": [
            {"name": name, "image": BUSYBOX_IMAGE, "imagePullPolicy": "Never", "command": command}
        ],
    }
    if marker is not None:
        spec["volumes"] = [{"name": "marker", "hostPath": {"path": str(marker), "type": "DirectoryOrCreate"}}]
        spec["containers"][0]["volumeMounts"] = [{"name": "marker", "mountPath": "/marker"}]
    return {"metadata": {"labels": {"app": name}}, "spec": spec}


def workload(kind: str, name: str, template: dict[str, Any]) -> dict[str, Any]:
    spec: dict[str, Any] = {"selector": {"matchLabels": {"app": name}}, "template": template}
    if kind == "Deployment":
        spec["replicas"] = 1
    return {"apiVersion": "apps/v1", "kind": kind, "metadata": {"name": name, "namespace": NS}, "spec": spec}


@pytest.fixture(scope="module")
def node() -> Iterator[KubeNode]:
    with kube_node_running() as n:
        yield n


def test_once_evicts_the_trasher_pod_and_its_replicaset_replaces_it(
    node: KubeNode, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("REMEDIATOR_KUBE_NODE_NAME", node.node_name)
    monkeypatch.setenv("REMEDIATOR_CRI_CONTAINERD_SOCKET", str(node.containerd_socket))
    monkeypatch.setenv("REMEDIATOR_EBPF", "off")  # ranking is by memcg slab here
    base = negatives()
    policies = tmp_path / "policies"
    policies.mkdir()
    (policies / "evict.yaml").write_text(POLICY.format(above=base + ACT_ABOVE, clear=base + CLEAR_BELOW))

    def run(cmd: str, state: str = "state") -> dict[str, Any]:
        return remediator_json(
            cmd, "--kubeconfig", str(node.kubeconfig), policies=policies, state=tmp_path / state, timeout=240
        )

    def reclaim_besteffort() -> None:
        # Our own pods' QoS parent: every pod under it is this test's. Hierarchical on v1.
        for name in ("memory.force_empty", "memory.reclaim"):
            if (besteffort / name).exists():
                with contextlib.suppress(OSError):  # v2 EAGAIN: less than asked
                    (besteffort / name).write_text("0" if name.endswith("empty") else str(4 << 30))
                return

    marker = node.base / "marker"
    flood_once = (
        f"if [ -e /marker/flooded ]; then exec /load/dcache_load idle; fi; touch /marker/flooded; "
        f"exec /load/dcache_load trash /tmp {FLOOD} 0 0"
    )
    node.apply([{"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NS}}])
    node.apply(workload("Deployment", "idle", pod_template("idle", ["/load/dcache_load", "idle"])))
    node.apply(
        workload("Deployment", "trasher", pod_template("trasher", ["/bin/sh", "-c", flood_once], marker))
    )
    (bystander,) = node.wait_running(NS, "app=idle", 1)
    (trasher,) = node.wait_running(NS, "app=trasher", 1)
    h = find_memory_hierarchy(HOST)
    assert h is not None
    besteffort = h.root / "kubepods" / "besteffort"
    try:
        deadline = time.monotonic() + 120
        while negatives() < base + ACT_ABOVE:
            assert time.monotonic() < deadline, f"only {negatives() - base} new negatives"
            time.sleep(0.5)
        time.sleep(1)

        first = run("once")
        assert first["policies"][0]["decisions"][0]["phase"] == "pending"
        time.sleep(11)
        second = run("once")
        (act,) = second["policies"][0]["actions"]
        assert act["action"] == "evict-pod"
        assert act["result"]["outcome"] == "applied", act
        assert act["result"]["verified"] is True, act["result"]
        name = trasher["metadata"]["name"]
        assert act["plan"]["target"]["detail"] == {
            "namespace": NS,
            "pod": name,
            "uid": trasher["metadata"]["uid"],
        }

        # The ReplicaSet's replacement runs; the bystander is the same pod.
        deadline = time.monotonic() + 60
        while True:
            pods = node.wait_running(NS, "app=trasher", 1)
            if all(p["metadata"]["uid"] != trasher["metadata"]["uid"] for p in pods):
                break
            assert time.monotonic() < deadline, pods
            time.sleep(0.2)
        (replacement,) = pods
        assert (
            replacement["metadata"]["ownerReferences"][0]["name"]
            == trasher["metadata"]["ownerReferences"][0]["name"]
        )
        (now,) = node.wait_running(NS, "app=idle", 1, timeout=10)
        assert now["metadata"]["uid"] == bystander["metadata"]["uid"]
        assert now["status"]["containerStatuses"][0]["restartCount"] == 0

        # A DaemonSet pod is refused with the reason, even as the top holder (a fresh state: the
        # first condition's one-step ladder has run).
        reclaim_besteffort()
        agent_cmd = ["/load/dcache_load", "trash", "/tmp", str(FLOOD), "0", "0"]
        node.apply(workload("DaemonSet", "agent", pod_template("agent", agent_cmd)))
        (agent,) = node.wait_running(NS, "app=agent", 1)
        deadline = time.monotonic() + 60
        while negatives() < base + ACT_ABOVE:
            assert time.monotonic() < deadline, f"the agent made only {negatives() - base} new negatives"
            time.sleep(0.5)
        assert run("once", "state2")["policies"][0]["decisions"][0]["phase"] == "pending"
        time.sleep(11)
        third = run("once", "state2")
        decisions = third["policies"][0]
        reasons = [a["result"]["message"] for a in decisions["actions"]] + [
            d["reason"] for d in decisions["decisions"]
        ]
        assert any("belongs to DaemonSet agent" in r for r in reasons), decisions
        assert all(a["result"]["outcome"] != "applied" for a in decisions["actions"]), decisions
        (still,) = node.wait_running(NS, "app=agent", 1, timeout=10)
        assert still["metadata"]["uid"] == agent["metadata"]["uid"]
        print(
            f"\nnegatives: base {base}; evicted {name}; "
            f"replacement {replacement['metadata']['name']}; {reasons}"
        )
    finally:
        # The evicted pod's image-layer negatives are charged to its parents now, the agent's to
        # its own cgroup: reclaim both through their QoS parent, then stop the flooders.
        reclaim_besteffort()
        with contextlib.suppress(AssertionError):
            node.kubectl("delete", "-n", NS, "daemonset/agent", "deployment/trasher", "--ignore-not-found")
    assert negatives() < base + CLEAR_BELOW
