"""shared-kernel-limits-ja.txt on a real Kubernetes node: a pod hoarding inotify watches.

A Deployment's pod runs tests/real/inotify_holder.c (static, from a hostPath volume in the
busybox image) as uid 4242: 100 instances each watching 12 directories, 1200 watches charged to
that uid. fs.inotify.max_user_watches is lowered for the test (to 2048, so the hog holds over
half of its uid's pool; root's own watches are checked to be far below it first) and restored
even on failure (`sysctl_guard`), and the restore is checked.

* `remediator audit --kubeconfig` names the hog's pod (namespace, owner) among the limits
  reading's containers with its 1200 watches, and changes nothing (the limit as lowered, no
  condition on the Node);
* `remediator once` raises the limit within the policy's ceiling (x2, read back), and the Node
  carries `RemediatorInotifyWatches=True` with a PolicyFiring and an ActionApplied Event;
* the hog and a bystander pod keep running as the same pods.
"""

from __future__ import annotations

import collections
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from remediator.host import HostRoot
from tests.helpers import remediator_json
from tests.real.conftest import OTHER_UID
from tests.real.kube_images import busybox_deployment
from tests.real.kube_node import KubeNode, kube_node_running
from tests.real.test_kube_dentries_real import node_conditions, remediator_events, wait_log

pytestmark = [pytest.mark.real, pytest.mark.slow, pytest.mark.timeout(1200)]

HOST = HostRoot()
KEY = "fs.inotify.max_user_watches"
NS = "rmd-watch"
INSTANCES = 100
# Directories of the busybox image (and the holder's own mount) each instance watches.
PATHS = [
    "/",
    "/bin",
    "/sbin",
    "/usr",
    "/usr/bin",
    "/usr/sbin",
    "/etc",
    "/root",
    "/dev",
    "/run",
    "/tmp",
    "/holder",
]
WATCHES = INSTANCES * len(PATHS)
LOWERED = 2048
CEILING = 8192
CONDITION = "RemediatorInotifyWatches"

POLICY = f"""\
apiVersion: remediator.io/v1
kind: Policy
metadata:
  name: inotify-watches
spec:
  mode: enforce
  interval: 30s
  watch:
    probe: limits
    metric: inotify_watches_max_uid
    above: 40%
    clearBelow: 10%
  actions:
    - action: raise-sysctl
      settle: 1m
      params: {{key: {KEY}, factor: 2.0, ceiling: {CEILING}}}
"""


def watches_by_uid() -> collections.Counter[int]:
    """inotify watches per uid of the process that holds the instance (one /proc scan)."""
    out: collections.Counter[int] = collections.Counter()
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            uid = os.stat(f"/proc/{pid}").st_uid
            for fd in os.listdir(f"/proc/{pid}/fd"):
                if os.readlink(f"/proc/{pid}/fd/{fd}") == "anon_inode:inotify":
                    with open(f"/proc/{pid}/fdinfo/{fd}") as f:
                        out[uid] += sum(1 for line in f if line.startswith("inotify wd:"))
        except OSError:  # the process or fd went away meanwhile
            continue
    return out


def deployment(name: str, command: list[str], holder_dir: Path, uid: int) -> dict[str, Any]:
    return busybox_deployment(
        NS,
        name,
        command,
        pod={
            "securityContext": {"runAsUser": uid, "runAsGroup": uid},
            "volumes": [{"name": "holder", "hostPath": {"path": str(holder_dir), "type": "Directory"}}],
        },
        container={"volumeMounts": [{"name": "holder", "mountPath": "/holder", "readOnly": True}]},
    )


@pytest.fixture(scope="module")
def node() -> Iterator[KubeNode]:
    with kube_node_running() as n:
        yield n


