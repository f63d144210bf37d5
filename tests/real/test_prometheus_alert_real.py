"""Monitoring end to end, with the real tools: the daemon acts on a fixture host whose file
handles are over a policy's line; a real Prometheus (Debian's 2.42) scrapes its endpoint on
loopback and evaluates the shipped monitoring/alerts.yml; the `RemediatorConditionFiring` rule
fires; a real Alertmanager (0.25) delivers it to a webhook on loopback. The daemon's own
notification of the raise, posted to the same Alertmanager in its `alertmanager` format, is
delivered too (`RemediatorActionApplied`): Alertmanager accepts the payload as it is.

Negative control: the breaker never opens here, so `RemediatorBreakerOpen` must never arrive.
Every process listens on 127.0.0.1 only, on ports found free, and is stopped at teardown; the
whole exchange is bounded by DEADLINE_S.
"""

from __future__ import annotations

import http.server
import json
import os
import shutil
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import listen_port
from tests.real.conftest import unavailable

ROOT = Path(__file__).parent.parent.parent
DEADLINE_S = 90.0

POLICY = """\
apiVersion: remediator.io/v1
kind: Policy
metadata: {name: file-handles}
spec:
  mode: enforce
  interval: 2s
  watch: {probe: limits, metric: file_handles, above: 1k, clearBelow: 500}
  actions:
    - action: raise-sysctl
      settle: 1h
      params: {key: fs.file-max, factor: 2.0, ceiling: 1M}
"""

CONTROLLER = """\
apiVersion: remediator.io/v1
kind: Controller
spec:
  notify:
    webhooks:
      - {{url: "http://127.0.0.1:{am}/api/v2/alerts", format: alertmanager}}
"""

PROMETHEUS = """\
global: {{scrape_interval: 1s, evaluation_interval: 1s}}
rule_files: ["{rules}"]
alerting:
  alertmanagers:
    - static_configs: [{{targets: ["127.0.0.1:{am}"]}}]
scrape_configs:
  - job_name: remediator
    static_configs: [{{targets: ["127.0.0.1:{metrics}"]}}]
"""

ALERTMANAGER = """\
route:
  receiver: hook
  group_by: [alertname]
  group_wait: 1s
  group_interval: 1s
  repeat_interval: 1h
receivers:
  - name: hook
    webhook_configs: [{{url: "http://127.0.0.1:{hook}/", send_resolved: false}}]
"""


def binary(name: str, package: str) -> str:
    path = shutil.which(name)
    if path is None:
        unavailable(f"{name} is not installed", f"apt-get install {package} (scripts/test.sh does)")
    return path


class Hook:
    """The webhook Alertmanager delivers to: records every alert name it receives."""

    def __init__(self) -> None:
        self.alerts: list[dict[str, Any]] = []
        hook = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                hook.alerts.extend(body.get("alerts", []))
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = int(self.server.server_address[1])
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def names(self) -> set[str]:
        return {a["labels"]["alertname"] for a in self.alerts}

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def wait_http(url: str, proc: subprocess.Popen[bytes], deadline: float) -> None:
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"{proc.args[0]} exited with {proc.returncode} before {url} answered")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.2)
    pytest.fail(f"{url} did not answer in time")


@pytest.fixture
def processes() -> Iterator[list[subprocess.Popen[bytes]]]:
    procs: list[subprocess.Popen[bytes]] = []
    yield procs
    for p in procs:
        if p.poll() is None:
            p.terminate()
    for p in procs:
        try:
            p.wait(15)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(5)
    assert all(p.poll() is not None for p in procs)


