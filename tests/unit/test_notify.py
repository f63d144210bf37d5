"""Notifications: what a cycle notifies (pure), both payload formats, and delivery against a
real HTTP server on loopback: retried on 500, given up after `attempts`, not retried on 400,
never sent from the cycle itself, a queue that stays bounded and that a restart resumes, and
`once` delivering to a webhook named in the Controller document."""

from __future__ import annotations

import http.server
import json
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from remediator.clock import FakeClock, SystemClock
from remediator.engine import ActionReport, CycleReport, PolicyReport
from remediator.model import (
    ActionResult,
    Decision,
    DecisionKind,
    Mode,
    Outcome,
    Phase,
    Plan,
    Target,
    TargetKind,
)
from remediator.notify import Notification, Notifier, Queue, Sender, alertmanager_payload, from_cycle, payload
from remediator.policy.rules import Notify, Webhook
from remediator.state import BreakerState
from tests.helpers import make_policy
from tests.unit.test_cli import env, host, run  # noqa: F401 (fixtures)

POLICY = make_policy(name="fh")
ALL = frozenset({"applied", "failed", "escalation", "breaker"})


def act(step: int, outcome: Outcome) -> ActionReport:
    d = Decision("fh", "host", DecisionKind.ACT, Phase.FIRING, "", step=step, action="raise-sysctl")
    plan = Plan("raise-sysctl", Target(TargetKind.SYSCTL, "fs.file-max"), "raise fs.file-max")
    return ActionReport(d, Mode.ENFORCE, "", plan, ActionResult(outcome, f"it {outcome.value}"))


def cycle(*actions: ActionReport, breaker: BreakerState | None = None, at: float = 100.0) -> CycleReport:
    pr = PolicyReport(POLICY, actions=list(actions))
    return CycleReport(at, "live", False, {}, [pr], breaker or BreakerState())


def test_what_a_cycle_notifies() -> None:
    report = cycle(
        act(0, Outcome.APPLIED),
        act(1, Outcome.APPLIED),
        act(0, Outcome.FAILED),
        act(0, Outcome.WOULD_APPLY),
        act(0, Outcome.SKIPPED),
        breaker=BreakerState(True, 100.0, "too many"),
    )
    notes = from_cycle(report, "h1", ALL)
    assert [n.kind for n in notes] == ["applied", "escalation", "failed", "breaker"]
    assert notes[0].summary == "fh: raise fs.file-max (applied)" and notes[0].message == "it applied"
    assert notes[3].message == "too many"
    # Filtered by `events`; an escalation not asked for is still an applied action.
    assert [n.kind for n in from_cycle(report, "h1", frozenset({"applied"}))] == ["applied", "applied"]
    # A breaker that opened in an earlier cycle is not notified again.
    assert from_cycle(cycle(breaker=BreakerState(True, 50.0, "old")), "h1", ALL) == []


def test_payload_formats() -> None:
    n = Notification(
        "failed", 0.0, "h1", "live", "fh: x (failed)", "boom", "fh", "host", "raise-sysctl", 0, "failed"
    )
    generic = json.loads(payload(n, "generic"))
    assert generic["format"] == "remediator.notification/v1" and generic["kind"] == "failed"
    assert generic["at"] == "1970-01-01T00:00:00+00:00"
    (alert,) = alertmanager_payload(n)
    assert alert["labels"] == {
        "alertname": "RemediatorActionFailed",
        "severity": "warning",
        "instance": "h1",
        "namespace": "live",
        "policy": "fh",
        "subject": "host",
        "action": "raise-sysctl",
        "outcome": "failed",
    }
    assert alert["annotations"] == {"summary": "fh: x (failed)", "description": "boom"}
    assert alert["endsAt"] == "1970-01-01T01:00:00+00:00"
    assert json.loads(payload(n, "alertmanager")) == [alert]


class Receiver:
    """A webhook receiver on 127.0.0.1 that answers with scripted status codes (then 200)."""

    def __init__(self, port: int = 0) -> None:
        self.codes: list[int] = []
        self.bodies: list[Any] = []
        self.requests = 0
        receiver = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                receiver.requests += 1
                code = receiver.codes.pop(0) if receiver.codes else 200
                if code == 200:
                    receiver.bodies.append(json.loads(body))
                self.send_response(code)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.close()


def config(url: str, attempts: int = 3, **kw: Any) -> Notify:
    return Notify(webhooks=(Webhook(url, "generic", 2.0),), attempts=attempts, backoff_max=0.05, **kw)


def fast_sender(path: Path, notify: Notify) -> Sender:
    return Sender(path, notify, SystemClock(), backoff_min=0.01)


def enqueue(tmp_path: Path, notify: Notify, n: int = 1) -> Notifier:
    notifier = Notifier(tmp_path, notify, SystemClock(), "h1")
    for _ in range(n):
        notifier.cycle(cycle(act(0, Outcome.APPLIED)))
    return notifier


def drain(sender: Sender, timeout: float = 10.0) -> None:
    sender.start()
    sender.wake()
    assert sender.wait_idle(timeout), "the sender did not empty the queue in time"
    sender.stop()


