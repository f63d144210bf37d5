"""The daemon's Docker inventory: the event stream says whom to inspect again; gaps resync."""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from remediator.probes.docker_events import DockerEventSource, event_container
from tests.unit.test_probe_containers import CID, CID3, FakeAPI, captured_host, no_sleep

END = object()


class FakeStream:
    """What `APIClient.events(decode=True)` returns: an iterator that `close()` ends."""

    def __init__(self) -> None:
        self.items: queue.Queue[Any] = queue.Queue()
        self.closed = threading.Event()

    def __iter__(self) -> Iterator[dict[str, Any]]:
        while True:
            item = self.items.get()
            if item is END or self.closed.is_set():
                return
            if isinstance(item, Exception):
                raise item
            yield item

    def close(self) -> None:
        self.closed.set()
        self.items.put(END)


class EventsAPI(FakeAPI):
    def __init__(self) -> None:
        super().__init__()
        self.streams: queue.Queue[FakeStream] = queue.Queue()
        self.subscriptions = 0

    def events(self, decode: bool, filters: dict[str, str]) -> FakeStream:
        assert decode and filters == {"type": "container"}
        self.subscriptions += 1
        stream = FakeStream()
        self.streams.put(stream)
        return stream


class Client:
    def __init__(self, api: EventsAPI) -> None:
        self.api = api

    def close(self) -> None:
        pass


def wait_until(pred: Any, timeout: float = 5.0) -> None:
    done = threading.Event()
    for _ in range(int(timeout / 0.01)):
        if pred():
            return
        done.wait(0.01)
    raise AssertionError("condition not reached")


def ev(action: str, cid: str) -> dict[str, Any]:
    return {"Type": "container", "Action": action, "Actor": {"ID": cid, "Attributes": {}}, "id": cid}


@pytest.fixture
def source(tmp_path: Path) -> Iterator[tuple[DockerEventSource, EventsAPI]]:
    api = EventsAPI()
    src = DockerEventSource(
        lambda: Client(api), captured_host(tmp_path), sleep=no_sleep, reconnect=(0.01, 0.02)
    )
    assert src.wait_subscribed(5)
    yield src, api
    src.close()


def test_event_container_ignores_exec_and_health_events() -> None:
    assert event_container(ev("start", CID)) == CID
    assert event_container(ev("exec_start: sh -c true", CID)) is None
    assert event_container(ev("health_status: healthy", CID)) is None
    assert event_container({"status": "die", "id": CID}) == CID  # pre-1.22 fields
    assert event_container({"Action": "start"}) is None


def test_only_containers_with_events_are_inspected_again(
    source: tuple[DockerEventSource, EventsAPI],
) -> None:
    src, api = source
    src.snapshot()  # the first snapshot after subscribing resyncs
    assert sorted(api.inspect_calls) == sorted([CID, CID3]) and src.resyncs == 1
    src.snapshot()
    assert len(api.inspect_calls) == 2
    stream = api.streams.get_nowait()
    stream.items.put(ev("exec_start: ls", CID))
    stream.items.put(ev("restart", CID3))
    wait_until(lambda: src.events_seen == 2)
    src.snapshot()
    assert api.inspect_calls[2:] == [CID3]
    assert src.resyncs == 1


def test_overflow_is_a_gap_and_resyncs_everything(tmp_path: Path) -> None:
    api = EventsAPI()
    src = DockerEventSource(lambda: Client(api), captured_host(tmp_path), sleep=no_sleep, max_pending=3)
    try:
        assert src.wait_subscribed(5)
        src.snapshot()
        stream = api.streams.get_nowait()
        with capture_logs() as logs:
            for i in range(5):
                stream.items.put(ev("start", f"{i:064x}"))
            wait_until(lambda: src.events_seen == 5)
        assert [e["event"] for e in logs] == ["docker_events_overflow"]
        before = len(api.inspect_calls)
        src.snapshot()
        assert sorted(api.inspect_calls[before:]) == sorted([CID, CID3]) and src.resyncs == 2
    finally:
        src.close()


def test_a_broken_stream_reconnects_and_resyncs(source: tuple[DockerEventSource, EventsAPI]) -> None:
    src, api = source
    src.snapshot()
    with capture_logs() as logs:
        api.streams.get_nowait().items.put(ConnectionError("dockerd went away"))
        wait_until(lambda: api.subscriptions == 2 and src.wait_subscribed(0))
    assert [e["event"] for e in logs if e["log_level"] == "warning"] == ["docker_events_lost"]
    before = len(api.inspect_calls)
    src.snapshot()
    assert sorted(api.inspect_calls[before:]) == sorted([CID, CID3])  # events may have been lost


def test_close_stops_the_thread(tmp_path: Path) -> None:
    api = EventsAPI()
    src = DockerEventSource(lambda: Client(api), captured_host(tmp_path), sleep=no_sleep)
    assert src.wait_subscribed(5)
    src.close()
    assert not src._thread.is_alive()
    assert api.streams.get_nowait().closed.is_set()


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def quiet(tmp_path: Path) -> Iterator[tuple[DockerEventSource, EventsAPI, Clock, Path]]:
    api = EventsAPI()
    clock = Clock()
    host = captured_host(tmp_path)
    docker_dir = host.sys / "fs" / "cgroup" / "memory" / "docker"
    for cid in (CID, CID3):
        (docker_dir / cid).mkdir(parents=True)
    src = DockerEventSource(
        lambda: Client(api), host, sleep=no_sleep, reconnect=(0.01, 0.02), relist_s=60.0, monotonic=clock
    )
    assert src.wait_subscribed(5)
    yield src, api, clock, docker_dir
    src.close()


