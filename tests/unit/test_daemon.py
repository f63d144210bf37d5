"""The daemon as systemd runs it: a real process, a real notify socket, real signals."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from remediator import daemon as daemon_module
from tests.helpers import listen_port

HERE = Path(__file__).parent.parent

GOOD = """\
apiVersion: remediator.io/v1
kind: Policy
metadata:
  name: {name}
spec:
  mode: audit
  interval: 1s
  watch: {{probe: dentries, metric: negative, above: 1M}}
  actions: [{{action: drop-caches}}]
"""


class Notify:
    """A stand-in for systemd's notify socket. Like systemd it reads every datagram as it comes
    (a unix datagram queue holds only net.unix.max_dgram_qlen messages, 10 by default)."""

    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.2)
        self.messages: list[str] = []
        self._seen = threading.Condition()
        self._closed = False
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        while not self._closed:
            try:
                msg = self.sock.recv(4096).decode()
            except TimeoutError:
                continue
            except OSError:
                return
            with self._seen:
                self.messages.append(msg)
                self._seen.notify_all()

    def wait_for(self, needle: str, start: int = 0) -> str:
        """The first message from index `start` on that contains `needle`."""
        with self._seen:
            found = self._seen.wait_for(
                lambda: next((m for m in self.messages[start:] if needle in m), None), timeout=20
            )
        assert found is not None, f"no {needle!r} in {self.messages[start:]}"
        return found

    def close(self) -> None:
        self._closed = True
        self._reader.join(5)
        self.sock.close()


PORT = listen_port()


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[str], Notify, Path, Path]]:
    host = tmp_path / "host"
    shutil.copytree(HERE / "fixtures" / "host", host)
    (host / "run").mkdir()
    policies = tmp_path / "policies"
    policies.mkdir()
    (policies / "a.yaml").write_text(GOOD.format(name="first"))
    notify = Notify(tmp_path / "notify.sock")
    state = tmp_path / "state"
    env = {
        **os.environ,
        "NOTIFY_SOCKET": str(tmp_path / "notify.sock"),
        "WATCHDOG_USEC": "1000000",
        "REMEDIATOR_HOST_ROOT": str(host),
        "REMEDIATOR_STATE_DIR": str(state),
        "REMEDIATOR_POLICIES": str(policies),
        "REMEDIATOR_DOCKER_URL": f"unix://{tmp_path}/no-docker.sock",
        "REMEDIATOR_METRICS_ADDRESS": f"127.0.0.1:{PORT}",
    }
    env.pop("WATCHDOG_PID", None)
    # Output goes to files: nobody reads a pipe while the test runs, and a full pipe would
    # block the daemon's logging.
    with (tmp_path / "stdout").open("w") as out, (tmp_path / "stderr").open("w") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "remediator", "run"], env=env, text=True, stdout=out, stderr=err
        )
    try:
        yield proc, notify, policies, state
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)
        notify.close()


def events(state: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in (state / "audit.jsonl").read_text().splitlines()]


def test_ready_watchdog_reload_and_clean_stop(
    daemon: tuple[subprocess.Popen[str], Notify, Path, Path],
) -> None:
    proc, notify, policies, state = daemon
    assert "READY=1" in notify.wait_for("READY=1")
    notify.wait_for("WATCHDOG=1")  # pinged every WATCHDOG_USEC/2 from the cycle executor

    # A broken policy set is rejected; the daemon keeps its last good set and says so.
    (policies / "b.yaml").write_text("apiVersion: remediator.io/v1\nkind: Policy\nmetadata: {name: x}\n")
    proc.send_signal(signal.SIGHUP)
    assert "reload failed" in notify.wait_for("STATUS=reload failed")
    assert proc.poll() is None
    failed = [e for e in events(state) if e["event"] == "policies_reload_failed"]
    assert failed and "b.yaml:1: spec: required field is missing" in str(failed[0]["errors"])

    # A good set replaces it.
    (policies / "b.yaml").write_text(GOOD.format(name="second"))
    proc.send_signal(signal.SIGHUP)
    notify.wait_for("STATUS=2 policies")
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        seen = {e.get("policy") for e in events(state) if e["event"] == "policy_evaluated"}
        if {"first", "second"} <= seen:
            break
        time.sleep(0.2)
    assert {"first", "second"} <= seen

    # Prometheus: each policy's cycles are timed, readings and the loaded set are exported.
    with urllib.request.urlopen(f"http://127.0.0.1:{PORT}/metrics", timeout=10) as response:
        exposition = response.read().decode()
    samples = {
        line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
        for line in exposition.splitlines()
        if line and not line.startswith("#")
    }
    assert samples['remediator_cycle_seconds_count{policy="first"}'] >= 1
    assert samples['remediator_cycle_seconds_sum{policy="first"}'] > 0
    assert samples["remediator_policies_loaded"] == 2
    assert samples["remediator_negative_dentries"] >= 0
    assert samples['remediator_probe_up{probe="dentries"}'] == 1
    assert samples["process_resident_memory_bytes"] > 0  # the daemon's own cost

    proc.send_signal(signal.SIGTERM)
    assert proc.wait(20) == 0
    assert "STOPPING=1" in notify.wait_for("STOPPING=1")
    assert events(state)[-1]["event"] == "daemon_stopped"


def test_a_burst_of_sighup_never_kills_the_daemon(
    daemon: tuple[subprocess.Popen[str], Notify, Path, Path],
) -> None:
    # Every thread (scheduler, metrics server) must block SIGHUP: the kernel gives a
    # process-directed signal to any thread that does not, and SIGHUP's default action is to
    # terminate. A burst lands while the main thread is busy reloading, outside sigtimedwait.
    proc, notify, _, state = daemon
    notify.wait_for("READY=1")
    for _ in range(30):
        proc.send_signal(signal.SIGHUP)
        time.sleep(0.01)
    deadline = time.monotonic() + 10
    while (
        time.monotonic() < deadline
        and len([e for e in events(state) if e["event"] == "policies_reloaded"]) < 2
    ):
        time.sleep(0.1)
    assert proc.poll() is None, (state.parent / "stderr").read_text()[-2000:]
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(20) == 0


def test_invalid_policies_at_start_exit_1(tmp_path: Path) -> None:
    policies = tmp_path / "p"
    policies.mkdir()
    (policies / "x.yaml").write_text("kind: Policy\n")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "remediator",
            "run",
            "--policies",
            str(policies),
            "--state-dir",
            str(tmp_path / "s"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 1
    assert "x.yaml:1: apiVersion: expected 'remediator.io/v1', got None" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_sd_notify_gives_up_on_a_full_socket(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "full.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as unread:
        unread.bind(str(path))
        monkeypatch.setenv("NOTIFY_SOCKET", str(path))
        monkeypatch.setattr(daemon_module, "NOTIFY_TIMEOUT_S", 0.05)
        sent = [daemon_module.sd_notify(f"STATUS={i}") for i in range(16)]
        # The queue took what it holds, then sends time out instead of blocking the daemon.
        assert sent[0] is True and sent[-1] is False
        assert unread.recv(64) == b"STATUS=0"
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "gone.sock"))
    assert daemon_module.sd_notify("READY=1") is False
    monkeypatch.delenv("NOTIFY_SOCKET")
    assert daemon_module.sd_notify("READY=1") is False
