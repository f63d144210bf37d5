"""Mutated policy sets through a real daemon's SIGHUP reload: after each bad set the daemon is
still running, has logged the rejection with file:line and kept its last good set; a good set
afterwards is taken. And a daemon that cannot start says so and exits with a status that the
systemd unit does not restart.

A real `remediator run --dry-run` process on a fixture host tree (no Docker, nothing acted on),
as tests/unit/test_daemon.py runs it."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests import fuzzing

HERE = Path(__file__).parent.parent
SETS = 300
SEED = 66
# file:line at the start of every reported error (a path, a colon, a line number).
FILE_LINE = re.compile(r"^/\S+\.ya?ml:\d+: ")

GOOD = """\
apiVersion: remediator.io/v1
kind: Policy
metadata:
  name: {name}
spec:
  mode: audit
  interval: 1h
  watch: {{probe: dentries, metric: negative, above: 1M}}
  actions: [{{action: drop-caches}}]
"""


class AuditLog:
    """Follows STATE/audit.jsonl as the daemon appends to it."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = 0
        self.events: list[dict[str, Any]] = []
        self.cursor = 0  # events before this one were looked at by an earlier wait_for

    def wait_for(self, names: set[str], proc: subprocess.Popen[str], timeout: float = 30) -> dict[str, Any]:
        """The next event (after the one the last call returned) named one of `names`. Events
        read in the same chunk after a match stay for the next call."""
        deadline = time.monotonic() + timeout
        while True:
            while self.cursor < len(self.events):
                event = self.events[self.cursor]
                self.cursor += 1
                if event["event"] in names:
                    return event
            if time.monotonic() >= deadline:
                raise AssertionError(f"no {names} within {timeout} s")
            if self.path.exists():
                with self.path.open() as f:
                    f.seek(self.offset)
                    chunk = f.read()
                # Only whole lines: the daemon may be in the middle of writing one.
                complete = chunk[: chunk.rfind("\n") + 1]
                self.offset += len(complete.encode())
                self.events.extend(json.loads(line) for line in complete.splitlines())
                if self.cursor < len(self.events):
                    continue
            assert proc.poll() is None, f"daemon exited with {proc.returncode}"
            time.sleep(0.02)


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[str], Path, AuditLog]]:
    host = tmp_path / "host"
    shutil.copytree(HERE / "fixtures" / "host", host)
    (host / "run").mkdir()
    policies = tmp_path / "policies"
    policies.mkdir()
    (policies / "a.yaml").write_text(GOOD.format(name="first"))
    state = tmp_path / "state"
    env = {
        **os.environ,
        "REMEDIATOR_HOST_ROOT": str(host),
        "REMEDIATOR_STATE_DIR": str(state),
        "REMEDIATOR_POLICIES": str(policies),
        "REMEDIATOR_DOCKER_URL": f"unix://{tmp_path}/no-docker.sock",
    }
    for var in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"):
        env.pop(var, None)
    with (tmp_path / "stdout").open("w") as out, (tmp_path / "stderr").open("w") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "remediator", "run", "--dry-run"],
            env=env,
            text=True,
            stdout=out,
            stderr=err,
        )
    try:
        yield proc, policies, AuditLog(state / "audit.jsonl")
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)


def test_every_bad_set_is_rejected_on_sighup_and_the_daemon_keeps_running(
    daemon: tuple[subprocess.Popen[str], Path, AuditLog], tmp_path: Path
) -> None:
    proc, policies, log = daemon
    log.wait_for({"daemon_started"}, proc)
    mutated = fuzzing.mutated_files(tmp_path / "mutated", SETS, SEED)
    kept = 1
    rejected = accepted = 0
    started = time.monotonic()
    for path in mutated:
        # The good a.yaml stays; the mutated file joins it, as a bad `git pull` would add one.
        shutil.copyfile(path, policies / "b.yaml")
        proc.send_signal(signal.SIGHUP)
        event = log.wait_for({"policies_reload_failed", "policies_reloaded"}, proc)
        if event["event"] == "policies_reload_failed":
            rejected += 1
            assert event["kept"] == kept, event
            for error in event["errors"]:
                assert FILE_LINE.match(error), (error, path)
        else:
            accepted += 1
            kept = len(event["policies"])
    wall = time.monotonic() - started
    assert proc.poll() is None
    assert rejected > SETS // 2

    # A good set afterwards is taken and evaluated.
    (policies / "b.yaml").write_text(GOOD.format(name="second"))
    proc.send_signal(signal.SIGHUP)
    event = log.wait_for({"policies_reload_failed", "policies_reloaded"}, proc)
    assert event["event"] == "policies_reloaded" and event["policies"] == ["first", "second"], event
    log.wait_for({"policy_evaluated"}, proc)  # scheduled right away
    assert not [e for e in log.events if e["event"] == "internal_error"]
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(20) == 0
    print(f"\nreload fuzz: {SETS} reloads in {wall:.1f} s, {rejected} rejected, {accepted} accepted")


def _unit_restart_prevented() -> set[int]:
    unit = (HERE.parent / "systemd" / "remediator.service").read_text()
    (line,) = [x for x in unit.splitlines() if x.startswith("RestartPreventExitStatus=")]
    return {int(v) for v in line.split("=", 1)[1].split()}


@pytest.mark.parametrize(
    "make",
    ["empty-directory", "fifo", "billion-laughs", "interval-overflow", "nul-byte", "controller-only"],
)
def test_a_daemon_that_cannot_start_says_so_and_is_not_restarted(tmp_path: Path, make: str) -> None:
    policies = tmp_path / "policies"
    policies.mkdir()
    target: Path = policies
    if make == "fifo":
        target = tmp_path / "fifo.yaml"
        os.mkfifo(target)
    elif make == "billion-laughs":
        (policies / "a.yaml").write_text(
            'a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]\n'
            + "".join(
                f"{c}: &{c} [{','.join([f'*{p}'] * 9)}]\n"
                for p, c in zip("abcdefgh", "bcdefghi", strict=True)
            )
        )
    elif make == "interval-overflow":
        (policies / "a.yaml").write_text(
            GOOD.format(name="p").replace("interval: 1h", "interval: 1000000000d")
        )
    elif make == "nul-byte":
        (policies / "a.yaml").write_text(GOOD.format(name="p").replace("1M", "1\x00M"))
    elif make == "controller-only":
        (policies / "a.yaml").write_text("apiVersion: remediator.io/v1\nkind: Controller\n")
    proc = subprocess.run(
        [sys.executable, "-m", "remediator", "run", "--dry-run", "--policies", str(target)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={**os.environ, "REMEDIATOR_STATE_DIR": str(tmp_path / "state")},
    )
    assert proc.returncode in _unit_restart_prevented(), proc.stderr
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    # One message: a header and one line per error, each naming the path (and line, in a file).
    assert lines[0].startswith("remediator: "), lines
    assert all(str(tmp_path) in line for line in lines[1:]), lines
