"""The systemd units in systemd/: valid for systemd, and consistent with the code they run.

`systemd-analyze verify` (Debian package `systemd`) loads the units the way PID 1 would and
reports unknown keys, bad values and missing executables. It needs no running systemd: this
test machine's PID 1 is not systemd. It does check that ExecStart= binaries exist, so the units
are copied to a temporary directory with ExecStart= pointed at this venv's `remediator` script.

Missing `systemd-analyze` is a failure, not a skip: scripts/test.sh installs it.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from remediator.actions.recreate import MAX_STOP_TIMEOUT_SECONDS
from remediator.cli import EXIT_POLICY, EXIT_USAGE
from remediator.errors import LockHeld
from remediator.settings import Settings

REPO = Path(__file__).resolve().parents[2]
UNITS_DIR = REPO / "systemd"
DAEMON = "remediator.service"
ONESHOT = "remediator-once.service"
TIMER = "remediator-once.timer"
UNITS = (DAEMON, ONESHOT, TIMER)
INSTALLED_BINARY = "/usr/local/sbin/remediator"  # scripts/install.sh makes this link

# Pinned: a caller's SYSTEMD_LOG_LEVEL=debug would print parse notes for every unit on the host.
VERIFY_ENV = {"SYSTEMD_LOG_LEVEL": "info", "SYSTEMD_LOG_COLOR": "0", "SYSTEMD_LOG_TARGET": "console"}


# -- helpers ----------------------------------------------------------------------------------


def systemd_analyze() -> str:
    path = shutil.which("systemd-analyze")
    assert path is not None, (
        "systemd-analyze not found: install the Debian package `systemd` (scripts/test.sh does)"
    )
    return path


def venv_remediator() -> str:
    found = shutil.which("remediator", path=str(Path(sys.executable).parent)) or shutil.which("remediator")
    assert found is not None, "no `remediator` entry point: pip install -e . into this venv"
    return found


def parse_unit(text: str) -> dict[str, list[tuple[str, str]]]:
    """A unit file -> {section: [(key, value), ...]}; keys may repeat, as in systemd."""
    sections: dict[str, list[tuple[str, str]]] = {}
    current: list[tuple[str, str]] | None = None
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], [])
            continue
        assert current is not None, f"key outside a section: {raw!r}"
        key, sep, value = line.partition("=")
        assert sep, f"not a key=value line: {raw!r}"
        current.append((key.strip(), value.strip()))
    return sections


def unit(name: str) -> dict[str, list[tuple[str, str]]]:
    return parse_unit((UNITS_DIR / name).read_text(encoding="utf-8"))


def values(name: str, section: str, key: str) -> list[str]:
    return [v for k, v in unit(name).get(section, []) if k == key]


def single(name: str, section: str, key: str) -> str:
    found = values(name, section, key)
    assert len(found) == 1, f"{name} [{section}] {key}= given {len(found)} times"
    return found[0]


_TIMESPAN = re.compile(r"(\d+(?:\.\d+)?)\s*(us|ms|min|sec|s|m|hr|h|d)")
_TIMESPAN_SECONDS = {
    "us": 1e-6,
    "ms": 1e-3,
    "s": 1.0,
    "sec": 1.0,
    "min": 60.0,
    "m": 60.0,
    "hr": 3600.0,
    "h": 3600.0,
    "d": 86400.0,
}


def timespan(text: str) -> float:
    """systemd.time(7) spans as the units use them ("10min", "6min", "30s") -> seconds."""
    parts = _TIMESPAN.findall(text)
    assert parts and "".join(n + u for n, u in parts) == text.replace(" ", ""), text
    return sum(float(n) * _TIMESPAN_SECONDS[u] for n, u in parts)


def copy_units(dest: Path, extra: dict[str, str] | None = None) -> list[Path]:
    """The units (and any extra ones) in `dest`, ExecStart= pointed at this venv's remediator."""
    binary = venv_remediator()
    out = []
    for name in UNITS:
        text = (UNITS_DIR / name).read_text(encoding="utf-8")
        assert INSTALLED_BINARY in text or name == TIMER, f"{name} does not run {INSTALLED_BINARY}"
        (dest / name).write_text(text.replace(INSTALLED_BINARY, binary), encoding="utf-8")
        out.append(dest / name)
    for name, text in (extra or {}).items():
        (dest / name).write_text(text.replace(INSTALLED_BINARY, binary), encoding="utf-8")
        out.append(dest / name)
    return out


def verify(paths: list[Path], level: str = "info") -> subprocess.CompletedProcess[str]:
    env = {**os.environ, **VERIFY_ENV, "SYSTEMD_LOG_LEVEL": level}
    return subprocess.run(
        [systemd_analyze(), "verify", "--man=no", "--generators=no", *map(str, paths)],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        check=False,
    )


def our_lines(output: str, tmp: Path, names: tuple[str, ...]) -> list[str]:
    """Lines about our units; verify may also talk about unrelated units of this host."""
    return [line for line in output.splitlines() if str(tmp) in line or any(n in line for n in names)]


def unit_dump(output: str, name: str) -> list[str]:
    """The `-> Unit <name>:` block of a debug-level verify: systemd's view of the parsed unit."""
    lines = output.splitlines()
    start = next(i for i, line in enumerate(lines) if line.strip() == f"-> Unit {name}:")
    block = []
    for line in lines[start + 1 :]:
        if line.strip().startswith("-> Unit "):
            break
        block.append(line.strip())
    return block


