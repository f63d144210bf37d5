"""Notifications: on an action applied or failed, an escalation, a breaker trip.

Every notification is an event in the journal (`notification`, warning level). When the
Controller's `spec.notify.webhooks` lists receivers, each also gets a JSON POST:
- from a queue in the state directory (`notify.db`, SQLite, at most `queueMax` rows), so a
  restart resumes what was not delivered, and the cycle never waits for a receiver: it only
  appends rows; a sender thread POSTs them;
- retried with tenacity, exponential back-off from 1 s to `backoffMax`, at most `attempts`
  POSTs per notification and receiver (counted across restarts), then given up
  (`notification_dropped`); a 4xx answer other than 408/429 is not retried;
- one row at a time under a lease, so a timer run and the daemon never both send one.

Formats: `generic` posts one `remediator.notification/v1` object; `alertmanager` posts a list
of one alert to Alertmanager's API v2 (`/api/v2/alerts`), with `endsAt` an hour later, since
these are events, not states that Alertmanager would see resolved.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import sqlite3
import threading
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tenacity import (
    RetryError,
    Retrying,
    retry_if_exception_type,
    stop_after_attempt,
    stop_when_event_set,
    wait_exponential,
)

from remediator.audit import get_logger
from remediator.clock import Clock
from remediator.engine import CycleReport
from remediator.model import Outcome
from remediator.policy.rules import Notify, Webhook

log = get_logger()

FORMAT = "remediator.notification/v1"
# Alertmanager keeps an alert until endsAt; an event is "news" for this long.
ALERT_TTL_S = 3600.0
_SEVERITY = {"applied": "info", "escalation": "warning", "failed": "warning", "breaker": "critical"}
_ALERTNAME = {
    "applied": "RemediatorActionApplied",
    "escalation": "RemediatorEscalated",
    "failed": "RemediatorActionFailed",
    "breaker": "RemediatorBreakerTripped",
}


@dataclass(frozen=True)
class Notification:
    kind: str  # applied | failed | escalation | breaker
    at: float
    host: str
    namespace: str
    summary: str
    message: str = ""
    policy: str | None = None
    subject: str | None = None
    action: str | None = None
    step: int | None = None
    outcome: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "kind": self.kind,
            "at": _iso(self.at),
            "host": self.host,
            "namespace": self.namespace,
            "policy": self.policy,
            "subject": self.subject,
            "action": self.action,
            "step": self.step,
            "outcome": self.outcome,
            "summary": self.summary,
            "message": self.message,
        }


def _iso(ts: float) -> str:
    return datetime.datetime.fromtimestamp(ts, datetime.UTC).isoformat(timespec="seconds")


def from_cycle(report: CycleReport, host: str, events: frozenset[str]) -> list[Notification]:
    """What one cycle notifies (pure). An applied or failed step after the first is an
    `escalation`; the breaker is notified in the cycle it opened."""
    out: list[Notification] = []
    for pr in report.policies:
        for a in pr.actions:
            outcome = a.result.outcome
            if outcome not in {Outcome.APPLIED, Outcome.FAILED}:
                continue
            kind = "failed" if outcome is Outcome.FAILED else "applied"
            if (a.decision.step or 0) > 0 and "escalation" in events:
                kind = "escalation"
            if kind not in events:
                continue
            summary = a.plan.summary if a.plan else f"{a.decision.action} on {a.decision.subject}"
            out.append(
                Notification(
                    kind,
                    report.at,
                    host,
                    report.namespace,
                    f"{pr.policy.name}: {summary} ({outcome.value})",
                    a.result.message,
                    pr.policy.name,
                    a.decision.subject,
                    a.decision.action,
                    a.decision.step,
                    outcome.value,
                )
            )
    b = report.breaker
    if "breaker" in events and b.open and b.opened_at is not None and b.opened_at >= report.at:
        out.append(
            Notification(
                "breaker",
                b.opened_at,
                host,
                report.namespace,
                "circuit breaker tripped: every action is audit-only until `remediator reset-breaker`",
                b.reason or "",
            )
        )
    return out


def alertmanager_payload(n: Notification) -> list[dict[str, Any]]:
    labels = {
        "alertname": _ALERTNAME[n.kind],
        "severity": _SEVERITY[n.kind],
        "instance": n.host,
        "namespace": n.namespace,
    }
    for key in ("policy", "subject", "action", "outcome"):
        value = getattr(n, key)
        if value is not None:
            labels[key] = str(value)
    return [
        {
            "labels": labels,
            "annotations": {"summary": n.summary, "description": n.message},
            "startsAt": _iso(n.at),
            "endsAt": _iso(n.at + ALERT_TTL_S),
        }
    ]


def payload(n: Notification, fmt: str) -> bytes:
    body: Any = alertmanager_payload(n) if fmt == "alertmanager" else n.to_dict()
    return json.dumps(body, sort_keys=True).encode()


# The queue ---------------------------------------------------------------------------------
_SCHEMA = """
CREATE TABLE IF NOT EXISTS queue (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    created REAL NOT NULL,
    url TEXT NOT NULL,
    timeout REAL NOT NULL,
    body BLOB NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    lease_until REAL NOT NULL DEFAULT 0
);
"""


@dataclass(frozen=True)
class Row:
    id: int
    url: str
    timeout: float
    body: bytes
    attempts: int


class Queue:
    """Undelivered notifications, oldest first, in their own SQLite file (not state.db: a
    receiver that is down for a week must not grow the state the controller decides on).
    One connection per thread."""

    def __init__(self, path: Path, max_items: int) -> None:
        self.path = path
        self.max_items = max_items
        self._db = sqlite3.connect(path, timeout=5, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.executescript(_SCHEMA)

    def close(self) -> None:
        self._db.close()

    def push(self, url: str, timeout: float, body: bytes, now: float) -> int:
        """Append one; returns how many of the oldest were dropped to stay within bounds."""
        with self._tx():
            self._db.execute(
                "INSERT INTO queue (created, url, timeout, body) VALUES (?, ?, ?, ?)",
                (now, url, timeout, body),
            )
            over = self.pending() - self.max_items
            if over > 0:
                self._db.execute(
                    "DELETE FROM queue WHERE id IN (SELECT id FROM queue ORDER BY id LIMIT ?)", (over,)
                )
        return max(over, 0)

    def claim(self, now: float, lease: float) -> Row | None:
        """The oldest row nobody holds, leased to the caller until now + lease."""
        with self._tx():
            r = self._db.execute(
                "SELECT id, url, timeout, body, attempts FROM queue WHERE lease_until <= ? "
                "ORDER BY id LIMIT 1",
                (now,),
            ).fetchone()
            if r is None:
                return None
            self._db.execute("UPDATE queue SET lease_until = ? WHERE id = ?", (now + lease, r[0]))
        return Row(r[0], r[1], r[2], bytes(r[3]), r[4])

    def done(self, row_id: int) -> None:
        self._db.execute("DELETE FROM queue WHERE id = ?", (row_id,))

    def release(self, row_id: int, attempts: int) -> None:
        """Back to the queue (a stop in the middle of retrying), with the attempts made."""
        self._db.execute("UPDATE queue SET lease_until = 0, attempts = ? WHERE id = ?", (attempts, row_id))

    def pending(self) -> int:
        return int(self._db.execute("SELECT count(*) FROM queue").fetchone()[0])

    @contextlib.contextmanager
    def _tx(self) -> Any:
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")


# Delivery ----------------------------------------------------------------------------------
class TemporaryDeliveryError(Exception):
    """Worth another attempt: connection refused or reset, timeout, 5xx, 408, 429."""


class PermanentDeliveryError(Exception):
    """Not worth another: the receiver rejected the payload (4xx)."""


def post(url: str, body: bytes, timeout: float) -> None:
    req = urllib.request.Request(  # noqa: S310 (the schema allows http and https URLs only)
        url, data=body, method="POST", headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(req, timeout=timeout) as response:  # noqa: S310 (as above)
            response.read(65536)
    except urllib.error.HTTPError as e:
        if e.code >= 500 or e.code in {408, 429}:
            raise TemporaryDeliveryError(f"HTTP {e.code}") from None
        raise PermanentDeliveryError(f"HTTP {e.code}") from None
    except (OSError, ValueError) as e:  # URLError, refused, reset, timeout
        raise TemporaryDeliveryError(f"{type(e).__name__}: {e}") from None


class Sender:
    """The thread that empties the queue. `wake()` after a push; `stop()` ends it, putting a
    notification it was retrying back in the queue with the attempts it made."""

    def __init__(
        self,
        path: Path,
        notify: Notify,
        clock: Clock,
        post_fn: Callable[[str, bytes, float], None] = post,
        backoff_min: float = 1.0,
    ) -> None:
        self.path = path
        self.notify = notify
        self.clock = clock
        self.post_fn = post_fn
        self.backoff_min = backoff_min
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._idle = threading.Event()
        # wake() and the thread's "queue empty, nothing new" check must not interleave, or a
        # push right after an empty claim could be reported idle.
        self._idle_lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="remediator-notify", daemon=True)
        self._thread.start()

    def wake(self) -> None:
        with self._idle_lock:
            self._idle.clear()
            self._wake.set()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def wait_idle(self, timeout: float) -> bool:
        """Until the queue is empty (or only holds rows another process leased)."""
        return self._idle.wait(timeout)

    def _lease(self) -> float:
        n = self.notify
        return n.attempts * (n.backoff_max + max((w.timeout for w in n.webhooks), default=5.0)) + 60

    def _run(self) -> None:
        queue = Queue(self.path, self.notify.queue_max)
        try:
            while not self._stop.is_set():
                row = queue.claim(self.clock.now(), self._lease())
                if row is None:
                    with self._idle_lock:
                        if not self._wake.is_set():
                            self._idle.set()
                    self._wake.wait(5.0)
                    self._wake.clear()
                    continue
                self._deliver(queue, row)
        except Exception as e:  # a broken queue file must not kill the daemon
            log.error("notification_sender_failed", error=f"{type(e).__name__}: {e}", queue=str(self.path))
        finally:
            self._idle.set()
            queue.close()

    def _deliver(self, queue: Queue, row: Row) -> None:
        left = max(self.notify.attempts - row.attempts, 1)
        made = 0

        def attempt() -> None:
            nonlocal made
            made += 1
            self.post_fn(row.url, row.body, row.timeout)

        def sleep(seconds: float) -> None:
            self._stop.wait(seconds)  # a stop interrupts the back-off at once

        retrying = Retrying(
            stop=stop_after_attempt(left) | stop_when_event_set(self._stop),
            wait=wait_exponential(
                multiplier=self.backoff_min, min=self.backoff_min, max=self.notify.backoff_max
            ),
            retry=retry_if_exception_type(TemporaryDeliveryError),
            sleep=sleep,
            reraise=False,
        )
        try:
            retrying(attempt)
        except RetryError as e:
            error = str(e.last_attempt.exception())
            if self._stop.is_set() and row.attempts + made < self.notify.attempts:
                queue.release(row.id, row.attempts + made)
                return
            queue.done(row.id)
            log.error(
                "notification_dropped",
                url=row.url,
                attempts=row.attempts + made,
                error=error,
                reason="gave up",
            )
            return
        except PermanentDeliveryError as e:
            queue.done(row.id)
            log.error(
                "notification_dropped",
                url=row.url,
                attempts=row.attempts + made,
                error=str(e),
                reason="rejected",
            )
            return
        queue.done(row.id)
        log.info("notification_delivered", url=row.url, attempts=row.attempts + made)

    def _dropped(self, row: Row, made: int, error: str, reason: str) -> None:
        attempts = row.attempts + made
        log.error("notification_dropped", url=row.url, attempts=attempts, error=error, reason=reason)


class Notifier:
    """What the runtime calls after each cycle: journal events always; webhooks through the
    queue when configured."""

    def __init__(self, state_dir: Path, notify: Notify, clock: Clock, host: str) -> None:
        self.path = state_dir / "notify.db"
        self.notify = notify
        self.clock = clock
        self.host = host
        self.sender: Sender | None = None

    def start(self) -> None:
        """Start sending (also what an earlier run left in the queue)."""
        if self.sender is None and (self.notify.webhooks or self.path.exists()):
            self.sender = Sender(self.path, self.notify, self.clock)
            self.sender.start()

    def stop(self, timeout: float = 10.0) -> None:
        if self.sender is not None:
            self.sender.stop(timeout)
            self.sender = None

    def cycle(self, report: CycleReport) -> list[Notification]:
        notes = from_cycle(report, self.host, self.notify.events)
        for n in notes:
            log.warning("notification", **{k: v for k, v in n.to_dict().items() if k != "format"})
        if notes and self.notify.webhooks:
            self._enqueue(notes)
        return notes

    def _enqueue(self, notes: list[Notification]) -> None:
        try:
            queue = Queue(self.path, self.notify.queue_max)
        except sqlite3.Error as e:
            log.error("notification_queue_failed", error=str(e), queue=str(self.path))
            return
        try:
            for n in notes:
                for w in self.notify.webhooks:
                    dropped = queue.push(w.url, w.timeout, payload(n, w.format), self.clock.now())
                    if dropped:
                        log.error("notification_dropped", url=w.url, count=dropped, reason="queue full")
        except sqlite3.Error as e:
            log.error("notification_queue_failed", error=str(e), queue=str(self.path))
        finally:
            queue.close()
        if self.sender is not None:
            self.sender.wake()

    def flush(self, timeout: float) -> None:
        """For `once`: send what is queued for at most `timeout` seconds, then stop; what is
        left waits in the queue for the next run or the daemon."""
        self.start()
        if self.sender is not None:
            self.sender.wake()
            self.sender.wait_idle(timeout)
        self.stop()


__all__ = ["Notification", "Notifier", "Queue", "Sender", "Webhook", "from_cycle", "payload"]
