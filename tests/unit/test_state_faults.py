"""Faults around the controller's own state and provenance (issue: bad input and faults):
state-directory mistakes are one line with exit 2, provenance never writes into the operator's
checkout, a starting daemon never marks another instance's running action, the breaker counts
only steps that were about to apply, audit events say `audit`, history stays bounded, library
logs stay JSON."""

from __future__ import annotations

import io
import json
import logging
import os
import shutil
import sqlite3
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from remediator import audit
from remediator.clock import FakeClock, SystemClock
from remediator.daemon import Daemon
from remediator.engine import keep_state_bounded
from remediator.model import Condition, Outcome, Phase
from remediator.policy.loader import git_info
from remediator.policy.rules import Controller, PolicySet
from remediator.settings import Settings
from remediator.state import MAX_STORED_LIST, InstanceLock, StateStore
from tests.helpers import copy_fixture_host, make_policy, run_cli

HERE = Path(__file__).parent.parent
POLICIES = HERE.parent / "policies"


run = run_cli


@pytest.fixture
def host(tmp_path: Path) -> Path:
    return copy_fixture_host(tmp_path / "host")


def env_for(host: Path, tmp_path: Path, state: Path) -> dict[str, str]:
    return {
        "REMEDIATOR_HOST_ROOT": str(host),
        "REMEDIATOR_STATE_DIR": str(state),
        "REMEDIATOR_POLICIES": str(POLICIES),
        "REMEDIATOR_DOCKER_URL": f"unix://{tmp_path}/no-docker.sock",
        "REMEDIATOR_LOG_LEVEL": "error",
    }


def _state_file(tmp_path: Path) -> Path:
    p = tmp_path / "state-is-a-file"
    p.write_text("x")
    return p


def _garbage_db(tmp_path: Path) -> Path:
    d = tmp_path / "garbage"
    d.mkdir()
    (d / "state.db").write_bytes(bytes(range(256)) * 20)
    return d


def _db_is_dir(tmp_path: Path) -> Path:
    d = tmp_path / "dbdir"
    (d / "state.db").mkdir(parents=True)
    return d


def _foreign_sqlite(tmp_path: Path) -> Path:
    d = tmp_path / "foreign"
    d.mkdir()
    db = sqlite3.connect(d / "state.db")
    db.execute("CREATE TABLE t (x)")
    db.commit()
    db.close()
    return d


STATE_PROBLEMS = {
    "state dir is a file": (_state_file, "the state directory is not a directory"),
    "garbage state.db": (_garbage_db, "cannot use the state database: file is not a database"),
    "state.db is a directory": (_db_is_dir, "expected the state database file"),
    "state.db of another program": (_foreign_sqlite, "not a remediator state database"),
}


@pytest.mark.parametrize("command", ["status", "audit", "once", "reset-breaker"])
@pytest.mark.parametrize("problem", sorted(STATE_PROBLEMS))
def test_state_dir_problems_are_one_line_usage_errors(
    host: Path, tmp_path: Path, command: str, problem: str
) -> None:
    make, message = STATE_PROBLEMS[problem]
    state = make(tmp_path)
    code, out, err = run([command], env_for(host, tmp_path, state))
    assert code == 2, (out, err)
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], err


def test_lock_that_is_a_directory_is_a_usage_error(host: Path, tmp_path: Path) -> None:
    state = tmp_path / "state"
    (state / "lock").mkdir(parents=True)
    code, _, err = run(["once"], env_for(host, tmp_path, state))
    assert code == 2
    assert err.strip() == f"remediator: {state / 'lock'}: cannot open the instance lock: Is a directory"


def test_status_limit_must_not_be_negative(host: Path, tmp_path: Path) -> None:
    code, _, err = run(["status", "--limit", "-5"], env_for(host, tmp_path, tmp_path / "s"))
    assert code == 2 and "-5 is not in the range x>=0" in err


def test_validate_needs_no_state_dir(tmp_path: Path) -> None:
    # An unreadable or odd state dir is no business of validate's.
    code, out, err = run(["validate", str(POLICIES)], {"REMEDIATOR_STATE_DIR": str(_state_file(tmp_path))})
    assert (code, err) == (0, "") and out.startswith("ok: ")


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (bytes(range(128, 256)) * 10, "is not UTF-8 (a binary file?)"),
        (
            b'{"format": "remediator.record/v1", "at": 1, "readings": {"x": {"probe": "x", "taken_at": 1, '
            b'"values": {"m": "high"}}}}\n',
            "readings.x.values.m: expected a number",
        ),
        (b'{"format": "remediator.record/v1", "at": 1e999, "readings": {}}\n', "finite"),
        (b"[" * 100_000 + b"\n", "not a remediator recording line"),
        (b'{"format": "remediator.record/v1", "at": 1, "readings": {"x": []}}\n', "expected an object"),
    ],
)
def test_bad_recordings_are_usage_errors(tmp_path: Path, content: bytes, message: str) -> None:
    rec = tmp_path / "rec.jsonl"
    rec.write_bytes(content)
    code, _, err = run(["replay", str(rec), "--policies", str(POLICIES)])
    assert code == 2 and "Traceback" not in err
    assert message in err and len(err.strip().splitlines()) == 1, err