def test_a_shipped_rule_fires_and_alertmanager_delivers_it(
    tmp_path: Path, processes: list[subprocess.Popen[bytes]]
) -> None:
    prometheus = binary("prometheus", "prometheus")
    alertmanager = binary("prometheus-alertmanager", "prometheus-alertmanager")
    deadline = time.monotonic() + DEADLINE_S
    hook = Hook()
    try:
        am, prom, metrics = listen_port(), listen_port(), listen_port()
        host = tmp_path / "host"
        shutil.copytree(ROOT / "tests" / "fixtures" / "host", host)
        policies = tmp_path / "policies"
        policies.mkdir()
        (policies / "file-handles.yaml").write_text(POLICY)
        (policies / "controller.yaml").write_text(CONTROLLER.format(am=am))
        (tmp_path / "prometheus.yml").write_text(
            PROMETHEUS.format(rules=ROOT / "monitoring" / "alerts.yml", am=am, metrics=metrics)
        )
        (tmp_path / "alertmanager.yml").write_text(ALERTMANAGER.format(hook=hook.port))
        logs = tmp_path / "logs"
        logs.mkdir()

        def start(name: str, args: list[str], env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
            out = open(logs / f"{name}.log", "wb")  # noqa: SIM115 (closed with the process)
            p = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=tmp_path)
            out.close()
            processes.append(p)
            return p

        am_proc = start(
            "alertmanager",
            [
                alertmanager,
                f"--config.file={tmp_path / 'alertmanager.yml'}",
                f"--storage.path={tmp_path / 'am-data'}",
                f"--web.listen-address=127.0.0.1:{am}",
                "--cluster.listen-address=",  # no gossip port: one instance, loopback only
            ],
        )
        wait_http(f"http://127.0.0.1:{am}/-/ready", am_proc, deadline)
        prom_proc = start(
            "prometheus",
            [
                prometheus,
                f"--config.file={tmp_path / 'prometheus.yml'}",
                f"--storage.tsdb.path={tmp_path / 'prom-data'}",
                f"--web.listen-address=127.0.0.1:{prom}",
            ],
        )
        wait_http(f"http://127.0.0.1:{prom}/-/ready", prom_proc, deadline)
        env = {
            **os.environ,
            "REMEDIATOR_HOST_ROOT": str(host),
            "REMEDIATOR_STATE_DIR": str(tmp_path / "state"),
            "REMEDIATOR_POLICIES": str(policies),
            "REMEDIATOR_DOCKER_URL": f"unix://{tmp_path}/no-docker.sock",
        }
        daemon = start(
            "remediator",
            [sys.executable, "-m", "remediator", "run", "--metrics-address", f"127.0.0.1:{metrics}"],
            env,
        )
        wait_http(f"http://127.0.0.1:{metrics}/metrics", daemon, deadline)
        # The daemon's own exposition (with the process collector) passes promtool's lint too.
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics}/metrics", timeout=5) as r:
            exposition = r.read().decode()
        promtool = subprocess.run(
            [binary("promtool", "prometheus"), "check", "metrics"],
            input=exposition,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert promtool.returncode == 0, promtool.stdout + promtool.stderr
        assert "process_resident_memory_bytes" in exposition

        while time.monotonic() < deadline and not {
            "RemediatorConditionFiring",
            "RemediatorActionApplied",
        } <= (hook.names()):
            assert daemon.poll() is None, (logs / "remediator.log").read_text()[-2000:]
            time.sleep(0.5)
        received = hook.names()
        assert {"RemediatorConditionFiring", "RemediatorActionApplied"} <= received, (
            f"received {received}; prometheus log: {(logs / 'prometheus.log').read_text()[-1500:]}"
        )
        firing = next(a for a in hook.alerts if a["labels"]["alertname"] == "RemediatorConditionFiring")
        assert firing["labels"]["policy"] == "file-handles" and firing["labels"]["job"] == "remediator"
        applied = next(a for a in hook.alerts if a["labels"]["alertname"] == "RemediatorActionApplied")
        assert applied["annotations"]["summary"].startswith("file-handles: raise fs.file-max from 100000")
        assert "RemediatorBreakerOpen" not in received  # the negative control
        # The remediation was real (on the fixture tree): the limit was raised once.
        assert (host / "proc/sys/fs/file-max").read_text().strip() == "200000"
        # Prometheus has the reading the rule was about (the fixture's file-nr: 1856 allocated).
        with urllib.request.urlopen(
            f"http://127.0.0.1:{prom}/api/v1/query?query=remediator_file_handles", timeout=5
        ) as q:
            result = json.loads(q.read())["data"]["result"]
        assert [float(r["value"][1]) for r in result] == [1856]
    finally:
        hook.close()
