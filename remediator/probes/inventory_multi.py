"""Several runtimes behind one `Inventory`: Docker, Kubernetes (CRI) and, when asked for
(`REMEDIATOR_CONTAINERD_NAMESPACES=on`), plain containerd namespaces on one node.

Each member answers for its own containers; a lookup asks them in order and the first that
knows the process or cgroup wins (Docker and CRI ids are 64 hex digits and the containerd
member skips their namespaces, so two members never claim one container). The composite's
`error` joins the members' errors, each prefixed with the runtime's name, so a reading says
which attribution is missing ("docker: ...") while the other runtime's containers are still
attributed.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

from remediator.clock import Clock
from remediator.errors import UserError
from remediator.host import HostRoot
from remediator.model import ContainerRef
from remediator.probes.base import Inventory
from remediator.probes.containerd import CtrCli
from remediator.probes.containerd_inventory import ContainerdNamespacesSource
from remediator.probes.containers import make_inventory_factory
from remediator.probes.inventory import InventoryFeed
from remediator.probes.kube_api import KubeClient, KubeConfigError, load_credentials
from remediator.probes.kube_inventory import KubeInventorySource, default_node_name
from remediator.settings import Settings


class MultiInventory:
    def __init__(self, members: Sequence[tuple[str, Inventory]]) -> None:
        self._members = list(members)

    @property
    def error(self) -> str | None:
        errors = [f"{name}: {inv.error}" for name, inv in self._members if inv.error]
        return "; ".join(errors) or None

    def containers(self) -> list[ContainerRef]:
        return [c for _, inv in self._members for c in inv.containers()]

    def container_of_pid(self, pid: int) -> ContainerRef | None:
        for _, inv in self._members:
            if (ref := inv.container_of_pid(pid)) is not None:
                return ref
        return None

    def container_of_cgroup(self, cgroup_path: str) -> ContainerRef | None:
        for _, inv in self._members:
            if (ref := inv.container_of_cgroup(cgroup_path)) is not None:
                return ref
        return None


def multi_inventory_factory(
    factories: Sequence[tuple[str, Callable[[], Inventory]]],
) -> Callable[[], Inventory]:
    """A factory of MultiInventory over member factories (each never raises, as the Docker one)."""
    if len(factories) == 1:
        return factories[0][1]

    def factory() -> Inventory:
        return MultiInventory([(name, make()) for name, make in factories])

    return factory


def node_inventory_factory(
    settings: Settings, host: HostRoot, clock: Clock, *, docker: Callable[[], Inventory] | None = None
) -> Callable[[], Inventory]:
    """The inventory of this node's runtimes, for `ProbeContext.inventory_factory`.

    `docker`: the Docker feed to use (the daemon's follows the event stream, one-shot runs keep
    inspected pids in the state directory); None: a plain one.

    Kubernetes joins when there are credentials for it (settings.kubeconfig, or in-cluster);
    Docker is always asked, except on a Kubernetes node that has no Docker socket at all (then a
    "Docker unreachable" error would only say that attribution is incomplete when it is not).
    A kubeconfig that cannot be used is the operator's error (exit 2), said before any cycle.
    """
    if docker is None:
        docker = make_inventory_factory(settings.docker_url, host, settings.docker_timeout)
    try:
        creds = load_credentials(settings.kubeconfig)
    except KubeConfigError as e:
        raise UserError(str(e)) from None
    plain: list[tuple[str, Callable[[], Inventory]]] = []
    if settings.containerd_namespaces:
        socket = str(host.run / "containerd" / "containerd.sock")
        source = ContainerdNamespacesSource(host, CtrCli(), socket)
        feed = InventoryFeed(lambda: source, host, {"containerd_socket": socket})
        plain.append(("containerd", feed))
    if creds is None:
        return multi_inventory_factory([("docker", docker), *plain])
    kube = KubeInventorySource(
        host,
        clock,
        KubeClient(creds),
        settings.kube_node_name or default_node_name(),
        CtrCli(),
        settings.cri_containerd_socket,
    )
    factories: list[tuple[str, Callable[[], Inventory]]] = [("kubernetes", kube), *plain]
    socket = settings.docker_url.removeprefix("unix://")
    # The Docker SDK dials docker_url as given (not under the host root), so the check does too.
    if not settings.docker_url.startswith("unix://") or Path(socket).exists():
        factories.insert(0, ("docker", docker))
    return multi_inventory_factory(factories)


__all__ = ["MultiInventory", "multi_inventory_factory", "node_inventory_factory"]
