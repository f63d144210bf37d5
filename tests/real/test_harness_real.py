"""The real-tier fixtures and skip rules, tested for real.

Restoration after a failing test body cannot be seen from inside that test, so those cases run
in a child pytest session (pytester, in a subprocess: its own process, so its leftover sweep
cannot mistake the parent's containers for its own), and the parent looks at the host after.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
from collections.abc import Callable
from pathlib import Path

import docker
import docker.errors
import pytest

from remediator.host import HostRoot
from tests.real.conftest import (
    CONTAINER_PREFIX,
    CTR_IMAGE,
    OWNER_LABEL,
    TEST_LABEL,
    MakeContainer,
    SmallTmpfs,
)

REPO_ROOT = Path(__file__).resolve().parents[2]
# Harmless to change for a moment: the seconds a lease holder gets to release a lease
# (fcntl(2) F_SETLEASE); nothing on a test machine holds leases.
SCRATCH_SYSCTL = "fs.lease-break-time"
HOST = HostRoot()


def _is_mounted(path: Path) -> bool:
    return os.path.ismount(path)


# -- the fixtures, on the happy path ------------------------------------------------------------


def test_make_container_starts_a_labelled_busybox(make_container: MakeContainer) -> None:
    c = make_container(labels={"purpose": "harness"})
    assert c.status == "running"
    assert c.name.startswith(CONTAINER_PREFIX)
    assert c.labels[TEST_LABEL] == "1"
    assert c.labels["purpose"] == "harness"
    assert OWNER_LABEL in c.labels
    assert c.attrs["Config"]["Cmd"] == ["sleep", "3600"]
    # top runs ps on the host side, so it sees the container's processes as the host does.
    assert [p[-1] for p in c.top()["Processes"]] == ["sleep 3600"]
    exit_code, output = c.exec_run(["id", "-un"])
    assert (exit_code, output.decode().strip()) == (0, "root")


def test_make_container_passes_run_options(make_container: MakeContainer) -> None:
    c = make_container(name=f"{CONTAINER_PREFIX}opts-{os.getpid()}", user="nobody", init=True)
    assert c.name == f"{CONTAINER_PREFIX}opts-{os.getpid()}"
    exit_code, output = c.exec_run(["id", "-un"])
    assert (exit_code, output.decode().strip()) == (0, "nobody")


def test_sysctl_guard_returns_the_current_value(sysctl_guard: Callable[[str], str]) -> None:
    assert sysctl_guard(SCRATCH_SYSCTL) == HOST.read_sysctl(SCRATCH_SYSCTL)


def test_small_tmpfs_has_the_requested_limits(small_tmpfs: SmallTmpfs) -> None:
    path = small_tmpfs(size="1M", nr_inodes=64)
    assert _is_mounted(path)
    st = os.statvfs(path)
    assert st.f_blocks * st.f_frsize == 1024 * 1024
    assert st.f_files == 64
    (path / "f").write_text("x")
    assert os.statvfs(path).f_ffree < st.f_ffree


def test_ctr_image_runs_in_containerd(ctr_image: str) -> None:
    assert ctr_image == CTR_IMAGE
    name = f"{CONTAINER_PREFIX}ctr-{os.getpid()}"
    try:
        out = subprocess.run(
            ["ctr", "--namespace", "default", "run", "--rm", ctr_image, name, "id", "-un"],
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        ).stdout
    finally:
        # --rm removes it on a normal exit; after a timeout it may still be there.
        subprocess.run(
            ["ctr", "--namespace", "default", "task", "kill", "-s", "KILL", name],
            capture_output=True,
            check=False,
        )
        subprocess.run(
            ["ctr", "--namespace", "default", "containers", "rm", name], capture_output=True, check=False
        )
    assert out.strip() == "root"


# -- restoration after a failing test body --------------------------------------------------------

CHILD_CONFTEST = """
pytest_plugins = ["tests.conftest", "tests.real.conftest"]
"""

CHILD_INI = """
[pytest]
markers =
    real: real tier
"""

CHILD_TESTS = """
import json, os
from pathlib import Path

import docker.errors
import pytest

from remediator.host import HostRoot

