"""docs/getting-started.md, followed for real: its ```sh blocks run in order, in one bash, from
a clean copy of this checkout, on this host's real kernel, Docker and containerd.

What the operator's paths point at is moved under a temporary directory by rewriting them in the
commands (/etc/remediator, /opt/remediator, /var/lib/remediator, /var/lib/node_exporter,
/usr/local/sbin), so the page's commands are run as written but the host's own directories are
never touched; the test checks they are as before. `remediator` on PATH is a small wrapper that
does for the moved paths what the real defaults do (the state directory, and
/etc/remediator/policies once it exists) and refuses a live `once` or `run` while any policy in
it enforces, so an edit of the page can never make this test repair the shared host. git sees
no global or system configuration, like a fresh root account.

`pip install .` in the page is the one-step install from a clean clone: the test then checks
the C extension was built and the bundled policies were installed as data files. The systemd
steps (```console) are proven by tests/real/test_systemd_boot_real.py.

The run takes about 1.5 minutes, so it is in the slow tier (scripts/test.sh runs it after the
default suite); the check of the page's blocks and paths runs in the default suite.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.real.conftest import unavailable

pytestmark = pytest.mark.real

REPO = Path(__file__).resolve().parents[2]
PAGE = REPO / "docs" / "getting-started.md"
MOVED = (
    "/etc/remediator",
    "/opt/remediator",
    "/var/lib/remediator",
    "/var/lib/node_exporter",
    "/usr/local/sbin",
)
# Paths the page only reads or runs.
READ_ONLY = ("/usr/bin/python3",)
SYSCTL_FILE = Path("/etc/sysctl.d/90-remediator.conf")

WRAPPER = """#!/bin/bash
# remediator as the page's operator has it, with the operator's paths moved under ROOT.
set -euo pipefail
root={root}
real=$root/usr/local/sbin/remediator
export REMEDIATOR_STATE_DIR=$root/var/lib/remediator
if [[ -d $root/etc/remediator/policies ]]; then
    export REMEDIATOR_POLICIES=$root/etc/remediator/policies
    policies=$root/etc/remediator/policies
else
    policies=$root/opt/remediator/venv/share/remediator/policies
