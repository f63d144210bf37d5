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

import contextlib
import io
import json
import secrets
import shutil
import subprocess
import tarfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import docker
import pytest
from docker.models.containers import Container

from tests.real.conftest import (
    _SESSION_OWNER,
    CONTAINER_PREFIX,
    CONTAINERD_SOCK,
    HOST,
    OWNER_LABEL,
    TEST_LABEL,
    MakeContainer,
    unavailable,
)

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


# -- The hardening blocks none of the actions ------------------------------------------------
#
# Each action runs in the shipped remediator-once.service (its sandbox untouched: capabilities,
# ProtectSystem=strict, ReadWritePaths=, MemoryMax=, the system call filter), started by
# systemd, never from a shell in the container. What each needs from the outside, honestly:
#
# * raise-sysctl writes the real kernel: the container gets a writable /proc/sys
#   (`systempaths=unconfined`) and the unit's own sandbox is what is under test. That also lets
#   systemd as PID 1 raise fs.file-max and fs.nr_open for the whole host at boot, and
#   systemd-sysctl apply its /usr/lib/sysctl.d (kernel.pid_max, fs.protected_*): those units are
#   masked, PID 1's raises are put back right after boot, and every sysctl the image's systemd
#   could touch is compared before and after. A per-netns sysctl would be harmless but is not a
#   pool the action may raise (probes/limits_pools.py allows host-wide pools only), so it would
#   not prove the action. Host-wide: run this under the shared flock.
# * clean-fifos: orphaned fifo dirs in the container's own /run/containerd/fifo, judged against
#   the host's containerd (its socket and `ctr` bind-mounted in), with a fresh dir as bystander.
# * reclaim-cgroup: a busybox container in the booted container's pid namespace
#   (`--pid container:<systemd>`), so its processes are visible to the unit; its memory cgroup
#   is the host's /sys/fs/cgroup/memory/docker/<id>, writable through the bind-mounted hierarchy.
# * the Docker socket: the system dockerd's, bind-mounted; the reclaim target is found through
#   it (the inventory lists and inspects it; labels pick it from everyone else's containers).

HARDENING_LABEL = "remediator.test.hardening"
MASKED_UNITS = ("systemd-sysctl.service", "systemd-binfmt.service", "proc-sys-fs-binfmt_misc.automount")
ROOTFS = Path("/var/cache/remediator-test/systemd-rootfs/bookworm")
RAISED_KEY = "fs.inotify.max_user_instances"

ACTION_POLICIES = """\
apiVersion: remediator.io/v1
kind: Policy
metadata: {name: hardening-sysctl}
spec:
  mode: enforce
  interval: 30s
  watch: {probe: limits, metric: inotify_instances_max_uid, above: 0.001%}
  actions:
    - action: raise-sysctl
      params: {key: fs.inotify.max_user_instances, factor: 2.0}
---
apiVersion: remediator.io/v1
kind: Policy
metadata: {name: hardening-fifos}
spec:
  mode: enforce
  interval: 30s
  watch: {probe: fifos, metric: orphan_fifo_dirs, above: 0}
  actions:
    - action: clean-fifos
      params: {minAge: 10m, maxDirs: 100}
---
apiVersion: remediator.io/v1
kind: Policy
metadata: {name: hardening-reclaim}
spec:
  mode: enforce
  interval: 30s
  watch: {probe: dentries, metric: negative, above: 0}
  containers:
    include: [{label: "LABEL=RUN"}]
  actions:
    - action: reclaim-cgroup
      params: {target: top, rankBy: slab_reclaimable_bytes}
"""


def image_sysctl_keys() -> list[str]:
    """Every key the image's sysctl.d files set (what systemd-sysctl would write), plus the
    ones PID 1 raises itself."""
    keys = set(GUARDED_SYSCTLS)
    for conf in sorted((ROOTFS / "usr/lib/sysctl.d").glob("*.conf")):
        for line in conf.read_text().splitlines():
            key = line.split("=", 1)[0].strip().lstrip("-")
            if "=" in line and key and not key.startswith(("#", ";")) and "*" not in key:
                keys.add(key)
    return sorted(k for k in keys if HOST.sysctl_path(k).exists())