# -- provenance is read-only ------------------------------------------------------------------


def _git(repo: Path, *args: str) -> None:
    subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True)


@pytest.fixture
def checkout(tmp_path: Path) -> Path:
    repo = tmp_path / "checkout"
    shutil.copytree(POLICIES, repo)
    _git(repo, "init", "-q")
    _git(repo, "add", "-A")
    _git(repo, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "policies")
    return repo


def test_git_info_never_writes_the_index(checkout: Path) -> None:
    index = checkout / ".git" / "index"
    # Make the index stale (a touched file) so that a refreshing `git status` would rewrite it.
    (checkout / "controller.yaml").touch()
    os.utime(index, (1, 1))
    before = index.stat()
    for _ in range(20):
        commit, dirty = git_info(checkout)
        assert commit is not None and len(commit) == 40 and dirty is False
    after = index.stat()
    assert (after.st_ino, after.st_mtime_ns, after.st_size) == (
        before.st_ino,
        before.st_mtime_ns,
        before.st_size,
    )
    assert not (checkout / ".git" / "index.lock").exists()


def test_git_info_runs_no_program_named_by_the_checkout(checkout: Path, tmp_path: Path) -> None:
    # remediator runs as root: a checkout's core.fsmonitor hook must not run as root.
    marker = tmp_path / "hook-ran"
    hook = tmp_path / "hook.sh"
    hook.write_text(f"#!/bin/sh\ntouch {marker}\n")
    hook.chmod(0o755)
    _git(checkout, "config", "core.fsmonitor", str(hook))
    commit, _ = git_info(checkout)
    assert commit is not None
    assert not marker.exists()


def test_git_info_sees_a_dirty_checkout(checkout: Path) -> None:
    (checkout / "controller.yaml").write_text((checkout / "controller.yaml").read_text() + "# edit\n")
    assert git_info(checkout)[1] is True


def test_operator_git_add_never_collides_with_validate(checkout: Path) -> None:
    """The reported race: validate in a loop while the operator runs `git add -A`."""
    stop = threading.Event()
    failures: list[str] = []

    def validate_loop() -> None:
        while not stop.is_set():
            git_info(checkout)

    t = threading.Thread(target=validate_loop)
    t.start()
    try:
        for i in range(150):
            (checkout / "note.txt").write_text(str(i))
            p = subprocess.run(
                ["git", "-C", str(checkout), "add", "-A"], check=False, capture_output=True, text=True
            )
            if p.returncode != 0:
                failures.append(p.stderr)
    finally:
        stop.set()
        t.join()
    assert failures == []


# -- the daemon and the lock ------------------------------------------------------------------


def _started_row(store: StateStore, at: float = 1.0) -> int:
    cond = Condition("inotify-watches", "host", Phase.FIRING, since=at)
    return store.start_action(
        at=at,
        policy="inotify-watches",
        subject="host",
        step=0,
        action="raise-sysctl",
        mode="enforce",
        mode_reason="enforce",
        value=1.0,
        plan={"summary": "x"},
        condition=cond,
    )


def test_a_starting_daemon_leaves_another_instances_running_action_alone(host: Path, tmp_path: Path) -> None:
    settings = Settings(
        host_root=host,
        state_dir=tmp_path / "state",
        lock_timeout=0.2,
        docker_url=f"unix://{tmp_path}/none.sock",
        dry_run=True,
    )
    from remediator.runtime import load

    ps = load([POLICIES])
    settings.state_dir.mkdir()
    store = StateStore(settings.db_path, namespace="dry-run")
    row = _started_row(store, at=time.time())
    stop = threading.Event()
    daemon = Daemon(settings, [POLICIES], ps, SystemClock())
    # Another instance (a `once` mid-action) holds the lock while the daemon starts.
    lock = InstanceLock(settings.lock_path, 1.0)
    lock.acquire()
    t = threading.Thread(target=daemon.run, args=(stop,))
    try:
        try:
            t.start()
            time.sleep(1.5)  # the daemon started; its first cycles find the lock held
            assert {r.id: r.status for r in store.actions()}[row] == "started"
        finally:
            lock.release()
        # Once the holder is gone, the next locked cycle reports it as interrupted.
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and {r.id: r.status for r in store.actions()}[row] == "started":
            daemon._run_policy(ps.policies[0].name)
    finally:
        stop.set()
        t.join(30)
    assert {r.id: r.status for r in store.actions()}[row] == "interrupted"
    store.close()


# -- history retention ------------------------------------------------------------------------


def _done_row(store: StateStore, at: float, result: dict[str, Any] | None = None) -> int:
    row = _started_row(store)
    store._db.execute("UPDATE actions SET at=? WHERE id=?", (at, row))
    store.finish_action(row, Outcome.APPLIED, result or {"ok": True})
    return row


