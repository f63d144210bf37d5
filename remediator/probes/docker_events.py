"""The daemon's Docker inventory: the listing, told by Docker's event stream what to inspect again.

`DockerEventSource` is a `DockerListing` (probes/containers.py) plus a daemon thread that
follows `GET /events?filters={"type":["container"]}` on a connection of its own. The thread
only notes which container ids had a lifecycle event (start, restart, die, rename, update,
...) in a bounded set; the cycle's `snapshot()` takes that set and inspects exactly those
containers again, so a cycle costs one list call plus an inspect per container that changed,
instead of one inspect per running container.

What the stream cannot promise, the snapshot does not rely on:

* Membership and names always come from the snapshot's own list call, so a container created,
  renamed or removed before `snapshot()` is seen at once, however late its event arrives.
* Events are lost between a broken connection and the resubscription, and Docker's pubsub drops
  events for a subscriber that reads too slowly. Every (re)subscription, stream error and
  overflow of the bounded set is a *gap*: the next snapshot inspects every container again (a
  full resync). Between gaps, a kept pid is still checked against its `/proc/<pid>/cgroup`
  before use (see `DockerListing`), so even a missed restart cannot misattribute a process.

A quiet host costs no API call at all: when the stream is unbroken, reported nothing since the
last snapshot and that snapshot is younger than `relist_s` (60 s), the snapshot is the last one
again, provided the cgroup directories its containers live in (`/docker`, `/system.slice` and
every parent a listed container uses, in the memory hierarchy or the unified one) hold the same
entries as just before it was listed, and the list agreed with them then (every listed
container's cgroup there, every Docker container cgroup there listed), or disagreed the same way
for SETTLE_S (a paused container: a cgroup, not "running"). A container that started
or stopped has made or removed its cgroup before `docker run` / `docker rm` returned, so
membership is current at once even when its event is still on the wire; a rename (which touches
no cgroup) shows from the snapshot after its event arrived, milliseconds later. Actions never
trust a snapshot anyway: each re-inspects its target by id just before acting.

Reconnects back off exponentially (1 s to 30 s) and never block a cycle; `close()` stops the
thread (it closes the stream under it) and waits for it, bounded.
"""

from __future__ import annotations

import contextlib
import os
import re
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import structlog

from remediator.host import HostRoot
from remediator.model import ContainerRef
from remediator.probes.containers import DockerListing, KeptPids

log = structlog.get_logger(__name__)

# Actions that say nothing about which process is the container's init or whether it runs:
# exec_*, health_status and the like arrive often (a healthcheck every few seconds) and must
# not cost inspects. Docker appends details after a colon ("exec_start: sh -c ...").
IGNORED_ACTIONS = frozenset(
    {
        "attach",
        "archive-path",
        "commit",
        "copy",
        "detach",
        "exec_create",
        "exec_detach",
        "exec_die",
        "exec_start",
        "export",
        "extract-to-dir",
        "health_status",
        "resize",
        "top",
    }
)

# At most this many changed ids between two snapshots; more is treated as a gap (one full
# resync costs what this many inspects cost, and keeps the memory bounded under churn).
MAX_PENDING = 4096
RECONNECT_MIN_S = 1.0
RECONNECT_MAX_S = 30.0
CLOSE_WAIT_S = 5.0
# A full list at least this often, however quiet the stream and the cgroup tree are.
RELIST_S = 60.0
# A list that disagrees with the cgroup tree the same way for this long is trusted anyway: the
# race it guards against (runc's cgroup before dockerd's "running") lasts milliseconds.
SETTLE_S = 2.0
# cgroup parents watched even before any container is listed: Docker's defaults for the
# cgroupfs and the systemd drivers.
DEFAULT_PARENTS = ("docker", "system.slice")


def event_container(event: Mapping[str, Any]) -> str | None:
    """The container id a decoded event is about, or None when it needs no inspect.

    Engine API >= 1.22 events carry `Action` and `Actor.ID`; the older `status` and `id` are
    still sent alongside them by the daemons we support, and are the fallback."""
    action = str(event.get("Action") or event.get("status") or "")
    if action.split(":", 1)[0].strip() in IGNORED_ACTIONS:
        return None
    actor = event.get("Actor") or {}
    cid = actor.get("ID") if isinstance(actor, Mapping) else None
    cid = cid or event.get("id")
    return str(cid) if cid else None