RECORD = Path(os.environ["RMD_HARNESS_RECORD"])
KEY = os.environ["RMD_HARNESS_SYSCTL"]


def record(key, value):
    data = json.loads(RECORD.read_text()) if RECORD.exists() else {}
    data[key] = value
    RECORD.write_text(json.dumps(data))


pytestmark = pytest.mark.real


def test_container_then_raise(make_container):
    record("running", make_container().name)
    raise RuntimeError("body fails after making a container")


def test_container_that_cannot_start(make_container):
    name = "rmd-test-nostart-" + str(os.getpid())
    record("not_started", name)
    make_container(name=name, command=["/no/such/program"])


def test_sysctl_then_raise(sysctl_guard):
    original = int(sysctl_guard(KEY))
    path = HostRoot().sysctl_path(KEY)
    path.write_text(str(original + 7))
    sysctl_guard(KEY)  # guarded twice: the first saved value must be the one that stays
    path.write_text(str(original + 9))
    record("sysctl_changed_to", HostRoot().read_sysctl(KEY))
    raise RuntimeError("body fails after changing a sysctl")


def test_tmpfs_then_raise(small_tmpfs):
    path = small_tmpfs(size="1M", nr_inodes=64)
    record("tmpfs", str(path))
    record("tmpfs_was_mounted", os.path.ismount(path))
    os.chdir(path)  # busy: a plain umount fails, the lazy one must take over
    raise RuntimeError("body fails with a tmpfs mounted and in use")
"""


@pytest.fixture
def child(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> pytest.Pytester:
    """A child pytest dir that loads this suite's conftests as plugins."""
    paths = [str(REPO_ROOT), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(paths))
    pytester.makeini(CHILD_INI)
    pytester.makeconftest(CHILD_CONFTEST)
    return pytester


