"""Which containers run on this host, independent of the runtime that runs them.

Two small interfaces keep "where the list comes from" apart from "what a cycle asks of it":

* `ContainerSource` (one per runtime: Docker, plain containerd namespaces, CRI) says
  which containers run now: `snapshot() -> tuple[ContainerRef, ...]`. A source may be cheap
  because it is incremental (the Docker source keeps inspect results between snapshots and
  follows the event stream); it must still be *current*: a container started or removed
  before `snapshot()` was called is in (or out of) the tuple it returns, and a rename shows as
  soon as the runtime has told of it (the Docker source: its event arrived). It raises
  `TemporaryError` / `PermanentError` when the runtime cannot answer, and `close()` releases
  whatever it holds (connections, threads).
* `Inventory` (probes/base.py) is what one cycle's probes ask: the containers and which one a
  process or cgroup belongs to. `SnapshotInventory` answers from one snapshot plus
  `/proc/<pid>/cgroup`; `StaticInventory` from a fixed list (tests, `replay`, and the degraded
  inventory when the runtime is unreachable).

`InventoryFeed` joins them: a long-lived callable (the daemon keeps one for its lifetime, a
one-shot run one per run) that hands each cycle a fresh `Inventory` from the source and never
raises: a runtime that does not answer gives the cycle an empty inventory with `error` set and
a `container_inventory_unavailable` warning, and the next cycle builds a new source.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Protocol

import structlog

from remediator.errors import PermanentError, TemporaryError
from remediator.host import HostRoot
from remediator.model import ContainerRef
from remediator.probes.base import Inventory
from remediator.probes.cgroups import (
    container_id_from_cgroup,
    container_id_from_cgroup_path,
    memory_cgroup_path,
)

log = structlog.get_logger(__name__)


class ContainerSource(Protocol):
    """The running containers of one runtime, current at each `snapshot()`."""

    runtime: str

    def snapshot(self) -> tuple[ContainerRef, ...]:
        """The containers running now. Raises TemporaryError / PermanentError."""
        ...

    def close(self) -> None:
        """Release connections and stop threads; the source is not used again."""
        ...


class _Index:
    """Lookups shared by the inventories: by id, by init pid, by cgroup path."""

    def __init__(self, containers: Iterable[ContainerRef]) -> None:
        self.refs = list(containers)
        self.by_id = {c.id: c for c in self.refs}
        self.by_pid = {c.pid: c for c in self.refs if c.pid}
        self.by_cgroup = {c.cgroup: c for c in self.refs if c.cgroup}
        # /proc/<pid>/cgroup text -> its container: most processes outside containers (the
        # shims, the host's daemons) share a few texts, parsed once per index (one cycle).
        self._by_text: dict[str, ContainerRef | None] = {}

    def of_cgroup_text(self, text: str) -> ContainerRef | None:
        """The container of a process with this /proc/<pid>/cgroup text: the one its cgroup
        path names by id, else the one whose cgroup holds it (ids that are not 64 hex digits:
        ctr, nerdctl)."""
        if text in self._by_text:
            return self._by_text[text]
        cid = container_id_from_cgroup(text)
        ref = self.by_id.get(cid) if cid else None
        if ref is None:
            ref = self.of_cgroup_tree(memory_cgroup_path(text))
        if len(self._by_text) < 4096:
            self._by_text[text] = ref
        return ref

    def of_cgroup_tree(self, cgroup_path: str | None) -> ContainerRef | None:
        """The container whose cgroup is this one or an ancestor of it (its own sub-cgroups)."""
        path = cgroup_path
        while path and path != "/" and self.by_cgroup:
            if (ref := self.by_cgroup.get(path)) is not None:
                return ref
            path = path.rsplit("/", 1)[0]
        return None

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


class SnapshotInventory:
    """One snapshot of a source, and attribution of any process by its `/proc/<pid>/cgroup`.

    A process belongs to a container when its cgroup path names the container's id, which holds
    for every layout we know of (see `container_id_from_cgroup`) and costs one small read per
    process, instead of asking the runtime about each pid. Each pid is read once per inventory
    (one cycle): several probes ask.
    """

    def __init__(self, refs: Iterable[ContainerRef], host: HostRoot) -> None:
        self._index = _Index(refs)
        self._host = host
        self._pid_cache: dict[int, ContainerRef | None] = {}

    @property
    def error(self) -> None:
        return None

    def containers(self) -> list[ContainerRef]:
        return list(self._index.refs)

    def container_of_pid(self, pid: int) -> ContainerRef | None:
        if pid in self._pid_cache:
            return self._pid_cache[pid]
        ref = self._index.by_pid.get(pid)
        if ref is None:
            try:
                text = self._host.read_text(self._host.proc / str(pid) / "cgroup")
            except OSError:
                text = ""  # the process is gone (ENOENT/ESRCH): it belongs to nobody now
            ref = self._index.of_cgroup_text(text)
        self._pid_cache[pid] = ref
        return ref

    def container_of_cgroup(self, cgroup_path: str) -> ContainerRef | None:
        return self._index.of_cgroup(cgroup_path)


class InventoryFeed:
    """Each call: a fresh `Inventory` for one cycle, from a source kept across calls.

    `source_factory` builds the source (connects to the runtime); it is called again only after
    a failure. `describe` names the runtime endpoint in the warning. Thread-safe: the daemon's
    cycles and an operator's `status` may ask at once.
    """

    def __init__(
        self,
        source_factory: Callable[[], ContainerSource],
        host: HostRoot,
        describe: Mapping[str, str] | None = None,
        event: str = "container_inventory_unavailable",
    ) -> None:
        self._source_factory = source_factory
        self._host = host
        self._describe = dict(describe or {})
        self._event = event
        self._source: ContainerSource | None = None
        self._lock = threading.Lock()

    def __call__(self) -> Inventory:
        with self._lock:
            try:
                if self._source is None:
                    self._source = self._source_factory()
                refs = self._source.snapshot()
            except (TemporaryError, PermanentError) as exc:
                log.warning(
                    self._event,
                    **self._describe,
                    error=str(exc),
                    temporary=isinstance(exc, TemporaryError),
                )
                self._drop()
                return StaticInventory(error=str(exc))
            return SnapshotInventory(refs, self._host)

    def close(self) -> None:
        with self._lock:
            self._drop()

    def _drop(self) -> None:
        if self._source is not None:
            with contextlib.suppress(Exception):  # a broken connection must not break the cycle
                self._source.close()
        self._source = None


__all__ = ["ContainerSource", "InventoryFeed", "SnapshotInventory", "StaticInventory"]
