"""Which container a process or cgroup belongs to, from cgroup paths (pure).

Parsing `/proc/<pid>/cgroup` (cgroup(7)) and finding the container id in a cgroup path: shared by
the container inventory (attribution), the limits and eBPF probes, and the reclaim and
cap-memory actions (which re-check a target's cgroup before acting).
"""

from __future__ import annotations

import re

# One path component that names a container: the bare id (cgroupfs drivers: /docker/<id>,
# /kubepods/<qos>/pod<uid>/<id>) or a systemd scope unit "<runtime>-<id>.scope" (systemd drivers:
# docker-<id>.scope, cri-containerd-<id>.scope, crio-<id>.scope, libpod-<id>.scope). Docker,
# containerd's CRI plugin and CRI-O all use 64 lowercase hex digits as container ids.
_CONTAINER_COMPONENT = re.compile(r"(?:(?P<prefix>[a-z][a-z0-9-]*)-)?(?P<id>[0-9a-f]{64})(?:\.scope)?")


def container_id_from_cgroup_path(path: str) -> str | None:
    """The container id a cgroup path names, or None. "/docker/<id>/init.scope" -> "<id>".

    The deepest matching component wins, so a sub-cgroup the container made for itself (systemd
    inside a container on cgroup v2 creates /docker/<id>/init.scope) still maps to the container.
    CRI-O's `crio-conmon-<id>.scope` holds the monitor process, which runs outside the container:
    it does not count.
    """
    for component in reversed(path.split("/")):
        m = _CONTAINER_COMPONENT.fullmatch(component)
        if m and "conmon" not in (m.group("prefix") or ""):
            return m.group("id")
    return None


def parse_proc_cgroup(text: str) -> dict[str, str]:
    """/proc/<pid>/cgroup -> {controller: path}; the cgroup v2 line ("0::/path") has key "".

    Format per cgroup(7): "hierarchy-ID:controller-list:cgroup-path". A v1 line may carry several
    controllers ("cpu,cpuacct") or a named hierarchy ("name=systemd"); each gets its own key.
    """
    paths: dict[str, str] = {}
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, path = parts
        if not controllers:
            paths[""] = path
            continue
        for controller in controllers.split(","):
            paths[controller] = path
    return paths


def memory_cgroup_path(text: str) -> str | None:
    """The cgroup path that holds a process's memory accounting, from /proc/<pid>/cgroup.

    On cgroup v1 (and hybrid hosts, where v2 is mounted without controllers) that is the
    `memory` controller's path; on a pure v2 host it is the single "0::" path. This is what
    `ContainerRef.cgroup` holds, relative to the memory hierarchy's root.
    """
    paths = parse_proc_cgroup(text)
    return paths.get("memory") or paths.get("")


def container_id_from_cgroup(text: str) -> str | None:
    """The container id in a /proc/<pid>/cgroup file, or None for a process outside containers."""
    paths = parse_proc_cgroup(text)
    # Prefer the hierarchies that every layout has; then any line at all.
    for key in ("memory", "", "pids"):
        if key in paths and (cid := container_id_from_cgroup_path(paths[key])):
            return cid
    for path in paths.values():
        if cid := container_id_from_cgroup_path(path):
            return cid
    return None


__all__ = [
    "container_id_from_cgroup",
    "container_id_from_cgroup_path",
    "memory_cgroup_path",
    "parse_proc_cgroup",
]