# -- systemd's own checks ---------------------------------------------------------------------


def test_units_verify_without_warnings(tmp_path: Path) -> None:
    result = verify(copy_units(tmp_path))
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert our_lines(output, tmp_path, UNITS) == [], output


def test_verify_reports_a_broken_unit(tmp_path: Path) -> None:
    """The check above is not vacuous: a misspelt key and a missing binary are reported."""
    broken = (UNITS_DIR / DAEMON).read_text(encoding="utf-8")
    broken = broken.replace("ProtectSystem=strict", "ProtectSytem=strict")
    broken = broken.replace(f"ExecStart={INSTALLED_BINARY}", "ExecStart=/nonexistent/remediator")
    path = tmp_path / "broken.service"
    path.write_text(broken, encoding="utf-8")
    result = verify([path])
    output = result.stdout + result.stderr
    assert result.returncode != 0, output
    assert "ProtectSytem" in output
    assert "/nonexistent/remediator" in output


def test_systemd_parses_what_we_meant(tmp_path: Path) -> None:
    """Read back systemd's own dump of each unit: some mistakes are dropped silently (an
    unknown capability name vanishes from the bounding set without a warning)."""
    result = verify(copy_units(tmp_path), level="debug")
    output = result.stdout + result.stderr
    assert result.returncode == 0, output

    for name in (DAEMON, ONESHOT):
        dump = unit_dump(output, name)
        wanted = sorted(c.lower() for c in single(name, "Service", "CapabilityBoundingSet").split())
        assert f"CapabilityBoundingSet: {' '.join(wanted)}" in dump, name
        # The job is writing /proc/sys and cgroup files: neither may be made read-only.
        assert "ProtectKernelTunables: no" in dump
        assert "ProtectControlGroups: no" in dump
        assert "ProtectSystem: strict" in dump
        assert "StateDirectory: remediator" in dump
        assert "StateDirectoryMode: 0700" in dump
        # clean-fifos under /run/containerd; raise-sysctl's file in /etc/sysctl.d.
        assert "ReadWritePaths: -/run/containerd -/etc/sysctl.d" in dump

    daemon = unit_dump(output, DAEMON)
    assert "Type: notify" in daemon
    assert "NotifyAccess: main" in daemon
    assert any(line.startswith(f"Conflicts: {TIMER}") for line in daemon)
    assert "Type: oneshot" in unit_dump(output, ONESHOT)
    assert any(line.startswith(f"Triggers: {ONESHOT}") for line in unit_dump(output, TIMER))


# -- consistency with the code ----------------------------------------------------------------


def test_exec_lines_run_the_installed_binary() -> None:
    assert single(DAEMON, "Service", "ExecStart").split()[:2] == [INSTALLED_BINARY, "run"]
    assert single(ONESHOT, "Service", "ExecStart").split()[:2] == [INSTALLED_BINARY, "once"]
    assert single(DAEMON, "Service", "ExecReload") == "/bin/kill -HUP $MAINPID"
    install = (REPO / "scripts" / "install.sh").read_text(encoding="utf-8")
    assert f"link=${{REMEDIATOR_LINK:-{INSTALLED_BINARY}}}" in install


def test_exit_codes_match_the_cli() -> None:
    # Bad policies and usage errors: restarting cannot help (cli.py, docs/cli.md).
    prevent = {int(v) for v in single(DAEMON, "Service", "RestartPreventExitStatus").split()}
    assert prevent == {EXIT_POLICY, EXIT_USAGE}
    # A timer run that found the lock held did nothing wrong.
    success = {int(v) for v in single(ONESHOT, "Service", "SuccessExitStatus").split()}
    assert success == {LockHeld.exit_code}


def test_timeouts_outlast_the_longest_action() -> None:
    """The watchdog ping and the stop both wait for the running cycle; the longest legitimate
    one is a recreate waiting its maximum stopTimeout, after waiting for the instance lock."""
    longest_cycle = MAX_STOP_TIMEOUT_SECONDS + Settings().lock_timeout
    assert timespan(single(DAEMON, "Service", "WatchdogSec")) > longest_cycle
    assert timespan(single(DAEMON, "Service", "TimeoutStopSec")) > longest_cycle
    assert timespan(single(ONESHOT, "Service", "TimeoutStartSec")) > longest_cycle


# Lines that differ between the daemon and the one-shot run by design; everything else (the
# sandbox and the resource limits) must be the same in both.
_ROLE_KEYS = {
    "Type",
    "NotifyAccess",
    "ExecStart",
    "ExecReload",
    "WatchdogSec",
    "TimeoutStopSec",
    "TimeoutStartSec",
    "KillMode",
    "Restart",
    "RestartSec",
    "RestartPreventExitStatus",
    "SuccessExitStatus",
}


def test_oneshot_has_the_daemons_sandbox() -> None:
    def sandbox(name: str) -> list[tuple[str, str]]:
        return sorted((k, v) for k, v in unit(name)["Service"] if k not in _ROLE_KEYS)

    assert sandbox(ONESHOT) == sandbox(DAEMON)


@pytest.mark.parametrize("text, seconds", [("10min", 600.0), ("30s", 30.0), ("1h 5min", 3900.0)])
def test_timespan(text: str, seconds: float) -> None:
    assert timespan(text) == seconds
