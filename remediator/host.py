"""One root for every host path.

Nothing else in remediator spells "/proc", "/sys" or "/run": it asks `HostRoot`, so that a test
can point the whole program at a fixture tree (like node_exporter's --path.procfs).
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class HostRoot:
    root: Path = Path("/")
    # containerd fifo roots besides the default <run>/containerd/fifo, each with the sockets of
    # the containerds that can own it, as host paths ("/srv/fifo", ("/srv/ctrd.sock",)).
    extra_fifo_roots: tuple[tuple[str, tuple[str, ...]], ...] = ()

    def host_path(self, path: str) -> Path:
        """A host path ("/run/x") under this root (<root>/run/x)."""
        return self.root / path.lstrip("/")

    # Where the host's configuration files live (etc/sysctl.d, usr/lib/sysctl.d, etc/tuned):
    # `root` unless set, so a real-kernel test can read the real /proc and write sysctl.d files
    # into a temporary tree.
    config_root: Path | None = None

    @property
    def config(self) -> Path:
        return self.config_root if self.config_root is not None else self.root

    @property
    def sysctl_d_dirs(self) -> tuple[Path, ...]:
        """sysctl.d(5) directories, highest precedence first: a file name in an earlier one
        masks the same name in a later one."""
        c = self.config
        return (
            c / "etc" / "sysctl.d",
            c / "run" / "sysctl.d",
            c / "usr" / "local" / "lib" / "sysctl.d",
            c / "usr" / "lib" / "sysctl.d",
            c / "lib" / "sysctl.d",
        )

    @property
    def sysctl_conf(self) -> Path:
        return self.config / "etc" / "sysctl.conf"

    @property
    def tuned_dirs(self) -> tuple[Path, ...]:
        """tuned profile directories, user profiles first (tuned-profiles(7))."""
        c = self.config
        return (c / "etc" / "tuned", c / "usr" / "lib" / "tuned" / "profiles", c / "usr" / "lib" / "tuned")

    @functools.cached_property
    def proc(self) -> Path:
        return self.root / "proc"

    @functools.cached_property
    def sys(self) -> Path:
        return self.root / "sys"

    @functools.cached_property
    def run(self) -> Path:
        return self.root / "run"

    @functools.cached_property
    def cgroup(self) -> Path:
        return self.sys / "fs" / "cgroup"

    def sysctl_path(self, key: str) -> Path:
        """`fs.inotify.max_user_watches` -> <root>/proc/sys/fs/inotify/max_user_watches."""
        return _sysctl_path(self.proc, key)

    def read_text(self, path: Path) -> str:
        with open(path, encoding="ascii", errors="replace") as f:
            return f.read()

    def read_sysctl(self, key: str) -> str:
        return self.read_text(self.sysctl_path(key)).strip()

    @functools.cached_property
    def is_real(self) -> bool:
        """Whether this root's proc is the running kernel's procfs as this process sees it: the
        root is "/", or the host's /proc is mounted under the root (a DaemonSet pod with
        hostPID: /host/proc/self is this process). Fixture trees are not. Asked once per root
        (per container every cycle, it cost more than the counter read it chose the way of)."""
        if self.root == Path("/"):
            return True
        try:
            return os.readlink(self.proc / "self") == str(os.getpid())
        except OSError:
            return False


@functools.lru_cache(maxsize=1024)
def _sysctl_path(proc: Path, key: str) -> Path:
    # Memoized: the limits probe asks for the same ~20 keys every cycle, and joining a Path
    # costs more than reading the held file behind it.
    parts = key.replace("/", ".").split(".")
    if not key or any(p in ("", ".", "..") for p in parts):
        raise ValueError(f"not a sysctl key: {key!r}")
    return proc.joinpath("sys", *parts)
