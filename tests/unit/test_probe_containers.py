"""The Docker adapter: cgroup layouts, the inventory over captured API responses, retries."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import docker.errors
import pytest
import requests
from structlog.testing import capture_logs

from remediator.errors import PermanentError, TemporaryError
from remediator.host import HostRoot
from remediator.model import ContainerRef
from remediator.probes.containers import (
    DockerInventory,
    DockerListing,
    KeptPids,
    StaticInventory,
    call_with_retries,
    container_id_from_cgroup,
    container_id_from_cgroup_path,
    make_inventory_factory,
    memory_cgroup_path,
    parse_proc_cgroup,
    primary_name,
)
from remediator.probes.inventory import SnapshotInventory
from tests.helpers import make_host

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"
LAYOUTS = FIXTURES / "proc" / "cgroup-layouts"
PROC = FIXTURES / "proc" / "linux-6.18"
DOCKER = FIXTURES / "docker"
CID = "5fed7652134bd8636559d9cfa0ce537d1d35ece4c49c5a944a3ee94faac7ec36"  # probe-scout2, pid 8082
CID3 = "7ebf05fcdc9c30502e775a9f9f8ad589165400c54edf32ccfa1a6df50b916bf5"  # probe-scout3, pid 8277


def no_sleep(_: float) -> None:
    pass


# --- cgroup parsing ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "layout",
    [
        "docker-cgroupfs-v1-hybrid",
        "docker-cgroupfs-v2",
        "docker-systemd-v1",
        "docker-systemd-v2",
        "docker-v2-systemd-inside-container",
        "kubepods-cgroupfs-v1",
        "kubepods-systemd-containerd-v2",
        "kubepods-systemd-crio-v2",
    ],
)
def test_container_id_from_cgroup_layouts(layout: str) -> None:
    assert container_id_from_cgroup((LAYOUTS / layout).read_text()) == CID


@pytest.mark.parametrize(
    "layout",
    [
        "host-v1-hybrid-not-a-container",
        "host-systemd-v2-not-a-container",
        "host-session-v2-not-a-container",
    ],
)
def test_container_id_from_cgroup_host_processes(layout: str) -> None:
    assert container_id_from_cgroup((LAYOUTS / layout).read_text()) is None


def test_container_id_from_cgroup_ignores_crio_conmon_and_short_ids() -> None:
    assert container_id_from_cgroup_path(f"/machine.slice/crio-conmon-{CID}.scope") is None
    assert container_id_from_cgroup_path(f"/docker/{CID[:12]}") is None
    assert container_id_from_cgroup_path(f"/docker/{CID.upper()}") is None
    assert container_id_from_cgroup("") is None


def test_parse_proc_cgroup_splits_controllers() -> None:
    paths = parse_proc_cgroup((LAYOUTS / "docker-systemd-v1").read_text())
    scope = f"/system.slice/docker-{CID}.scope"
    assert paths["cpu"] == paths["cpuacct"] == paths["memory"] == paths["name=systemd"] == scope
    assert paths[""] == scope


def test_memory_cgroup_path_prefers_v1_memory_controller() -> None:
    hybrid = "4:memory:/docker/abc\n0::/\n"
    assert memory_cgroup_path(hybrid) == "/docker/abc"
    assert memory_cgroup_path((LAYOUTS / "docker-systemd-v2").read_text()) == (
        f"/system.slice/docker-{CID}.scope"
    )
    assert memory_cgroup_path("") is None


# --- StaticInventory -----------------------------------------------------------------------

REF_A = ContainerRef(id="a" * 64, name="a", pid=10, cgroup="/docker/" + "a" * 64)
REF_B = ContainerRef(id="b" * 64, name="b", pid=20, cgroup=None)


def test_static_inventory_lookups() -> None:
    inv = StaticInventory([REF_A, REF_B], pid_map={11: "a" * 64, 12: "gone"})
    assert inv.containers() == [REF_A, REF_B]
    assert inv.container_of_pid(10) == REF_A  # init pid
    assert inv.container_of_pid(11) == REF_A
    assert inv.container_of_pid(20) == REF_B
    assert inv.container_of_pid(12) is None
    assert inv.container_of_pid(99) is None
    assert inv.container_of_cgroup("/docker/" + "a" * 64) == REF_A
    assert inv.container_of_cgroup(f"/system.slice/docker-{'b' * 64}.scope") == REF_B
    assert inv.container_of_cgroup("/init.scope") is None


# --- DockerInventory over captured Engine API responses ------------------------------------


class FakeAPI:
    """The two low-level calls DockerInventory makes, answering from captured JSON."""

    def __init__(self) -> None:
        self.summaries: list[dict[str, Any]] = json.loads((DOCKER / "containers-json.json").read_text())
        self.inspected: dict[str, dict[str, Any]] = json.loads((DOCKER / "inspect.json").read_text())
        self.list_failures: list[Exception] = []
        self.inspect_failures: dict[str, Exception] = {}
        self.list_calls = 0
        self.inspect_calls: list[str] = []

    def containers(self, filters: dict[str, str]) -> list[dict[str, Any]]:
        assert filters == {"status": "running"}
        self.list_calls += 1
        if self.list_failures:
            raise self.list_failures.pop(0)
        return self.summaries

    def inspect_container(self, cid: str) -> dict[str, Any]:
        self.inspect_calls.append(cid)
        if cid in self.inspect_failures:
            raise self.inspect_failures[cid]
        return self.inspected[cid]


class FakeClient:
    def __init__(self, api: FakeAPI | None = None) -> None:
        self.api = api or FakeAPI()
        self.closed = False

    def close(self) -> None:
        self.closed = True


def captured_host(tmp_path: Path) -> HostRoot:
    return make_host(
        tmp_path,
        {
            "proc/8082/cgroup": (PROC / "8082/cgroup").read_text(),
            "proc/8277/cgroup": (PROC / "8277/cgroup").read_text(),
            "proc/9000/cgroup": (PROC / "8277/cgroup").read_text(),  # a second process in scout3
            "proc/1/cgroup": (PROC / "1/cgroup").read_text(),
            "proc/9001/cgroup": f"4:memory:/docker/{'c' * 64}\n",  # started after the listing
        },
    )


def api_error(status: int) -> docker.errors.APIError:
    response = requests.Response()
    response.status_code = status
    return docker.errors.APIError(f"status {status}", response=response)


def test_docker_inventory_lists_running_containers(tmp_path: Path) -> None:
    inv = DockerInventory(FakeClient(), captured_host(tmp_path), sleep=no_sleep)
    refs = {c.name: c for c in inv.containers()}
    assert set(refs) == {"probe-scout2", "probe-scout3"}
    scout2 = refs["probe-scout2"]
    assert scout2 == ContainerRef(
        id=CID,
        name="probe-scout2",
        labels={},
        runtime="docker",
        pid=8082,
        cgroup=f"/docker/{CID}",
        image="remediator-test/busybox:latest",
    )


def test_docker_inventory_attributes_pids_and_cgroups(tmp_path: Path) -> None:
    inv = DockerInventory(FakeClient(), captured_host(tmp_path), sleep=no_sleep)
    scout3 = inv.container_of_pid(8277)
    assert scout3 is not None and scout3.id == CID3
    assert inv.container_of_pid(9000) == scout3
    assert inv.container_of_pid(1) is None  # host init
    assert inv.container_of_pid(9001) is None  # a container the listing does not know
    assert inv.container_of_pid(424242) is None  # no such process
    assert inv.container_of_cgroup(f"/docker/{CID}") is not None
    assert inv.container_of_cgroup(f"/system.slice/docker-{CID3}.scope") == scout3
    assert inv.container_of_cgroup("/") is None


def test_docker_inventory_takes_labels_and_skips_stopped(tmp_path: Path) -> None:
    api = FakeAPI()
    # Labels, names and image come from the list call (it has them); inspect only gives pids.
    next(s for s in api.summaries if s["Id"] == CID)["Labels"] = {"remediator.protect": "true"}
    api.inspected[CID3]["State"]["Running"] = False  # exited between list and inspect
    inv = DockerInventory(FakeClient(api), captured_host(tmp_path), sleep=no_sleep)
    [only] = inv.containers()
    assert only.id == CID and dict(only.labels) == {"remediator.protect": "true"}


def test_docker_inventory_skips_container_removed_between_list_and_inspect(
    tmp_path: Path,
) -> None:
    api = FakeAPI()
    api.inspect_failures[CID3] = docker.errors.NotFound("No such container")
    inv = DockerInventory(FakeClient(api), captured_host(tmp_path), sleep=no_sleep)
    assert [c.id for c in inv.containers()] == [CID]


@pytest.mark.parametrize(
    "failure",
    [
        requests.exceptions.ConnectionError("connection refused"),
        requests.exceptions.ReadTimeout("read timed out"),
        api_error(500),
        api_error(503),
    ],
)
def test_transient_failures_are_retried(tmp_path: Path, failure: Exception) -> None:
    api = FakeAPI()
    api.list_failures = [failure, failure]
    inv = DockerInventory(FakeClient(api), captured_host(tmp_path), sleep=no_sleep)
    assert len(inv.containers()) == 2
    assert api.list_calls == 3


def test_transient_failures_give_up_after_three_attempts(tmp_path: Path) -> None:
    api = FakeAPI()
    api.list_failures = [requests.exceptions.ConnectionError("refused")] * 5
    sleeps: list[float] = []
    inv = DockerInventory(FakeClient(api), captured_host(tmp_path), sleep=sleeps.append)
    with pytest.raises(TemporaryError, match="list containers"):
        inv.refresh()
    assert api.list_calls == 3
    assert sleeps == [0.2, 0.4]  # short exponential backoff


def test_client_errors_are_not_retried(tmp_path: Path) -> None:
    api = FakeAPI()
    api.list_failures = [api_error(400)]
    inv = DockerInventory(FakeClient(api), captured_host(tmp_path), sleep=no_sleep)
    with pytest.raises(PermanentError):
        inv.refresh()
    assert api.list_calls == 1


def test_call_with_retries_passes_other_exceptions_through() -> None:
    def broken() -> None:
        raise KeyError("a bug, not Docker")

    with pytest.raises(KeyError):
        call_with_retries("x", broken, sleep=no_sleep)


# --- the factory ---------------------------------------------------------------------------


def test_factory_builds_a_docker_inventory(tmp_path: Path) -> None:
    client = FakeClient()
    factory = make_inventory_factory(
        "unix:///fake.sock", captured_host(tmp_path), 5.0, client_factory=lambda: client
    )
    inv = factory()
    assert isinstance(inv, SnapshotInventory)
    assert len(inv.containers()) == 2
    assert client.api.list_calls == 1  # listed once, when built


def test_factory_degrades_to_empty_inventory_and_reconnects(tmp_path: Path) -> None:
    clients: list[FakeClient] = []

    def client_factory() -> FakeClient:
        api = FakeAPI()
        if not clients:
            api.list_failures = [requests.exceptions.ConnectionError("refused")] * 3
        clients.append(FakeClient(api))
        return clients[-1]

    factory = make_inventory_factory(
        "unix:///fake.sock",
        captured_host(tmp_path),
        5.0,
        client_factory=client_factory,
        sleep=no_sleep,
    )
    with capture_logs() as logs:
        degraded = factory()
    assert degraded.containers() == []
    assert degraded.error is not None and "refused" in degraded.error
    assert degraded.container_of_pid(8082) is None
    assert [e["event"] for e in logs if e["log_level"] == "warning"] == ["docker_unavailable"]
    assert logs[-1]["temporary"] is True
    assert clients[0].closed

    recovered = factory()
    assert len(recovered.containers()) == 2
    assert recovered.error is None
    assert len(clients) == 2


def test_factory_with_no_daemon_degrades(tmp_path: Path) -> None:
    """The real SDK against a socket nobody listens on: connection refused, then degrade."""
    missing = tmp_path / "docker.sock"
    factory: Callable[[], Any] = make_inventory_factory(
        f"unix://{missing}", HostRoot(tmp_path), 1.0, sleep=no_sleep
    )
    with capture_logs() as logs:
        inv = factory()
    assert inv.containers() == []
    assert inv.error is not None and inv.error.startswith("docker: connect: ")
    [warning] = [e for e in logs if e["event"] == "docker_unavailable"]
    assert warning["temporary"] is True
    assert warning["docker_url"] == f"unix://{missing}"


# --- DockerListing: one list per snapshot, inspect only what is new ------------------------


def summary(api: FakeAPI, cid: str) -> dict[str, Any]:
    return next(s for s in api.summaries if s["Id"] == cid)


def test_listing_inspects_each_container_once_across_snapshots(tmp_path: Path) -> None:
    api = FakeAPI()
    listing = DockerListing(FakeClient(api), captured_host(tmp_path), sleep=no_sleep)
    first = listing.snapshot()
    assert sorted(api.inspect_calls) == sorted([CID, CID3])
    for _ in range(5):
        assert listing.snapshot() == first
    assert api.list_calls == 6
    assert len(api.inspect_calls) == 2  # the kept pids still name their containers


def test_listing_sees_renames_labels_and_removals_from_the_list(tmp_path: Path) -> None:
    api = FakeAPI()
    listing = DockerListing(FakeClient(api), captured_host(tmp_path), sleep=no_sleep)
    listing.snapshot()
    summary(api, CID)["Names"] = ["/renamed", "/other/alias-of-renamed"]
    summary(api, CID)["Labels"] = {"team": "x"}
    api.summaries = [s for s in api.summaries if s["Id"] != CID3]
    [only] = listing.snapshot()
    assert (only.name, dict(only.labels), only.pid) == ("renamed", {"team": "x"}, 8082)
    assert set(listing.pids.pids) == {CID}  # the removed container's pid is not kept
    assert len(api.inspect_calls) == 2


def test_listing_inspects_again_when_the_kept_pid_left_the_container(tmp_path: Path) -> None:
    """A restart keeps the id and changes the init pid: the old pid is gone (or someone
    else's), so the kept one is not trusted and the container is inspected again."""
    api = FakeAPI()
    host = captured_host(tmp_path)
    listing = DockerListing(FakeClient(api), host, sleep=no_sleep)
    listing.snapshot()
    (tmp_path / "proc/8277").rename(tmp_path / "proc/8300")  # scout3 restarted as pid 8300
    api.inspected[CID3] = {**api.inspected[CID3], "State": {**api.inspected[CID3]["State"], "Pid": 8300}}
    refs = {r.id: r for r in listing.snapshot()}
    assert refs[CID3].pid == 8300 and refs[CID3].cgroup is not None
    assert api.inspect_calls[2:] == [CID3]
    # A pid reused by a process of another container is not trusted either.
    (tmp_path / "proc/8300/cgroup").write_text((PROC / "8082/cgroup").read_text())
    api.inspected[CID3]["State"]["Pid"] = 9000
    refs = {r.id: r for r in listing.snapshot()}
    assert refs[CID3].pid == 9000
    assert api.inspect_calls[3:] == [CID3]


def test_listing_does_not_keep_a_pid_it_cannot_check(tmp_path: Path) -> None:
    api = FakeAPI()
    host = captured_host(tmp_path)
    (tmp_path / "proc/8082/cgroup").write_text("0::/custom.slice/web\n")  # names no container
    listing = DockerListing(FakeClient(api), host, sleep=no_sleep)
    listing.snapshot()
    refs = {r.id: r for r in listing.snapshot()}
    assert refs[CID].pid == 8082 and refs[CID].cgroup == "/custom.slice/web"
    assert api.inspect_calls.count(CID) == 2  # inspected every time, as before the cache
    assert CID not in listing.pids.pids


def test_kept_pids_file_saves_inspects_for_the_next_run(tmp_path: Path) -> None:
    path = tmp_path / "state" / "container-pids.json"
    path.parent.mkdir()
    host = captured_host(tmp_path)
    first = FakeAPI()
    DockerListing(FakeClient(first), host, pids=KeptPids(path), sleep=no_sleep).snapshot()
    assert json.loads(path.read_text()) == {"version": 1, "pids": {CID: 8082, CID3: 8277}}
    second = FakeAPI()
    refs = DockerListing(FakeClient(second), host, pids=KeptPids(path), sleep=no_sleep).snapshot()
    assert second.inspect_calls == [] and {r.pid for r in refs} == {8082, 8277}


def test_kept_pids_readonly_and_broken_files_change_nothing(tmp_path: Path) -> None:
    host = captured_host(tmp_path)
    path = tmp_path / "container-pids.json"
    DockerListing(FakeClient(FakeAPI()), host, pids=KeptPids(path, readonly=True), sleep=no_sleep).snapshot()
    assert not path.exists()  # audit writes nothing
    path.write_text("{not json")
    api = FakeAPI()
    DockerListing(FakeClient(api), host, pids=KeptPids(path, readonly=True), sleep=no_sleep).snapshot()
    assert len(api.inspect_calls) == 2 and path.read_text() == "{not json"


def test_primary_name_skips_link_aliases() -> None:
    assert primary_name(["/db/web-db", "/db"]) == "db"
    assert primary_name(["/a/b"]) == "a/b"
    assert primary_name([]) == ""


def test_listing_finds_the_pid_our_namespace_sees_through_the_cgroup(tmp_path: Path) -> None:
    """Run in a container's pid namespace (the systemd tier), Docker's pid is not ours: the
    container's memory cgroup lists its processes as we number them."""
    api = FakeAPI()
    host = captured_host(tmp_path)
    (tmp_path / "proc/8082").rename(tmp_path / "proc/42")  # scout2's init, as our namespace sees it
    procs = tmp_path / f"sys/fs/cgroup/memory/docker/{CID}/cgroup.procs"
    procs.parent.mkdir(parents=True)
    procs.write_text("42\n")
    # Docker's pid 8277 for scout3 exists here but is another container's process.
    api.inspected[CID3] = {**api.inspected[CID3], "State": {**api.inspected[CID3]["State"], "Pid": 42}}
    (tmp_path / "proc/8277").rename(tmp_path / "proc/8277-gone")
    refs = {r.id: r for r in DockerListing(FakeClient(api), host, sleep=no_sleep).snapshot()}
    assert (refs[CID].pid, refs[CID].cgroup) == (42, f"/docker/{CID}")
    # Pid 42 is scout2's: never taken as scout3's pid or cgroup.
    assert (refs[CID3].pid, refs[CID3].cgroup) == (None, None)
