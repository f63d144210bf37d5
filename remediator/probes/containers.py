"""The Docker adapter of the container inventory: which containers Docker runs, at little cost.

This is the only probe module that talks to Docker (with `probes/docker_events.py`, its event
stream). It implements the `ContainerSource` protocol of `probes/inventory.py`:

* `DockerListing`: one `GET /containers/json` per snapshot (running containers with their
  names, labels and image: what Docker's list returns), plus an inspect only for what the list
  lacks, the init pid, and only for a container it has not inspected before. Pids are kept
  between snapshots (and, for one-shot runs, in a small file in the state directory) and
  checked before each use: a kept pid counts only while its `/proc/<pid>/cgroup` still names
  the container (a restarted container has a new init process; the old pid is gone or someone
  else's), otherwise the container is inspected again. The list API gives no start time, so
  the key is the id plus that check, which also holds when a pid is reused.
* `DockerEventSource` (probes/docker_events.py, the daemon's): the same listing, told by
  Docker's event stream which containers to inspect again.
* `DockerInventory`: one listing as a cycle's `Inventory` (tests and tools).
* `make_inventory_factory()`: what the runtime puts in `ProbeContext.inventory_factory`; it
  never raises: with Docker down the probes still read the host, only without per-container
  attribution (a `docker_unavailable` warning each cycle).

Docker API calls are retried (tenacity, bounded) on transient failures only: connection errors,
timeouts, and HTTP 5xx from the daemon. What is left after the retries becomes
`TemporaryError`; anything else Docker rejects becomes `PermanentError`.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable, Collection, Mapping
from pathlib import Path
from typing import Any, TypeVar

import docker
import docker.errors
import requests
import structlog
import tenacity

from remediator.errors import PermanentError, TemporaryError
from remediator.host import HostRoot
from remediator.model import ContainerRef
from remediator.probes.cgroups import (
    container_id_from_cgroup,
    container_id_from_cgroup_path,
    memory_cgroup_path,
    parse_proc_cgroup,
)
from remediator.probes.inventory import InventoryFeed, SnapshotInventory, StaticInventory

log = structlog.get_logger(__name__)

T = TypeVar("T")

# Bounded retries: an inventory is rebuilt every cycle anyway, so waiting long here only delays
# the host-wide readings. 3 attempts with 0.2 s, 0.4 s pauses stay well under a second.
RETRY_ATTEMPTS = 3
RETRY_BACKOFF_SECONDS = 0.2
RETRY_BACKOFF_MAX_SECONDS = 1.0

# The kept-pids file: one small JSON object, rewritten (atomically) only when it changed.
PIDS_FILE_VERSION = 1


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


def primary_name(names: Collection[str]) -> str:
    """The container's own name from the list API's `Names` ("/web"); legacy links add
    "/other/alias" entries, which name the link, not the container."""
    plain = [n.lstrip("/") for n in names if "/" not in n.lstrip("/")]
    if plain:
        return plain[0]
    return next(iter(names), "").lstrip("/")


class KeptPids:
    """Init pids of inspected containers, by container id; optionally kept in a file.

    `path` None: in memory only (the daemon lives long enough). `readonly`: read the file, never
    write it (audit writes nothing). A file that cannot be read or parsed is ignored: it only
    saves inspects.
    """

    def __init__(self, path: Path | None = None, *, readonly: bool = False) -> None:
        self.path = path
        self.readonly = readonly
        self.pids: dict[str, int] = {}
        self._saved: dict[str, int] = {}
        if path is not None:
            with contextlib.suppress(OSError, ValueError, TypeError, AttributeError):
                data = json.loads(path.read_text())
                if data.get("version") == PIDS_FILE_VERSION:
                    self.pids = {str(k): int(v) for k, v in dict(data["pids"]).items()}
                    self._saved = dict(self.pids)

    def forget(self, ids: Collection[str] | None = None) -> None:
        """Inspect these again at the next snapshot (None: all of them)."""
        if ids is None:
            self.pids.clear()
        else:
            for cid in ids:
                self.pids.pop(cid, None)

    def save(self) -> None:
        if self.path is None or self.readonly or self.pids == self._saved:
            return
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        try:
            tmp.write_text(json.dumps({"version": PIDS_FILE_VERSION, "pids": self.pids}, sort_keys=True))
            os.replace(tmp, self.path)
        except OSError as exc:  # a full or read-only state dir costs inspects, nothing else
            log.debug("container_pids_not_saved", path=str(self.path), error=str(exc))
            with contextlib.suppress(OSError):
                tmp.unlink()
            return
        self._saved = dict(self.pids)


class DockerListing:
    """A `ContainerSource`: running containers from one list call, inspecting only new ones.

    `client` is a `docker.DockerClient`; only its low-level `api` is used, so that each HTTP
    call is retried on its own and a container removed between list and inspect is skipped
    instead of failing the whole listing. Not thread-safe: one caller at a time (InventoryFeed
    holds a lock).
    """

    runtime = "docker"

    def __init__(
        self,
        client: Any,  # docker.DockerClient; the SDK ships no type information
        host: HostRoot,
        *,
        pids: KeptPids | None = None,
        attempts: int = RETRY_ATTEMPTS,
        backoff: float = RETRY_BACKOFF_SECONDS,
        sleep: Callable[[float], None] | None = None,  # tests pass a no-op
    ) -> None:
        self.client = client
        self._api = client.api
        self._host = host
        self.pids = pids if pids is not None else KeptPids()
        self._attempts = attempts
        self._backoff = backoff
        self._sleep = sleep
        self.inspects = 0  # how many inspect calls this listing made (benchmarks, tests)

    def snapshot(self) -> tuple[ContainerRef, ...]:
        summaries = self._call("list containers", self._api.containers, filters={"status": "running"})
        refs = []
        listed = set()
        for summary in summaries:
            cid = str(summary["Id"])
            listed.add(cid)
            ref = self._ref(cid, summary)
            if ref is not None:
                refs.append(ref)
        # Bounded by what runs: a removed container's pid is not kept.
        for cid in set(self.pids.pids) - listed:
            del self.pids.pids[cid]
        self.pids.save()
        return tuple(refs)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.client.close()

    def _ref(self, cid: str, summary: Mapping[str, Any]) -> ContainerRef | None:
        pid = self.pids.pids.get(cid)
        cgroup = self._cgroup_of(pid, cid) if pid else None
        if cgroup is None:
            try:
                attrs = self._call("inspect container", self._api.inspect_container, cid)
            except PermanentError as exc:
                if isinstance(exc.__cause__, docker.errors.NotFound):
                    self.pids.forget([cid])
                    return None  # removed between list and inspect: not running any more
                raise
            finally:
                self.inspects += 1
            state = attrs.get("State") or {}
            if not state.get("Running"):
                self.pids.forget([cid])
                return None  # exited between list and inspect
            pid = int(state.get("Pid") or 0) or None
            cgroup = self._cgroup_of(pid, cid) if pid else None
            if pid is not None and cgroup is None:
                # Docker's pid is in its own (the host's) pid namespace. Run in another one (in
                # a container), ours numbers the container's processes differently, or does not
                # see them at all: find one through the container's memory cgroup.
                pid = self._pid_in_our_namespace(cid, attrs) or pid
                cgroup = self._cgroup_of(pid, cid)
            if pid is not None and cgroup is not None:
                self.pids.pids[cid] = pid
            elif pid is not None:
                # A layout whose cgroup path does not name the container: the pid cannot be
                # checked later, so it is not kept (inspected every time, as before), and the
                # memory cgroup is whatever the process is in.
                self.pids.forget([cid])
                pid, cgroup = self._unchecked(pid)
        labels = summary.get("Labels") or {}
        return ContainerRef(
            id=cid,
            name=primary_name(summary.get("Names") or ()),
            labels=labels,
            runtime="docker",
            pid=pid,
            cgroup=cgroup,
            image=summary.get("Image"),
        )

    def _cgroup_of(self, pid: int, cid: str) -> str | None:
        """The memory cgroup of `pid` when that process is in container `cid`, else None."""
        try:
            text = self._host.read_text(self._host.proc / str(pid) / "cgroup")
        except OSError:
            return None  # exited (or the container was restarted): inspect again
        if container_id_from_cgroup(text) != cid:
            return None
        return memory_cgroup_path(text)

    def _pid_in_our_namespace(self, cid: str, attrs: Mapping[str, Any]) -> int | None:
        """A process of container `cid` as our pid namespace numbers it, from `cgroup.procs`
        of the container's memory cgroup (the kernel translates the pids for the reader and
        leaves out those it cannot see). Docker names that cgroup `<parent>/<id>` (cgroupfs
        driver, parent /docker unless --cgroup-parent) or `<slice>/docker-<id>.scope` (systemd
        driver). None when there is no such cgroup or no process of it is visible."""
        parent = str((attrs.get("HostConfig") or {}).get("CgroupParent") or "").strip("/")
        relative = [f"{parent or 'docker'}/{cid}", f"{parent or 'system.slice'}/docker-{cid}.scope"]
        cgroup_fs = self._host.sys / "fs" / "cgroup"
        for base in (cgroup_fs / "memory", cgroup_fs):
            for rel in relative:
                try:
                    procs = self._host.read_text(base / rel / "cgroup.procs").split()
                except OSError:
                    continue
                for word in procs[:8]:  # the first few suffice; a process may exit meanwhile
                    if word.isdigit() and self._cgroup_of(int(word), cid) is not None:
                        return int(word)
        return None

    def _unchecked(self, pid: int) -> tuple[int | None, str | None]:
        """(pid, its memory cgroup) for a pid whose cgroup does not name the container; (None,
        None) when the process is gone or is another container's (a pid of another namespace
        that happens to exist in ours: it must not be attributed to this container)."""
        try:
            text = self._host.read_text(self._host.proc / str(pid) / "cgroup")
        except OSError:
            return None, None
        if container_id_from_cgroup(text) is not None:
            return None, None
        return pid, memory_cgroup_path(text)

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


class DockerInventory(SnapshotInventory):
    """One listing of Docker's running containers as a cycle's `Inventory`, listed on
    `refresh()` or lazily on first use. Raises TemporaryError / PermanentError."""

    def __init__(
        self,
        client: Any,
        host: HostRoot,
        *,
        attempts: int = RETRY_ATTEMPTS,
        backoff: float = RETRY_BACKOFF_SECONDS,
        sleep: Callable[[float], None] | None = None,
    ) -> None:
        super().__init__((), host)
        self._listing = DockerListing(client, host, attempts=attempts, backoff=backoff, sleep=sleep)
        self._listed = False

    def refresh(self) -> None:
        refs = self._listing.snapshot()
        SnapshotInventory.__init__(self, refs, self._host)
        self._listed = True

    def containers(self) -> list[ContainerRef]:
        self._loaded()
        return super().containers()

    def container_of_pid(self, pid: int) -> ContainerRef | None:
        self._loaded()
        return super().container_of_pid(pid)

    def container_of_cgroup(self, cgroup_path: str) -> ContainerRef | None:
        self._loaded()
        return super().container_of_cgroup(cgroup_path)

    def _loaded(self) -> None:
        if not self._listed:
            self.refresh()


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
    pids_path: Path | None = None,
    readonly: bool = False,
    events: bool = False,
) -> InventoryFeed:
    """A zero-argument callable for `ProbeContext.inventory_factory`; it never raises.

    One client is kept across calls (connection pooling, one version probe) and so are the
    inspected pids. `pids_path`: keep them in this file too (one-shot runs: the next run reads
    it), written unless `readonly`. `events`: follow Docker's event stream in a thread (the
    daemon; call `close()` on the feed to stop it). When Docker cannot be reached or refuses,
    the cycle gets an empty inventory and a `docker_unavailable` warning, and the next call
    connects afresh.
    """

    def new_client() -> Any:
        if client_factory is not None:
            return client_factory()
        return connect(docker_url, timeout, sleep=sleep)

    def new_source() -> DockerListing:
        pids = KeptPids(pids_path, readonly=readonly)
        if events:
            from remediator.probes.docker_events import DockerEventSource  # noqa: PLC0415 (cycle)

            return DockerEventSource(new_client, host, pids=pids, sleep=sleep)
        return DockerListing(new_client(), host, pids=pids, sleep=sleep)

    return InventoryFeed(new_source, host, {"docker_url": docker_url}, event="docker_unavailable")


__all__ = [
    "DockerInventory",
    "DockerListing",
    "KeptPids",
    "StaticInventory",
    "call_with_retries",
    "connect",
    "container_id_from_cgroup",
    "container_id_from_cgroup_path",
    "make_inventory_factory",
    "memory_cgroup_path",
    "parse_proc_cgroup",
    "primary_name",
]
