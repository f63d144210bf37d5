"""Fixtures for the real tier: root, the real kernel, the running containerd and dockerd.

Every fixture that changes the host puts it back at teardown, also when the test failed, and
teardown itself fails loudly when it could not (a leaked sysctl or mount must not pass unseen).

A missing prerequisite fails the test with the command that fixes it; set
``REMEDIATOR_SKIP_REAL=1`` to skip instead (see tests/conftest.py for the rules).

Fixtures:

* ``docker_client`` (session): ``docker.DockerClient`` on /var/run/docker.sock.
* ``busybox_image`` (session): ``"remediator-test/busybox:latest"``, built by
  scripts/make-test-image.sh.
* ``ctr_image`` (session): the same image's name in containerd's ``default`` namespace,
  ``"docker.io/remediator-test/busybox:latest"``, for tests that drive ``ctr``.
* ``make_container(name=None, labels=None, command=("sleep", "3600"), **kwargs)``: a started
  container (``docker.models.containers.Container``); extra keyword arguments go to
  ``containers.run`` (``image=`` overrides the busybox image). Each is labelled
  ``remediator.test=1``, and removed by name (force, with volumes) at teardown, so a container
  that a test recreated under the same name goes too.
* ``sysctl_guard(key)``: saves a sysctl (``"fs.inotify.max_user_instances"``) and returns its
  value as text; the saved value is written back at teardown (last saved, first restored).
* ``holder_dir`` (module): a directory with a static ``holder`` binary built from
  tests/real/inotify_holder.c, to bind-mount into busybox containers; ``run_holder(make_container,
  holder_dir, args, **kwargs)`` starts one running it and waits until it says ``ready``.
  ``OTHER_UID`` is a uid no host process uses, so its per-uid inotify counts are the test's own.
* ``dcache_load_dir`` (module): a directory with a static ``dcache_load`` binary built from
  tests/real/dcache_load.c (trasher, worker, idle bystander of the negative-dentry case), to
  bind-mount into busybox containers at /load; ``run_dcache_load(make_container, dir, args)``
  starts one and waits until it says ``ready``.
* ``small_tmpfs(size="4M", nr_inodes=None)``: mounts a new tmpfs on an empty directory and
  returns that Path; unmounted at teardown (lazily if busy).
* ``docker26``, ``docker28`` (session): a private dockerd 26.1.5 (Debian trixie) or 28.5.2
  (sid) beside the system one (tests/real/private_docker.py), with the test image loaded;
  started on first use, stopped at the end of the session. ``ENGINES`` and
  ``engine_client(request)`` let a module run its tests against each: see
  tests/real/test_recreate_real.py.

At the start and the end of the session, containers labelled ``remediator.test=1`` that were left
behind are removed: those of this session, and those of sessions that are gone (their owner label
names a process that no longer runs). Containers of another live pytest session are left alone,
so two developers' runs on one machine do not break each other. Leftover test tmpfs mounts are
swept the same way.
"""

from __future__ import annotations

import errno
import os
import secrets
import shutil
import subprocess
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, NoReturn, Protocol

import docker
import docker.errors
import pytest
import requests
from docker.models.containers import Container

from remediator.host import HostRoot
from remediator.probes.dentries import find_memory_hierarchy
from tests.real.private_docker import PrivateDocker, Unavailable, private_docker

DOCKER_SOCK = Path("/var/run/docker.sock")
CONTAINERD_SOCK = Path("/run/containerd/containerd.sock")
BUSYBOX_IMAGE = "remediator-test/busybox:latest"
CTR_NAMESPACE = "default"
CTR_IMAGE = f"docker.io/{BUSYBOX_IMAGE}"
TEST_LABEL = "remediator.test"
OWNER_LABEL = "remediator.test.owner"
CONTAINER_PREFIX = "rmd-test-"
TMPFS_SOURCE_PREFIX = "rmd-test-tmpfs-"
# Docker API calls here are local and small; a minute covers a loaded 2-core CI machine.
DOCKER_TIMEOUT_S = 60

