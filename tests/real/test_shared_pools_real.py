"""Reproduces shared-kernel-limits-ja.txt for the pools a container shares with the host, on
the real kernel and dockerd, with limits lowered for a few seconds (always restored, even on
failure, and checked by `sysctl_guard`):

* inotify: a container exhausts its uid's inotify instances and watches while a host `tail -f`
  of the same uid runs; a second host `tail -f` falls back to polling. `remediator audit`
  attributes the usage to the container and the uid and reports the degraded `tail -f`;
  `remediator once` raises both limits within their ceilings and writes the sysctl.d file (into a
  temporary config root, never the real /etc); a new `tail -f` then gets inotify.
* file-max: a root container (no CAP_SYS_ADMIN, so subject to the limit) exhausts fs.file-max;
  a non-root host process cannot start (ENFILE). `once` raises file-max; the process starts.
* aio: a container exhausts fs.aio-max-nr; `once` raises it.
* restart-degraded: a consumer container that came up while the pool was exhausted is still
  reported after the raise (as the daemon sees it) and is restarted through Docker; so is a
  container that crashed while file-max was exhausted and that Docker's restart policy could
  not bring back (ENFILE at exec).
* conntrack: a bridged container's TCP connections to the host fill the host's table (its
  limit lowered to what is in use + 400 for ~10 s); host connects time out; `audit` attributes
  the entries to the container; `once` raises nf_conntrack_max. Run under the shared flock.

Each test keeps a bystander container and checks it untouched. The machine is shared: the uid
used for inotify is one no other test uses, and lowered limits stay lowered only while the test
waits for remediator (seconds); root on the host is exempt from file-max (CAP_SYS_ADMIN).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from remediator.actions.base import ApplyContext, PlanContext
from remediator.actions.restart_degraded import RestartDegraded, RestartDegradedParams
from remediator.clock import SystemClock
from remediator.host import HostRoot
from remediator.model import Outcome, Plan, Reading
from remediator.probes.base import ProbeContext
from remediator.probes.containers import make_inventory_factory
from remediator.probes.limits import LimitsProbe
from remediator.probes.limits_fdscan import ScanCache
from remediator.probes.memory import DictMemory
from tests.helpers import remediator_json
from tests.real.conftest import MakeContainer, run_holder, unavailable

pytestmark = pytest.mark.real

HOST = HostRoot()
POOL_UID = 4343  # used by no host process and by no other test: its inotify counts are ours
POOL_HOLDER = Path(__file__).with_name("pool_holder.c")


def policy(name: str, metric: str, key: str) -> str:
    return f"""\
apiVersion: remediator.io/v1
kind: Policy
metadata:
  name: {name}
spec:
  mode: enforce
  interval: 30s
  watch:
    probe: limits
    metric: {metric}
    above: 90%
  actions:
    - action: raise-sysctl
      settle: 1m
      params: {{key: {key}, factor: 2.0}}
  cooldown: 30m
"""


@pytest.fixture
def world(tmp_path: Path) -> dict[str, Path]:
    """Policies, state and a config root (etc/ only) for raise-sysctl's sysctl.d file."""
    config = tmp_path / "config"
    (config / "etc").mkdir(parents=True)
    (tmp_path / "policies").mkdir()
    return {"policies": tmp_path / "policies", "state": tmp_path / "state", "config": config}


def remediator(world: dict[str, Path], *args: str) -> dict[str, Any]:
    return remediator_json(
        *args, "--config-root", str(world["config"]), policies=world["policies"], state=world["state"]
    )


@pytest.fixture(scope="module")
def pool_holder_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        unavailable("no C compiler to build tests/real/pool_holder.c", "apt-get install gcc libc6-dev")
    out = tmp_path_factory.mktemp("pool-holder")
    out.chmod(0o755)
    subprocess.run([cc, "-static", "-O2", "-o", str(out / "pool_holder"), str(POOL_HOLDER)], check=True)
    return out


def hold_pool(make_container: MakeContainer, d: Path, *args: str, **kwargs: Any) -> tuple[Any, int]:
    c = make_container(
        command=("/h/pool_holder", *args), volumes={str(d): {"bind": "/h", "mode": "ro"}}, **kwargs
    )
    deadline = time.monotonic() + 20
    while (m := re.search(rb"ready (\d+) (\d+)", c.logs())) is None:
        assert time.monotonic() < deadline, f"pool_holder did not start: {c.logs()!r}"
        time.sleep(0.05)
    return c, int(m.group(1))


