"""kubepods cgroup paths of both kubelet cgroup drivers, v1 and v2 (pure)."""

from __future__ import annotations

import pytest

from remediator.probes.containers import container_id_from_cgroup, memory_cgroup_path
from remediator.probes.kube_cgroup import KubeCgroup, parse_kube_cgroup_path

CID = "d1c3a9e5b7f24c6e8a0b2d4f6e8a0c2e4b6d8f0a1c3e5a7b9d1f3a5c7e9b1d3f"
UID = "3f1e2d4c-5b6a-4789-8abc-def012345678"
UID_ = UID.replace("-", "_")


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        # cgroupfs driver (what tests/real/kube_node.py runs), each QoS class
        (f"/kubepods/besteffort/pod{UID}/{CID}", KubeCgroup(UID, "BestEffort", CID, "cgroupfs")),
        (f"/kubepods/burstable/pod{UID}/{CID}", KubeCgroup(UID, "Burstable", CID, "cgroupfs")),
        (f"/kubepods/pod{UID}/{CID}", KubeCgroup(UID, "Guaranteed", CID, "cgroupfs")),
        # the pod's own cgroup: no container
        (f"/kubepods/burstable/pod{UID}", KubeCgroup(UID, "Burstable", None, "cgroupfs")),
        # systemd driver: dashes of the uid become underscores in unit names
        (
            f"/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{UID_}.slice/cri-containerd-{CID}.scope",
            KubeCgroup(UID, "BestEffort", CID, "systemd"),
        ),
        (
            f"/kubepods.slice/kubepods-pod{UID_}.slice/cri-containerd-{CID}.scope",
            KubeCgroup(UID, "Guaranteed", CID, "systemd"),
        ),
        (
            f"/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_}.slice/crio-{CID}.scope",
            KubeCgroup(UID, "Burstable", CID, "systemd"),
        ),
        # a kubelet in a nested cgroup (kind: systemd driver under kubelet.slice)
        (
            f"/kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-besteffort.slice/"
            f"kubelet-kubepods-besteffort-pod{UID_}.slice/cri-containerd-{CID}.scope",
            KubeCgroup(UID, "BestEffort", CID, "systemd"),
        ),
        # a sub-cgroup the container made for itself still maps to the container
        (f"/kubepods/besteffort/pod{UID}/{CID}/init.scope", KubeCgroup(UID, "BestEffort", CID, "cgroupfs")),
        # CRI-O's monitor runs outside the container: the pod only
        (
            f"/kubepods.slice/kubepods-pod{UID_}.slice/crio-conmon-{CID}.scope",
            KubeCgroup(UID, "Guaranteed", None, "systemd"),
        ),
        # not Kubernetes
        (f"/docker/{CID}", None),
        (f"/system.slice/docker-{CID}.scope", None),
        ("/", None),
        ("/kubepods", None),
        ("/kubepods/besteffort", None),
        (f"/kubepods/besteffort/pod-not-a-uid/{CID}", None),
    ],
)
def test_parse_kube_cgroup_path(path: str, expected: KubeCgroup | None) -> None:
    assert parse_kube_cgroup_path(path) == expected


# /proc/<pid>/cgroup of a process in a BestEffort pod's container on this project's hosts (cgroup
# v1, cgroupfs driver), as tests/real/kube_node.py's node makes it.
PROC_CGROUP_V1 = "\n".join(
    f"{i}:{c}:/kubepods/besteffort/pod{UID}/{CID}"
    for i, c in enumerate(
        ["name=systemd", "pids", "blkio", "freezer", "devices", "memory", "cpuset", "cpuacct", "cpu"]
    )
)
PROC_CGROUP_V2 = (
    "0::/kubepods.slice/kubepods-besteffort.slice/"
    f"kubepods-besteffort-pod{UID_}.slice/cri-containerd-{CID}.scope\n"
)


@pytest.mark.parametrize("text", [PROC_CGROUP_V1, PROC_CGROUP_V2])
def test_proc_cgroup_of_a_pod_container_maps_to_its_id_and_pod(text: str) -> None:
    path = memory_cgroup_path(text)
    assert path is not None
    parsed = parse_kube_cgroup_path(path)
    assert parsed is not None and parsed.pod_uid == UID and parsed.container_id == CID
    assert container_id_from_cgroup(text) == CID