def test_history_is_pruned_by_age_and_count_but_never_inside_a_window(tmp_path: Path) -> None:
    store = StateStore(tmp_path / "state.db")
    now = 100 * 86400.0
    for i in range(300):  # 300 old rows, one an hour, ending 10 days ago
        _done_row(store, now - 10 * 86400 - i * 3600)
    recent = [_done_row(store, now - 60 * i) for i in range(1, 151)]  # last 2.5 hours
    crashed = _started_row(store)
    store._db.execute("UPDATE actions SET at=? WHERE id=?", (now - 90 * 86400, crashed))
    ps = PolicySet(
        "/p",
        (make_policy(budget_window=3 * 3600.0),),
        Controller(history_max_age=20 * 86400.0, history_max_actions=100),
    )
    removed = keep_state_bounded(store, ps, now)
    ids = {r.id for r in store.actions()}
    # Every row of the last 3 hours stays (budget window), though that is over maxActions;
    # the started row stays; every old row goes (over the count).
    assert set(recent) <= ids and crashed in ids
    assert len(ids) == 151 and removed == 300
    store.close()


def test_history_age_limit_removes_old_rows(tmp_path: Path) -> None:
    store = StateStore(tmp_path / "state.db")
    now = 100 * 86400.0
    old = _done_row(store, now - 40 * 86400)
    kept = _done_row(store, now - 10 * 86400)
    ps = PolicySet("/p", (make_policy(),), Controller(history_max_age=30 * 86400.0, history_max_actions=5000))
    assert keep_state_bounded(store, ps, now) == 1
    assert [r.id for r in store.actions()] == [kept] and old != kept
    store.close()


def test_stored_results_keep_lists_bounded(tmp_path: Path) -> None:
    store = StateStore(tmp_path / "state.db")
    row = _done_row(store, 10.0, {"removed": [f"/run/containerd/fifo/{i}" for i in range(100_000)]})
    (stored,) = [r for r in store.actions() if r.id == row]
    assert stored.result is not None
    removed = stored.result["removed"]
    assert len(removed) == MAX_STORED_LIST + 1
    assert removed[-1] == f"... {100_000 - MAX_STORED_LIST} more not stored (see the audit log)"
    assert (tmp_path / "state.db").stat().st_size < 200_000
    store.close()


def test_once_keeps_history_bounded(host: Path, tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    store = StateStore(state / "state.db")
    for i in range(6000):
        _done_row(store, time.time() - 2 * 86400 - i)  # inside maxAge, outside every window
    store.close()
    code, _, err = run(["once"], env_for(host, tmp_path, state))
    assert code == 0, err
    store = StateStore(state / "state.db", readonly=True)
    assert store.size() == 5000  # the bundled controller.yaml: maxActions 5000
    store.close()


# -- audit's events, library logs -------------------------------------------------------------


def test_audit_events_say_audit_not_live(host: Path, tmp_path: Path) -> None:
    state = tmp_path / "state"
    code, _, err = run(["once"], env_for(host, tmp_path, state))  # some live state to read
    assert code == 0, err
    trail = state / "audit.jsonl"
    seen = len(trail.read_text().splitlines())
    code, _, err = run(["audit"], env_for(host, tmp_path, state))
    assert code == 0, err
    new = [json.loads(x) for x in trail.read_text().splitlines()[seen:]]
    engine_events = [e for e in new if "namespace" in e]
    assert {e["event"] for e in engine_events} >= {"probe_read", "policy_evaluated"}
    assert {e["namespace"] for e in engine_events} == {"audit"}


def test_library_warnings_are_json_events() -> None:
    stream = io.StringIO()
    audit.configure(level="info", fmt="json", stream=stream)
    try:
        logging.getLogger("apscheduler.executors.default").warning(
            "Run time of job %r was missed by %s", "policy:x", "0:00:05"
        )
        logging.getLogger("apscheduler.scheduler").info("Added job")  # chatter: not an event
    finally:
        audit.configure(level="warning", fmt="json")
    lines = stream.getvalue().splitlines()
    assert len(lines) == 1
    event = json.loads(lines[0])
    assert event["event"] == "library_log" and event["level"] == "warning"
    assert event["logger"] == "apscheduler.executors.default"
    assert event["message"] == "Run time of job 'policy:x' was missed by 0:00:05"


def test_fake_clock_history_prune_is_idempotent(tmp_path: Path) -> None:
    clock = FakeClock(start=50 * 86400.0)
    store = StateStore(tmp_path / "state.db")
    for i in range(10):
        _done_row(store, clock.now() - 40 * 86400 - i)
    ps = PolicySet("/p", (make_policy(),), Controller())
    assert keep_state_bounded(store, ps, clock.now()) == 10
    assert keep_state_bounded(store, ps, clock.now()) == 0
    store.close()


def test_replay_refuses_an_endless_hold(tmp_path: Path) -> None:
    rec = tmp_path / "rec.jsonl"
    rec.write_text('{"format": "remediator.record/v1", "at": 1, "readings": {}}\n')
    started = time.monotonic()
    code, _, err = run(["replay", str(rec), "--hold", "366d", "--every", "1ms", "--policies", str(POLICIES)])
    assert code == 2 and "at most 100,000 in one replay" in err and "Traceback" not in err
    assert time.monotonic() - started < 30
