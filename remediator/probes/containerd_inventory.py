"""Containers of plain containerd namespaces: what `ctr run` and nerdctl make, with no Docker or
kubelet to describe them (the fifo case report's host ran its workloads like this).

`ContainerdNamespacesSource` is a `ContainerSource` over one containerd socket. Each snapshot is
`ctr namespaces ls -q`, then per namespace one `ctr tasks ls`: the running tasks and their init
pids. Namespaces another inventory describes are skipped: `moby` (dockerd's own containerd
namespace: the Docker inventory names those containers) and `k8s.io` (the CRI's: the Kubernetes
inventory does). A container's labels and image come from `ctr containers info` once per
container (they never change while it exists); its cgroup is read from its init process's
`/proc/<pid>/cgroup` (memory hierarchy), which is right for both cgroup drivers and every
`--cgroup` a client chose, where ctr's default is `/<namespace>/<id>`.

Ids are the client's names, not 64 hex digits, so processes are attributed by their memory
cgroup path (`SnapshotInventory` falls back to it). A container is named `<namespace>/<id>`
wherever containers are named.

Reads only: nothing here changes containerd or the host.
"""

from __future__ import annotations

import json
from collections.abc import Collection
from dataclasses import dataclass

import structlog

from remediator.errors import PermanentError, TemporaryError
from remediator.host import HostRoot
from remediator.model import ContainerRef
from remediator.probes.cgroups import memory_cgroup_path
from remediator.probes.containerd import ContainerdNotFound, CtrRunner

log = structlog.get_logger(__name__)

RUNTIME = "containerd"
# Described by the Docker and Kubernetes inventories.
SKIPPED_NAMESPACES = frozenset({"moby", "k8s.io"})
# Bounds: a cycle asks about at most this many namespaces and new containers.
MAX_NAMESPACES = 64
MAX_INFO_QUERIES = 200


@dataclass(frozen=True)
class Task:
    id: str
    pid: int
    status: str


def parse_tasks_ls(text: str) -> list[Task]:
    """`ctr tasks ls` -> its tasks. The table: a TASK PID STATUS header, then one row each."""
    tasks: list[Task] = []
    lines = [line for line in text.splitlines() if line.strip()]
    if not lines:
        return tasks
    if lines[0].split()[:3] != ["TASK", "PID", "STATUS"]:
        raise ValueError(f"unexpected header {lines[0].strip()!r}")
    for line in lines[1:]:
        fields = line.split()
        if len(fields) < 3 or not fields[1].isdigit():
            raise ValueError(f"unexpected row {line.strip()!r}")
        tasks.append(Task(fields[0], int(fields[1]), fields[2]))
    return tasks


def parse_container_info(text: str) -> tuple[dict[str, str], str | None]:
    """`ctr containers info <id>` (JSON) -> (labels, image)."""
    doc = json.loads(text)
    if not isinstance(doc, dict):
        raise ValueError("expected a JSON object")
    labels = doc.get("Labels") or {}
    image = doc.get("Image")
    return {str(k): str(v) for k, v in labels.items()}, str(image) if image else None


class ContainerdNamespacesSource:
    """The running containers of every plain namespace of one containerd."""

    runtime = RUNTIME

    def __init__(
        self,
        host: HostRoot,
        ctr: CtrRunner,
        socket: str,
        skip: Collection[str] = SKIPPED_NAMESPACES,
    ) -> None:
        self._host = host
        self._ctr = ctr
        self._socket = socket
        self._skip = frozenset(skip)
        # (namespace, id) -> (labels, image): a container's description never changes.
        self._info: dict[tuple[str, str], tuple[dict[str, str], str | None]] = {}

    def snapshot(self) -> tuple[ContainerRef, ...]:
        try:
            namespaces = sorted(set(self._ctr(self._socket, ["namespaces", "ls", "-q"]).split()))
        except ContainerdNotFound as e:
            raise PermanentError(str(e)) from None
        namespaces = [n for n in namespaces if n not in self._skip]
        if len(namespaces) > MAX_NAMESPACES:
            log.warning("containerd_namespaces_truncated", count=len(namespaces), limit=MAX_NAMESPACES)
            namespaces = namespaces[:MAX_NAMESPACES]
        refs: list[ContainerRef] = []
        seen: set[tuple[str, str]] = set()
        queries = 0
        for ns in namespaces:
            try:
                tasks = parse_tasks_ls(self._ctr(self._socket, ["--namespace", ns, "tasks", "ls"]))
            except ContainerdNotFound:
                continue  # the namespace went since the list
            except ValueError as e:
                raise TemporaryError(f"ctr -n {ns} tasks ls: {e}") from None
            for task in tasks:
                if task.status != "RUNNING" or task.pid <= 0:
                    continue
                cgroup = self._cgroup(task.pid)
                if cgroup is None:
                    continue  # exited since the list
                key = (ns, task.id)
                seen.add(key)
                if key not in self._info and queries < MAX_INFO_QUERIES:
                    queries += 1
                    if (info := self._describe(ns, task.id)) is not None:
                        self._info[key] = info
                labels, image = self._info.get(key, ({}, None))
                refs.append(
                    ContainerRef(
                        id=task.id,
                        name=f"{ns}/{task.id}",
                        labels=labels,
                        runtime=RUNTIME,
                        pid=task.pid,
                        cgroup=cgroup,
                        image=image,
                    )
                )
        for key in set(self._info) - seen:  # forget the containers that stopped
            del self._info[key]
        return tuple(refs)

    def _describe(self, ns: str, cid: str) -> tuple[dict[str, str], str | None] | None:
        """Labels and image; None when containerd did not answer now (asked again next time)."""
        try:
            return parse_container_info(
                self._ctr(self._socket, ["--namespace", ns, "containers", "info", cid])
            )
        except (ContainerdNotFound, ValueError) as e:
            log.debug("containerd_info_unavailable", namespace=ns, container=cid, error=str(e))
            return {}, None
        except TemporaryError as e:
            log.debug("containerd_info_unavailable", namespace=ns, container=cid, error=str(e))
            return None

    def _cgroup(self, pid: int) -> str | None:
        try:
            text = self._host.read_text(self._host.proc / str(pid) / "cgroup")
        except OSError:
            return None
        return memory_cgroup_path(text)

    def close(self) -> None:
        self._info.clear()


__all__ = [
    "SKIPPED_NAMESPACES",
    "ContainerdNamespacesSource",
    "Task",
    "parse_container_info",
    "parse_tasks_ls",
]