HOST = HostRoot()


def unavailable(what: str, fix: str) -> NoReturn:
    """A real-tier prerequisite is missing: fail, or skip when REMEDIATOR_SKIP_REAL=1."""
    message = f"{what}. Fix: {fix}"
    if os.environ.get("REMEDIATOR_SKIP_REAL") == "1":
        pytest.skip(f"REMEDIATOR_SKIP_REAL=1: {message}")
    pytest.fail(f"{message} (or set REMEDIATOR_SKIP_REAL=1 to skip the real tier)", pytrace=False)


# -- ownership of leftovers ---------------------------------------------------------------------


def _boot_id() -> str:
    return HOST.read_text(HOST.proc / "sys" / "kernel" / "random" / "boot_id").strip()


# "<boot id>/<pid>/<random>": the random part tells this session from an earlier one in the same
# process (pytester runs sessions in-process); boot id and pid tell whether the owner still runs.
_SESSION_OWNER = f"{_boot_id()}/{os.getpid()}/{secrets.token_hex(4)}"


def _owner_is_gone(owner: str | None) -> bool:
    if not owner:
        return True  # unlabelled: not from make_container, so nobody will clean it but us
    parts = owner.split("/")
    if len(parts) != 3 or not parts[1].isdigit():
        return True
    boot, pid, _ = parts
    if boot != _boot_id():
        return True
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False  # exists, owned by someone else
    return False


def _is_ours_or_orphaned(owner: str | None) -> bool:
    return owner == _SESSION_OWNER or _owner_is_gone(owner)


def _remove_container(client: docker.DockerClient, name_or_id: str) -> None:
    """Force-remove one container; done when it is gone, whoever removed it."""
    deadline = time.monotonic() + DOCKER_TIMEOUT_S
    while True:
        try:
            client.containers.get(name_or_id).remove(force=True, v=True)
            return
        except docker.errors.NotFound:
            return
        except docker.errors.APIError as e:
            # 409 "removal already in progress": another remover (a recreate action under test,
            # dockerd's own --rm) got there first; wait for it to finish.
            if e.status_code != 409 or time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def _sweep_containers() -> list[str]:
    """Remove leftover test containers that are ours or orphaned; return their names."""
    if not DOCKER_SOCK.exists():
        return []
    try:
        client = docker.DockerClient(base_url=f"unix://{DOCKER_SOCK}", timeout=DOCKER_TIMEOUT_S)
    except docker.errors.DockerException:
        return []  # no daemon, no containers to leave behind
    removed = []
    try:
        for c in client.containers.list(all=True, filters={"label": f"{TEST_LABEL}=1"}):
            if _is_ours_or_orphaned(c.labels.get(OWNER_LABEL)):
                _remove_container(client, c.id)
                removed.append(c.name)
    finally:
        client.close()
    return removed


def _test_tmpfs_mounts() -> list[tuple[str, Path]]:
    """(source, mount point) of every tmpfs that small_tmpfs mounted, from /proc/self/mounts."""
    found = []
    for line in HOST.read_text(HOST.proc / "self" / "mounts").splitlines():
        fields = line.split()
        if len(fields) >= 3 and fields[2] == "tmpfs" and fields[0].startswith(TMPFS_SOURCE_PREFIX):
            # The kernel escapes blanks in mount points as octal (\040); ours have none.
            found.append((fields[0], Path(fields[1])))
    return found


def _sweep_tmpfs() -> list[Path]:
    swept = []
    for source, target in _test_tmpfs_mounts():
        owner = source.removeprefix(TMPFS_SOURCE_PREFIX).replace("_", "/")
        if _is_ours_or_orphaned(owner):
            _umount(target)
            swept.append(target)
    return swept