fi
for arg in "$@"; do
    case $arg in
    once | run)
        if [[ " $* " != *" --dry-run "* ]] && grep -qs '^ *mode: enforce' "$policies"/*.y*ml; then
            echo "getting-started test: refusing a live '$arg' with enforcing policies in $policies" >&2
            exit 99
        fi
        ;;
    esac
done
exec "$real" "$@"
"""


def page_blocks(text: str) -> list[str]:
    """The ```sh blocks of the page, in order (```console and plain blocks are not run)."""
    return [m.group(1) for m in re.finditer(r"^```sh\n(.*?)^```\n", text, re.M | re.S)]


def test_the_page_has_blocks_to_run_and_each_moved_path_is_one_the_test_moves() -> None:
    blocks = page_blocks(PAGE.read_text())
    assert len(blocks) >= 8
    text = "\n".join(blocks)
    for step in ("pip install", "remediator audit", "remediator validate", "git init", "remediator report"):
        assert step in text, step
    # Every absolute path a block writes to must be one the test moves.
    for path in re.findall(r"(?<![\w$])(/(?:etc|opt|var|usr)/[\w./-]+)", text):
        assert path.startswith(MOVED) or path in READ_ONLY, f"{path}: not moved by the test; add it to MOVED"


def _snapshot() -> dict[str, object]:
    out: dict[str, object] = {p: os.path.lexists(p) for p in MOVED if p != "/usr/local/sbin"}
    out["/usr/local/sbin/remediator"] = (
        os.readlink("/usr/local/sbin/remediator")
        if os.path.islink("/usr/local/sbin/remediator")
        else os.path.exists("/usr/local/sbin/remediator")
    )
    out[str(SYSCTL_FILE)] = SYSCTL_FILE.read_bytes() if SYSCTL_FILE.exists() else None
    return out


def _clean_copy(dest: Path) -> None:
    """The checkout as a clone of it would be, with uncommitted edits: tracked and new files,
    nothing ignored (no .venv, no built extension, no egg-info)."""
    listed = subprocess.run(
        ["git", "-C", str(REPO), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        capture_output=True,
        check=True,
    ).stdout.split(b"\0")
    for rel in filter(None, (x.decode() for x in listed)):
        src = REPO / rel
        if not src.is_file():
            continue  # deleted but not yet committed
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, target)


@pytest.mark.slow  # about 1.5 min: a pip install and ten remediator runs
def test_getting_started_runs_as_written(tmp_path: Path) -> None:
    if not shutil.which("git"):
        unavailable("git is not installed", "apt-get install git")
    root = tmp_path / "root"
    for p in MOVED:
        (root / p.lstrip("/")).parent.mkdir(parents=True, exist_ok=True)
    (root / "usr/local/sbin").mkdir(parents=True)
    src = tmp_path / "src"
    _clean_copy(src)
    assert not list(src.rglob("*.so")) and not (src / ".venv").exists()

    wrap = tmp_path / "wrap"
    wrap.mkdir()
    (wrap / "remediator").write_text(WRAPPER.format(root=root))
    (wrap / "remediator").chmod(0o755)

    script = ["set -euo pipefail"]
    for i, written in enumerate(page_blocks(PAGE.read_text()), 1):
        block = written
        for p in MOVED:
            block = block.replace(p, f"{root}{p}")
        first = written.strip().splitlines()[0]
        script += [f"echo {shlex.quote(f'### block {i}: {first[:60]}')}", block]
    empty_gitconfig = tmp_path / "gitconfig"
    empty_gitconfig.write_text("")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(
        PATH=f"{wrap}:{root}/usr/local/sbin:/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin",
        GIT_CONFIG_GLOBAL=str(empty_gitconfig),
        GIT_CONFIG_NOSYSTEM="1",
        # Quicker, and the attribution is not what the page is about.
        REMEDIATOR_EBPF="off",
    )

    before = _snapshot()
    done = subprocess.run(
        ["bash", "-c", "\n".join(script)],
        cwd=src,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    assert _snapshot() == before, "the page's commands changed the host's own paths"
    out = done.stdout
    (tmp_path / "transcript.txt").write_text(out + "\n---- stderr ----\n" + done.stderr)
    assert done.returncode == 0, (
        f"the page failed (exit {done.returncode}):\n{out[-4000:]}\n{done.stderr[-4000:]}"
    )

    # 1. The one-step install: the C extensions built, the bundled policies installed as data.
    venv = root / "opt/remediator/venv"
    for ext in ("actions/_fifowalk", "probes/_fdscan", "probes/_kcmp", "probes/_batch"):
        assert list(venv.glob(f"lib/python3*/site-packages/remediator/{ext}*.so")), ext
    shipped = sorted(p.name for p in (REPO / "policies").glob("*.yaml"))
    assert sorted(p.name for p in (venv / "share/remediator/policies").glob("*.yaml")) == shipped
    assert re.search(r"remediator, version \S+", out)
    # 2. The first audit read this host and used the bundled set.
    assert f"policies: {venv}/share/remediator/policies" in out
    # 3-4. The checkout, validated, with one policy enforcing at the end.
    policies = root / "etc/remediator/policies"
    log = subprocess.run(
        ["git", "-C", str(policies), "log", "--format=%s"],
        capture_output=True,
        text=True,
        check=True,
        env=env,
    ).stdout.splitlines()
    assert log == ["leaked-fifo-dirs: enforce", "remediator policies: the bundled set, everything in audit"]
    assert re.search(r"^ok: \d+ policies in \d+ files", out, re.M)
    enforcing = [
        (f.name, n)
        for f in sorted(policies.glob("*.yaml"))
        for n, line in enumerate(f.read_text().splitlines())
        if re.fullmatch(r"\s*mode: enforce", line)
    ]
    assert enforcing == [("containerd-fifos.yaml", 13)], enforcing
    assert re.search(r"^leaked-fifo-dirs\s+enforce\s", out, re.M)
    # 5. The cycle by hand recorded its events with the checkout's commit.
    head = subprocess.run(
        ["git", "-C", str(policies), "rev-parse", "HEAD~1"],
        capture_output=True,
        text=True,
        check=True,
        env=env,
    ).stdout.strip()
    events = [json.loads(line) for line in (root / "var/lib/remediator/audit.jsonl").read_text().splitlines()]
    commits = {str(e["policy_commit"]) for e in events if e.get("policy_commit")}
    assert any(head.startswith(c) for c in commits), (head, commits)
    assert (root / "var/lib/remediator/state.db").is_file()
    # 6. The textfile parses and carries the breaker.
    text = (root / "var/lib/node_exporter/textfile/remediator.prom").read_text()
    names = {f.name for f in text_string_to_metric_families(text)}
    assert {"remediator_breaker_open", "remediator_probe_up"} <= names
    # 7. The replay ran on the recorded reading.
    assert (root / "var/lib/remediator/readings.jsonl").stat().st_size > 0
    # 8-9. The report and the breaker.
    assert "remediator report, live state" in out
    assert re.search(r"^breaker: closed", out, re.M)
    assert any(e.get("event") == "breaker_reset" and e.get("by") == "alice" for e in _events(root))


def _events(root: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in (root / "var/lib/remediator/audit.jsonl").read_text().splitlines()]