class DockerEventSource(DockerListing):
    """A `ContainerSource` for the daemon; see the module docstring."""

    def __init__(
        self,
        client_factory: Callable[[], Any],  # a new docker.DockerClient per call
        host: HostRoot,
        *,
        pids: KeptPids | None = None,
        sleep: Callable[[float], None] | None = None,
        max_pending: int = MAX_PENDING,
        reconnect: tuple[float, float] = (RECONNECT_MIN_S, RECONNECT_MAX_S),
        relist_s: float = RELIST_S,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__(client_factory(), host, pids=pids, sleep=sleep)
        self._relist_s = relist_s
        self._monotonic = monotonic
        self._last: tuple[ContainerRef, ...] | None = None
        self._last_at = 0.0
        # The cgroup directories' entries when the last list was taken; None: that list did
        # not agree with them, so the next snapshot lists again.
        self._last_tree: dict[str, frozenset[str]] | None = None
        self._parents_seen: tuple[str, ...] = tuple(sorted(DEFAULT_PARENTS))
        # A list that disagreed with the tree: (the tree, the listed ids, when first seen so).
        self._unagreed: tuple[dict[str, frozenset[str]], frozenset[str], float] | None = None
        self._cgroup_base: Path | None = None  # where the cgroup directories are listed
        self.reused = 0  # snapshots answered without an API call (metrics, tests, benchmarks)
        self._client_factory = client_factory
        self._max_pending = max_pending
        self._reconnect = reconnect
        self._lock = threading.Lock()
        self._pending: set[str] = set()
        self._gap = True  # nothing followed yet
        self._stop = threading.Event()
        self._stream: Any = None
        self._subscribed = threading.Event()  # set while a stream is open (tests wait on it)
        self.resyncs = 0  # snapshots that inspected everything again (metrics, tests)
        self.events_seen = 0
        self._thread = threading.Thread(target=self._follow, name="docker-events", daemon=True)
        self._thread.start()

    # the cycle's side -------------------------------------------------------------------
    def snapshot(self) -> tuple[ContainerRef, ...]:
        with self._lock:
            gap, pending = self._gap, self._pending
            self._gap, self._pending = False, set()
        now = self._monotonic()
        if (
            not gap
            and not pending
            and self._last is not None
            and self._last_tree is not None
            and now - self._last_at < self._relist_s
            and self._cgroup_tree(self._last_tree) == self._last_tree
        ):
            self.reused += 1
            return self._last
        if gap:
            self.pids.forget()
            self.resyncs += 1
        else:
            self.pids.forget(pending)
        self._last = None
        # The tree is read before the list, and kept (so that a later snapshot may reuse this
        # one) only when the list agrees with it: then the set of container cgroups at that
        # moment is what the list says, and any later change to it makes a snapshot list again.
        # Read after the list, a container started in between was in the tree and not in the
        # list, and every later snapshot reused the list without it (seen under churn). Even
        # in this order the list can lag the tree: runc makes a container's cgroup before
        # dockerd calls it running, and removes it before dockerd calls it stopped.
        tree = self._cgroup_tree(self._parents_seen)
        try:
            refs = super().snapshot()
        except Exception:
            with self._lock:  # what this snapshot took is not lost with it
                self._gap = True
            raise
        parents = self._parents(refs)
        agreed = set(parents) <= tree.keys() and _agrees(tree, refs)
        if not agreed and set(parents) <= tree.keys():
            # The same disagreement for SETTLE_S is no race: a paused container (a cgroup, not
            # "running") or a cgroup left behind. Else a paused container would cost a list
            # every cycle for as long as it stays paused.
            ids = frozenset(r.id for r in refs)
            first = self._unagreed
            if first is not None and first[0] == tree and first[1] == ids:
                agreed = now - first[2] >= SETTLE_S
            else:
                self._unagreed = (tree, ids, now)
        if agreed:
            self._unagreed = None
        self._last_tree = tree if agreed else None
        self._parents_seen = parents
        self._last, self._last_at = refs, now
        return refs

    @staticmethod
    def _parents(refs: tuple[ContainerRef, ...]) -> tuple[str, ...]:
        """The cgroup directories that hold containers: the defaults and every parent in use."""
        parents = set(DEFAULT_PARENTS)
        for ref in refs:
            if ref.cgroup and "/" in ref.cgroup.strip("/"):
                parents.add(ref.cgroup.strip("/").rsplit("/", 1)[0])
        return tuple(sorted(parents))

    def _cgroup_tree(self, parents: Iterable[str]) -> dict[str, frozenset[str]]:
        """The entries of each parent cgroup directory (missing: empty), in the memory
        hierarchy (v1) or the unified one (v2), which is looked for once."""
        if self._cgroup_base is None:
            root = self._host.sys / "fs" / "cgroup"
            self._cgroup_base = root / "memory" if (root / "memory").is_dir() else root
        tree = {}
        for parent in parents:
            try:
                tree[parent] = frozenset(os.listdir(self._cgroup_base / parent))
            except OSError:
                tree[parent] = frozenset()
        return tree

    def wait_subscribed(self, timeout: float) -> bool:
        return self._subscribed.wait(timeout)

    def close(self) -> None:
        self._stop.set()
        with self._lock:
            stream = self._stream
        if stream is not None:
            with contextlib.suppress(Exception):
                stream.close()
        self._thread.join(CLOSE_WAIT_S)
        super().close()

    # the thread's side ------------------------------------------------------------------
    def _note(self, event: Mapping[str, Any]) -> None:
        cid = event_container(event)
        with self._lock:
            self.events_seen += 1
            if cid is None or self._gap:
                return  # a gap re-inspects everything anyway
            self._pending.add(cid)
            if len(self._pending) > self._max_pending:
                log.warning("docker_events_overflow", pending=len(self._pending))
                self._pending.clear()
                self._gap = True

    def _follow(self) -> None:
        delay = self._reconnect[0]
        while not self._stop.is_set():
            client: Any = None
            stream: Any = None
            try:
                client = self._client_factory()
                stream = client.api.events(decode=True, filters={"type": "container"})
                with self._lock:
                    self._stream = stream
                    # Whatever happened before this subscription is unknown to us.
                    self._gap = True
                if self._stop.is_set():
                    break
                self._subscribed.set()
                log.debug("docker_events_following")
                delay = self._reconnect[0]
                for event in stream:
                    if isinstance(event, Mapping):
                        self._note(event)
                if not self._stop.is_set():
                    raise ConnectionError("the event stream ended (dockerd restarted?)")
            except Exception as exc:  # any failure of the thread is a gap, never a crash
                if self._stop.is_set():
                    break
                with self._lock:
                    self._gap = True
                log.warning("docker_events_lost", error=f"{type(exc).__name__}: {exc}", retry_in=delay)
            finally:
                self._subscribed.clear()
                with self._lock:
                    self._stream = None
                for closable in (stream, client):
                    if closable is not None:
                        with contextlib.suppress(Exception):
                            closable.close()
            if self._stop.wait(delay):
                break
            delay = min(delay * 2, self._reconnect[1])


# A Docker container's cgroup directory: its id (cgroupfs driver, under /docker) or its scope
# unit (systemd driver, under system.slice). Other runtimes' scopes there are not Docker's.
_DOCKER_LEAF = re.compile(r"(?:docker-)?([0-9a-f]{64})(?:\.scope)?")


def _agrees(tree: Mapping[str, frozenset[str]], refs: Iterable[ContainerRef]) -> bool:
    """Whether a list of running containers matches the cgroup directories read just before
    it: each listed container's cgroup is there, and each Docker container cgroup there is
    listed."""
    ids = set()
    for ref in refs:
        ids.add(ref.id)
        if ref.cgroup:
            parent, _, leaf = ref.cgroup.strip("/").rpartition("/")
            if parent in tree and leaf not in tree[parent]:
                return False
    for entries in tree.values():
        for entry in entries:
            m = _DOCKER_LEAF.fullmatch(entry)
            if m is not None and m.group(1) not in ids:
                return False
    return True


__all__ = ["DockerEventSource", "event_container"]