def test_inotify_hog_pod_named_by_audit_and_the_pool_raised_by_once(
    node: KubeNode,
    holder_dir: Path,
    sysctl_guard: Callable[[str], str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("REMEDIATOR_KUBE_NODE_NAME", node.node_name)
    monkeypatch.setenv("REMEDIATOR_CRI_CONTAINERD_SOCKET", str(node.containerd_socket))
    original = int(sysctl_guard(KEY))  # written back after the test, even on failure
    assert original > CEILING, f"{KEY} is {original}: the test lowers it to {LOWERED}"
    policies = tmp_path / "policies"
    policies.mkdir()
    (policies / "p.yaml").write_text(POLICY)
    (tmp_path / "config" / "etc").mkdir(parents=True)

    def run(cmd: str) -> dict[str, Any]:
        return remediator_json(
            cmd,
            "--kubeconfig",
            str(node.kubeconfig),
            "--config-root",
            str(tmp_path / "config"),
            policies=policies,
            state=tmp_path / "state",
            timeout=240,
        )

    node.apply([{"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NS}}])
    node.apply(deployment("idle", ["/bin/sh", "-c", "echo ready; exec sleep 3600"], holder_dir, 0))
    (bystander,) = node.wait_running(NS, "app=idle", 1)
    node.apply(deployment("hog", ["/holder/holder", str(INSTANCES), *PATHS], holder_dir, OTHER_UID))
    (hog,) = node.wait_running(NS, "app=hog", 1)
    try:
        wait_log(hog, "ready", 30)
        held = watches_by_uid()
        assert held[OTHER_UID] == WATCHES, held
        # Root keeps its watches well under the lowered pool (the kubelet, containerd, systemd).
        assert held[0] < LOWERED // 4, (
            f"root holds {held[0]} inotify watches: lowering to {LOWERED} could hurt"
        )
        HOST.sysctl_path(KEY).write_text(f"{LOWERED}\n")

        doc = run("audit")
        reading = doc["readings"]["limits"]
        assert reading["values"]["inotify_watches_max_uid"] == WATCHES, reading["values"]
        name = hog["metadata"]["name"]
        described = {
            c["container"]["pod"]["name"]: c
            for c in reading["containers"]
            if c["container"].get("pod") and c["container"]["pod"]["container"] == "hog"
        }
        assert name in described, [c["container"]["name"] for c in reading["containers"]]
        pod = described[name]["container"]["pod"]
        assert (pod["namespace"], pod["owner_kind"], pod["source"]) == (NS, "ReplicaSet", "api"), pod
        assert described[name]["values"]["inotify_watches"] == WATCHES
        assert doc["policies"][0]["decisions"][0]["kind"] == "act"
        assert doc["kubernetes"]["would"] is True
        assert [c["type"] for c in doc["kubernetes"]["conditions"]] == [CONDITION]
        assert int(HOST.read_sysctl(KEY)) == LOWERED  # audit changed nothing
        assert CONDITION not in node_conditions(node)

        doc = run("once")
        (act,) = doc["policies"][0]["actions"]
        result = act["result"]
        assert (act["action"], result["outcome"], result["verified"]) == ("raise-sysctl", "applied", True), (
            result
        )
        assert (result["before"]["value"], result["after"]["value"]) == (LOWERED, 2 * LOWERED)
        assert 2 * LOWERED <= CEILING
        assert int(HOST.read_sysctl(KEY)) == 2 * LOWERED

        fired = node_conditions(node)[CONDITION]
        assert (fired["status"], fired["reason"]) == ("True", "ThresholdExceeded"), fired
        assert "inotify_watches_max_uid over 40%" in fired["message"], fired
        assert {"PolicyFiring", "ActionApplied"} <= remediator_events(node, "default", "Node", node.node_name)

        for selector, before in (("app=idle", bystander), ("app=hog", hog)):
            (now,) = node.wait_running(NS, selector, 1, timeout=10)
            assert now["metadata"]["uid"] == before["metadata"]["uid"]
            assert now["status"]["containerStatuses"][0]["restartCount"] == 0
        print(
            f"\nwatches: hog {WATCHES}, root {held[0]}; {KEY} {LOWERED} -> {2 * LOWERED}; condition {fired}"
        )
    finally:
        node.kubectl("delete", "namespace", NS, "--wait=false")
    # sysctl_guard writes the original back after this test and fails it if it cannot.