@pytest.fixture
def booted_for_actions(
    systemd_image: str,
    docker_client: docker.DockerClient,
    sysctl_guard: Callable[[str], str],
    tmp_path: Path,
) -> Iterator[tuple[Container, str]]:
    keys = image_sysctl_keys()
    before = {k: sysctl_guard(k) for k in (*keys, RAISED_KEY)}
    mounts_before = cgroup_mounts()
    hierarchies = sorted(p.name for p in Path("/sys/fs/cgroup").iterdir() if p.is_dir() or p.is_symlink())
    volumes = {f"/sys/fs/cgroup/{h}": {"bind": f"/sys/fs/cgroup/{h}", "mode": "rw"} for h in hierarchies}
    volumes[str(ROOT)] = {"bind": SRC, "mode": "ro"}
    for unit in ("remediator.service", "remediator-once.service", "remediator-once.timer"):
        volumes[str(ROOT / "systemd" / unit)] = {"bind": f"/etc/systemd/system/{unit}", "mode": "ro"}
    empty = tmp_path / "masked"
    empty.write_text("")  # an empty unit file is a masked unit (systemd.unit(5))
    mask_binds = [f"{empty}:/etc/systemd/system/{unit}:ro" for unit in MASKED_UNITS]
    volume_list = [f"{src}:{v['bind']}:{v['mode']}" for src, v in volumes.items()] + mask_binds
    volume_list += [
        "/var/run/docker.sock:/run/docker.sock:rw",
        f"{CONTAINERD_SOCK}:/run/containerd/containerd.sock:rw",
        f"{shutil.which('ctr')}:/usr/local/bin/ctr:ro",
    ]
    run = secrets.token_hex(4)
    # `docker run --security-opt systempaths=unconfined` is the CLI's spelling of empty
    # MaskedPaths and ReadonlyPaths, which the SDK's run() cannot pass: created through the
    # low-level API, labelled like make_container's (the session sweep knows them).
    api = docker_client.api
    host_config = api.create_host_config(
        binds=volume_list,
        cap_add=["ALL"],
        cap_drop=["SYS_RESOURCE"],
        security_opt=["seccomp=unconfined"],
        cgroupns="host",
        tmpfs={"/sys/fs/cgroup": "", "/run": "", "/run/lock": ""},
    )
    host_config.update(MaskedPaths=[], ReadonlyPaths=[])
    created = api.create_container(
        systemd_image,
        ["/lib/systemd/systemd"],
        name=f"{CONTAINER_PREFIX}hardening-{run}",
        environment={"container": "docker"},
        labels={TEST_LABEL: "1", OWNER_LABEL: _SESSION_OWNER},
        host_config=host_config,
    )
    c = docker_client.containers.get(created["Id"])
    c.start()
    try:
        state = wait_for(
            c, ["systemctl", "is-system-running"], lambda out: out in {"running", "degraded"}, 60
        )
        # PID 1 raised fs.file-max and fs.nr_open for the host while it booted: put them back
        # now, before anything else runs, and make sure nothing else changed.
        for key in GUARDED_SYSCTLS:
            if HOST.read_sysctl(key) != before[key]:
                HOST.sysctl_path(key).write_text(before[key] + "\n")
        assert {k: HOST.read_sysctl(k) for k in keys} == {k: before[k] for k in keys}
        assert state in {"running", "degraded"}, sh(c, "systemctl --failed --no-pager")[1]
        _, sys_mount = sh(c, "grep ' /proc/sys ' /proc/self/mountinfo || echo none")
        assert sys_mount == "none" or " rw," in f" {sys_mount.split()[5]},", sys_mount
        assert c.put_archive(
            "/",
            tar_of(
                {
                    "/etc/remediator/policies/actions.yaml": ACTION_POLICIES.replace(
                        "LABEL=RUN", f"{HARDENING_LABEL}={run}"
                    ),
                    "/usr/local/sbin/remediator": WRAPPER,
                },
                {},
                executables=("/usr/local/sbin/remediator",),
            ),
        )
        sh(c, "systemctl daemon-reload")
        yield c, run
    finally:
        c.remove(force=True)
        for key in GUARDED_SYSCTLS:  # again: a failed boot may not have reached the restore
            if HOST.read_sysctl(key) != before[key]:
                HOST.sysctl_path(key).write_text(before[key] + "\n")
        assert cgroup_mounts() == mounts_before, "booting systemd in a container changed the host"
        # sysctl_guard restores RAISED_KEY and checks every key it was given.


