"""evict-pod's delete fallback on a real Kubernetes node, against a real PodDisruptionBudget.

A Deployment's trasher pod (one replica) floods negative dentries once, and a
PodDisruptionBudget (`minAvailable: 1`) protects it, so the API server refuses its eviction
with HTTP 429. A policy whose only step is `evict-pod` fires:

* with `deleteFallback: true` alone, the refusal stands: the step is `skipped` (the budget),
  nothing is deleted, the pod keeps its uid;
* with `deleteDespiteDisruptionBudget: true` too (the separate opt-in), the pod is deleted with
  its uid precondition, and its ReplicaSet's replacement runs; a bystander keeps its uid.

(1.20 serves the Eviction subresource, so the other fallback case, 404/405, is covered by the
unit tests against a fake API server.) The host is restored as in test_kube_evict_real.py: the
negatives are reclaimed through our own pods' QoS parent, and the count is checked.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from remediator.host import HostRoot
from remediator.probes.dentries import find_memory_hierarchy
from tests.helpers import remediator_json
from tests.real.kube_node import KubeNode, kube_node_running
from tests.real.test_kube_evict_real import negatives, pod_template

pytestmark = [pytest.mark.real, pytest.mark.slow, pytest.mark.timeout(1800)]

HOST = HostRoot()
NS = "rmd-pdb"
FLOOD = 400_000  # failed lookups, two negatives each on overlayfs
ACT_ABOVE = 500_000
CLEAR_BELOW = 250_000

POLICY = """\
apiVersion: remediator.io/v1
kind: Policy
metadata:
  name: negative-dentries-evict
spec:
  mode: enforce
  interval: 10s
  watch:
    probe: dentries
    metric: negative
    above: {above}
    clearBelow: {clear}
    for: 0s
  actions:
    - action: evict-pod
      allowDisruptive: true
      settle: 20s
      params:
        target: top
        rankBy: slab_reclaimable_bytes
        deleteFallback: true
        deleteDespiteDisruptionBudget: {override}
"""


def workload(name: str, template: dict[str, Any]) -> dict[str, Any]:
    spec = {"replicas": 1, "selector": {"matchLabels": {"app": name}}, "template": template}
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name, "namespace": NS},
        "spec": spec,
    }


@pytest.fixture(scope="module")
def node() -> Iterator[KubeNode]:
    with kube_node_running() as n:
        yield n


def test_a_disruption_budget_refusal_stands_unless_the_separate_opt_in_deletes(
    node: KubeNode, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("REMEDIATOR_KUBE_NODE_NAME", node.node_name)
    monkeypatch.setenv("REMEDIATOR_CRI_CONTAINERD_SOCKET", str(node.containerd_socket))
    monkeypatch.setenv("REMEDIATOR_EBPF", "off")  # ranking is by memcg slab here
    base = negatives()

    def run(override: bool) -> dict[str, Any]:
        policies = tmp_path / f"policies-{override}"
        policies.mkdir()
        text = POLICY.format(above=base + ACT_ABOVE, clear=base + CLEAR_BELOW, override=str(override).lower())
        (policies / "evict.yaml").write_text(text)
        return remediator_json(
            "once",
            "--kubeconfig",
            str(node.kubeconfig),
            policies=policies,
            state=tmp_path / f"state-{override}",
            timeout=240,
        )

    h = find_memory_hierarchy(HOST)
    assert h is not None
    besteffort = h.root / "kubepods" / "besteffort"

    def reclaim_besteffort() -> None:
        for name in ("memory.force_empty", "memory.reclaim"):
            if (besteffort / name).exists():
                with contextlib.suppress(OSError):  # v2 EAGAIN: less than asked
                    (besteffort / name).write_text("0" if name.endswith("empty") else str(4 << 30))
                return

    marker = node.base / "marker-pdb"
    flood_once = (
        f"if [ -e /marker/flooded ]; then exec /load/dcache_load idle; fi; touch /marker/flooded; "
        f"exec /load/dcache_load trash /tmp {FLOOD} 0 0"
    )
    node.apply([{"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NS}}])
    node.apply(workload("idle", pod_template("idle", ["/load/dcache_load", "idle"])))
    node.apply(
        {
            "apiVersion": "policy/v1beta1",
            "kind": "PodDisruptionBudget",
            "metadata": {"name": "trasher", "namespace": NS},
            "spec": {"minAvailable": 1, "selector": {"matchLabels": {"app": "trasher"}}},
        }
    )
    node.apply(workload("trasher", pod_template("trasher", ["/bin/sh", "-c", flood_once], marker)))
    (bystander,) = node.wait_running(NS, "app=idle", 1)
    (trasher,) = node.wait_running(NS, "app=trasher", 1)
    try:
        # The disruption controller has counted the pod: no disruption allowed.
        deadline = time.monotonic() + 60
        while True:
            status = node.api("GET", f"/apis/policy/v1beta1/namespaces/{NS}/poddisruptionbudgets/trasher")[
                "status"
            ]
            if status.get("currentHealthy") == 1 and status.get("disruptionsAllowed") == 0:
                break
            assert time.monotonic() < deadline, status
            time.sleep(0.5)
        deadline = time.monotonic() + 120
        while negatives() < base + ACT_ABOVE:
            assert time.monotonic() < deadline, f"only {negatives() - base} new negatives"
            time.sleep(0.5)
        time.sleep(1)

        # deleteFallback alone: the budget's refusal stands.
        (act,) = run(False)["policies"][0]["actions"]
        assert act["action"] == "evict-pod"
        assert act["result"]["outcome"] == "skipped", act["result"]
        assert "PodDisruptionBudget" in act["result"]["message"], act["result"]
        (same,) = node.wait_running(NS, "app=trasher", 1, timeout=10)
        assert same["metadata"]["uid"] == trasher["metadata"]["uid"]

        # The separate opt-in: deleted with the uid precondition, replaced by its ReplicaSet.
        (act,) = run(True)["policies"][0]["actions"]
        result = act["result"]
        assert result["outcome"] == "applied", result
        assert result["message"].startswith(f"deleted pod {NS}/{trasher['metadata']['name']}"), result
        assert "PodDisruptionBudget refused" in result["message"], result
        assert result["before"] == {"uid": trasher["metadata"]["uid"], "fallback": "delete"}
        assert result["verified"] is True, result
        deadline = time.monotonic() + 60
        while True:
            pods = node.wait_running(NS, "app=trasher", 1)
            if all(p["metadata"]["uid"] != trasher["metadata"]["uid"] for p in pods):
                break
            assert time.monotonic() < deadline, pods
            time.sleep(0.2)
        (now,) = node.wait_running(NS, "app=idle", 1, timeout=10)
        assert now["metadata"]["uid"] == bystander["metadata"]["uid"]
        assert now["status"]["containerStatuses"][0]["restartCount"] == 0
        print(f"\nnegatives: base {base}; skipped, then deleted: {result['message']}")
    finally:
        reclaim_besteffort()
        with contextlib.suppress(AssertionError):
            node.kubectl("delete", "namespace", NS, "--wait=false")
    reclaim_besteffort()
    assert negatives() < base + CLEAR_BELOW