def holds_inotify(pid: int) -> bool:
    fd_dir = HOST.proc / str(pid) / "fd"
    return any(os.readlink(fd_dir / n) == "anon_inode:inotify" for n in os.listdir(fd_dir))


@pytest.fixture
def public_log() -> Iterator[Path]:
    """A log file the pool uid can read (pytest's tmp dirs are root-only)."""
    d = Path(tempfile.mkdtemp(prefix="rmd-test-log-"))
    d.chmod(0o755)
    log = d / "app.log"
    log.write_text("start\n")
    log.chmod(0o644)
    yield log
    shutil.rmtree(d)


@pytest.fixture
def tails(tmp_path: Path) -> Iterator[list[subprocess.Popen[bytes]]]:
    procs: list[subprocess.Popen[bytes]] = []
    yield procs
    for p in procs:
        p.kill()
        p.wait(timeout=10)


def start_tail(tails: list[subprocess.Popen[bytes]], log: Path) -> subprocess.Popen[bytes]:
    p = subprocess.Popen(
        ["tail", "-f", str(log)],
        user=POOL_UID,
        group=POOL_UID,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    tails.append(p)
    deadline = time.monotonic() + 5
    while not (HOST.proc / str(p.pid) / "fd" / "3").exists() and time.monotonic() < deadline:
        time.sleep(0.02)  # tail has opened its file (fd 3) and set up inotify, or failed to
    time.sleep(0.2)
    return p


def own_file(world: dict[str, Path]) -> str:
    return (world["config"] / "etc" / "sysctl.d" / "90-remediator.conf").read_text()


def test_inotify_exhausted_by_a_container_while_host_tail_f_runs(
    make_container: MakeContainer,
    holder_dir: Path,
    sysctl_guard: Any,
    world: dict[str, Path],
    public_log: Path,
    tails: list[subprocess.Popen[bytes]],
) -> None:
    instances_key, watches_key = "fs.inotify.max_user_instances", "fs.inotify.max_user_watches"
    orig_i, orig_w = int(sysctl_guard(instances_key)), int(sysctl_guard(watches_key))
    (world["policies"] / "p.yaml").write_text(
        policy("inotify-instances", "inotify_instances_max_uid", instances_key)
        + "---\n"
        + policy("inotify-watches", "inotify_watches_max_uid", watches_key)
    )
    log = public_log
    bystander = make_container()
    hog = run_holder(make_container, holder_dir, ("6", "/tmp", "/etc", "/bin"), user=f"{POOL_UID}:{POOL_UID}")
    first = start_tail(tails, log)
    assert holds_inotify(first.pid)  # the pool is not exhausted yet: tail -f uses inotify

    # The uid now holds 7 instances and 19 watches; make that the limit (root's own use on this
    # host is far below it, and the limits go back within seconds).
    try:
        HOST.sysctl_path(instances_key).write_text("7\n")
        HOST.sysctl_path(watches_key).write_text("19\n")
        degraded = start_tail(tails, log)
        assert not holds_inotify(degraded.pid)  # fell back to polling ("reverting to polling")

        doc = remediator(world, "audit")
        limits = doc["readings"]["limits"]
        assert limits["detail"]["inotify_by_uid"][str(POOL_UID)] == {"instances": 7, "watches": 19}
        by_name = {c["container"]["name"]: c["values"] for c in limits["containers"]}
        assert (by_name[hog.name]["inotify_instances"], by_name[hog.name]["inotify_watches"]) == (6, 18)
        assert by_name[bystander.name]["inotify_instances"] == 0
        assert {c["pid"]: c["uid"] for c in limits["detail"]["degraded_consumers"]} == {
            degraded.pid: POOL_UID
        }
        assert [a["result"]["outcome"] for p in doc["policies"] for a in p["actions"]] == ["would_apply"] * 2
        assert (int(HOST.read_sysctl(instances_key)), int(HOST.read_sysctl(watches_key))) == (7, 19)
        assert not (world["config"] / "etc" / "sysctl.d").exists()  # audit wrote nothing

        doc = remediator(world, "once")
        results = {a["result"]["before"]["key"]: a["result"] for p in doc["policies"] for a in p["actions"]}
        now_i, now_w = int(HOST.read_sysctl(instances_key)), int(HOST.read_sysctl(watches_key))
        new_tail = start_tail(tails, log)
        new_tail_ok = holds_inotify(new_tail.pid)
    finally:
        # Restore now, not at teardown: the window with lowered limits stays seconds long.
        HOST.sysctl_path(instances_key).write_text(f"{orig_i}\n")
        HOST.sysctl_path(watches_key).write_text(f"{orig_w}\n")

    assert (now_i, now_w) == (14, 38)
    for key, value in ((instances_key, 14), (watches_key, 38)):
        r = results[key]
        assert (r["outcome"], r["verified"], r["after"]["value"], r["after"]["persisted_value"]) == (
            "applied",
            True,
            value,
            value,
        )
        assert value <= r["before"]["ceiling"]
        assert f"\n{key} = {value}\n" in own_file(world)
    assert new_tail_ok  # a new host tail -f gets inotify again
    assert not holds_inotify(degraded.pid)  # raising does not heal it: it needs a restart
    for c, cid in ((bystander, bystander.id), (hog, hog.id)):
        c.reload()
        assert (c.id, c.status) == (cid, "running")


def run_as_pool_uid(*argv: str) -> tuple[int, str]:
    """Exit status and stderr of a non-root host process; an exec that fails (ENFILE while
    opening the binary) is (-1, the error)."""
    try:
        p = subprocess.run(
            list(argv), check=False, user=POOL_UID, group=POOL_UID, capture_output=True, text=True, timeout=10
        )
    except OSError as e:
        return -1, str(e)
    return p.returncode, p.stderr


def test_file_max_exhausted_by_a_root_container_locks_out_host_users(
    make_container: MakeContainer, pool_holder_dir: Path, sysctl_guard: Any, world: dict[str, Path]
) -> None:
    key = "fs.file-max"
    original = int(sysctl_guard(key))
    (world["policies"] / "p.yaml").write_text(policy("file-handles", "file_handles", key))
    bystander = make_container()
    allocated = int(HOST.read_text(HOST.proc / "sys/fs/file-nr").split()[0])
    limit = allocated + 3000
    try:
        HOST.sysctl_path(key).write_text(f"{limit}\n")
        # Root in a container lacks CAP_SYS_ADMIN: it is held to file-max like any user.
        # 15,000 fds fit the container's RLIMIT_NOFILE (dockerd's 20,000); the pool has 3,000.
        hog, held = hold_pool(make_container, pool_holder_dir, "files", "15000")
        locked_out = run_as_pool_uid("/bin/cat", "/etc/hostname")

        doc = remediator(world, "audit")
        limits = doc["readings"]["limits"]
        by_name = {c["container"]["name"]: c["values"] for c in limits["containers"]}
        top = max(by_name, key=lambda n: by_name[n]["file_handles"])

        doc = remediator(world, "once")
        (a,) = doc["policies"][0]["actions"]
        raised = int(HOST.read_sysctl(key))
        after = run_as_pool_uid("/bin/cat", "/etc/hostname")
    finally:
        HOST.sysctl_path(key).write_text(f"{original}\n")

    assert held > 1000  # the container got most of the room before the pool ran dry
    # ENFILE: ld.so cannot open the libraries ("error 23"), or cat cannot open its file.
    assert locked_out[0] != 0
    assert "23" in locked_out[1] or "Too many open files in system" in locked_out[1]
    assert top == hog.name and by_name[hog.name]["file_handles"] >= held
    assert (a["result"]["outcome"], a["result"]["verified"]) == ("applied", True)
    assert raised == 2 * limit and raised <= a["result"]["before"]["ceiling"]
    assert f"\n{key} = {raised}\n" in own_file(world)
    assert after[0] == 0, after[1]
    bystander.reload()
    assert bystander.status == "running"


def test_aio_exhausted_by_a_container_is_raised(
    make_container: MakeContainer, pool_holder_dir: Path, sysctl_guard: Any, world: dict[str, Path]
) -> None:
    key = "fs.aio-max-nr"
    original = int(sysctl_guard(key))
    (world["policies"] / "p.yaml").write_text(policy("aio", "aio_requests", key))
    bystander = make_container()
    in_use = int(HOST.read_sysctl("fs.aio-nr"))
    try:
        HOST.sysctl_path(key).write_text(f"{in_use + 4096}\n")
        hog, contexts = hold_pool(make_container, pool_holder_dir, "aio", "1000")
        nr = int(HOST.read_sysctl("fs.aio-nr"))
        doc = remediator(world, "audit")
        value = doc["policies"][0]["decisions"][0]["value"]
        doc = remediator(world, "once")
        (a,) = doc["policies"][0]["actions"]
        raised = int(HOST.read_sysctl(key))
    finally:
        HOST.sysctl_path(key).write_text(f"{original}\n")
    assert contexts > 0 and nr > 0.9 * (in_use + 4096)  # io_setup failed with EAGAIN at the limit
    assert value == nr
    assert (a["result"]["outcome"], raised) == ("applied", 2 * (in_use + 4096))
    assert f"\n{key} = {raised}\n" in own_file(world)
    hog.remove(force=True)  # `docker rm -f` frees the contexts at once
    assert int(HOST.read_sysctl("fs.aio-nr")) == in_use
    bystander.reload()
    assert bystander.status == "running"


def conntrack_drops() -> int:
    """The kernel's "table full, dropping packet" counter (the `drop` column of every CPU's row)."""
    header, *rows = HOST.read_text(HOST.proc / "net/stat/nf_conntrack").split("\n")
    col = header.split().index("drop")
    return sum(int(r.split()[col], 16) for r in rows if r.strip())


@contextlib.contextmanager
def tcp_listener(address: str) -> Iterator[tuple[int, list[socket.socket]]]:
    """A host listener that accepts and holds every connection (so that they stay ESTABLISHED,
    and their conntrack entries ASSURED: a full table cannot evict them early)."""
    lsock = socket.create_server((address, 0), backlog=4096)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        lsock.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(lsock.accept()[0])
            except OSError:
                continue

    t = threading.Thread(target=accept, daemon=True)
    t.start()
    try:
        yield lsock.getsockname()[1], held
    finally:
        stop.set()
        t.join(timeout=5)
        for c in held:
            c.close()
        lsock.close()


def host_connects(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1.5):
            return True
    except OSError:
        return False


def test_conntrack_table_filled_by_a_container_times_out_host_connects(
    make_container: MakeContainer, pool_holder_dir: Path, sysctl_guard: Any, world: dict[str, Path]
) -> None:
    """A bridged container opens TCP connections to the host until the host's conntrack table is
    full: the host's own new connections (loopback is tracked too) time out and the kernel counts
    "table full, dropping packet". `audit` attributes the entries to the container by its address;
    `once` raises nf_conntrack_max within its ceiling; host connects work again.

    The count is per network namespace against one global nf_conntrack_max, and the container's
    connections to the host are tracked in the host's namespace: so the honest way to fill the
    host's table without flooding the machine is to lower nf_conntrack_max to what is in use plus
    400 entries, for the ~10 s the test needs (run under the shared flock: the host's other new
    flows are dropped meanwhile), and put it back in `finally` (and sysctl_guard checks it)."""
    key = "net.netfilter.nf_conntrack_max"
    if not HOST.sysctl_path(key).exists():
        unavailable("the nf_conntrack module is not loaded", "modprobe nf_conntrack")
    original = int(sysctl_guard(key))
    (world["policies"] / "p.yaml").write_text(policy("conntrack", "conntrack_entries", key))
    gateway = docker_bridge_gateway()
    bystander = make_container()
    with tcp_listener("0.0.0.0") as (port, accepted):
        drops_before = conntrack_drops()
        limit = int(HOST.read_sysctl("net.netfilter.nf_conntrack_count")) + 400
        try:
            HOST.sysctl_path(key).write_text(f"{limit}\n")
            hog, held = hold_pool(make_container, pool_holder_dir, "tcp", "2000", gateway, str(port))
            full = int(HOST.read_sysctl("net.netfilter.nf_conntrack_count"))
            host_before = host_connects(port)
            drops = conntrack_drops() - drops_before

            doc = remediator(world, "audit")
            limits = doc["readings"]["limits"]
            by_name = {c["container"]["name"]: c["values"] for c in limits["containers"]}

            doc = remediator(world, "once")
            (a,) = doc["policies"][0]["actions"]
            raised = int(HOST.read_sysctl(key))
            host_after = host_connects(port)
        finally:
            HOST.sysctl_path(key).write_text(f"{original}\n")
        assert len(accepted) >= held  # the connections were real and held
    assert int(HOST.read_sysctl(key)) == original

    assert 200 < held < 2000 and "110" in hog.logs().decode()  # stopped by a dropped SYN (ETIMEDOUT)
    assert full >= limit - 5  # the table was full (entries of other flows may expire meanwhile)
    assert not host_before and drops > 0
    hog_entries = by_name[hog.name]["conntrack_entries"]
    assert hog_entries >= held and hog_entries == max(v["conntrack_entries"] for v in by_name.values())
    assert by_name[bystander.name]["conntrack_entries"] == 0
    assert (a["result"]["outcome"], a["result"]["verified"]) == ("applied", True)
    assert raised == 2 * limit and raised <= a["result"]["before"]["ceiling"]
    assert f"\n{key} = {raised}\n" in own_file(world)
    assert host_after
    bystander.reload()
    assert bystander.status == "running"


def docker_bridge_gateway() -> str:
    out = subprocess.run(
        ["docker", "network", "inspect", "bridge", "-f", "{{range .IPAM.Config}}{{.Gateway}}{{end}}"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    if not out:
        # dockerd leaves IPAM's Gateway empty on some hosts (seen on a fresh one): the bridge
        # interface's own address is the gateway then.
        out = (
            subprocess.run(
                [
                    "docker",
                    "network",
                    "inspect",
                    "bridge",
                    "-f",
                    '{{index .Options "com.docker.network.bridge.name"}}',
                ],
                capture_output=True,
                text=True,
                check=True,
            ).stdout.strip()
            or "docker0"
        )
        addr = subprocess.run(
            ["ip", "-4", "-o", "addr", "show", "dev", out], capture_output=True, text=True, check=True
        ).stdout.split()
        out = next((a.split("/")[0] for a in addr if "/" in a and a[0].isdigit()), "")
    assert out, "the default bridge has no gateway address"
    return out


def test_a_container_degraded_by_the_exhaustion_is_restarted_after_the_raise(
    make_container: MakeContainer, holder_dir: Path, sysctl_guard: Any, docker_client: Any
) -> None:
    """In one process, as the daemon sees it: the probe remembers that the uid's pool was
    exhausted, so the consumer that came up without inotify is still reported after the raise,
    and restart-degraded restarts its container (through Docker) and nothing else."""
    key = "fs.inotify.max_user_instances"
    original = int(sysctl_guard(key))
    bystander = make_container()
    run_holder(make_container, holder_dir, ("6", "/tmp"), user=f"{POOL_UID}:{POOL_UID}")
    probe = LimitsProbe(cache=ScanCache())

    def read() -> Reading:
        ctx = ProbeContext(
            HOST, SystemClock(), make_inventory_factory("unix:///var/run/docker.sock", HOST, 30.0)
        )
        return probe.read(ctx)

    try:
        HOST.sysctl_path(key).write_text("6\n")
        # busybox's tail -f is a consumer by name that holds no inotify fd: degraded while the
        # uid's pool is exhausted.
        victim = make_container(command=("tail", "-f", "/etc/hostname"), user=f"{POOL_UID}:{POOL_UID}")
        old_pid, old_start = victim.attrs["State"]["Pid"], victim.attrs["State"]["StartedAt"]
        exhausted = read()
    finally:
        HOST.sysctl_path(key).write_text(f"{original}\n")
    after_raise = read()
    for r in (exhausted, after_raise):
        # (the inotify consumers; crash-looping containers of other tests, if any, have no pid)
        assert [(c["pid"], c["container_id"]) for c in r.detail["degraded_consumers"] if "pid" in c] == [
            (old_pid, victim.id)
        ]
    assert after_raise.detail["inotify_exhausted_uids"] == []

    plan = RestartDegraded().plan(
        PlanContext(
            "inotify-degraded",
            "inotify_degraded",
            "host",
            after_raise,
            RestartDegradedParams(stopTimeout=1),
            lambda c: c.id == victim.id,
            0.0,
        )
    )
    assert isinstance(plan, Plan), plan
    result = RestartDegraded().execute(
        plan, ApplyContext(HOST, SystemClock(), dry_run=False, docker_factory=lambda: docker_client)
    )
    assert (result.outcome, result.verified) == (Outcome.APPLIED, True), result.message
    victim.reload()
    assert victim.id == plan.expect["targets"][0]["id"] and victim.status == "running"
    assert victim.attrs["State"]["StartedAt"] != old_start and victim.attrs["State"]["Pid"] != old_pid
    bystander.reload()
    assert bystander.status == "running"


def test_a_container_that_crashed_while_file_max_was_exhausted_is_restarted_after_the_raise(
    make_container: MakeContainer, pool_holder_dir: Path, sysctl_guard: Any, docker_client: Any
) -> None:
    """A container whose loop needs to open a file dies when a root container exhausts
    fs.file-max, and Docker's restart (on-failure) cannot exec it again (ENFILE): the limits
    probe reports it with the pool, in one process as the daemon sees it, also after the limit
    is back up; restart-degraded restarts it through Docker and it runs; the bystander and the
    hog are untouched (the hog is the offender, for recreate-container, not a consumer)."""
    key = "fs.file-max"
    original = int(sysctl_guard(key))
    bystander = make_container()
    victim = make_container(
        command=("sh", "-c", "while cat /etc/hostname >/dev/null; do sleep 0.2; done; exit 7"),
        restart_policy={"Name": "on-failure", "MaximumRetryCount": 3},
    )
    first_start = victim.attrs["State"]["StartedAt"]
    memory = DictMemory()
    probe = LimitsProbe(cache=ScanCache(), docker=lambda: docker_client.api)

    def read() -> Reading:
        inventory = make_inventory_factory("unix:///var/run/docker.sock", HOST, 30.0)
        return probe.read(ProbeContext(HOST, SystemClock(), inventory, memory=memory))

    def mine(r: Reading) -> list[dict[str, Any]]:
        return [c for c in r.detail["degraded_consumers"] if c.get("container_id") == victim.id]

    allocated = int(HOST.read_text(HOST.proc / "sys/fs/file-nr").split()[0])
    try:
        HOST.sysctl_path(key).write_text(f"{allocated + 3000}\n")
        hog, held = hold_pool(make_container, pool_holder_dir, "files", "15000")
        # The pool is full, but other processes on a shared machine free a file now and then,
        # and file-nr is a per-CPU counter: hold it below what is allocated for these seconds,
        # so that every allocation of a process without CAP_SYS_ADMIN fails (ENFILE).
        in_use = int(HOST.read_text(HOST.proc / "sys/fs/file-nr").split()[0])
        HOST.sysctl_path(key).write_text(f"{in_use - 500}\n")
        deadline = time.monotonic() + 20
        while True:  # the victim's next `cat` fails; Docker's restarts cannot exec `sh`
            victim.reload()
            if victim.status == "exited" or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        during = read()
    finally:
        HOST.sysctl_path(key).write_text(f"{original}\n")
    after_raise = read()

    assert held > 1000 and victim.status == "exited", (held, victim.attrs["State"])
    assert "file_handles" in during.detail["exhausted_pools"]
    for r in (during, after_raise):
        (entry,) = mine(r)
        assert (
            entry["reason"] == "exited (exit 7) since the pool was exhausted"
            or "RestartCount" in entry["reason"]
        )
        assert (entry["kind"], entry["pool"], entry["container"]) == (
            "container",
            "file_handles",
            victim.name,
        )
    assert after_raise.values["degraded_consumers"] >= 1
    assert not [
        c for c in after_raise.detail["degraded_consumers"] if c.get("container_id") in (bystander.id, hog.id)
    ]

    plan = RestartDegraded().plan(
        PlanContext(
            "degraded",
            "degraded_consumers",
            "host",
            after_raise,
            RestartDegradedParams(stopTimeout=1),
            lambda c: c.id == victim.id,
            0.0,
        )
    )
    assert isinstance(plan, Plan), plan
    assert [t["id"] for t in plan.expect["targets"]] == [victim.id]
    result = RestartDegraded().execute(
        plan, ApplyContext(HOST, SystemClock(), dry_run=False, docker_factory=lambda: docker_client)
    )
    assert (result.outcome, result.verified) == (Outcome.APPLIED, True), result.message
    time.sleep(1)  # a second `cat` pass: the pool has room again
    victim.reload()
    assert victim.status == "running" and victim.attrs["State"]["StartedAt"] != first_start
    assert mine(read()) == []  # running: no longer degraded
    for c in (bystander, hog):
        before = c.attrs["State"]["StartedAt"]
        c.reload()
        assert (c.status, c.attrs["State"]["StartedAt"]) == ("running", before)
