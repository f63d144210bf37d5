"""The CLI on a fixture host: golden validate output, JSON documents, exit codes, and the
full cycle (once -> status -> replay) with state in a temp dir. No root or daemons needed:
the fixture host has no containers and Docker is pointed at a socket that does not exist."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
import structlog
from click.testing import CliRunner

from remediator.cli import main
from remediator.state import InstanceLock

HERE = Path(__file__).parent.parent
GOLDEN = HERE / "golden"
UPDATE = os.environ.get("REMEDIATOR_UPDATE_GOLDEN") == "1"


def golden(name: str, text: str) -> None:
    """Compare with tests/golden/<name>; REMEDIATOR_UPDATE_GOLDEN=1 rewrites it (review the diff)."""
    path = GOLDEN / name
    if UPDATE:
        path.write_text(text)
    assert text == path.read_text(), f"golden {name} differs (REMEDIATOR_UPDATE_GOLDEN=1 to rewrite)"


@pytest.fixture(autouse=True)
def _reset_logging() -> Iterator[None]:
    """Commands configure structlog process-wide (a "warning" filter drops info events): put
    the defaults back so that later tests' capture_logs() sees every event."""
    yield
    structlog.reset_defaults()


@pytest.fixture
def host(tmp_path: Path) -> Path:
    root = tmp_path / "host"
    shutil.copytree(HERE / "fixtures" / "host", root)
    (root / "run" / "containerd" / "fifo").mkdir(parents=True)
    return root


def tree_digest(root: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        h.update(str(p.relative_to(root)).encode())
        if p.is_file():
            h.update(p.read_bytes())
    return h.hexdigest()


POLICY = """\
apiVersion: remediator.io/v1
kind: Policy
metadata:
  name: watches
spec:
  mode: enforce
  watch:
    probe: limits
    metric: file_handles
    above: 1k
    clearBelow: 500
  actions:
    - action: raise-sysctl
      settle: 1m
      params:
        key: fs.file-max
        factor: 2.0
        ceiling: 1M
"""


@pytest.fixture
def env(host: Path, tmp_path: Path) -> dict[str, str]:
    policies = tmp_path / "policies"
    policies.mkdir()
    (policies / "p.yaml").write_text(POLICY)
    return {
        "REMEDIATOR_HOST_ROOT": str(host),
        "REMEDIATOR_STATE_DIR": str(tmp_path / "state"),
        "REMEDIATOR_POLICIES": str(policies),
        "REMEDIATOR_DOCKER_URL": f"unix://{tmp_path}/no-docker.sock",
    }


def run(args: list[str], env: dict[str, str] | None = None) -> tuple[int, str, str]:
    result = CliRunner().invoke(main, args, env=env or {}, catch_exceptions=False, prog_name="remediator")
    return result.exit_code, result.stdout, result.stderr


def test_help_lists_every_command() -> None:
    code, out, _ = run(["--help"])
    assert code == 0
    commands = ("validate", "audit", "once", "run", "status", "limits", "reset-breaker", "replay", "schema")
    for cmd in (*commands, "restore-memory", "report"):
        assert f"  {cmd} " in out


def test_bad_flag_is_a_usage_error_without_traceback() -> None:
    code, _, err = run(["audit", "--bogus"])
    assert code == 2
    assert "No such option '--bogus'" in err and "Traceback" not in err


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("/srv/fifo", "expected PATH=SOCKET[,SOCKET...]"),
        ("/srv/fifo=", "expected PATH=SOCKET[,SOCKET...]"),
        ("srv/fifo=/s.sock", "expected absolute paths, got 'srv/fifo'"),
        ("/srv/fifo=/a.sock,b.sock", "expected absolute paths, got 'b.sock'"),
    ],
)
def test_bad_fifo_root_is_a_usage_error(env: dict[str, str], spec: str, message: str) -> None:
    code, _, err = run(["audit", "--fifo-root", spec], env)
    assert code == 2
    assert message in err and "Traceback" not in err


@pytest.mark.parametrize("address", ["notaport", "127.0.0.1:99999", "127.0.0.1:0", "9464", "host:"])
def test_bad_metrics_address_is_a_usage_error(env: dict[str, str], address: str) -> None:
    code, _, err = run(["run", "--metrics-address", address], env)
    assert code == 2
    assert "expected HOST:PORT with a port from 1 to 65535" in err and "Traceback" not in err


def test_metrics_port_in_use_is_a_clear_error(env: dict[str, str]) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code, _, err = run(["run", "--metrics-address", f":{port}"], env)
    assert code == 2
    assert f"--metrics-address: cannot listen on 127.0.0.1:{port}: Address already in use" in err


def test_validate_golden_errors() -> None:
    code, out, err = run(["validate", str(HERE / "fixtures" / "policies" / "broken")])
    assert (code, out) == (1, "")
    golden("validate-broken.txt", err.replace(str(HERE) + "/", ""))