@pytest.fixture(scope="session", autouse=True)
def _real_tier_session() -> Iterator[None]:
    """Root check, and leftover sweeps before and after the real tier."""
    if os.geteuid() != 0:
        unavailable("the real tier needs root", "run the tests as root: sudo scripts/test.sh")
    _sweep_containers()
    _sweep_tmpfs()
    yield
    containers = _sweep_containers()
    mounts = _sweep_tmpfs()
    if containers or mounts:
        # A fixture's teardown normally removes these; reaching here means a test made its own
        # or a teardown failed. Say so instead of hiding it.
        warnings.warn(
            f"removed leftover test containers {containers} and tmpfs mounts {mounts}",
            stacklevel=1,
        )


# -- daemons and images -------------------------------------------------------------------------


@pytest.fixture(scope="session")
def docker_client() -> Iterator[docker.DockerClient]:
    fix = "run scripts/start-daemons.sh (scripts/test.sh runs it)"
    if not DOCKER_SOCK.is_socket():
        unavailable(f"dockerd is not running: no socket at {DOCKER_SOCK}", fix)
    try:
        # version=None: negotiate the API version, as dockerd 20.10 speaks 1.41 only.
        client = docker.DockerClient(base_url=f"unix://{DOCKER_SOCK}", timeout=DOCKER_TIMEOUT_S)
        client.ping()
    except (docker.errors.DockerException, requests.RequestException) as e:
        unavailable(f"dockerd is not answering on {DOCKER_SOCK}: {e}", fix)
    yield client
    client.close()


@pytest.fixture(scope="session")
def busybox_image(docker_client: docker.DockerClient) -> str:
    try:
        docker_client.images.get(BUSYBOX_IMAGE)
    except docker.errors.ImageNotFound:
        unavailable(f"test image {BUSYBOX_IMAGE} is missing", "run scripts/make-test-image.sh")
    return BUSYBOX_IMAGE


@pytest.fixture(scope="session")
def ctr_image() -> str:
    fix = "run scripts/start-daemons.sh, then scripts/make-test-image.sh"
    try:
        out = subprocess.run(
            [
                "ctr",
                "--address",
                str(CONTAINERD_SOCK),
                "--connect-timeout",
                "2s",
                "--namespace",
                CTR_NAMESPACE,
                "images",
                "ls",
                "-q",
            ],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError) as e:
        unavailable(f"containerd is not answering on {CONTAINERD_SOCK}: {e}", fix)
    if CTR_IMAGE not in out.split():
        unavailable(f"containerd namespace {CTR_NAMESPACE!r} has no image {CTR_IMAGE}", fix)
    return CTR_IMAGE


# -- containers ---------------------------------------------------------------------------------


class MakeContainer(Protocol):
    def __call__(
        self,
        name: str | None = None,
        labels: dict[str, str] | None = None,
        command: Sequence[str] = ("sleep", "3600"),
        **kwargs: Any,
    ) -> Container: ...


@pytest.fixture
def make_container(docker_client: docker.DockerClient, busybox_image: str) -> Iterator[MakeContainer]:
    names: list[str] = []

    def make(
        name: str | None = None,
        labels: dict[str, str] | None = None,
        command: Sequence[str] = ("sleep", "3600"),
        **kwargs: Any,
    ) -> Container:
        name = name or f"{CONTAINER_PREFIX}{secrets.token_hex(4)}"
        image = kwargs.pop("image", busybox_image)
        kwargs.pop("detach", None)
        # Recorded before creating: a container created but not started still gets removed.
        names.append(name)
        container: Container = docker_client.containers.run(
            image,
            list(command),
            name=name,
            labels={**(labels or {}), TEST_LABEL: "1", OWNER_LABEL: _SESSION_OWNER},
            detach=True,
            **kwargs,
        )
        container.reload()
        return container

    yield make
    errors = []
    for name in reversed(names):
        try:
            _remove_container(docker_client, name)
        except (docker.errors.DockerException, requests.RequestException) as e:
            errors.append(f"{name}: {e}")
    if errors:
        pytest.fail(f"could not remove test containers: {errors}", pytrace=False)


# -- sysctls ------------------------------------------------------------------------------------


def _same_value(a: str, b: str) -> bool:
    # Multi-field sysctls (kernel.printk) read back tab-separated whatever was written.
    return a.split() == b.split()


