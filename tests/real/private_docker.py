"""A private dockerd of a later Debian suite (trixie: docker.io 26.1.5, containerd 1.7), beside
the system's, so the container actions' real tests also run against a newer Engine API and an
API difference is found by a test, not a user.

Binaries come from `scripts/suite-package.sh SUITE /var/cache/remediator-test docker.io
containerd runc` (cached; unpacked with dpkg -x, nothing installed). Everything the daemons own
is private: containerd's address, root and state; dockerd's socket, --data-root, --exec-root,
--pidfile and cgroup parent; and dockerd runs in a network namespace of its own
(`ip netns add remediator-test-docker26`, entered with nsenter --net only, so it sees the host's
mounts and cgroups), with its own bridge and iptables off. The namespace is not optional:
dockerd 26 deletes the host's docker0 at start-up when it runs in the host's network namespace
with another bridge (seen here: the system dockerd's default network then has no bridge). The
system runc (Debian 12's) is used: trixie's needs a newer glibc, and runc is not what these
tests are about.

The data root persists under /var/lib/remediator-test (the test image stays loaded between
runs); its containers are all test containers and are removed at start and at the end. A flock
on the base directory keeps two sessions from sharing one instance.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import docker
import docker.errors

REPO = Path(__file__).resolve().parents[2]
CACHE = Path("/var/cache/remediator-test")
STATE = Path("/var/lib/remediator-test")
SUITES = {"trixie": "26", "sid": "28"}
BRIDGE_CIDR = "10.213.255.1/24"
POOL = "base=10.214.0.0/16,size=24"
START_TIMEOUT_S = 60
LOCK_TIMEOUT_S = 600


class Unavailable(Exception):
    """The private engine cannot be started; the message says why and how to fix it."""


@dataclass
class PrivateDocker:
    suite: str
    version: str
    url: str
    client: docker.DockerClient


def _unpack(suite: str) -> Path:
    try:
        out = subprocess.run(
            [
                str(REPO / "scripts" / "suite-package.sh"),
                suite,
                str(CACHE),
                "docker.io",
                "containerd",
                "runc",
            ],
            capture_output=True,
            text=True,
            timeout=600,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError) as e:
        raise Unavailable(f"cannot fetch {suite}'s docker.io: {e}") from e
    return Path(out.strip().splitlines()[-1])


def _wait_socket(sock: Path, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while not sock.is_socket():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise Unavailable(f"{proc.args[0]} did not start: {log.read_text()[-2000:]}")
        time.sleep(0.1)


def _stop(proc: subprocess.Popen[bytes] | None) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)


@contextlib.contextmanager
def private_docker(suite: str, image: str, system: docker.DockerClient) -> Iterator[PrivateDocker]:
    """Start containerd + dockerd of `suite`, load `image` from the system daemon, yield a
    client; stop both (and remove the bridge and every container) on exit."""
    version = SUITES[suite]
    root = _unpack(suite)
    base = Path(f"/run/remediator-test-docker{version}")
    data = STATE / f"docker{version}"
    base.mkdir(parents=True, exist_ok=True)
    data.mkdir(parents=True, exist_ok=True)
    lock = os.open(data / "lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    deadline = time.monotonic() + LOCK_TIMEOUT_S
    while True:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            if time.monotonic() > deadline:
                os.close(lock)
                raise Unavailable(f"another test session holds {data / 'lock'}") from None
            time.sleep(1)
    bridge = f"rmdtest{version}"
    netns = f"remediator-test-docker{version}"
    procs: list[subprocess.Popen[bytes]] = []
    client: docker.DockerClient | None = None
    try:
        # A private PATH: the suite's shim, docker-init and docker-proxy; the system's runc.
        bindir = base / "bin"
        bindir.mkdir(exist_ok=True)
        links = {
            "containerd-shim-runc-v2": root / "usr/bin/containerd-shim-runc-v2",
            "docker-init": root / "usr/bin/docker-init",
            "docker-proxy": root / "usr/sbin/docker-proxy",
            "runc": Path(shutil.which("runc") or "/usr/sbin/runc"),
        }
        for name, target in links.items():
            link = bindir / name
            with contextlib.suppress(FileNotFoundError):
                link.unlink()
            link.symlink_to(target)
        env = {**os.environ, "PATH": f"{bindir}:/usr/sbin:/usr/bin:/sbin:/bin"}

        config = base / "containerd.toml"
        config.write_text(
            "version = 2\n"
            f'root = "{data}/containerd"\n'
            f'state = "{base}/containerd"\n'
            'disabled_plugins = ["io.containerd.grpc.v1.cri"]\n'
            f'[grpc]\n  address = "{base}/containerd.sock"\n'
            f'[ttrpc]\n  address = "{base}/containerd.sock.ttrpc"\n'
            f'[debug]\n  address = "{base}/containerd-debug.sock"\n'
            '[metrics]\n  address = ""\n'
        )
        for stale in ("containerd.sock", "docker.sock"):
            with contextlib.suppress(FileNotFoundError):
                (base / stale).unlink()
        ctd_log = base / "containerd.log"
        with open(ctd_log, "wb") as out:
            procs.append(
                subprocess.Popen(
                    [str(root / "usr/bin/containerd"), "--config", str(config)],
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    env=env,
                    start_new_session=True,
                )
            )
        _wait_socket(base / "containerd.sock", procs[-1], ctd_log)

        subprocess.run(["ip", "netns", "del", netns], capture_output=True, check=False)
        subprocess.run(["ip", "netns", "add", netns], check=True)
        inside = ["ip", "-n", netns]
        subprocess.run([*inside, "link", "set", "lo", "up"], check=True)
        subprocess.run([*inside, "link", "add", "name", bridge, "type", "bridge"], check=True)
        subprocess.run([*inside, "addr", "add", BRIDGE_CIDR, "dev", bridge], check=True)
        subprocess.run([*inside, "link", "set", bridge, "up"], check=True)
        dockerd_log = base / "dockerd.log"
        with open(dockerd_log, "wb") as out:
            procs.append(
                subprocess.Popen(
                    [
                        "nsenter",
                        f"--net=/run/netns/{netns}",
                        "--",
                        str(root / "usr/sbin/dockerd"),
                        f"--containerd={base}/containerd.sock",
                        f"--data-root={data}/docker",
                        f"--exec-root={base}/exec",
                        f"--pidfile={base}/dockerd.pid",
                        f"--host=unix://{base}/docker.sock",
                        f"--bridge={bridge}",
                        "--iptables=false",
                        "--ip6tables=false",
                        "--ip-masq=false",
                        f"--default-address-pool={POOL}",
                        f"--cgroup-parent=remediator-test-docker{version}",
                        "--userland-proxy=false",
                    ],
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    env=env,
                    start_new_session=True,
                )
            )
        _wait_socket(base / "docker.sock", procs[-1], dockerd_log)
        url = f"unix://{base}/docker.sock"
        client = docker.DockerClient(base_url=url, timeout=60)
        for c in client.containers.list(all=True):  # leftovers of a killed session: all ours
            c.remove(force=True, v=True)
        try:
            client.images.get(image)
        except docker.errors.ImageNotFound:
            client.images.load(b"".join(system.images.get(image).save(named=True)))
        yield PrivateDocker(suite, client.version()["Version"], url, client)
    finally:
        if client is not None:
            with contextlib.suppress(docker.errors.DockerException):
                for c in client.containers.list(all=True):
                    c.remove(force=True, v=True)
            client.close()
        for proc in reversed(procs):
            _stop(proc)
        subprocess.run(["ip", "netns", "del", netns], capture_output=True, check=False)
        os.close(lock)