def test_validate_json() -> None:
    code, out, _ = run(["validate", "--json", str(HERE / "fixtures" / "policies" / "broken")])
    doc = json.loads(out)
    assert code == 1 and doc["valid"] is False and len(doc["errors"]) == 12
    assert doc["errors"][0] == {
        "file": str(HERE / "fixtures/policies/broken/10-types.yaml"),
        "line": 6,
        "field": "spec.mode",
        "message": "Input should be 'audit' or 'enforce'",
    }


def test_validate_bundled() -> None:
    code, out, _ = run(["validate"], {"REMEDIATOR_POLICIES": ""})
    assert code == 0 and out.startswith("ok: 21 policies in 6 files")


DISRUPTIVE = """\
apiVersion: remediator.io/v1
kind: Policy
metadata: {name: d}
spec:
  mode: enforce
  watch: {probe: dentries, metric: negative, above: 10M}
  actions:
    - action: reclaim-cgroup
    - action: recreate-container
%s
"""


@pytest.mark.parametrize(("opt_in", "warned"), [("", True), ("      allowDisruptive: true", False)])
def test_validate_warns_about_a_disruptive_step_without_the_opt_in(
    tmp_path: Path, opt_in: str, warned: bool
) -> None:
    (tmp_path / "p.yaml").write_text(DISRUPTIVE % opt_in)
    code, out, err = run(["validate", str(tmp_path)])
    assert code == 0 and out.startswith("ok: 1 policies")
    expected = (
        f"warning: {tmp_path}/p.yaml:9: spec.actions[1]: recreate-container is disruptive and the "
        "policy enforces it without `allowDisruptive: true`; it will run in audit mode\n"
    )
    assert err == (expected if warned else "")
    code, out, _ = run(["validate", "--json", str(tmp_path)])
    assert json.loads(out)["warnings"] == ([expected[len("warning: ") : -1]] if warned else [])


def test_audit_json_changes_nothing(env: dict[str, str], host: Path, tmp_path: Path) -> None:
    before = tree_digest(host)
    code, out, err = run(["audit", "--json"], env)
    assert code == 0, err
    doc = json.loads(out)
    assert doc["format"] == "remediator.cycle/v1" and doc["dry_run"] is True
    assert doc["readings"]["limits"]["values"]["file_handles"] == 1856
    (p,) = doc["policies"]
    assert p["name"] == "watches" and p["source"]["line"] == 4
    (d,) = p["decisions"]
    assert (d["kind"], d["phase"], d["trigger"]) == ("act", "firing", 1000)
    (a,) = p["actions"]
    assert a["result"]["outcome"] == "would_apply"
    assert a["plan"]["summary"].startswith("raise fs.file-max from 100000 to 200000")
    assert tree_digest(host) == before  # the fixture /proc/sys file is untouched
    assert not (tmp_path / "state" / "state.db").exists()  # audit never creates state


def test_once_acts_then_status_and_state_persist(env: dict[str, str], host: Path) -> None:
    code, out, err = run(["once", "--json"], env)
    assert code == 0, err
    (a,) = json.loads(out)["policies"][0]["actions"]
    assert a["result"]["outcome"] == "applied" and a["result"]["after"]["value"] == 200000
    assert (host / "proc/sys/fs/file-max").read_text().strip() == "200000"
    # The audit file got the events, one JSON object per line.
    events = [
        json.loads(line)["event"]
        for line in (Path(env["REMEDIATOR_STATE_DIR"]) / "audit.jsonl").read_text().splitlines()
    ]
    assert "action_applied" in events and "policy_evaluated" in events

    code, out, _ = run(["status", "--json"], env)
    doc = json.loads(out)
    assert code == 0 and doc["format"] == "remediator.status/v1"
    (cond,) = doc["conditions"]
    assert (cond["policy"], cond["phase"], cond["step"]) == ("watches", "firing", 1)
    assert doc["budgets"]["watches"] == {"used": 1, "max": 3, "window_seconds": 3600.0}
    assert doc["actions"][0]["outcome"] == "applied"

    # A second run within settle time does not act again.
    code, out, _ = run(["once", "--json"], env)
    assert json.loads(out)["policies"][0]["actions"] == []
    assert (host / "proc/sys/fs/file-max").read_text().strip() == "200000"


def test_once_dry_run_changes_nothing_and_keeps_live_state_clean(env: dict[str, str], host: Path) -> None:
    before = tree_digest(host)
    code, out, _ = run(["once", "--dry-run", "--json"], env)
    assert code == 0
    assert json.loads(out)["policies"][0]["actions"][0]["result"]["outcome"] == "would_apply"
    assert tree_digest(host) == before
    code, out, _ = run(["status", "--json"], env)
    assert json.loads(out)["conditions"] == []  # live namespace untouched


