"""The Docker adapter: which containers run on this host, and whom a process or cgroup belongs to.

This is the only probe module that talks to Docker. It implements the `Inventory` protocol of
`probes/base.py` three ways:

* `DockerInventory`: the running containers as the Docker Engine API lists them, read once per
  cycle (`ProbeContext.inventory()` builds it lazily), plus process attribution through
  `/proc/<pid>/cgroup`.
* `StaticInventory`: a fixed list, pure; for tests, `replay`, and as the degraded inventory
  when Docker is unreachable.
* `make_inventory_factory()`: what the runtime puts in `ProbeContext.inventory_factory`. It
  never raises: with Docker down the probes still read the host, only without per-container
  attribution (a warning is logged each cycle).

Attribution reads the cgroup path rather than asking Docker for every pid: a process belongs to a
container when its cgroup path names the container's 64-hex id, which holds for every layout we
know of (see `container_id_from_cgroup`) and costs one small read per process.

Docker API calls are retried (tenacity, bounded) on transient failures only: connection errors,
timeouts, and HTTP 5xx from the daemon. What is left after the retries becomes
`TemporaryError`; anything else Docker rejects becomes `PermanentError`.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, TypeVar

import docker
import docker.errors
import requests
import structlog
import tenacity

from remediator.errors import PermanentError, TemporaryError
from remediator.host import HostRoot
from remediator.model import ContainerRef
from remediator.probes.base import Inventory

log = structlog.get_logger(__name__)

T = TypeVar("T")

# Bounded retries: an inventory is rebuilt every cycle anyway, so waiting long here only delays
# the host-wide readings. 3 attempts with 0.2 s, 0.4 s pauses stay well under a second.
RETRY_ATTEMPTS = 3
RETRY_BACKOFF_SECONDS = 0.2
RETRY_BACKOFF_MAX_SECONDS = 1.0

# ---------------------------------------------------------------------------------------------
# /proc/<pid>/cgroup parsing (pure)
# ---------------------------------------------------------------------------------------------

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


# ---------------------------------------------------------------------------------------------
# Inventories
# ---------------------------------------------------------------------------------------------


class _Index:
    """Lookups shared by both inventories: by id, by init pid, by cgroup path."""

    def __init__(self, containers: Iterable[ContainerRef]) -> None:
        self.refs = list(containers)
        self.by_id = {c.id: c for c in self.refs}
        self.by_pid = {c.pid: c for c in self.refs if c.pid}
        self.by_cgroup = {c.cgroup: c for c in self.refs if c.cgroup}

    def of_cgroup(self, cgroup_path: str) -> ContainerRef | None:
        if (ref := self.by_cgroup.get(cgroup_path)) is not None:
            return ref
        cid = container_id_from_cgroup_path(cgroup_path)
        return self.by_id.get(cid) if cid else None


class StaticInventory:
    """A fixed inventory. `pid_map` maps a pid to a container id (init pids need no entry)."""

    def __init__(
        self,
        containers: Sequence[ContainerRef] = (),
        pid_map: Mapping[int, str] | None = None,
        error: str | None = None,
    ) -> None:
        self._index = _Index(containers)
        self._pid_map = dict(pid_map or {})
        self._error = error

    @property
    def error(self) -> str | None:
        return self._error

    def containers(self) -> list[ContainerRef]:
        return list(self._index.refs)

    def container_of_pid(self, pid: int) -> ContainerRef | None:
        if (cid := self._pid_map.get(pid)) is not None:
            return self._index.by_id.get(cid)
        return self._index.by_pid.get(pid)

    def container_of_cgroup(self, cgroup_path: str) -> ContainerRef | None:
        return self._index.of_cgroup(cgroup_path)


def _is_transient(exc: BaseException) -> bool:
    """Worth retrying: the daemon is restarting, overloaded or slow, not saying "no"."""
    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        # APIError is itself a requests HTTPError; judge it by its status before anything else.
        if isinstance(cur, docker.errors.APIError):
            return bool(cur.is_server_error())
        if isinstance(cur, requests.exceptions.ConnectionError | requests.exceptions.Timeout):
            return True
        # The SDK wraps the failed version probe of a new client in a bare DockerException.
        cur = cur.__cause__
    return False


class DockerInventory:
    """Running Docker containers, listed once (`refresh()`, or lazily on first use).

    `client` is a `docker.DockerClient`; only its low-level `api` is used, so that each HTTP
    call is retried on its own and a container removed between list and inspect is skipped
    instead of failing the whole listing.
    """

    def __init__(
        self,
        client: Any,  # docker.DockerClient; the SDK ships no type information
        host: HostRoot,
        *,
        attempts: int = RETRY_ATTEMPTS,
        backoff: float = RETRY_BACKOFF_SECONDS,
        sleep: Callable[[float], None] | None = None,  # tests pass a no-op
    ) -> None:
        self._api = client.api
        self._host = host
        self._attempts = attempts
        self._backoff = backoff
        self._sleep = sleep
        self._index: _Index | None = None
        # Attribution of a pid is read once per inventory (one cycle): several probes ask.
        self._pid_cache: dict[int, ContainerRef | None] = {}

    @property
    def error(self) -> None:
        return None  # a failed listing raises; the factory turns that into StaticInventory(error=)

    def refresh(self) -> None:
        """List running containers now. Raises TemporaryError / PermanentError."""
        summaries = self._call("list containers", self._api.containers, filters={"status": "running"})
        refs = []
        for summary in summaries:
            try:
                attrs = self._call("inspect container", self._api.inspect_container, summary["Id"])
            except PermanentError as exc:
                if isinstance(exc.__cause__, docker.errors.NotFound):
                    continue  # removed between list and inspect: not running any more
                raise
            ref = self._ref(attrs)
            if ref is not None:
                refs.append(ref)
        self._index = _Index(refs)
        self._pid_cache.clear()

    def containers(self) -> list[ContainerRef]:
        return list(self._loaded().refs)

    def container_of_pid(self, pid: int) -> ContainerRef | None:
        if pid in self._pid_cache:
            return self._pid_cache[pid]
        index = self._loaded()
        ref = index.by_pid.get(pid)
        if ref is None:
            try:
                text = self._host.read_text(self._host.proc / str(pid) / "cgroup")
            except OSError:
                text = ""  # the process is gone (ENOENT/ESRCH): it belongs to nobody now
            cid = container_id_from_cgroup(text)
            ref = index.by_id.get(cid) if cid else None
        self._pid_cache[pid] = ref
        return ref

    def container_of_cgroup(self, cgroup_path: str) -> ContainerRef | None:
        return self._loaded().of_cgroup(cgroup_path)

    def _loaded(self) -> _Index:
        if self._index is None:
            self.refresh()
        assert self._index is not None  # refresh() sets it or raises
        return self._index

    def _ref(self, attrs: Mapping[str, Any]) -> ContainerRef | None:
        state = attrs.get("State") or {}
        if not state.get("Running"):
            return None
        config = attrs.get("Config") or {}
        pid = int(state.get("Pid") or 0) or None
        cgroup = None
        if pid is not None:
            try:
                text = self._host.read_text(self._host.proc / str(pid) / "cgroup")
                cgroup = memory_cgroup_path(text)
            except OSError:
                cgroup = None  # exited since inspect; the next cycle will not list it
        return ContainerRef(
            id=attrs["Id"],
            name=str(attrs.get("Name") or "").lstrip("/"),
            labels=config.get("Labels") or {},
            runtime="docker",
            pid=pid,
            cgroup=cgroup,
            image=config.get("Image") or attrs.get("Image"),
        )

    def _call(self, what: str, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        return call_with_retries(
            what,
            fn,
            *args,
            attempts=self._attempts,
            backoff=self._backoff,
            sleep=self._sleep,
            **kwargs,
        )


def call_with_retries(
    what: str,
    fn: Callable[..., T],
    *args: Any,
    attempts: int = RETRY_ATTEMPTS,
    backoff: float = RETRY_BACKOFF_SECONDS,
    sleep: Callable[[float], None] | None = None,
    **kwargs: Any,
) -> T:
    """Call a Docker SDK function, retrying transient failures; map what is left to our errors."""

    def before_sleep(state: tenacity.RetryCallState) -> None:
        exc = state.outcome.exception() if state.outcome else None
        log.debug("docker_retry", call=what, attempt=state.attempt_number, error=str(exc))

    options: dict[str, Any] = {}
    if sleep is not None:
        options["sleep"] = sleep
    retrying = tenacity.Retrying(
        stop=tenacity.stop_after_attempt(attempts),
        wait=tenacity.wait_exponential(multiplier=backoff, max=RETRY_BACKOFF_MAX_SECONDS),
        retry=tenacity.retry_if_exception(_is_transient),
        before_sleep=before_sleep,
        reraise=True,
        **options,
    )
    try:
        return retrying(fn, *args, **kwargs)
    except (docker.errors.DockerException, requests.exceptions.RequestException) as exc:
        if _is_transient(exc):
            raise TemporaryError(f"docker: {what}: {exc}") from exc
        raise PermanentError(f"docker: {what}: {exc}") from exc


def connect(docker_url: str, timeout: float, **retry: Any) -> Any:
    """A `docker.DockerClient` for `docker_url` (e.g. unix:///var/run/docker.sock).

    The SDK asks the daemon for its API version while constructing the client, so this already
    talks to Docker and is retried like any other call.
    """
    return call_with_retries(
        "connect",
        docker.DockerClient,
        base_url=docker_url,
        timeout=timeout,
        version="auto",
        **retry,
    )


def make_inventory_factory(
    docker_url: str,
    host: HostRoot,
    timeout: float,
    *,
    client_factory: Callable[[], Any] | None = None,  # tests inject a fake client
    sleep: Callable[[float], None] | None = None,
) -> Callable[[], Inventory]:
    """A zero-argument callable for `ProbeContext.inventory_factory`; it never raises.

    One client is kept across cycles (connection pooling, one version probe). When Docker
    cannot be reached or refuses, the cycle gets an empty inventory and a `docker_unavailable`
    warning, and the next cycle connects afresh.
    """
    client: Any = None

    def new_client() -> Any:
        if client_factory is not None:
            return client_factory()
        return connect(docker_url, timeout, sleep=sleep)

    def factory() -> Inventory:
        nonlocal client
        try:
            if client is None:
                client = new_client()
            inventory = DockerInventory(client, host, sleep=sleep)
            inventory.refresh()
        except (TemporaryError, PermanentError) as exc:
            log.warning(
                "docker_unavailable",
                docker_url=docker_url,
                error=str(exc),
                temporary=isinstance(exc, TemporaryError),
            )
            if client is not None:
                with contextlib.suppress(Exception):  # a broken pool must not break the cycle
                    client.close()
            client = None
            return StaticInventory(error=str(exc))
        return inventory

    return factory


__all__ = [
    "DockerInventory",
    "StaticInventory",
    "call_with_retries",
    "connect",
    "container_id_from_cgroup",
    "container_id_from_cgroup_path",
    "make_inventory_factory",
    "memory_cgroup_path",
    "parse_proc_cgroup",
]
