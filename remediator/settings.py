"""Controller settings: where things live and how long to wait. Not policy (that is in git).

Each field says its unit, its default and why. Every field can be set by a CLI flag or an
environment variable (`REMEDIATOR_<FIELD>`), see `remediator --help`.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

SYSTEM_POLICIES = Path("/etc/remediator/policies")

# Verbosities of `--log-level` (remediator.audit maps them to logging levels). Here, not in
# audit, so that the CLI can offer them without importing structlog.
LOG_LEVEL_NAMES = ("debug", "info", "warning", "error")


def bundled_policies() -> Path | None:
    """The policies shipped with remediator.

    Installed wheels put them in <prefix>/share/remediator/policies (pyproject data-files);
    a source checkout or editable install has them at the repository top.
    """
    for candidate in (
        Path(sys.prefix) / "share" / "remediator" / "policies",
        Path(__file__).resolve().parent.parent / "policies",
    ):
        if candidate.is_dir():
            return candidate
    return None


def default_policies() -> Path:
    """/etc/remediator/policies when it exists, else the bundled set."""
    if SYSTEM_POLICIES.is_dir():
        return SYSTEM_POLICIES
    return bundled_policies() or SYSTEM_POLICIES


def parse_fifo_root(spec: str) -> tuple[str, tuple[str, ...]]:
    """ "/srv/fifo=/srv/ctrd.sock,/run/other.sock" -> ("/srv/fifo", ("/srv/ctrd.sock", ...)).

    Raises ValueError saying what is expected: every path absolute, at least one socket (a
    root judged against no containerd would make every aged directory an orphan).
    """
    path, sep, sockets = spec.partition("=")
    socks = tuple(s for s in sockets.split(",") if s)
    if not sep or not path or not socks:
        raise ValueError(f"{spec!r}: expected PATH=SOCKET[,SOCKET...]")
    bad = [p for p in (path, *socks) if not p.startswith("/")]
    if bad:
        raise ValueError(f"{spec!r}: expected absolute paths, got {bad[0]!r}")
    return path, socks


@dataclass(frozen=True)
class Settings:
    # Root of the host as remediator sees it. "/" in production; tests point it at fixture trees.
    host_root: Path = Path("/")
    # Root of the host's configuration files (etc/sysctl.d, usr/lib/sysctl.d, etc/tuned): where
    # raise-sysctl persists a raise and looks for other owners of a key. None: host_root.
    # Real-kernel tests point it at a temporary tree so they never write the real /etc.
    config_root: Path | None = None
    # SQLite state, the lock file. /var/lib is what systemd's StateDirectory= manages and what
    # survives reboots (conditions, cooldowns and budgets must survive them).
    state_dir: Path = Path("/var/lib/remediator")
    # JSON-lines audit trail, one event per line. None: only the process's own log stream
    # (journald under systemd). Default beside the state so one directory holds the evidence.
    audit_log: Path | None = None
    # Docker Engine API endpoint; the Debian docker.io default socket.
    docker_url: str = "unix:///var/run/docker.sock"
    # Seconds per Docker API call. Short: a wedged dockerd must not stall the whole cycle; calls
    # are retried (bounded) by the adapter.
    docker_timeout: float = 10.0
    # Seconds to wait for another instance (timer vs daemon) to finish its cycle. A cycle takes
    # well under a second on a quiet host; 30s rides out a slow action without piling up timers.
    lock_timeout: float = 30.0
    # Evaluate everything, change nothing (every action runs in audit mode).
    dry_run: bool = False
    # Buckets of the dentry hash table, when the kernel log no longer has the boot line
    # "Dentry cache hash table entries: N" and the host was booted with dhash_entries= (else the
    # probe's estimate from MemTotal is exact). REMEDIATOR_DENTRY_HASH_BUCKETS. None: find it.
    dentry_hash_buckets: int | None = None
    # BCC attribution of failed lookups: auto (only when the dentry cache needs attributing, so
    # the daemon stays small while healthy), always, or off. REMEDIATOR_EBPF.
    ebpf: str = "auto"
    # containerd fifo roots to judge besides the default /run/containerd/fifo, each with the
    # containerd sockets that can own it: a private containerd's, any `ctr --fifo-dir`. Host
    # paths, (path, sockets) as parse_fifo_root() reads "PATH=SOCKET[,SOCKET...]". Default none.
    fifo_roots: tuple[tuple[str, tuple[str, ...]], ...] = ()
    # Kubernetes: a kubeconfig whose current context reaches this node's API server, to name the
    # pods of CRI containers (docs/kubernetes.md). None: in-cluster credentials when running in
    # a pod (KUBERNETES_SERVICE_HOST), else no Kubernetes. REMEDIATOR_KUBECONFIG.
    kubeconfig: Path | None = None
    # This node's name as the API server knows it (spec.nodeName of its pods). None: NODE_NAME
    # from the environment (the DaemonSet sets it), else the hostname in lower case, which is
    # what the kubelet registers without --hostname-override. REMEDIATOR_KUBE_NODE_NAME.
    kube_node_name: str | None = None
    # The containerd that runs the CRI (k8s.io) containers, asked for their labels when the API
    # server is unreachable. containerd's default socket. REMEDIATOR_CRI_CONTAINERD_SOCKET.
    cri_containerd_socket: str = "/run/containerd/containerd.sock"
    # Also list the containers of containerd's plain namespaces (ctr, nerdctl; not moby or
    # k8s.io) on <run>/containerd/containerd.sock: a `ctr tasks ls` per namespace per cycle.
    # Off by default. REMEDIATOR_CONTAINERD_NAMESPACES=on.
    containerd_namespaces: bool = False

    @property
    def db_path(self) -> Path:
        return self.state_dir / "state.db"

    @property
    def probe_memory_path(self) -> Path:
        """Recent probe samples (growth rates across the timer's runs); see probes/memory.py."""
        return self.state_dir / "probe-memory.json"

    @property
    def lock_path(self) -> Path:
        return self.state_dir / "lock"

    @property
    def audit_path(self) -> Path:
        return self.audit_log if self.audit_log is not None else self.state_dir / "audit.jsonl"
