"""Every containerd the real tier can run: the system's (1.6.20) and private 1.7.24 and 2.1.9.

The private ones are Debian trixie's and sid's packages, unpacked (not installed) by
scripts/suite-package.sh into /var/cache/remediator-test (cached; fetched when missing), and
started beside the system containerd with their own socket, root, state and config, in a
namespace of their own. The system's runc runs their containers (its own `--runc-root` per
instance, so runc's state never mixes with the system containerd's). The image is the test image
exported from the system containerd. One session-scoped fixture starts them and stops them at
the end of the session, after killing every task they still run.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from remediator.host import HostRoot
from tests.real.conftest import CONTAINERD_SOCK, CTR_IMAGE, CTR_NAMESPACE, unavailable

CACHE = Path("/var/cache/remediator-test")
REPO = Path(__file__).resolve().parents[2]
PRIVATE_NAMESPACE = "rmd-test"
# Debian suites carrying the versions we run, and what `containerd --version` must say.
SUITES = {"1.7.24": "trixie", "2.1.9": "sid"}
VERSIONS = ("1.6.20", *SUITES)


@dataclass
class Containerd:
    """One containerd daemon and the `ctr` of the same version."""

    version: str
    socket: Path
    ctr_binary: str
    namespace: str
    runc_root: Path | None = None  # None: the system containerd's default
    process: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    def ctr(self, *args: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        cmd = [self.ctr_binary, "--address", str(self.socket), "--namespace", self.namespace, *args]
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
        if check and result.returncode:
            raise AssertionError(f"ctr {self.version} {' '.join(args)}: {result.stderr.strip()}")
        return result

    def run_task(self, fifo_dir: Path, name: str, *cmd: str) -> None:
        extra = ["--runc-root", str(self.runc_root)] if self.runc_root else []
        self.ctr("run", "-d", "--fifo-dir", str(fifo_dir), *extra, CTR_IMAGE, name, *cmd)

    def exec_detached(self, fifo_dir: Path, task: str, exec_id: str, *cmd: str) -> None:
        self.ctr("tasks", "exec", "-d", "--fifo-dir", str(fifo_dir), "--exec-id", exec_id, task, *cmd)

    def remove(self, name: str) -> None:
        """Kill and delete a task and its container, as an orchestrator would."""
        self.ctr("tasks", "kill", "-s", "SIGKILL", name, check=False)
        for _ in range(100):  # a killed task must be reaped before it can be deleted
            deleted = self.ctr("tasks", "delete", name, check=False)
            if deleted.returncode == 0 or "not found" in deleted.stderr:
                break
            time.sleep(0.1)
        self.ctr("containers", "delete", name, check=False)

    def tasks(self) -> list[str]:
        return self.ctr("tasks", "ls", "-q").stdout.split()

    def containers(self) -> list[str]:
        return self.ctr("containers", "ls", "-q").stdout.split()


def fixture_host(tmp_path: Path, c: Containerd) -> tuple[HostRoot, Path]:
    """A host root whose proc is the real /proc, with a fifo root configured for `c` alone
    (`--fifo-root /srv/fifo=/srv/containerd.sock`, the socket a symlink to c's). Returns the
    host and the fifo root's real path, for `ctr --fifo-dir`."""
    root = tmp_path / "host"
    (root / "run").mkdir(parents=True)
    (root / "proc").symlink_to(HostRoot().proc)
    fifo = root / "srv" / "fifo"
    fifo.mkdir(parents=True, mode=0o700)
    (root / "srv" / "containerd.sock").symlink_to(c.socket)
    return HostRoot(root, (("/srv/fifo", ("/srv/containerd.sock",)),)), fifo


def _unpacked(suite: str) -> Path:
    root = CACHE / suite / "root"
    if not (root / "usr" / "bin" / "containerd").exists():
        fetched = subprocess.run(
            [str(REPO / "scripts" / "suite-package.sh"), suite, str(CACHE), "containerd"],
            capture_output=True,
            text=True,
            timeout=600,
            check=False,
        )
        if fetched.returncode:
            unavailable(
                f"containerd from Debian {suite} could not be fetched: {fetched.stderr.strip()[-300:]}",
                f"scripts/suite-package.sh {suite} {CACHE} containerd",
            )
    return root


def _start(version: str, suite: str, base: Path, image_tar: Path) -> Containerd:
    bindir = _unpacked(suite) / "usr" / "bin"
    said = subprocess.run(
        [str(bindir / "containerd"), "--version"], capture_output=True, text=True, check=False
    )
    if version not in said.stdout:
        unavailable(f"{bindir}/containerd is not {version}: {said.stdout.strip()}", f"rm -r {CACHE / suite}")
    d = base / suite
    for sub in ("root", "state", "runc"):
        (d / sub).mkdir(parents=True)
    sock = d / "containerd.sock"
    config = d / "config.toml"
    # Version 2 config: 1.7 reads it natively, 2.x migrates it. CRI is off: we only use ctr.
    config.write_text(
        f'version = 2\nroot = "{d / "root"}"\nstate = "{d / "state"}"\n'
        'disabled_plugins = ["io.containerd.grpc.v1.cri"]\n'
        f'[grpc]\n  address = "{sock}"\n[ttrpc]\n  address = "{sock}.ttrpc"\n'
        f'[debug]\n  address = "{d / "debug.sock"}"\n[metrics]\n  address = ""\n'
    )
    # Only this version's shim goes before the system's PATH: the unpacked tree may hold other
    # packages' binaries too (a runc built for a newer glibc), and runc must be the system's.
    shims = d / "bin"
    shims.mkdir()
    (shims / "containerd-shim-runc-v2").symlink_to(bindir / "containerd-shim-runc-v2")
    env = {**os.environ, "PATH": f"{shims}:{os.environ.get('PATH', '/usr/sbin:/usr/bin:/sbin:/bin')}"}
    log = (d / "containerd.log").open("wb")
    proc = subprocess.Popen(
        [str(bindir / "containerd"), "--config", str(config)],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
        start_new_session=True,
    )
    c = Containerd(version, sock, str(bindir / "ctr"), PRIVATE_NAMESPACE, d / "runc", proc)
    deadline = time.monotonic() + 30
    while c.ctr("version", check=False).returncode:
        if proc.poll() is not None or time.monotonic() > deadline:
            tail = (d / "containerd.log").read_text(errors="replace")[-500:]
            _stop(c)
            pytest.fail(f"private containerd {version} did not start: {tail}", pytrace=False)
        time.sleep(0.2)
    c.ctr("images", "import", str(image_tar))
    return c


def _mount_points() -> list[Path]:
    """Mount points of this mount namespace (proc(5) /proc/self/mountinfo, field 5)."""
    lines = (HostRoot().proc / "self" / "mountinfo").read_text().splitlines()
    return [Path(line.split()[4].replace("\\040", " ")) for line in lines]


def _stop(c: Containerd) -> list[str]:
    """Kill its tasks, stop the daemon; what could not be cleaned up."""
    problems: list[str] = []
    if c.process is not None and c.process.poll() is None:
        try:
            for task in c.tasks():
                c.remove(task)
            for container in c.containers():
                c.ctr("containers", "delete", container, check=False)
        except (AssertionError, subprocess.SubprocessError) as e:
            problems.append(f"{c.version}: {e}")
        c.process.send_signal(signal.SIGTERM)
        try:
            c.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            c.process.kill()
            c.process.wait(timeout=10)
            problems.append(f"containerd {c.version} needed SIGKILL")
    return problems


@pytest.fixture(scope="session")
def containerds(ctr_image: str) -> Iterator[dict[str, Containerd]]:
    """The system containerd and one private instance of each other version, by version."""
    # A short path: runc fails without a word (no log.json) when the state path under it is
    # too long for one of the unix sockets it makes there (sun_path is 108 bytes).
    base = Path(tempfile.mkdtemp(prefix="rmd-test-cd-", dir="/tmp"))
    image_tar = base / "image.tar"
    system = Containerd("1.6.20", CONTAINERD_SOCK, "ctr", CTR_NAMESPACE)
    system.ctr("images", "export", str(image_tar), ctr_image)
    said = subprocess.run(["containerd", "--version"], capture_output=True, text=True, check=False).stdout
    if "1.6.20" not in said:
        unavailable(f"the system containerd is not 1.6.20: {said.strip()}", "apt-get install containerd")
    started: dict[str, Containerd] = {"1.6.20": system}
    try:
        for version, suite in SUITES.items():
            started[version] = _start(version, suite, base, image_tar)
        yield started
    finally:
        problems = [p for c in started.values() if c.process is not None for p in _stop(c)]
        mounted = [m for m in _mount_points() if m.is_relative_to(base)]
        if mounted:  # never remove a tree with something mounted in it
            problems.append(f"still mounted: {mounted}")
        else:
            shutil.rmtree(base, ignore_errors=True)
        if problems:
            pytest.fail(f"private containerds: {problems}", pytrace=False)
