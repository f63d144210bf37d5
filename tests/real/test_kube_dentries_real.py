"""The negative-dentry case (dentry-cache-isolation-story.txt) on a real Kubernetes node.

A Deployment's trasher pod floods negative dentries with tests/real/dcache_load.c's helper (a
few million, then a trickle), an idle bystander pod of the same image does nothing.

* `remediator audit --kubeconfig` names the trasher's pod and namespace as the top contributor
  (the pod described by the API server: owner ReplicaSet, QoS class), and changes nothing;
* `remediator once` holds for the policy's 10 s, then reclaims the trasher container's memory
  cgroup (under kubepods, found through the CRI inventory): the count goes under the clear line;
* the bystander and the trasher keep their pod uids and run (reclaim kills nothing);
* the Node carries the NPD-style condition `RemediatorNegativeDentries=True` while the policy
  fires (audit only says it would set it), with Events on the Node (PolicyFiring, ActionApplied)
  and on the trasher's pod (ActionApplied); a third `once`, under the clear line, sets it False
  (`NoProblem`, a PolicyResolved Event), the kubelet's own conditions untouched.

The host is restored: the trasher's cgroup is reclaimed again before the node is torn down (its
negatives would otherwise move to the kubepods parents), and the count is checked.
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
from remediator.probes.ebpf import unavailable as ebpf_unavailable
from remediator.settings import bundled_policies
from tests.helpers import remediator_json
from tests.real.kube_images import busybox_deployment
from tests.real.kube_node import KubeNode, kube_node_running

pytestmark = [pytest.mark.real, pytest.mark.slow, pytest.mark.timeout(1800)]

HOST = HostRoot()
NS = "rmd-shop"
FLOOD = 2_400_000  # failed lookups in the burst (two negatives each on overlayfs)
TRICKLE = 20_000  # per second afterwards
ACT_ABOVE = 2_000_000  # over the host's count before the test
CLEAR_BELOW = 1_000_000


def negatives() -> int:
    return parse_dentry_state(HOST.read_sysctl("fs.dentry-state")).nr_negative


def deployment(name: str, args: list[str]) -> dict[str, Any]:
    return busybox_deployment(NS, name, ["/load/dcache_load", *args])


def pod_log(pod: dict[str, Any]) -> str:
    meta = pod["metadata"]
    container = pod["spec"]["containers"][0]["name"]
    path = Path("/var/log/pods") / f"{meta['namespace']}_{meta['name']}_{meta['uid']}" / container / "0.log"
    return path.read_text(errors="replace") if path.exists() else ""


def wait_log(pod: dict[str, Any], word: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while word not in pod_log(pod):
        assert time.monotonic() < deadline, (
            f"{pod['metadata']['name']} did not say {word!r}: {pod_log(pod)!r}"
        )
        time.sleep(0.2)


def container_cgroup(pod: dict[str, Any]) -> Path:
    h = find_memory_hierarchy(HOST)
    assert h is not None
    cid = pod["status"]["containerStatuses"][0]["containerID"].split("://", 1)[1]
    qos = pod["status"]["qosClass"].lower()
    return Path(h.root, "kubepods", qos, f"pod{pod['metadata']['uid']}", cid)


def reclaim(cg: Path) -> None:
    if (cg / "memory.force_empty").exists():
        (cg / "memory.force_empty").write_text("0")
    else:
        with contextlib.suppress(OSError):  # EAGAIN: less than asked
            (cg / "memory.reclaim").write_text(str(4 << 30))


CONDITION = "RemediatorNegativeDentries"


def node_conditions(node: KubeNode) -> dict[str, dict[str, Any]]:
    obj = node.api("GET", f"/api/v1/nodes/{node.node_name}")
    return {c["type"]: c for c in obj["status"].get("conditions") or []}


def remediator_events(node: KubeNode, namespace: str, kind: str, name: str) -> set[str]:
    """The reasons of remediator's Events about one object."""
    items = node.api("GET", f"/api/v1/namespaces/{namespace}/events")["items"]
    return {
        e["reason"]
        for e in items
        if (e.get("source") or {}).get("component") == "remediator"
        and (e["involvedObject"].get("kind"), e["involvedObject"].get("name")) == (kind, name)
    }


@pytest.fixture(scope="module")
def node() -> Iterator[KubeNode]:
    with kube_node_running() as n:
        yield n


