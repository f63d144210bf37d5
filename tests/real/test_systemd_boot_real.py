"""The shipped units under a real systemd (Debian 12's systemd 252 booted as PID 1 in a
container): READY, SIGHUP reload, a hung daemon restarted by the watchdog, no restart loop on a
bad policy set (exit 1, RestartPreventExitStatus=), and the timer's oneshot sharing the state
directory and lock with the daemon.

The rootfs is built once by scripts/make-systemd-rootfs.sh (cached under
/var/cache/remediator-test; rebuilt when missing). The checkout and its .venv are bind-mounted
read-only at the same path, so the units run this tree's code.

The host is protected, and checked afterwards: each cgroup v1 hierarchy is bind-mounted on its
own (never the whole /sys/fs/cgroup, which systemd would remount read-only for the host), and
Docker keeps /proc/sys read-only for a container that is not privileged, so systemd's boot-time
raise of fs.file-max and fs.nr_open cannot reach the host. Those sysctls and the host's cgroup
mounts are compared before and after.
"""

from __future__ import annotations

import io
import subprocess
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from docker.models.containers import Container

from tests.real.conftest import HOST, MakeContainer, unavailable

pytestmark = [pytest.mark.real, pytest.mark.slow]

ROOT = Path(__file__).resolve().parent.parent.parent
# Where the checkout is mounted inside the container. Not its host path: the units have
# PrivateTmp=yes, so a checkout under /tmp (CI's clone may be one) would vanish from the
# services' view. The command is a wrapper that runs this tree with the checkout's .venv.
SRC = "/opt/remediator-src"
WRAPPER = f"""#!/bin/sh
PYTHONPATH={SRC} exec {SRC}/.venv/bin/python3 -m remediator "$@"
"""
IMAGE = "remediator-test/systemd:bookworm"
GUARDED_SYSCTLS = ("fs.file-max", "fs.nr_open", "kernel.pid_max", "kernel.threads-max")

POLICY = """\
apiVersion: remediator.io/v1
kind: Policy
metadata: {name: dentries-watch}
spec:
  mode: audit
  interval: 5s
  watch: {probe: dentries, metric: negative, above: 1T}
  actions: [{action: drop-caches, params: {what: dentries-inodes}}]
"""
BROKEN = "apiVersion: remediator.io/v1\nkind: Policy\nmetadata: {name: broken}\n"

# The test's overrides of the shipped units: short watchdog and restart delay, the timer firing
# at once. Everything else (sandbox, capabilities, exit-code handling) is the shipped unit.
DAEMON_DROPIN = "[Service]\nWatchdogSec=6s\nRestartSec=1s\n"
TIMER_DROPIN = "[Timer]\nOnBootSec=\nOnUnitActiveSec=\nOnActiveSec=1s\nAccuracySec=1s\nRandomizedDelaySec=0\n"


def cgroup_mounts() -> list[str]:
    lines = HOST.read_text(HOST.proc / "self" / "mountinfo").splitlines()
    return sorted(" ".join(line.split()[3:]) for line in lines if "cgroup" in line)


def host_facts() -> dict[str, object]:
    return {
        "sysctls": {k: HOST.read_sysctl(k) for k in GUARDED_SYSCTLS},
        "cgroup_mounts": cgroup_mounts(),
    }


