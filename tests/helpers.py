"""Small builders shared by the tests."""

from __future__ import annotations

import json
import random
import shutil
import socket
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from remediator.host import HostRoot
from remediator.model import Mode, Scope
from remediator.policy.rules import Policy, Selector, Source, Step
from remediator.quantity import Amount

FIXTURE_HOST = Path(__file__).parent / "fixtures" / "host"

_handed_out: set[int] = set()


def _ephemeral_range() -> range:
    try:
        low, high = (int(v) for v in Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    except (OSError, ValueError):
        low, high = 32768, 60999
    return range(low, high + 1)


def listen_port() -> int:
    """A loopback port free to listen on, outside the kernel's ephemeral range.

    A port the kernel hands out itself (bind to port 0) can be taken again before the server
    binds it: by that server's own outgoing connections (kube-apiserver to etcd did this in CI,
    "bind: address already in use"). Ports below the ephemeral range are never picked as a
    connection's local port, so only another listener can take one; the bind checks none does
    now, and no port is handed out twice in one run."""
    ephemeral = _ephemeral_range()
    candidates = [p for p in range(10000, 30000) if p not in ephemeral and p not in _handed_out]
    random.shuffle(candidates)
    for port in candidates:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        _handed_out.add(port)
        return port
    raise RuntimeError("no free loopback port below the ephemeral range")


def copy_fixture_host(dest: Path) -> Path:
    """A writable copy of tests/fixtures/host (a small healthy host: /proc files, an empty
    containerd fifo root), for commands run with --host-root."""
    shutil.copytree(FIXTURE_HOST, dest)
    (dest / "run" / "containerd" / "fifo").mkdir(parents=True, exist_ok=True)
    return dest


def run_cli(args: list[str], env: dict[str, str] | None = None) -> tuple[int, str, str]:
    """`remediator ARGS` in-process: (exit code, stdout, stderr)."""
    from click.testing import CliRunner

    from remediator.cli import main

    result = CliRunner().invoke(main, args, env=env or {}, catch_exceptions=False, prog_name="remediator")
    return result.exit_code, result.stdout, result.stderr


def make_host(tmp_path: Path, files: Mapping[str, str | bytes]) -> HostRoot:
    """A fixture host tree: {"proc/sys/fs/file-nr": "1 0 100\\n"} -> HostRoot(tmp_path)."""
    for rel, content in files.items():
        p = tmp_path / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            p.write_bytes(content)
        else:
            p.write_text(content)
    return HostRoot(tmp_path)


class NoParams(BaseModel):
    pass


def make_policy(**kw: Any) -> Policy:
    """A compiled policy with test defaults: trigger 100, clear 50, hold 5m, two steps."""
    steps = kw.pop("steps", None) or (
        Step("first", None, 60.0, NoParams()),
        Step("second", None, 120.0, NoParams()),
    )
    base = dict(
        name="p",
        description="",
        source=Source("p.yaml", 1),
        mode=Mode.ENFORCE,
        interval=30.0,
        probe="probe",
        metric="m",
        scope=Scope.HOST,
        trigger=Amount(100),
        clear=Amount(50),
        hold=300.0,
        steps=tuple(steps),
        cooldown=600.0,
        budget_max=10,
        budget_window=3600.0,
        selector=Selector(),
    )
    base.update(kw)
    return Policy(**base)  # type: ignore[arg-type]


def remediator_json(*args: str, policies: Path, state: Path, timeout: float = 120) -> dict[str, Any]:
    """Run `python -m remediator ARGS --json` on this host's real state and return the document;
    a non-zero exit fails the test with the command's stderr."""
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "remediator",
            *args,
            "--json",
            "--policies",
            str(policies),
            "--state-dir",
            str(state),
            "--log-level",
            "error",
        ],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    doc: dict[str, Any] = json.loads(proc.stdout)
    return doc
