"""The single-node Kubernetes of tests/real/kube_node.py works, and leaves the host as it was.

Node Ready, a 2-replica Deployment Running, a deleted pod replaced by its ReplicaSet; while it
runs the kubelet's sysctl writes are undone at once; after it, every sysctl, cgroup, mount,
interface and path it touched is back (the context manager's teardown checks, this test checks
again from outside).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from tests.real.kube_host import UNMOVABLE_PATHS, read_sysctls
from tests.real.kube_images import busybox_deployment
from tests.real.kube_node import BRIDGE, kube_node_running

pytestmark = [pytest.mark.real, pytest.mark.slow, pytest.mark.timeout(1800)]

NS = "rmd-test"


def sleeper_deployment(name: str, replicas: int) -> dict[str, Any]:
    return busybox_deployment(NS, name, ["/bin/sleep", "3600"], replicas=replicas, container_name="main")


def test_node_runs_a_deployment_and_is_torn_down_cleanly() -> None:
    paths_before = {p: p.exists() for p in UNMOVABLE_PATHS}
    sysctls_before = read_sysctls()
    with kube_node_running() as node:
        assert node.node_ready()
        # The kubelet wrote its sysctls at start; the guard has put them back already.
        assert read_sysctls() == sysctls_before
        node.apply([{"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NS}}])
        node.apply(sleeper_deployment("sleeper", 2))
        pods = node.wait_running(NS, "app=sleeper", 2)
        uids = {p["metadata"]["uid"] for p in pods}
        assert len(uids) == 2
        victim = pods[0]["metadata"]
        started = time.monotonic()
        node.api("DELETE", f"/api/v1/namespaces/{NS}/pods/{victim['name']}", {"gracePeriodSeconds": 0})
        deadline = started + 60
        while True:
            running = node.wait_running(NS, "app=sleeper", 2)
            now_uids = {p["metadata"]["uid"] for p in running}
            if victim["uid"] not in now_uids and len(now_uids) == 2:
                break
            assert time.monotonic() < deadline, f"no replacement for {victim['name']}: {running}"
            time.sleep(0.2)
        assert now_uids - uids, "the ReplicaSet made a new pod"
        assert uids - {victim["uid"]} <= now_uids, "the other pod kept its uid"
        # Each pod's containers sit in kubepods cgroups on this host (cgroupfs driver).
        memory = Path("/sys/fs/cgroup/memory")
        for p in running:
            qos = p["status"]["qosClass"].lower()
            pod_dir = memory / "kubepods" / qos / f"pod{p['metadata']['uid']}"
            assert pod_dir.is_dir(), pod_dir
        guard = node.guard
    # After the teardown: as before, seen from outside the fixture.
    assert guard is not None
    assert read_sysctls() == sysctls_before
    # What the kubelet writes at start (--protect-kernel-defaults=false): each that differed
    # here was seen changed and written back by the guard.
    kubelet_writes = {"kernel.panic": "10", "kernel.panic_on_oops": "1", "vm.overcommit_memory": "1"}
    expected = {k for k, v in kubelet_writes.items() if sysctls_before[k] != v}
    assert expected <= {key for key, _, _ in guard.restored}, guard.restored
    assert not Path("/sys/class/net", BRIDGE).exists()
    assert not Path("/sys/fs/cgroup/memory/kubepods").exists()
    assert {p: p.exists() for p in UNMOVABLE_PATHS} == paths_before
    assert not node.base.exists()