def test_the_cycle_only_queues_and_journals(tmp_path: Path, receiver: Receiver) -> None:
    with capture_logs() as logs:
        notes = enqueue(tmp_path, config(receiver.url)).cycle(cycle(act(0, Outcome.FAILED)))
    assert [n.kind for n in notes] == ["failed"]
    # Always in the journal: one event per notification (enqueue's applied, then the failure).
    kinds = [(e["event"], e["kind"]) for e in logs]
    assert kinds == [("notification", "applied"), ("notification", "failed")]
    assert logs[1]["policy"] == "fh" and logs[1]["message"] == "it failed"
    assert receiver.requests == 0  # no network from the cycle: the sender thread posts
    q = Queue(tmp_path / "notify.db", 100)
    assert q.pending() == 2
    q.close()


def test_retried_on_500_then_delivered(tmp_path: Path, receiver: Receiver) -> None:
    receiver.codes = [500, 503]
    notify = config(receiver.url, attempts=5)
    enqueue(tmp_path, notify)
    with capture_logs() as logs:
        drain(fast_sender(tmp_path / "notify.db", notify))
    assert receiver.requests == 3
    assert receiver.bodies[0]["kind"] == "applied" and receiver.bodies[0]["host"] == "h1"
    delivered = [e for e in logs if e["event"] == "notification_delivered"]
    assert [e["attempts"] for e in delivered] == [3]
    assert Queue(tmp_path / "notify.db", 100).pending() == 0


def test_given_up_after_attempts(tmp_path: Path, receiver: Receiver) -> None:
    receiver.codes = [500] * 10
    notify = config(receiver.url, attempts=3)
    enqueue(tmp_path, notify)
    with capture_logs() as logs:
        drain(fast_sender(tmp_path / "notify.db", notify))
    assert receiver.requests == 3  # bounded: exactly `attempts` POSTs
    (dropped,) = [e for e in logs if e["event"] == "notification_dropped"]
    assert dropped["reason"] == "gave up" and dropped["attempts"] == 3 and "HTTP 500" in dropped["error"]
    assert Queue(tmp_path / "notify.db", 100).pending() == 0


def test_a_rejection_is_not_retried(tmp_path: Path, receiver: Receiver) -> None:
    receiver.codes = [400]
    notify = config(receiver.url, attempts=5)
    enqueue(tmp_path, notify)
    with capture_logs() as logs:
        drain(fast_sender(tmp_path / "notify.db", notify))
    assert receiver.requests == 1
    assert [e["reason"] for e in logs if e["event"] == "notification_dropped"] == ["rejected"]


def test_the_queue_is_bounded(tmp_path: Path, receiver: Receiver) -> None:
    notify = config(receiver.url, queue_max=10)
    with capture_logs() as logs:
        enqueue(tmp_path, notify, n=15)
    assert Queue(tmp_path / "notify.db", 10).pending() == 10
    assert sum(e["count"] for e in logs if e["event"] == "notification_dropped") == 5


def test_a_restart_resumes_the_queue(tmp_path: Path, receiver: Receiver) -> None:
    url = receiver.url
    receiver.close()  # the receiver is down: connection refused
    notify = config(url, attempts=10)
    enqueue(tmp_path, notify, n=2)
    sender = Sender(tmp_path / "notify.db", replace(notify, backoff_max=0.2), SystemClock(), backoff_min=0.1)
    sender.start()
    time.sleep(0.5)  # a few refused attempts on the first notification
    sender.stop()  # the daemon stops in the middle of retrying
    q = Queue(tmp_path / "notify.db", 100)
    assert q.pending() == 2
    first = q.claim(0.0, 0.0)  # lease 0: look without holding
    assert first is not None and 1 <= first.attempts < 10
    q.close()

    # The receiver is back on the same port; a new process (new sender) delivers both.
    back = Receiver(int(url.rsplit(":", 1)[1].split("/")[0]))
    try:
        with capture_logs() as logs:
            drain(fast_sender(tmp_path / "notify.db", notify))
        assert back.requests == 2
        attempts = [e["attempts"] for e in logs if e["event"] == "notification_delivered"]
        assert attempts == [first.attempts + 1, 1]  # the count went on across the restart
    finally:
        back.close()


CONTROLLER = """\
apiVersion: remediator.io/v1
kind: Controller
spec:
  notify:
    webhooks:
      - url: {url}
        format: alertmanager
"""


def test_once_delivers_to_the_controllers_webhook(env: dict[str, str], receiver: Receiver) -> None:  # noqa: F811
    (Path(env["REMEDIATOR_POLICIES"]) / "controller.yaml").write_text(CONTROLLER.format(url=receiver.url))
    code, _, err = run(["once"], env)
    assert code == 0, err
    (alerts,) = receiver.bodies
    assert alerts[0]["labels"]["alertname"] == "RemediatorActionApplied"
    assert alerts[0]["labels"]["policy"] == "watches"
    assert Queue(Path(env["REMEDIATOR_STATE_DIR"]) / "notify.db", 100).pending() == 0


def test_fake_clock_leases(tmp_path: Path) -> None:
    """A leased row is invisible to another sender until its lease ends (timer vs daemon)."""
    clock = FakeClock(1000.0)
    q = Queue(tmp_path / "notify.db", 100)
    q.push("http://127.0.0.1:1/", 1.0, b"{}", clock.now())
    assert q.claim(clock.now(), 60.0) is not None
    assert q.claim(clock.now() + 30, 60.0) is None
    assert q.claim(clock.now() + 61, 60.0) is not None
    q.close()