@pytest.fixture(scope="module")
def systemd_image() -> str:
    if subprocess.run(["which", "debootstrap"], capture_output=True, check=False).returncode != 0:
        unavailable("debootstrap is not installed", "apt-get install debootstrap (scripts/test.sh does)")
    result = subprocess.run(
        [str(ROOT / "scripts" / "make-systemd-rootfs.sh")],
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    if result.returncode != 0:
        unavailable(
            f"the systemd rootfs could not be built: {result.stderr[-500:]}", "scripts/make-systemd-rootfs.sh"
        )
    return result.stdout.strip()


def tar_of(files: dict[str, str], links: dict[str, str], executables: tuple[str, ...] = ()) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for path, text in files.items():
            data = text.encode()
            info = tarfile.TarInfo(path.lstrip("/"))
            info.size = len(data)
            info.mode = 0o755 if path in executables else 0o644
            tar.addfile(info, io.BytesIO(data))
        for path, target in links.items():
            info = tarfile.TarInfo(path.lstrip("/"))
            info.type = tarfile.SYMTYPE
            info.linkname = target
            tar.addfile(info)
    return buf.getvalue()


@pytest.fixture
def booted(systemd_image: str, make_container: MakeContainer) -> Iterator[Container]:
    before = host_facts()
    hierarchies = sorted(p.name for p in Path("/sys/fs/cgroup").iterdir() if p.is_dir() or p.is_symlink())
    volumes = {f"/sys/fs/cgroup/{h}": {"bind": f"/sys/fs/cgroup/{h}", "mode": "rw"} for h in hierarchies}
    volumes[str(ROOT)] = {"bind": SRC, "mode": "ro"}
    for unit in ("remediator.service", "remediator-once.service", "remediator-once.timer"):
        volumes[str(ROOT / "systemd" / unit)] = {"bind": f"/etc/systemd/system/{unit}", "mode": "ro"}
    c = make_container(
        image=systemd_image,
        command=["/lib/systemd/systemd"],
        environment={"container": "docker"},
        cap_add=["ALL"],
        cap_drop=["SYS_RESOURCE"],
        security_opt=["seccomp=unconfined"],
        cgroupns="host",
        tmpfs={"/sys/fs/cgroup": "", "/run": "", "/run/lock": ""},
        volumes=volumes,
    )
    try:
        assert c.put_archive(
            "/",
            tar_of(
                {
                    "/etc/remediator/policies/p.yaml": POLICY,
                    "/etc/systemd/system/remediator.service.d/test.conf": DAEMON_DROPIN,
                    "/etc/systemd/system/remediator-once.timer.d/test.conf": TIMER_DROPIN,
                    "/usr/local/sbin/remediator": WRAPPER,
                },
                {},
                executables=("/usr/local/sbin/remediator",),
            ),
        )
        state = wait_for(
            c, ["systemctl", "is-system-running"], lambda out: out in {"running", "degraded"}, 60
        )
        assert state in {"running", "degraded"}
        sh(c, "systemctl daemon-reload")
        # What keeps PID 1's raise of fs.file-max off the host: /proc/sys is read-only in here.
        _, sys_mount = sh(c, "grep ' /proc/sys ' /proc/self/mountinfo")
        assert sys_mount and " ro," in f" {sys_mount.split()[5]},", sys_mount
        yield c
    finally:
        c.remove(force=True)
        after = host_facts()
        assert after == before, "booting systemd in a container changed the host"


def sh(c: Container, cmd: str) -> tuple[int, str]:
    code, out = c.exec_run(["sh", "-c", cmd])
    return code, out.decode(errors="replace").strip()


def show(c: Container, unit: str, prop: str) -> str:
    return sh(c, f"systemctl show -p {prop} --value {unit}")[1]


def wait_for(c: Container, cmd: list[str], ok: object, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    out = ""
    while time.monotonic() < deadline:
        _, raw = c.exec_run(cmd)
        out = raw.decode(errors="replace").strip()
        if ok(out):  # type: ignore[operator]
            return out
        time.sleep(0.5)
    return out


def once_ran(c: Container, since: str) -> str:
    """Wait for remediator-once.service to finish a run that started after `since` (monotonic
    usec, as systemctl shows it); its Result."""
    wait_for(
        c,
        ["systemctl", "show", "-p", "ExecMainExitTimestampMonotonic", "--value", "remediator-once.service"],
        lambda o: o not in {"", "0"} and int(o) > int(since or 0),
        60,
    )
    return show(c, "remediator-once.service", "Result")


def test_units_under_real_systemd(booted: Container) -> None:
    c = booted
    # The timer fires the oneshot (on a host without the daemon).
    assert sh(c, "systemctl start remediator-once.timer")[0] == 0
    result = once_ran(c, "0")
    assert result == "success", sh(c, "journalctl -u remediator-once --no-pager | tail -20")[1]
    _, once_log = sh(c, "journalctl -u remediator-once --no-pager -o cat")
    assert "policy_evaluated" in once_log

    # READY: a Type=notify start returns once the daemon said READY=1 (and its STATUS=). The
    # daemon conflicts with the timer: starting it stops the timer.
    code, out = sh(c, "systemctl start remediator")
    assert code == 0, out + sh(c, "journalctl -u remediator --no-pager | tail -20")[1]
    assert show(c, "remediator", "ActiveState") == "active"
    assert "1 policies, live" in show(c, "remediator", "StatusText")
    assert show(c, "remediator-once.timer", "ActiveState") == "inactive"

    # SIGHUP reload (ExecReload=): the policy set is reloaded, the daemon keeps running.
    pid = show(c, "remediator", "MainPID")
    assert sh(c, "systemctl reload remediator")[0] == 0
    logs = wait_for(
        c, ["journalctl", "-u", "remediator", "--no-pager"], lambda o: "policies_reloaded" in o, 20
    )
    assert "policies_reloaded" in logs
    assert show(c, "remediator", "MainPID") == pid

    # The oneshot run by hand beside the daemon: same state directory and lock (exit 75, lock
    # held, counts as success), and the daemon goes on.
    last = show(c, "remediator-once.service", "ExecMainExitTimestampMonotonic")
    assert sh(c, "systemctl start remediator-once.service")[0] == 0
    assert once_ran(c, last) == "success"
    _, files = sh(c, "ls /var/lib/remediator")
    assert {"state.db", "lock", "audit.jsonl"} <= set(files.split())
    assert show(c, "remediator", "MainPID") == pid

    # A hung daemon stops pinging the watchdog: systemd kills it and starts a new one.
    restarts = int(show(c, "remediator", "NRestarts"))
    code, out = sh(c, f"/bin/kill -STOP {pid}")
    assert code == 0, out + sh(c, "systemctl status remediator --no-pager; ps -ef")[1]
    new_pid = wait_for(
        c,
        ["systemctl", "show", "-p", "MainPID", "--value", "remediator"],
        lambda o: o not in {pid, "0", ""},
        40,
    )
    assert new_pid not in {pid, "0", ""}, sh(c, "journalctl -u remediator --no-pager | tail -20")[1]
    journal = sh(c, "journalctl -u remediator --no-pager | tail -15")[1]
    assert int(show(c, "remediator", "NRestarts")) == restarts + 1, f"{new_pid}: {journal}"
    assert "watchdog" in sh(c, "journalctl -u remediator --no-pager")[1].lower()
    wait_for(c, ["systemctl", "is-active", "remediator"], lambda o: o == "active", 20)

    # The sandbox as systemd scores it (docs/operations.md records the number).
    _, security = sh(c, "systemd-analyze security --no-pager remediator.service | tail -1")
    print(security)  # shown with -s; e.g. "Overall exposure level for remediator.service: 4.6 OK"
    assert "Overall exposure level for remediator.service" in security

    # A bad policy set at start is exit 1, which the unit does not restart: no loop.
    sh(c, f"cat > /etc/remediator/policies/bad.yaml <<'EOF'\n{BROKEN}EOF")
    sh(c, "systemctl restart remediator")
    time.sleep(5)  # five RestartSec= periods: a loop would have restarted it by now
    assert show(c, "remediator", "ActiveState") == "failed"
    assert show(c, "remediator", "ExecMainStatus") == "1"
    # A manual restart resets the counter; an automatic restart since would have raised it.
    assert show(c, "remediator", "NRestarts") == "0"
    assert "error(s) in policies" in sh(c, "journalctl -u remediator --no-pager -n 30")[1]
