"""Kubernetes Events for what remediator sees and does, aggregated and rate-limited.

An Event is a `v1` object in the involved object's namespace (a Node's go to `default`, where
the kubelet puts its own), with `source.component: remediator`. It is written when a policy
fires, when an action is applied or fails, and when a condition clears: on transitions, never
once per cycle, so a quiet node writes none.

Bounded three ways, like client-go's EventCorrelator:

* a repeat (same object, type, reason and message) within `AGGREGATE_SECONDS` of the last one
  bumps that Event's `count` and `lastTimestamp` (a merge PATCH) instead of creating another;
* a token bucket (`BURST` events, one more every `REFILL_SECONDS`) caps a storm; what it refuses
  is dropped and counted (`dropped`, the `remediator_kube_events_dropped_total` metric);
* while the API server is unreachable the Events wait in a queue of at most `QUEUE_MAX`; the
  oldest go first when it is full (counted as dropped too).

The recorder keeps its memory in the process: in timer mode (one process per run) a repeat in
the next run is a new Event, which the token bucket and the transition-only rule keep rare.
"""

from __future__ import annotations

import datetime
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from remediator.errors import PermanentError, TemporaryError

COMPONENT = "remediator"
# client-go's EventCorrelator aggregates repeats within 10 minutes; so do we.
AGGREGATE_SECONDS = 600.0
# client-go's spam filter allows a burst of 25 per object and source; ours is per process, one
# more every 30 s: a ladder of 3 steps on 5 policies fits in a burst, a flapping one does not.
BURST = 25
REFILL_SECONDS = 30.0
# Events waiting for an unreachable API server. Each is under 1 KB: 100 is ~100 KB at most.
QUEUE_MAX = 100

WARNING, NORMAL = "Warning", "Normal"


def rfc3339(at: float) -> str:
    """Unix seconds -> `2026-12-02T07:40:12Z`, as the API server's timestamps are written."""
    return datetime.datetime.fromtimestamp(at, datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass(frozen=True)
class Involved:
    """The object an Event is about: this Node, or a pod."""

    kind: str  # "Node" or "Pod"
    name: str
    uid: str
    namespace: str | None = None  # None for the (cluster-scoped) Node

    @classmethod
    def node(cls, name: str) -> Involved:
        # The kubelet's own Node events carry the node's name as the uid, and `kubectl describe
        # node` looks them up that way (kubectl's describe.go sets ref.UID = node name).
        return cls("Node", name, name)

    @property
    def event_namespace(self) -> str:
        return self.namespace or "default"

    def to_dict(self) -> dict[str, str]:
        ref = {"apiVersion": "v1", "kind": self.kind, "name": self.name, "uid": self.uid}
        if self.namespace:
            ref["namespace"] = self.namespace
        return ref


@dataclass(frozen=True)
class Note:
    """One Event to write (pure data)."""

    involved: Involved
    type: str  # Warning | Normal
    reason: str  # CamelCase
    message: str

    def key(self) -> tuple[Any, ...]:
        return (self.involved, self.type, self.reason, self.message)


def event_body(note: Note, name: str, host: str, first: float, last: float, count: int) -> dict[str, Any]:
    """The v1 Event object for `note` (pure)."""
    return {
        "apiVersion": "v1",
        "kind": "Event",
        "metadata": {"name": name, "namespace": note.involved.event_namespace},
        "involvedObject": note.involved.to_dict(),
        "reason": note.reason,
        # The API server refuses messages past 1 KB in some versions' validation of new events.
        "message": note.message[:1024],
        "type": note.type,
        "source": {"component": COMPONENT, "host": host},
        "reportingComponent": COMPONENT,
        "reportingInstance": host,
        "firstTimestamp": rfc3339(first),
        "lastTimestamp": rfc3339(last),
        "count": count,
    }


@dataclass
class _Sent:
    name: str
    first: float
    last: float
    count: int


class EventRecorder:
    """Queues Notes (rate-limited) and writes them (aggregated) when `flush` is called."""

    def __init__(
        self,
        host: str,
        now: Callable[[], float],
        *,
        burst: int = BURST,
        refill_seconds: float = REFILL_SECONDS,
        queue_max: int = QUEUE_MAX,
    ) -> None:
        self.host = host
        self._now = now
        self._burst = burst
        self._refill = refill_seconds
        self._tokens = float(burst)
        self._tokens_at = now()
        self._queue: deque[tuple[Note, float]] = deque()
        self._queue_max = queue_max
        self._sent: dict[tuple[Any, ...], _Sent] = {}
        self._seq = 0
        self.dropped = 0

    @property
    def pending(self) -> int:
        return len(self._queue)

    def record(self, note: Note) -> bool:
        """Queue one Event; False when the rate limit dropped it."""
        now = self._now()
        self._tokens = min(self._burst, self._tokens + (now - self._tokens_at) / self._refill)
        self._tokens_at = now
        if self._tokens < 1:
            self.dropped += 1
            return False
        self._tokens -= 1
        if len(self._queue) >= self._queue_max:
            self._queue.popleft()
            self.dropped += 1
        self._queue.append((note, now))
        return True

    def _name(self, note: Note, at: float) -> str:
        # Like client-go: "<object>.<hex nanoseconds>", unique per process by a sequence.
        self._seq += 1
        return f"{note.involved.name}.{int(at * 1e9) + self._seq:x}"

    def flush(self, client: Any) -> str | None:
        """Write what is queued, oldest first. Stops at the first failure and keeps the rest
        queued; returns that failure's message (None: all written)."""
        while self._queue:
            note, at = self._queue[0]
            try:
                self._write(client, note, at)
            except (TemporaryError, PermanentError) as e:
                if isinstance(e, PermanentError):
                    # Refused for good (403: no RBAC for events, 404: no such namespace, 422:
                    # invalid): retrying would fail the same way every cycle, so it is dropped.
                    self._queue.popleft()
                    self.dropped += 1
                return str(e)
            self._queue.popleft()
        return None

    def _write(self, client: Any, note: Note, at: float) -> None:
        ns = note.involved.event_namespace
        sent = self._sent.get(note.key())
        if sent is not None and at - sent.last < AGGREGATE_SECONDS:
            patch = {"count": sent.count + 1, "lastTimestamp": rfc3339(at)}
            try:
                client.request(
                    "PATCH",
                    f"/api/v1/namespaces/{ns}/events/{sent.name}",
                    body=patch,
                    content_type="application/merge-patch+json",
                )
            except PermanentError as e:
                if "HTTP 404" not in str(e):
                    raise
                # The Event expired (the API server keeps them an hour): a new one below.
            else:
                sent.count += 1
                sent.last = at
                return
        name = self._name(note, at)
        client.request(
            "POST", f"/api/v1/namespaces/{ns}/events", body=event_body(note, name, self.host, at, at, 1)
        )
        self._sent[note.key()] = _Sent(name, at, at, 1)
        # Forget what can no longer be aggregated, so the memory stays bounded.
        for key in [k for k, s in self._sent.items() if at - s.last >= AGGREGATE_SECONDS]:
            del self._sent[key]


__all__ = ["NORMAL", "WARNING", "EventRecorder", "Involved", "Note", "event_body", "rfc3339"]