def test_trasher_pod_named_by_audit_and_its_cgroup_reclaimed_by_once(
    node: KubeNode, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("REMEDIATOR_KUBE_NODE_NAME", node.node_name)
    monkeypatch.setenv("REMEDIATOR_CRI_CONTAINERD_SOCKET", str(node.containerd_socket))
    if ebpf_unavailable(HOST) is None:
        monkeypatch.setenv("REMEDIATOR_EBPF", "always")
    policies = tmp_path / "policies"
    policies.mkdir()
    base = negatives()
    bundled = bundled_policies()
    assert bundled is not None
    text = (bundled / "negative-dentries.yaml").read_text()
    assert "above: 200%" in text and "clearBelow: 100%" in text
    (policies / "negative-dentries.yaml").write_text(
        text.replace("above: 200%", f"above: {base + ACT_ABOVE}").replace(
            "clearBelow: 100%", f"clearBelow: {base + CLEAR_BELOW}"
        )
    )

    def run(cmd: str) -> dict[str, Any]:
        return remediator_json(
            cmd,
            "--kubeconfig",
            str(node.kubeconfig),
            policies=policies,
            state=tmp_path / "state",
            timeout=240,
        )

    node.apply([{"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NS}}])
    node.apply(deployment("idle", ["idle"]))
    (bystander,) = node.wait_running(NS, "app=idle", 1)
    wait_log(bystander, "ready", 30)
    node.apply(deployment("trasher", ["trash", "/tmp", str(FLOOD), "0", str(TRICKLE)]))
    (trasher,) = node.wait_running(NS, "app=trasher", 1)
    cg = container_cgroup(trasher)
    try:
        wait_log(trasher, "done", 120)
        flooded = negatives()
        assert flooded > base + ACT_ABOVE, f"only {flooded - base} new negatives"

        doc = run("audit")
        reading = doc["readings"]["dentries"]
        top = reading["detail"]["attribution"]["top"][0]
        name = trasher["metadata"]["name"]
        assert (top.get("pod"), top.get("namespace")) == (name, NS), reading["detail"]["attribution"]["top"]
        assert top["container"] == f"{NS}/{name}/trasher"
        described = {c["container"]["id"]: c["container"] for c in reading["containers"]}
        cid = cg.name
        pod = described[cid]["pod"]
        assert pod["source"] == "api", pod
        assert pod["owner_kind"] == "ReplicaSet" and pod["owner_name"].startswith("trasher-"), pod
        assert pod["qos_class"] == "BestEffort"
        assert described[cid]["cgroup"] == f"/kubepods/besteffort/pod{trasher['metadata']['uid']}/{cid}"
        assert negatives() >= flooded * 0.95  # audit freed nothing
        assert CONDITION not in node_conditions(node)  # audit writes nothing to the API server

        first = run("once")
        assert first["policies"][0]["decisions"][0]["phase"] == "pending"
        time.sleep(11)
        second = run("once")
        (act,) = second["policies"][0]["actions"]
        assert (act["action"], act["result"]["outcome"]) == ("reclaim-cgroup", "applied"), act["result"]
        assert act["plan"]["target"]["name"] == f"{NS}/{name}/trasher"
        after = act["result"]["after"]
        assert after["host_nr_negative"] < base + CLEAR_BELOW, act["result"]
        assert negatives() < base + CLEAR_BELOW

        # The condition is on the Node while the policy fires, with Events on the Node and pod.
        fired = node_conditions(node)[CONDITION]
        assert (fired["status"], fired["reason"]) == ("True", "ThresholdExceeded"), fired
        assert fired["message"].startswith("negative-dentries: dentries negative over "), fired
        assert node_conditions(node)["Ready"]["status"] == "True"
        assert {"PolicyFiring", "ActionApplied"} <= remediator_events(node, "default", "Node", node.node_name)
        assert "ActionApplied" in remediator_events(node, NS, "Pod", name)

        third = run("once")
        assert third["policies"][0]["decisions"][0]["phase"] in ("resolved", "ok"), third["policies"][0]
        cleared = node_conditions(node)[CONDITION]
        assert (cleared["status"], cleared["reason"]) == ("False", "NoProblem"), cleared
        assert cleared["lastTransitionTime"] >= fired["lastTransitionTime"]
        assert "PolicyResolved" in remediator_events(node, "default", "Node", node.node_name)
        assert node_conditions(node)["Ready"]["status"] == "True"

        # Both pods still run as the same pods.
        for selector, before in (("app=idle", bystander), ("app=trasher", trasher)):
            (now,) = node.wait_running(NS, selector, 1, timeout=10)
            assert now["metadata"]["uid"] == before["metadata"]["uid"]
            assert now["status"]["containerStatuses"][0]["restartCount"] == 0
        print(
            f"\nnegatives: base {base}, flooded {flooded}, "
            f"after reclaim {after['host_nr_negative']}; top {top}"
        )
    finally:
        # Restore: reclaim the trasher's own cgroup, then stop it (its pod is deleted), so that
        # only a moment's trickle can move to the kubepods parents when its cgroup goes.
        if cg.is_dir():
            reclaim(cg)
        node.kubectl("scale", "-n", NS, "deployment/trasher", "--replicas=0")
    assert negatives() < base + CLEAR_BELOW