def test_lock_held_exits_75(env: dict[str, str]) -> None:
    state = Path(env["REMEDIATOR_STATE_DIR"])
    lock = InstanceLock(state / "lock", 0)
    lock.acquire()
    try:
        code, _, err = run(["once"], {**env, "REMEDIATOR_LOCK_TIMEOUT": "0"})
    finally:
        lock.release()
    assert code == 75
    assert f"another remediator instance (pid {os.getpid()}) is acting on this host" in err


def test_record_and_replay(env: dict[str, str], tmp_path: Path) -> None:
    rec = tmp_path / "rec.jsonl"
    code, _, err = run(["audit", "--record", str(rec)], env)
    assert code == 0, err
    line = json.loads(rec.read_text())
    assert line["format"] == "remediator.record/v1" and "limits" in line["readings"]
    code, out, err = run(["replay", str(rec), "--hold", "2m", "--every", "30s", "--json"], env)
    assert code == 0, err
    cycles = json.loads(out)["cycles"]
    assert len(cycles) == 5  # the recording, then 4 more steps of 30s
    kinds = [c["policies"][0]["decisions"][0]["kind"] for c in cycles]
    # One step (settle 1m), cooldown 10m: act, settle, judged and exhausted, then wait.
    assert kinds == ["act", "none", "exhausted", "exhausted", "exhausted"]
    assert all(a["result"]["outcome"] == "would_apply" for c in cycles for a in c["policies"][0]["actions"])


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--hold", "5x"], "Invalid value for '--hold': expected a duration such as 30s, 5m, 1h30m or 1d"),
        (["--every", "0s"], "Invalid value for '--every': must be longer than 0s"),
    ],
)
def test_replay_bad_duration_names_the_option(tmp_path: Path, args: list[str], message: str) -> None:
    rec = tmp_path / "r.jsonl"
    rec.write_text("")
    code, _, err = run(["replay", str(rec), *args])
    assert code == 2 and message in err and "Traceback" not in err


def test_replay_bad_file_is_a_clear_error(tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"format": "something-else"}\n')
    code, _, err = run(["replay", str(bad)])
    assert code == 2
    assert err.strip() == (
        f"remediator: {bad}:1: not a remediator recording line: "
        "expected format 'remediator.record/v1', got 'something-else'"
    )
    code, _, err = run(["replay", str(tmp_path / "missing.jsonl")])
    assert code == 2 and "cannot read recording" in err


def test_reset_breaker(env: dict[str, str]) -> None:
    code, out, _ = run(["reset-breaker", "--by", "alice"], env)
    assert code == 0 and out.strip() == "breaker closed (it was not open)"


def test_schema_is_json() -> None:
    code, out, _ = run(["schema"])
    assert code == 0 and json.loads(out)["title"].startswith("remediator policy document")


def test_limits_table_and_json_on_the_fixture_host(env: dict[str, str]) -> None:
    code, out, _ = run(["limits"], env)
    assert code == 0
    golden("limits.txt", out)
    code, out, _ = run(["limits", "--json"], env)
    assert code == 0
    doc = json.loads(out)
    assert doc["format"] == "remediator.limits/v1"
    assert [p["pool"] for p in doc["pools"]][:2] == ["file_handles", "tasks"]  # fullest first
    assert doc["pools"][0]["percent"] == round(100 * doc["pools"][0]["usage"] / doc["pools"][0]["limit"], 1)
    assert doc["containers"] == [] and any(n.startswith("containers: ") for n in doc["notes"])


def test_help_imports_no_heavy_library() -> None:
    """`--help` start-up (benchmarks/startup.py measures it): the CLI module imports neither
    structlog (and rich, which structlog would pull in) nor the engine's libraries."""
    import subprocess
    import sys

    code = (
        "import sys, remediator.cli; "
        "print(sorted(m for m in ('structlog', 'rich', 'pydantic', 'prometheus_client', 'yaml', 'json') "
        "if sys.modules.get(m) is not None))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_the_daemons_libraries_load_without_rich_or_a_charset_guesser() -> None:
    """What the daemon imports, after the CLI opted out of rich and charset detection: neither
    is loaded, requests does not warn about it, and the Docker SDK still decodes errors."""
    import subprocess
    import sys

    code = (
        "import sys, warnings; warnings.simplefilter('error'); import remediator.cli, remediator.runtime; "
        'import docker, requests; r = requests.models.Response(); r._content = b\'{"message": "x"}\'; '
        "r.status_code = 404; assert r.json() == {'message': 'x'} and r.text == '{\"message\": \"x\"}'; "
        "names = ('rich', 'charset_normalizer', 'chardet'); "
        "print(sorted(m for m in names if sys.modules.get(m) is not None))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stderr
