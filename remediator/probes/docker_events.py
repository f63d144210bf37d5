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

Reconnects back off exponentially (1 s to 30 s) and never block a cycle; `close()` stops the
thread (it closes the stream under it) and waits for it, bounded.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Mapping
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
    ) -> None:
        super().__init__(client_factory(), host, pids=pids, sleep=sleep)
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
        if gap:
            self.pids.forget()
            self.resyncs += 1
        else:
            self.pids.forget(pending)
        try:
            return super().snapshot()
        except Exception:
            with self._lock:  # what this snapshot took is not lost with it
                self._gap = True
            raise

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


__all__ = ["DockerEventSource", "event_container"]
