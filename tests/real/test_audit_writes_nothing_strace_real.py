"""`remediator audit` and `once --dry-run` write nothing outside the controller's own state and
log directories, seen by strace(1) on every process they start (git included), with the
policies in a git checkout as operators keep them. The reported defect: a plain `git status`
took .git/index.lock and rewrote .git/index in the operator's checkout on every run."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.real

REPO = Path(__file__).resolve().parents[2]
# Calls that change the file system, by where their path arguments are.
PATH_ARGS = {
    "open": (0,),
    "creat": (0,),
    "openat": (1,),
    "mkdir": (0,),
    "mkdirat": (1,),
    "rmdir": (0,),
    "unlink": (0,),
    "unlinkat": (1,),
    "rename": (0, 1),
    "renameat": (1, 3),
    "renameat2": (1, 3),
    "link": (1,),
    "linkat": (3,),
    "symlink": (1,),
    "symlinkat": (2,),
    "truncate": (0,),
    "chmod": (0,),
    "fchmodat": (1,),
    "chown": (0,),
    "lchown": (0,),
    "fchownat": (1,),
    "utimensat": (1,),
    "mknod": (0,),
    "mknodat": (1,),
}
WRITE_FLAGS = ("O_WRONLY", "O_RDWR", "O_CREAT", "O_TRUNC", "O_APPEND")
TRACED = sorted({*PATH_ARGS, "chdir", "fchdir", "clone", "clone3", "fork", "vfork"})
LINE = re.compile(r"^(?P<pid>\d+) +(?P<call>\w+)\((?P<args>.*)\) += (?P<ret>-?\d+|\?)")
STRING = re.compile(r'"((?:[^"\\]|\\.)*)"')


def _split_args(args: str) -> list[str]:
    """strace's argument list, split at top-level commas (strings and braces kept whole)."""
    out, depth, cur, in_str, esc = [], 0, [], False, False
    for ch in args:
        if in_str:
            cur.append(ch)
            if esc:
                esc = False
            elif ch == "\\":
                esc = True
            elif ch == '"':
                in_str = False
            continue
        if ch == '"':
            in_str = True
        elif ch in "{[(<":
            depth += 1
        elif ch in "}])>":
            depth -= 1
        elif ch == "," and depth == 0:
            out.append("".join(cur).strip())
            cur = []
            continue
        cur.append(ch)
    out.append("".join(cur).strip())
    return out


def _path(arg: str) -> str | None:
    m = STRING.search(arg)
    return m.group(1) if m else None


def _dirfd(arg: str) -> str | None:
    # With -y a descriptor prints as 3</some/dir>; AT_FDCWD means the process's cwd.
    m = re.match(r"\d+<(.*)>$", arg)
    return m.group(1) if m else None


def writes(log: Path, first_pid_cwd: str) -> list[str]:
    """Every path the traced processes created, opened for writing, renamed, removed or
    changed the metadata of, resolved against each process's own working directory."""
    cwd: dict[str, str] = {}
    first: str | None = None
    found: list[str] = []
    for raw in log.read_text(errors="replace").splitlines():
        m = LINE.match(raw)
        if not m:
            continue
        pid, call, ret = m["pid"], m["call"], m["ret"]
        if first is None:
            first = pid
            cwd[pid] = first_pid_cwd
        here = cwd.setdefault(pid, first_pid_cwd)
        args = _split_args(m["args"])
        if call in ("clone", "clone3", "fork", "vfork") and ret.isdigit():
            cwd[ret] = here
            continue
        if ret.startswith("-"):
            continue  # failed: changed nothing
        if call == "chdir":
            p = _path(args[0]) or ""
            cwd[pid] = os.path.normpath(os.path.join(here, p))
            continue
        if call == "fchdir":
            cwd[pid] = _dirfd(args[0]) or here
            continue
        if call in ("open", "openat") and not any(f in m["args"] for f in WRITE_FLAGS):
            continue
        for i in PATH_ARGS.get(call, ()):
            if i >= len(args):
                continue
            p = _path(args[i])
            if p is None:
                continue
            base = here
            if call.endswith("at") or call == "renameat2":
                base = _dirfd(args[i - 1]) or here
            found.append(os.path.normpath(os.path.join(base, p)))
    return found


def _checkout(tmp_path: Path) -> Path:
    repo = tmp_path / "policies"
    shutil.copytree(REPO / "policies", repo)
    for args in (
        ["init", "-q"],
        ["add", "-A"],
        ["-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "p"],
    ):
        subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True)
    # A stale index (a file touched after the commit) is what makes a plain `git status`
    # rewrite the index.
    (repo / "controller.yaml").touch()
    os.utime(repo / ".git" / "index", (1, 1))
    return repo


def _snapshot(root: Path) -> dict[str, tuple[int, int, int]]:
    out = {}
    for p in sorted(root.rglob("*")):
        st = p.lstat()
        out[str(p.relative_to(root))] = (st.st_ino, st.st_mtime_ns, st.st_size)
    return out


@pytest.mark.parametrize("command", [["audit"], ["once", "--dry-run"]])
def test_audit_and_dry_run_write_only_their_own_state(tmp_path: Path, command: list[str]) -> None:
    strace = shutil.which("strace")
    assert strace, "strace is missing: scripts/test.sh installs it (Debian package strace)"
    policies = _checkout(tmp_path)
    state = tmp_path / "state"
    work = tmp_path / "cwd"
    work.mkdir()
    log = tmp_path / "strace.log"
    argv = [
        sys.executable,
        "-m",
        "remediator",
        *command,
        "--policies",
        str(policies),
        "--state-dir",
        str(state),
    ]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    # Once untraced, so that Python's own byte-code cache is in place and only the controller's
    # behaviour is traced.
    warm = subprocess.run(argv, cwd=work, env=env, capture_output=True, text=True, timeout=120, check=False)
    assert warm.returncode in (0, 3), warm.stderr
    before = _snapshot(policies)
    traced = subprocess.run(
        [strace, "-f", "-y", "-qq", "-s", "4096", "-e", f"trace={','.join(TRACED)}", "-o", str(log), *argv],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert traced.returncode in (0, 3), traced.stderr
    paths = writes(log, str(work))
    assert paths, "the trace saw no write at all: the parser or strace is broken"
    allowed = (str(state) + "/", "/dev/null", "/dev/tty")
    outside = sorted({p for p in paths if not (p == str(state) or p.startswith(allowed))})
    assert outside == [], f"writes outside {state}: {outside}"
    # The checkout is bit for bit as it was, .git included.
    assert _snapshot(policies) == before
    # And git really ran: the trace shows it reading the checkout.
    assert str(policies) in log.read_text()
