"""The README's first command, `scripts/install.sh && remediator audit`, on this host.

install.sh builds a wheel of this checkout and installs it into a venv made from
/usr/bin/python3; the installed command must find the bundled policies (shipped as wheel data
files, not read from this checkout) and show real readings of this host. The venv and the
command's link go to a temporary directory, so the host's /opt and /usr/local stay as they were.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.real

REPO = Path(__file__).resolve().parents[2]
SYSTEM_POLICIES = Path("/etc/remediator/policies")


def test_install_then_audit_shows_this_hosts_readings_and_the_bundled_decisions(tmp_path: Path) -> None:
    venv, link = tmp_path / "venv", tmp_path / "sbin" / "remediator"
    env = {key: value for key, value in os.environ.items() if key not in ("PYTHONPATH", "VIRTUAL_ENV")}
    installed = subprocess.run(
        ["bash", str(REPO / "scripts" / "install.sh")],
        env={**env, "REMEDIATOR_VENV": str(venv), "REMEDIATOR_LINK": str(link)},
        capture_output=True,
        text=True,
        timeout=540,
        check=False,
    )
    assert installed.returncode == 0, installed.stderr
    assert installed.stdout.strip().endswith(f"installed: {link} -> {venv}/bin/remediator")
    assert link.resolve() == (venv / "bin" / "remediator").resolve()

    # From another directory, so nothing can be picked up from this checkout.
    audit = subprocess.run(
        [str(link), "audit", "--json", "--state-dir", str(tmp_path / "state"), "--log-level", "error"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert audit.returncode == 0, audit.stderr
    doc: dict[str, Any] = json.loads(audit.stdout)
    assert doc["format"] == "remediator.cycle/v1" and doc["dry_run"] is True

    policy_set = doc["policy_set"]
    bundled = venv / "share" / "remediator" / "policies"
    expected_dir = SYSTEM_POLICIES if SYSTEM_POLICIES.is_dir() else bundled
    assert policy_set["directory"] == str(expected_dir)
    if expected_dir == bundled:
        shipped = sorted(p.name for p in (REPO / "policies").glob("*.yaml"))
        assert [Path(f).name for f in policy_set["files"]] == shipped
        assert set(policy_set["policies"]) >= {"negative-dentries", "leaked-fifo-dirs", "file-handles"}

    readings = doc["readings"]
    # The kernel's own numbers, read back here the way the issue names them.
    dentry_state = [int(x) for x in Path("/proc/sys/fs/dentry-state").read_text().split()[:2]]
    assert readings["dentries"]["values"]["total"] > 0
    assert readings["dentries"]["values"]["total"] >= min(dentry_state) // 2
    run = os.statvfs("/run")
    assert readings["fifos"]["limits"]["run_inodes_used"] == run.f_files
    assert 0 < readings["fifos"]["values"]["run_inodes_used"] <= run.f_files
    file_max = int(Path("/proc/sys/fs/file-max").read_text())
    assert readings["limits"]["limits"]["file_handles"] == file_max
    assert readings["limits"]["values"]["file_handles"] > 0

    decisions = [d for p in doc["policies"] for d in p["decisions"]]
    assert decisions and all(d["phase"] in ("ok", "pending", "firing", "resolved") for d in decisions)
    # Audit runs no action: any planned action carries the dry-run outcome.
    for policy in doc["policies"]:
        for action in policy["actions"]:
            assert action["result"]["outcome"] in ("would_apply", "skipped"), action