def test_a_quiet_host_costs_no_api_call_until_the_relist_age(
    quiet: tuple[DockerEventSource, EventsAPI, Clock, Path],
) -> None:
    src, api, clock, _ = quiet
    first = src.snapshot()
    assert api.list_calls == 1 and {r.id for r in first} == {CID, CID3}
    for _ in range(5):
        clock.now += 10
        assert src.snapshot() == first
    assert api.list_calls == 1 and src.reused == 5
    clock.now += 10.5  # 60.5 s after the list
    assert src.snapshot() == first
    assert api.list_calls == 2 and src.reused == 5


def test_an_event_or_a_new_cgroup_lists_again(
    quiet: tuple[DockerEventSource, EventsAPI, Clock, Path],
) -> None:
    src, api, _, docker_dir = quiet
    src.snapshot()
    stream = api.streams.get_nowait()
    stream.items.put(ev("rename", CID))
    wait_until(lambda: src.events_seen == 1)
    src.snapshot()
    assert api.list_calls == 2 and api.inspect_calls[-1] == CID
    src.snapshot()
    assert api.list_calls == 2  # nothing new since
    # A container that started before its event arrived: its cgroup is there already. Until
    # dockerd lists it as running, the list disagrees with the tree: listed again each time.
    new = "c" * 64
    (docker_dir / new).mkdir()
    src.snapshot()
    src.snapshot()
    assert api.list_calls == 4
    start_running(api, new, pid=9001)
    assert new in {r.id for r in src.snapshot()}
    assert api.list_calls == 5
    src.snapshot()
    assert api.list_calls == 5
    # One that stopped: its cgroup is gone (and, while dockerd still lists it, again each time).
    (docker_dir / CID3).rmdir()
    src.snapshot()
    src.snapshot()
    assert api.list_calls == 7
    api.summaries = [c for c in api.summaries if c["Id"] != CID3]
    assert CID3 not in {r.id for r in src.snapshot()}
    src.snapshot()
    assert api.list_calls == 8
    # Under a parent no listed container uses yet, outside Docker's defaults: only an event
    # (or the relist age) tells; the default parents are watched from the start.
    (docker_dir.parent / "system.slice" / ("d" * 64)).mkdir(parents=True)
    src.snapshot()
    assert api.list_calls == 9


def start_running(api: EventsAPI, cid: str, pid: int) -> None:
    """dockerd now lists `cid` as running (a copy of CID's answers with its id and pid)."""
    summary = dict(next(c for c in api.summaries if c["Id"] == CID))
    summary["Id"], summary["Names"] = cid, [f"/new-{cid[:4]}"]
    api.summaries = [*api.summaries, summary]
    attrs = dict(api.inspected[CID])
    attrs["Id"], attrs["Name"], attrs["State"] = cid, f"/new-{cid[:4]}", {**attrs["State"], "Pid": pid}
    api.inspected[cid] = attrs


def test_a_list_that_lags_the_cgroups_is_never_reused(
    quiet: tuple[DockerEventSource, EventsAPI, Clock, Path],
) -> None:
    """The race a real churn test found: a container's cgroup appears (runc) before dockerd
    lists it as running. A list taken in that moment must not be reused once the tree has
    settled, or every later snapshot misses a running container until the relist age."""
    src, api, clock, docker_dir = quiet
    assert api.list_calls == 0
    new = "e" * 64
    (docker_dir / new).mkdir()  # runc made it; dockerd does not list it yet
    assert new not in {r.id for r in src.snapshot()}
    start_running(api, new, pid=9001)
    for _ in range(3):  # the tree did not move since; the next snapshot lists all the same
        clock.now += 10
        assert new in {r.id for r in src.snapshot()}
    assert api.list_calls == 2 and src.reused == 2  # and the list that agrees is reused


def test_a_failed_list_is_never_reused(quiet: tuple[DockerEventSource, EventsAPI, Clock, Path]) -> None:
    src, api, _, _ = quiet
    src.snapshot()
    (api.streams.get_nowait()).items.put(ev("start", CID3))
    wait_until(lambda: src.events_seen == 1)
    api.list_failures.append(ConnectionError("dockerd is restarting"))
    with pytest.raises(Exception, match="dockerd is restarting"):
        src.snapshot()
    src.snapshot()
    assert api.list_calls == 3 and src.resyncs == 2  # the failure was a gap: everything again


def test_a_paused_container_costs_a_list_only_until_the_disagreement_settles(
    quiet: tuple[DockerEventSource, EventsAPI, Clock, Path],
) -> None:
    """A paused container has a cgroup but is not "running": the list never shows it. The same
    disagreement for SETTLE_S is no race, and the quiet host's snapshots are free again."""
    from remediator.probes.docker_events import SETTLE_S

    src, api, clock, docker_dir = quiet
    (docker_dir / ("f" * 64)).mkdir()  # paused: its cgroup stays, dockerd lists it not
    src.snapshot()
    clock.now += SETTLE_S / 2
    src.snapshot()  # the same disagreement, too soon to trust
    assert api.list_calls == 2
    clock.now += SETTLE_S / 2
    src.snapshot()  # settled: this list stands
    clock.now += 10
    src.snapshot()
    assert api.list_calls == 3 and src.reused == 1
