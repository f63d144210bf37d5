"""The Docker adapter of the container actions: the Engine API calls they make, nothing else.

recreate-container and cap-memory speak to a container runtime through this class; another
runtime (containerd, CRI) gets an adapter of its own next to it. Each call is retried (bounded)
on transient errors (`probes.containers.call_with_retries`); a "no such container" answer
becomes `None` where the caller asked for that (`find`), so the procedure can tell "gone" from
"broken".
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import docker.errors

from remediator.errors import PermanentError
from remediator.probes.containers import call_with_retries

T = TypeVar("T")


def is_not_found(exc: BaseException) -> bool:
    return isinstance(exc.__cause__, docker.errors.NotFound) or isinstance(exc, docker.errors.NotFound)


class DockerEngine:
    """One Docker daemon, through the SDK's low-level `APIClient` (`client.api`)."""

    runtime = "docker"

    def __init__(self, client: Any, sleep: Callable[[float], None] | None = None) -> None:
        self.api = client.api
        self._sleep = sleep

    def call(self, what: str, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        return call_with_retries(what, fn, *args, sleep=self._sleep, **kwargs)

    @property
    def api_version(self) -> str | None:
        return getattr(self.api, "api_version", None)

    # reading ----------------------------------------------------------------------------
    def inspect(self, ident: str) -> dict[str, Any]:
        return dict(self.call("inspect container", self.api.inspect_container, ident))

    def find(self, ident: str) -> dict[str, Any] | None:
        """The container with this id or name, or None when there is none."""
        try:
            return self.inspect(ident)
        except PermanentError as e:
            if is_not_found(e):
                return None
            raise

    def all_containers(self) -> list[dict[str, Any]]:
        """Every container, running or not, inspected (a removed one is skipped)."""
        out = []
        for summary in self.call("list containers", self.api.containers, all=True):
            attrs = self.find(summary["Id"])
            if attrs is not None:
                out.append(attrs)
        return out

    def diff(self, ident: str) -> list[dict[str, Any]]:
        return list(self.call("diff container", self.api.diff, ident) or [])

    def image_id(self, ref: str) -> str | None:
        try:
            return str(self.call("inspect image", self.api.inspect_image, ref)["Id"])
        except PermanentError:
            return None

    # acting -----------------------------------------------------------------------------
    def create(self, body: Mapping[str, Any], name: str) -> str:
        created = self.call("create copy", self.api.create_container_from_config, dict(body), name=name)
        return str(created["Id"])

    def connect(self, ident: str, network: str, endpoint: Mapping[str, Any]) -> None:
        ipam = endpoint.get("IPAMConfig") or {}
        self.call(
            "connect network",
            self.api.connect_container_to_network,
            ident,
            network,
            aliases=endpoint.get("Aliases"),
            links=endpoint.get("Links"),
            ipv4_address=ipam.get("IPv4Address") or None,
            ipv6_address=ipam.get("IPv6Address") or None,
            link_local_ips=ipam.get("LinkLocalIPs") or None,
            driver_opt=endpoint.get("DriverOpts"),
        )

    def stop(self, ident: str, timeout: int) -> None:
        self.call("stop container", self.api.stop, ident, timeout=timeout)

    def rename(self, ident: str, name: str) -> None:
        self.call("rename container", self.api.rename, ident, name)

    def start(self, ident: str) -> None:
        self.call("start container", self.api.start, ident)

    def remove(self, container_id: str, *, volumes: bool, force: bool = False) -> None:
        """Remove by id only. `volumes`: also its anonymous volumes (`docker rm -v`)."""
        self.call("remove container", self.api.remove_container, container_id, v=volumes, force=force)

    def update_memory(self, ident: str, memory: int, memswap: int) -> None:
        self.call(
            "update container", self.api.update_container, ident, mem_limit=memory, memswap_limit=memswap
        )
