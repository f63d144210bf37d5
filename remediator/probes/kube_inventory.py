"""Kubernetes (CRI) containers: found from their cgroups, described by the API server.

Finding: the kubelet gives every container a cgroup under `kubepods` (probes/kube_cgroup.py
parses both drivers' layouts); we walk the memory hierarchy there, which also gives each
container's cgroup path (what the dentries probe attributes slab memory by) and a process of it.
No CRI client is needed to find them, and a container the runtime has forgotten but whose
processes still run (the kind of leak we are after) is found too.

Describing, by the best source at hand:

* the API server (`source="api"` on the PodRef): one list of the node's pods, kept between
  cycles and listed again at most every `relist_seconds`, or sooner (not more often than every
  `min_relist_seconds`) when a cgroup names a pod the list does not have. Reads stay bounded:
  one call per cycle at most, none in most cycles (see docs/kubernetes.md);
* containerd's labels (`source="labels"`), when the API server cannot be reached or has no such
  pod yet: `ctr -n k8s.io containers info <id>` gives io.kubernetes.pod.name/namespace/uid and
  io.kubernetes.container.name (no owner, no QoS class beyond the cgroup's); asked once per
  container id (labels never change), never for the containers of a pod the list has (a sandbox
  is in no containerStatuses: it is named by its pod, as `POD`);
* the cgroup alone (`source="cgroup"`): pod uid and QoS class, no names.

An unreachable API server is said once (`kube_api_unreachable`), and once more when it is back
(`kube_api_reachable`); attribution goes on node-local in between.
"""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Protocol

import structlog

from remediator.clock import Clock
from remediator.errors import PermanentError, TemporaryError
from remediator.host import HostRoot
from remediator.model import ContainerRef, PodRef
from remediator.probes.base import Inventory
from remediator.probes.containerd import CtrRunner
from remediator.probes.containers import StaticInventory, container_id_from_cgroup, memory_cgroup_path
from remediator.probes.dentries import find_memory_hierarchy
from remediator.probes.kube_api import PodInfo
from remediator.probes.kube_cgroup import KubeCgroup, parse_kube_cgroup_path

log = structlog.get_logger(__name__)

CRI_NAMESPACE = "k8s.io"
# Seconds between full relists of the node's pods. Pod names, owners and QoS classes never
# change during a pod's life; only new pods need a list, and those trigger one themselves.
RELIST_SECONDS = 300.0
# The shortest gap between two lists, seconds: a churning node (a CrashLoopBackOff, a Job every
# few seconds) must not turn every cycle into an API call.
MIN_RELIST_SECONDS = 10.0
# Directories visited below kubepods at most: 110 pods a node by default, a few containers each;
# a tree far larger than that is not a kubelet's and is not walked further.
MAX_CGROUP_DIRS = 5000
# How deep the kubepods root may sit below the hierarchy's root (kind: /kubelet.slice/
# kubelet-kubepods.slice is depth 2).
MAX_ROOT_DEPTH = 3


@dataclass(frozen=True)
class CriCgroup:
    """One container cgroup found under kubepods."""

    path: str  # relative to the memory hierarchy's root, "/kubepods/besteffort/pod<uid>/<id>"
    parsed: KubeCgroup
    pid: int | None  # a process in it (the lowest pid), None when it has none


def _subdirs(d: Path) -> Iterator[Path]:
    try:
        with os.scandir(d) as it:
            for e in it:
                if e.is_dir(follow_symlinks=False):
                    yield Path(e.path)
    except OSError:
        return  # removed while walking: the pod is gone


def _lowest_pid(d: Path) -> int | None:
    try:
        pids = [int(x) for x in (d / "cgroup.procs").read_text().split()]
    except (OSError, ValueError):
        return None
    return min(pids) if pids else None


