"""Which pod and CRI container a cgroup path names (pure).

The kubelet puts every pod under one cgroup per QoS class and every container of it under the
pod's cgroup, with one of two drivers (kubelet --cgroup-driver), on cgroup v1 (in each
hierarchy) and v2 alike:

* cgroupfs: `/kubepods/besteffort/pod<uid>/<id>`, `/kubepods/burstable/pod<uid>/<id>`, and
  Guaranteed pods directly under the root: `/kubepods/pod<uid>/<id>`.
* systemd: `/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod<uid>.slice/
  cri-containerd-<id>.scope` (Guaranteed: `/kubepods.slice/kubepods-pod<uid>.slice/...`). A
  systemd unit name cannot hold "-" inside a component, so the uid's dashes become "_".

The kubelet may itself run in a cgroup (a kind node: `/kubelet.slice/kubelet-kubepods.slice/...`,
or `/<something>/kubepods/...` when nested), so the `kubepods` component is looked for anywhere
in the path. The container id is 64 hex digits (containerd's CRI plugin and CRI-O); the pod
sandbox (pause) is a container like any other here.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

QOS_CLASSES = {"besteffort": "BestEffort", "burstable": "Burstable", "guaranteed": "Guaranteed"}

_UID = r"[0-9a-f]{8}[-_][0-9a-f]{4}[-_][0-9a-f]{4}[-_][0-9a-f]{4}[-_][0-9a-f]{12}"
_ROOT = re.compile(r"(?:[a-z0-9_]+-)?kubepods(?:\.slice)?")
# cgroupfs: "besteffort"; systemd: "kubepods-besteffort.slice" (with any prefix of the root's).
_QOS = re.compile(r"(?:[a-z0-9_-]*kubepods-)?(?P<qos>besteffort|burstable)(?:\.slice)?")
# cgroupfs: "pod<uid>"; systemd: "kubepods[-<qos>]-pod<uid_with_underscores>.slice".
_POD = re.compile(rf"(?:[a-z0-9_-]*kubepods(?:-(?:besteffort|burstable))?-)?pod(?P<uid>{_UID})(?:\.slice)?")
# cgroupfs: "<id>"; systemd: "cri-containerd-<id>.scope", "crio-<id>.scope", "docker-<id>.scope".
_CONTAINER = re.compile(r"(?:(?P<prefix>[a-z][a-z0-9-]*)-)?(?P<id>[0-9a-f]{64})(?:\.scope)?")


@dataclass(frozen=True)
class KubeCgroup:
    """What a kubepods cgroup path says: the pod's uid and QoS class, the container id if any."""

    pod_uid: str  # with dashes, as the API server writes metadata.uid
    qos_class: str  # Guaranteed, Burstable or BestEffort (status.qosClass spelling)
    container_id: str | None  # None for the pod's own cgroup
    driver: str  # "cgroupfs" or "systemd"


def parse_kube_cgroup_path(path: str) -> KubeCgroup | None:
    """The pod (and container) a cgroup path belongs to, or None when it is not under kubepods.

    Components below the container's (a sub-cgroup a container made for itself) still map to
    the container. CRI-O's `crio-conmon-<id>.scope` holds the monitor, outside the container:
    it maps to the pod only.
    """
    parts = [p for p in path.split("/") if p]
    for i, part in enumerate(parts):
        if _ROOT.fullmatch(part):
            return _below_root(parts[i + 1 :], systemd=part.endswith(".slice"))
    return None


def _below_root(parts: list[str], *, systemd: bool) -> KubeCgroup | None:
    qos = "Guaranteed"
    if parts and (m := _QOS.fullmatch(parts[0])):
        qos = QOS_CLASSES[m.group("qos")]
        parts = parts[1:]
    if not parts or not (pod := _POD.fullmatch(parts[0])):
        return None
    uid = pod.group("uid").replace("_", "-")
    container_id = None
    c = _CONTAINER.fullmatch(parts[1]) if len(parts) > 1 else None
    if c is not None and "conmon" not in (c.group("prefix") or ""):
        container_id = c.group("id")
    return KubeCgroup(uid, qos, container_id, "systemd" if systemd else "cgroupfs")


__all__ = ["QOS_CLASSES", "KubeCgroup", "parse_kube_cgroup_path"]