@pytest.fixture
def sysctl_guard() -> Iterator[Callable[[str], str]]:
    saved: list[tuple[str, Path, str]] = []

    def guard(key: str) -> str:
        path = HOST.sysctl_path(key)
        value = HOST.read_text(path)
        saved.append((key, path, value))
        return value.strip()

    yield guard
    errors = []
    for key, path, value in reversed(saved):
        try:
            if not _same_value(HOST.read_text(path), value):
                path.write_text(value.strip() + "\n")
            now = HOST.read_text(path)
            if not _same_value(now, value):
                errors.append(f"{key}: wrote {value.strip()!r}, reads {now.strip()!r}")
        except OSError as e:
            errors.append(f"{key}: {e}")
    if errors:
        pytest.fail(f"sysctl_guard could not restore: {errors}", pytrace=False)


# -- tmpfs --------------------------------------------------------------------------------------


class SmallTmpfs(Protocol):
    def __call__(self, size: str = "4M", nr_inodes: int | None = None) -> Path: ...


def _umount(target: Path) -> None:
    """Unmount; lazily (MNT_DETACH, umount(8) -l) when busy, e.g. a process still has a cwd there."""
    if subprocess.run(["umount", str(target)], capture_output=True, check=False).returncode:
        subprocess.run(["umount", "-l", str(target)], capture_output=True, check=False)


@pytest.fixture
def small_tmpfs(tmp_path: Path) -> Iterator[SmallTmpfs]:
    mounted: list[Path] = []
    source = TMPFS_SOURCE_PREFIX + _SESSION_OWNER.replace("/", "_")

    def mount(size: str = "4M", nr_inodes: int | None = None) -> Path:
        target = tmp_path / f"tmpfs{len(mounted)}"
        target.mkdir()
        # tmpfs(5): size= caps bytes, nr_inodes= caps inodes (the /run exhaustion case).
        options = [f"size={size}", "mode=0755"]
        if nr_inodes is not None:
            options.append(f"nr_inodes={nr_inodes}")
        result = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", ",".join(options), source, str(target)],
            capture_output=True,
            text=True,
            check=False,
        )
        if result.returncode:
            pytest.fail(f"mount tmpfs {options} on {target}: {result.stderr.strip()}", pytrace=False)
        mounted.append(target)
        return target

    yield mount
    still = []
    for target in reversed(mounted):
        _umount(target)
        if os.path.ismount(target):
            still.append(target)
    if still:
        pytest.fail(f"small_tmpfs could not unmount {still}", pytrace=False)


HOLDER_SOURCE = Path(__file__).with_name("inotify_holder.c")
# A uid no host process uses, so its per-uid inotify count is exactly the test container's.
OTHER_UID = 4242


@pytest.fixture(scope="module")
def holder_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory holding a static `holder` binary, to bind-mount into busybox containers."""
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        unavailable("no C compiler to build tests/real/inotify_holder.c", "apt-get install gcc")
    out = tmp_path_factory.mktemp("holder")
    out.chmod(0o755)  # pytest makes it 0700; the container runs the binary as a non-root uid too
    subprocess.run(
        [cc, "-static", "-O2", "-o", str(out / "holder"), str(HOLDER_SOURCE)],
        check=True,
        capture_output=True,
    )
    return out


DCACHE_LOAD_SOURCE = Path(__file__).resolve().parent / "dcache_load.c"


@pytest.fixture(scope="module")
def dcache_load_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory holding a static `dcache_load` binary, to bind-mount into busybox containers."""
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        unavailable("no C compiler to build tests/real/dcache_load.c", "apt-get install gcc")
    out = tmp_path_factory.mktemp("dcache_load")
    out.chmod(0o755)
    subprocess.run(
        [cc, "-static", "-O2", "-o", str(out / "dcache_load"), str(DCACHE_LOAD_SOURCE)],
        check=True,
        capture_output=True,
    )
    return out