def journal_events(c: Container, unit: str) -> list[dict[str, Any]]:
    _, out = sh(c, f"journalctl -u {unit} --no-pager -o cat")
    events = []
    for line in out.splitlines():
        with contextlib.suppress(ValueError):
            if isinstance(event := json.loads(line), dict):
                events.append(event)
    return events


def test_hardening_blocks_none_of_the_actions(
    booted_for_actions: tuple[Container, str], make_container: MakeContainer
) -> None:
    c, run = booted_for_actions
    assert show(c, "systemd-sysctl.service", "LoadState") == "masked"
    # The reclaim target, in the booted container's pid namespace; a bystander outside it.
    target = make_container(
        labels={HARDENING_LABEL: run},
        pid_mode=f"container:{c.id}",
        command=[
            "sh",
            "-c",
            "i=0; while [ $i -lt 3000 ]; do stat /nx$i 2>/dev/null; i=$((i+1)); done; sleep 3600",
        ],
    )
    bystander = make_container(labels={HARDENING_LABEL: run})  # eligible, but not ours to see
    # Orphaned fifo dirs (2 h old) and a fresh one (the bystander: younger than minAge).
    leaks = [secrets.token_hex(8) for _ in range(3)]
    fresh = secrets.token_hex(8)
    script = ["set -e", "mkdir -p /run/containerd/fifo", "cd /run/containerd/fifo"]
    for d in [*leaks, fresh]:
        script.append(f"mkdir {d} && for s in stdin stdout stderr; do mkfifo {d}/{d}-$s; done")
    for d in leaks:
        script.append(f"touch -h -d '2 hours ago' {d}/* {d}")
    code, out = sh(c, " && ".join(script[:3]) + "\n" + "\n".join(script[3:]))
    assert code == 0, out
    raised_before = int(HOST.read_sysctl(RAISED_KEY))
    time.sleep(2)  # the target's lookups have run

    sh(c, "systemctl start remediator-once.service")  # its Result says how it went
    result = once_ran(c, "0")
    events = journal_events(c, "remediator-once")
    applied = {e.get("policy"): e for e in events if e.get("event") == "action_applied"}
    failed = [e for e in events if e.get("event") in {"action_failed", "probe_failed"}]
    assert result == "success", (
        result,
        failed,
        sh(c, "journalctl -u remediator-once --no-pager | tail -30")[1],
    )

    # raise-sysctl: the host's kernel value went up, written from inside the sandbox.
    assert "hardening-sysctl" in applied, failed
    assert int(HOST.read_sysctl(RAISED_KEY)) > raised_before
    # clean-fifos: the orphans are gone, the fresh dir stays.
    _, left = sh(c, "ls /run/containerd/fifo")
    assert set(left.split()) == {fresh}, (left, applied.get("hardening-fifos"), failed)
    # reclaim-cgroup through the Docker socket's inventory: the target's memory cgroup.
    reclaim = applied.get("hardening-reclaim")
    assert reclaim is not None, failed
    assert reclaim["target"]["id"] == target.id
    assert reclaim["target"]["id"] != bystander.id
    # The inventory came over the bind-mounted socket and saw the host's containers.
    reads = [e for e in events if e.get("event") == "probe_read" and e.get("probe") == "dentries"]
    assert reads and reads[-1]["containers"] >= 2
    for name, event in sorted(applied.items()):
        print(f"{name}: {event['message']}")
    _, security = sh(c, "systemd-analyze security --no-pager remediator-once.service | tail -1")
    print(security)