def scan_cri_cgroups(memory_root: Path, limit: int = MAX_CGROUP_DIRS) -> list[CriCgroup]:
    """Every container cgroup under a kubepods root of a memory hierarchy mounted at `memory_root`."""
    roots: list[Path] = []
    frontier = [memory_root]
    for _ in range(MAX_ROOT_DEPTH):
        nxt = []
        for d in frontier:
            for sub in _subdirs(d):
                name = sub.name
                if name in ("kubepods", "kubepods.slice") or name.endswith("-kubepods.slice"):
                    roots.append(sub)
                elif name.endswith(".slice") or d == memory_root:
                    nxt.append(sub)
        if roots:
            break
        frontier = nxt
    found: list[CriCgroup] = []
    visited = 0
    stack = list(roots)
    while stack and visited < limit:
        d = stack.pop()
        visited += 1
        rel = "/" + str(d.relative_to(memory_root))
        parsed = parse_kube_cgroup_path(rel)
        if parsed is not None and parsed.container_id is not None:
            found.append(CriCgroup(rel, parsed, _lowest_pid(d)))
            continue  # a container's own sub-cgroups belong to it
        stack.extend(_subdirs(d))
    if stack:
        log.warning("kube_cgroup_walk_truncated", visited=visited, limit=limit)
    return sorted(found, key=lambda c: c.path)


def parse_container_info(text: str) -> tuple[dict[str, str], str | None]:
    """`ctr containers info <id>` (JSON) -> (labels, image)."""
    doc = json.loads(text)
    if not isinstance(doc, dict):
        raise ValueError("expected a JSON object")
    labels = doc.get("Labels") or {}
    return {str(k): str(v) for k, v in labels.items()}, doc.get("Image")


def pod_from_labels(labels: Mapping[str, str], cg: KubeCgroup) -> PodRef | None:
    name = labels.get("io.kubernetes.pod.name")
    namespace = labels.get("io.kubernetes.pod.namespace")
    if not name or not namespace:
        return None
    container = labels.get("io.kubernetes.container.name")
    return PodRef(
        name=name,
        namespace=namespace,
        uid=labels.get("io.kubernetes.pod.uid") or cg.pod_uid,
        container=container if container and container != "POD" else None,
        qos_class=cg.qos_class,
        source="labels",
    )


def describe(
    cg: CriCgroup,
    pods: Mapping[str, PodInfo] | None,
    labels_of: Callable[[str], tuple[dict[str, str], str | None] | None],
) -> ContainerRef:
    """A ContainerRef for one container cgroup, from the pod list, else labels, else the cgroup."""
    parsed = cg.parsed
    cid = parsed.container_id or ""
    labels: dict[str, str] = {}
    image: str | None = None
    pod: PodRef | None = None
    info = pods.get(parsed.pod_uid) if pods is not None else None
    if info is not None:
        name_image = info.containers.get(cid)
        if name_image is not None:
            pod = replace(info.ref, container=name_image[0])
            image = name_image[1]
        else:
            # The sandbox (pause) is in no containerStatuses; a container newer than the list
            # would not be either: both are named by the pod alone, with no runtime call (a
            # node of 100 pods would otherwise cost 100 ctr calls a cycle).
            pod = replace(info.ref, container=None)
    else:
        got = labels_of(cid)
        if got is not None:
            labels, image = got
            pod = pod_from_labels(labels, parsed)
    if pod is None:
        pod = PodRef(name="", namespace="", uid=parsed.pod_uid, qos_class=parsed.qos_class, source="cgroup")
        name = f"pod{parsed.pod_uid}/{cid[:12]}"
    else:
        name = f"{pod.namespace}/{pod.name}/{pod.container or 'POD'}"
    return ContainerRef(
        id=cid,
        name=name,
        labels=labels,
        runtime="cri",
        pid=cg.pid,
        cgroup=cg.path,
        image=image,
        pod=pod,
    )


class KubeInventory:
    """The CRI containers of this node at one instant (one cycle)."""

    def __init__(self, host: HostRoot, refs: list[ContainerRef], error: str | None = None) -> None:
        self._host = host
        self._static = StaticInventory(refs, error=error)
        self._by_id = {r.id: r for r in refs}
        self._pid_cache: dict[int, ContainerRef | None] = {}

    @property
    def error(self) -> str | None:
        return self._static.error

    def containers(self) -> list[ContainerRef]:
        return self._static.containers()

    def container_of_pid(self, pid: int) -> ContainerRef | None:
        if pid in self._pid_cache:
            return self._pid_cache[pid]
        ref = self._static.container_of_pid(pid)
        if ref is None:
            try:
                text = self._host.read_text(self._host.proc / str(pid) / "cgroup")
            except OSError:
                text = ""  # gone
            cid = container_id_from_cgroup(text)
            ref = self._by_id.get(cid) if cid else None
            if ref is None and (path := memory_cgroup_path(text)):
                ref = self.container_of_cgroup(path)
        self._pid_cache[pid] = ref
        return ref

    def container_of_cgroup(self, cgroup_path: str) -> ContainerRef | None:
        ref = self._static.container_of_cgroup(cgroup_path)
        if ref is None and (parsed := parse_kube_cgroup_path(cgroup_path)) and parsed.container_id:
            ref = self._by_id.get(parsed.container_id)
        return ref