def run_dcache_load(
    make_container: MakeContainer, load_dir: Path, args: tuple[str, ...], **kwargs: Any
) -> Container:
    container = make_container(
        command=("/load/dcache_load", *args),
        volumes={str(load_dir): {"bind": "/load", "mode": "ro"}},
        **kwargs,
    )
    deadline = time.monotonic() + 20
    while b"ready" not in container.logs():
        assert time.monotonic() < deadline, f"dcache_load did not start: {container.logs()!r}"
        time.sleep(0.05)
    return container


def reclaim_own_cgroup(container: Container) -> None:
    """Reclaim one of this test's own running containers' memory cgroup (never the host's,
    never a parent): before removal, so its image-layer negative dentries are freed instead of
    moving to /docker, where only a reclaim reaching every other container could free them."""
    container.reload()
    h = find_memory_hierarchy(HOST)
    assert h is not None, "no memory cgroup hierarchy"
    cg = h.root / "docker" / container.id
    if h.version == 1:
        (cg / "memory.force_empty").write_text("0")
    else:
        try:
            (cg / "memory.reclaim").write_text(str(4 << 30))
        except OSError as e:
            if e.errno != errno.EAGAIN:  # EAGAIN: reclaimed less than asked
                raise


def run_holder(
    make_container: MakeContainer, holder_dir: Path, args: tuple[str, ...], **kwargs: Any
) -> Container:
    container = make_container(
        command=("/holder/holder", *args),
        volumes={str(holder_dir): {"bind": "/holder", "mode": "ro"}},
        **kwargs,
    )
    deadline = time.monotonic() + 10
    while b"ready" not in container.logs():
        assert time.monotonic() < deadline, f"holder did not start: {container.logs()!r}"
        time.sleep(0.05)
    return container


# -- a private, newer Docker engine -------------------------------------------------------------

# The engines container-action tests run against: the system dockerd (Debian 12: 20.10, API
# 1.41) and private ones of Debian trixie (26.1.5, API 1.45) and sid (28.5.2, API 1.51).
ENGINES = ("system", "docker26", "docker28")


def _private_engine(suite: str) -> Iterator[PrivateDocker]:
    system = docker.DockerClient(base_url=f"unix://{DOCKER_SOCK}", timeout=DOCKER_TIMEOUT_S)
    try:
        system.images.get(BUSYBOX_IMAGE)
    except docker.errors.DockerException as e:
        unavailable(f"system dockerd or {BUSYBOX_IMAGE} missing: {e}", "run scripts/make-test-image.sh")
    engine = private_docker(suite, BUSYBOX_IMAGE, system)
    try:
        started = engine.__enter__()
    except Unavailable as e:
        unavailable(
            f"the private docker engine of {suite}: {e}",
            f"run scripts/suite-package.sh {suite} /var/cache/remediator-test docker.io containerd runc",
        )
    try:
        yield started
    finally:
        engine.__exit__(None, None, None)
        system.close()


@pytest.fixture(scope="session")
def docker26() -> Iterator[PrivateDocker]:
    yield from _private_engine("trixie")


@pytest.fixture(scope="session")
def docker28() -> Iterator[PrivateDocker]:
    yield from _private_engine("sid")


def engine_client(request: pytest.FixtureRequest) -> Iterator[tuple[docker.DockerClient, str]]:
    """(client, unix:// URL) of the engine a module-scoped parametrized fixture names; for a
    module that overrides ``docker_client`` (so it cannot ask for the system one by name)."""
    if request.param == "system":
        try:
            client = docker.DockerClient(base_url=f"unix://{DOCKER_SOCK}", timeout=DOCKER_TIMEOUT_S)
            client.ping()
        except (docker.errors.DockerException, requests.RequestException) as e:
            unavailable(f"dockerd is not answering on {DOCKER_SOCK}: {e}", "run scripts/start-daemons.sh")
        yield client, f"unix://{DOCKER_SOCK}"
        client.close()
        return
    private: PrivateDocker = request.getfixturevalue(request.param)
    yield private.client, private.url
