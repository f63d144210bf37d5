"""Host state a Kubernetes node touches, for tests/real/kube_node.py: the sysctls the kubelet
writes (guarded and restored), the paths it cannot be told to leave alone, its cgroups, mounts
and the CNI bridge."""

from __future__ import annotations

import contextlib
import threading
from pathlib import Path

# What the kubelet writes at start (pkg/kubelet/cm/container_manager_linux.go,
# setupKernelTunables, 1.20) and what a CNI bridge may switch on: snapshotted and guarded.
GUARDED_SYSCTLS = (
    "kernel.panic",
    "kernel.panic_on_oops",
    "vm.overcommit_memory",
    "vm.panic_on_oom",
    "kernel.keys.root_maxkeys",
    "kernel.keys.root_maxbytes",
    "net.ipv4.ip_forward",
)
# Host paths the kubelet / CNI write whatever their flags say.
UNMOVABLE_PATHS = (
    Path("/var/lib/kubelet"),  # device-plugins/ under it is hard-coded
    Path("/var/lib/cni"),  # libcni's results cache
    Path("/var/log/pods"),
    Path("/var/log/containers"),
)
CGROUP_ROOT = Path("/sys/fs/cgroup")
NETNS_DIR = Path("/run/netns")


def _sysctl_path(key: str) -> Path:
    return Path("/proc/sys") / key.replace(".", "/")


def read_sysctls() -> dict[str, str]:
    return {k: _sysctl_path(k).read_text().strip() for k in GUARDED_SYSCTLS if _sysctl_path(k).exists()}


class SysctlGuard:
    """Writes the snapshotted sysctls back whenever one differs, until stopped."""

    def __init__(self) -> None:
        self.saved = read_sysctls()
        self.restored: list[tuple[str, str, str]] = []  # (key, seen, written back)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rmd-kube-sysctl-guard", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def restore_once(self) -> None:
        for key, want in self.saved.items():
            path = _sysctl_path(key)
            seen = path.read_text().strip()
            if seen != want:
                path.write_text(want + "\n")
                self.restored.append((key, seen, want))

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            with contextlib.suppress(OSError):
                self.restore_once()

    def stop(self) -> list[str]:
        self._stop.set()
        self._thread.join(timeout=5)
        self.restore_once()
        now = read_sysctls()
        return [f"sysctl {k}={now.get(k)} (was {v})" for k, v in self.saved.items() if now.get(k) != v]


def kubepods_dirs() -> list[Path]:
    found = []
    for h in CGROUP_ROOT.iterdir():
        for name in ("kubepods", "kubepods.slice"):
            if (h / name).is_dir():
                found.append(h / name)
    return found


def mounts_under(base: Path) -> list[Path]:
    lines = Path("/proc/self/mountinfo").read_text().splitlines()
    points = [Path(line.split()[4].replace("\\040", " ")) for line in lines]
    return [p for p in points if p == base or p.is_relative_to(base)]


def link_exists(name: str) -> bool:
    return Path("/sys/class/net", name).exists()


def links_on_bridge(name: str) -> list[str]:
    brif = Path("/sys/class/net", name, "brif")
    return sorted(p.name for p in brif.iterdir()) if brif.is_dir() else []


def rmdir_tree(d: Path) -> None:
    """rmdir a cgroup tree bottom-up (cgroup dirs hold only kernel files: rmdir, never unlink)."""
    for sub in sorted((p for p in d.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True):
        with contextlib.suppress(OSError):
            sub.rmdir()
    with contextlib.suppress(OSError):
        d.rmdir()


__all__ = [
    "CGROUP_ROOT",
    "GUARDED_SYSCTLS",
    "NETNS_DIR",
    "UNMOVABLE_PATHS",
    "SysctlGuard",
    "kubepods_dirs",
    "link_exists",
    "links_on_bridge",
    "mounts_under",
    "read_sysctls",
    "rmdir_tree",
]