class PodLister(Protocol):
    """What the inventory needs of the API client (kube_api.KubeClient)."""

    def node_pods(self, node: str) -> dict[str, PodInfo]: ...


def default_node_name() -> str:
    """NODE_NAME (the DaemonSet sets it from spec.nodeName), else the hostname as the kubelet
    registers it by default (lower case)."""
    return os.environ.get("NODE_NAME") or socket.gethostname().lower()


class KubeInventorySource:
    """Builds a KubeInventory each cycle, keeping the node's pod list between cycles.

    `client` None: no API server configured (labels and cgroups only, nothing said).
    """

    def __init__(
        self,
        host: HostRoot,
        clock: Clock,
        client: PodLister | None,
        node: str,
        ctr: CtrRunner | None,
        containerd_socket: str,
        *,
        relist_seconds: float = RELIST_SECONDS,
        min_relist_seconds: float = MIN_RELIST_SECONDS,
    ) -> None:
        self.host = host
        self.clock = clock
        self.client = client
        self.node = node
        self.ctr = ctr
        self.containerd_socket = containerd_socket
        self.relist_seconds = relist_seconds
        self.min_relist_seconds = min_relist_seconds
        self.pods: dict[str, PodInfo] | None = None
        self.listed_at: float | None = None
        self.api_error: str | None = None  # the last failure, while it lasts
        # Labels by container id, for the containers of the last scan only (bounded by the node).
        self._label_cache: dict[str, tuple[dict[str, str], str | None]] = {}

    def _maybe_list(self, uids: set[str]) -> None:
        if self.client is None:
            return
        now = self.clock.now()
        age = None if self.listed_at is None else now - self.listed_at
        missing = self.pods is not None and not uids <= self.pods.keys()
        due = age is None or age >= self.relist_seconds or (missing and age >= self.min_relist_seconds)
        if not due:
            return
        self.listed_at = now  # a failure waits for the next slot too: bounded reads either way
        try:
            self.pods = self.client.node_pods(self.node)
        except (TemporaryError, PermanentError) as e:
            if self.api_error is None:
                log.warning(
                    "kube_api_unreachable", node=self.node, error=str(e), fallback="containerd labels"
                )
            self.api_error = str(e)
            return
        if self.api_error is not None:
            log.info("kube_api_reachable", node=self.node, pods=len(self.pods))
        self.api_error = None

    def _labels(self, cid: str) -> tuple[dict[str, str], str | None] | None:
        """A container's labels and image, asked once per container id (both are immutable)."""
        if cid in self._label_cache:
            return self._label_cache[cid]
        if self.ctr is None:
            return None
        try:
            text = self.ctr(self.containerd_socket, ["--namespace", CRI_NAMESPACE, "containers", "info", cid])
            got = parse_container_info(text)
        except (TemporaryError, PermanentError, ValueError) as e:
            log.debug("cri_labels_unavailable", container=cid[:12], error=str(e))
            return None  # not cached: asked again next cycle
        self._label_cache[cid] = got
        return got

    def __call__(self) -> Inventory:
        hierarchy = find_memory_hierarchy(self.host)
        if hierarchy is None:
            return KubeInventory(self.host, [], error="no memory cgroup hierarchy to find CRI containers in")
        cgroups = scan_cri_cgroups(hierarchy.root)
        self._maybe_list({c.parsed.pod_uid for c in cgroups})
        # After a failed list the last good one still names the pods it has (names, owners and
        # QoS classes do not change during a pod's life); labels name the newer ones.
        refs = [describe(c, self.pods, self._labels) for c in cgroups]
        seen = {c.parsed.container_id for c in cgroups}
        self._label_cache = {k: v for k, v in self._label_cache.items() if k in seen}
        return KubeInventory(self.host, refs)


__all__ = [
    "CRI_NAMESPACE",
    "CriCgroup",
    "KubeInventory",
    "KubeInventorySource",
    "default_node_name",
    "describe",
    "parse_container_info",
    "pod_from_labels",
    "scan_cri_cgroups",
]