def test_fixtures_restore_the_host_when_the_test_body_raises(
    child: pytest.Pytester,
    docker_client: docker.DockerClient,
    sysctl_guard: Callable[[str], str],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    before = sysctl_guard(SCRATCH_SYSCTL)  # our own guard too, in case the child's fails
    record = tmp_path / "record.json"
    monkeypatch.setenv("RMD_HARNESS_RECORD", str(record))
    monkeypatch.setenv("RMD_HARNESS_SYSCTL", SCRATCH_SYSCTL)
    child.makepyfile(test_child=CHILD_TESTS)

    result = child.runpytest_subprocess("-p", "no:cacheprovider")

    result.assert_outcomes(failed=4)
    seen = json.loads(record.read_text())
    assert seen["sysctl_changed_to"] == str(int(before) + 9)
    assert HOST.read_sysctl(SCRATCH_SYSCTL) == before
    for key in ("running", "not_started"):
        with pytest.raises(docker.errors.NotFound):
            docker_client.containers.get(seen[key])
    assert seen["tmpfs_was_mounted"] is True
    assert not _is_mounted(Path(seen["tmpfs"]))


# -- the skip rules of tests/conftest.py --------------------------------------------------------

CHILD_SKIPS = """
import pytest
from tests.real.conftest import unavailable

pytestmark = pytest.mark.real


def test_plain_skip():
    pytest.skip("some reason")


def test_missing_prerequisite():
    unavailable("dockerd is down", "run scripts/start-daemons.sh")


def test_passes():
    pass
"""


@pytest.mark.parametrize(
    ("env", "outcomes", "expected_lines"),
    [
        pytest.param(
            {"CI": "true", "REMEDIATOR_SKIP_REAL": "1"},
            {"failed": 2, "passed": 1},
            ["*CI or REMEDIATOR_REQUIRE_REAL=1 is set*Skip reason: some reason*"],
            id="ci-turns-every-skip-into-a-failure",
        ),
        pytest.param(
            {"REMEDIATOR_REQUIRE_REAL": "1"},
            {"failed": 2, "passed": 1},
            ["*Skip reason: some reason*"],
            id="require-real-turns-every-skip-into-a-failure",
        ),
        pytest.param(
            {},
            {"failed": 1, "skipped": 1, "passed": 1},
            ["*dockerd is down. Fix: run scripts/start-daemons.sh*REMEDIATOR_SKIP_REAL=1*"],
            id="missing-prerequisite-fails-by-default",
        ),
        pytest.param(
            {"REMEDIATOR_SKIP_REAL": "1"},
            {"skipped": 2, "passed": 1},
            ["*REAL TIER NOT TESTED*", "*2 real-tier test(s) skipped: *"],
            id="skip-real-skips-loudly",
        ),
    ],
)
def test_real_tier_skip_rules(
    child: pytest.Pytester,
    monkeypatch: pytest.MonkeyPatch,
    env: dict[str, str],
    outcomes: dict[str, int],
    expected_lines: list[str],
) -> None:
    for name in ("CI", "REMEDIATOR_REQUIRE_REAL", "REMEDIATOR_SKIP_REAL"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    child.makepyfile(test_child=CHILD_SKIPS)

    result = child.runpytest_subprocess("-p", "no:cacheprovider", "-rs")

    result.assert_outcomes(**outcomes)
    result.stdout.fnmatch_lines(expected_lines)


# -- a missing prerequisite fails with the fix ----------------------------------------------------

CHILD_PREREQUISITES_CONFTEST = """
import os
from pathlib import Path

import tests.real.conftest as real

pytest_plugins = ["tests.conftest", "tests.real.conftest"]

# What the parent wants broken, set before any fixture reads it.
if "RMD_DOCKER_SOCK" in os.environ:
    real.DOCKER_SOCK = Path(os.environ["RMD_DOCKER_SOCK"])
if "RMD_IMAGE" in os.environ:
    real.BUSYBOX_IMAGE = os.environ["RMD_IMAGE"]
    real.CTR_IMAGE = "docker.io/" + os.environ["RMD_IMAGE"]
"""

CHILD_PREREQUISITES = """
import pytest

pytestmark = pytest.mark.real


def test_docker(docker_client):
    pass


def test_image(busybox_image):
    pass


def test_ctr_image(ctr_image):
    pass
"""


def _stale_socket(path: Path) -> Path:
    """A socket file nobody listens on, as a killed dockerd leaves behind."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.bind(str(path))
    return path


@pytest.mark.parametrize(
    ("breakage", "outcomes", "expected_lines"),
    [
        pytest.param(
            "no-socket",
            {"errors": 2, "passed": 1},
            ["*dockerd is not running: no socket at *Fix: run scripts/start-daemons.sh*"],
            id="dockerd-not-running",
        ),
        pytest.param(
            "stale-socket",
            {"errors": 2, "passed": 1},
            ["*dockerd is not answering on *Fix: run scripts/start-daemons.sh*"],
            id="dockerd-not-answering",
        ),
        pytest.param(
            "no-image",
            {"errors": 2, "passed": 1},
            [
                "*test image remediator-test/no-such-image:latest is missing. "
                "Fix: run scripts/make-test-image.sh*",
                "*has no image docker.io/remediator-test/no-such-image:latest*",
            ],
            id="test-image-missing",
        ),
    ],
)
def test_missing_prerequisite_fails_naming_the_fix(
    child: pytest.Pytester,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    breakage: str,
    outcomes: dict[str, int],
    expected_lines: list[str],
) -> None:
    for name in ("CI", "REMEDIATOR_REQUIRE_REAL", "REMEDIATOR_SKIP_REAL"):
        monkeypatch.delenv(name, raising=False)
    if breakage == "no-socket":
        monkeypatch.setenv("RMD_DOCKER_SOCK", str(tmp_path / "absent.sock"))
    elif breakage == "stale-socket":
        monkeypatch.setenv("RMD_DOCKER_SOCK", str(_stale_socket(tmp_path / "stale.sock")))
    else:
        monkeypatch.setenv("RMD_IMAGE", "remediator-test/no-such-image:latest")
    child.makeconftest(CHILD_PREREQUISITES_CONFTEST)
    child.makepyfile(test_child=CHILD_PREREQUISITES)

    result = child.runpytest_subprocess("-p", "no:cacheprovider")

    result.assert_outcomes(**outcomes)
    result.stdout.fnmatch_lines(expected_lines)
