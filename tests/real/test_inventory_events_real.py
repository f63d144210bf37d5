"""The daemon's container inventory on the real dockerd: current at every snapshot, cheap.

The daemon keeps one inventory for its life (probes/docker_events.py): a list call per snapshot
that follows an event or a change of the containers' cgroup directories (none on a quiet host),
and an inspect only for containers Docker's event stream reported. These tests drive real
containers through create / rename / restart / stop / remove and check that the very next
snapshot shows each change (ids, names, running init pid), and then race a churner that
creates and removes containers against thousands of snapshots, checking each snapshot against
what was certainly running (and certainly not) while it was taken.
"""

from __future__ import annotations

import contextlib
import random
import secrets
import threading
import time
from dataclasses import dataclass

import docker
import docker.errors
import pytest

from remediator.host import HostRoot
from remediator.model import ContainerRef
from remediator.probes.containers import make_inventory_factory
from remediator.probes.docker_events import DockerEventSource
from remediator.probes.inventory import InventoryFeed
from tests.real.conftest import DOCKER_SOCK, MakeContainer

pytestmark = pytest.mark.real

HOST = HostRoot()
RUN_LABEL = "remediator.test.inventory"


def ours(feed: InventoryFeed, run: str) -> dict[str, ContainerRef]:
    inventory = feed()
    assert inventory.error is None
    return {r.id: r for r in inventory.containers() if r.labels.get(RUN_LABEL) == run}


def event_source(feed: InventoryFeed) -> DockerEventSource:
    source = feed._source
    assert isinstance(source, DockerEventSource)
    return source


def test_each_change_is_in_the_next_snapshot(
    make_container: MakeContainer, docker_client: docker.DockerClient
) -> None:
    run = secrets.token_hex(4)
    feed = make_inventory_factory(f"unix://{DOCKER_SOCK}", HOST, 30.0, events=True)
    made: list[str] = []  # by id: make_container removes by name, and some get renamed
    try:
        assert ours(feed, run) == {}
        assert event_source(feed).wait_subscribed(10)
        rng = random.Random(11)
        expected: dict[str, str] = {}  # running: id -> name
        stopped: dict[str, str] = {}
        source = event_source(feed)
        for step in range(40):
            events_before = source.events_seen
            choices = ["create"] * 3 + ["rename", "restart", "stop", "remove"] * bool(expected)
            choices += ["start"] * bool(stopped)
            op = rng.choice(choices)
            if op == "create":
                c = make_container(labels={RUN_LABEL: run})
                made.append(c.id)
                expected[c.id] = c.name
            elif op == "start":
                cid = rng.choice(sorted(stopped))
                docker_client.api.start(cid)
                expected[cid] = stopped.pop(cid)
            else:
                cid = rng.choice(sorted(expected))
                if op == "rename":
                    new = f"rmd-test-renamed-{secrets.token_hex(4)}"
                    docker_client.api.rename(cid, new)
                    expected[cid] = new
                elif op == "restart":
                    docker_client.api.restart(cid, timeout=0)
                elif op == "stop":
                    docker_client.api.stop(cid, timeout=0)
                    stopped[cid] = expected.pop(cid)
                else:
                    docker_client.api.remove_container(cid, force=True)
                    del expected[cid]
            # Starts and stops show at once (their cgroups); a rename from the snapshot after its
            # event arrived, which every step here sends.
            deadline = time.monotonic() + 10
            while source.events_seen == events_before and time.monotonic() < deadline:
                time.sleep(0.005)
            seen = ours(feed, run)
            assert {cid: ref.name for cid, ref in seen.items()} == expected, f"step {step}: {op}"
            for cid, ref in seen.items():
                pid = docker_client.api.inspect_container(cid)["State"]["Pid"]
                assert ref.pid == pid, f"step {step}: {op}: stale pid for {ref.name}"
                assert ref.cgroup and cid in ref.cgroup
        # The stream did its work: far fewer inspects than one per container per snapshot.
        assert source.events_seen > 0
        assert source.inspects < 40 * max(1, len(expected))
        print(f"40 steps: {source.events_seen} events, {source.inspects} inspects")
        # Quiet now: once the trailing events are in, snapshots cost no API call and stay right.
        time.sleep(1)
        ours(feed, run)
        reused = source.reused
        for _ in range(5):
            assert {cid: ref.name for cid, ref in ours(feed, run).items()} == expected
        assert source.reused == reused + 5
    finally:
        feed.close()
        for cid in made:
            with contextlib.suppress(docker.errors.NotFound):
                docker_client.api.remove_container(cid, force=True)


@dataclass
class Life:
    created_at: float = 0.0  # before the create call
    running_at: float | None = None  # after run() returned: running from here on
    removing_at: float | None = None  # before the remove call
    removed_at: float | None = None  # after it returned: gone from here on


def test_snapshots_stay_consistent_under_create_and_remove_churn(
    make_container: MakeContainer, docker_client: docker.DockerClient
) -> None:
    run = secrets.token_hex(4)
    lives: dict[str, Life] = {}
    lock = threading.Lock()
    stop = threading.Event()
    failures: list[BaseException] = []

    def churn() -> None:
        rng = random.Random(7)
        alive: list[str] = []
        try:
            while not stop.is_set():
                if len(alive) < 3 or (len(alive) < 12 and rng.random() < 0.55):
                    life = Life(created_at=time.monotonic())
                    c = make_container(labels={RUN_LABEL: run})
                    life.running_at = time.monotonic()
                    with lock:
                        lives[c.id] = life
                    alive.append(c.id)
                else:
                    cid = alive.pop(rng.randrange(len(alive)))
                    with lock:
                        lives[cid].removing_at = time.monotonic()
                    docker_client.api.remove_container(cid, force=True)
                    with lock:
                        lives[cid].removed_at = time.monotonic()
        except BaseException as e:  # reported by the main thread
            failures.append(e)

    feed = make_inventory_factory(f"unix://{DOCKER_SOCK}", HOST, 30.0, events=True)
    churner = threading.Thread(target=churn, daemon=True)
    snapshots = 0
    ever_seen: set[str] = set()
    try:
        ours(feed, run)
        source = event_source(feed)
        churner.start()
        deadline = time.monotonic() + 25
        while time.monotonic() < deadline or snapshots < 1000:
            before = time.monotonic()
            seen = ours(feed, run)
            after = time.monotonic()
            snapshots += 1
            with lock:
                known = dict(lives)
            for cid, life in known.items():
                certainly_running = (
                    life.running_at is not None
                    and life.running_at <= before
                    and (life.removing_at is None or life.removing_at >= after)
                )
                certainly_gone = life.removed_at is not None and life.removed_at <= before
                if certainly_running:
                    assert cid in seen, f"snapshot {snapshots}: misses running {cid[:12]}"
                    assert seen[cid].pid and seen[cid].cgroup
                if certainly_gone:
                    assert cid not in seen, f"snapshot {snapshots}: still lists removed {cid[:12]}"
            ever_seen.update(seen)
            if failures:
                break
    finally:
        stop.set()
        churner.join(60)
        feed.close()
    if failures:
        raise failures[0]
    with lock:
        created = len(lives)
        removed = sum(1 for life in lives.values() if life.removed_at is not None)
        assert ever_seen <= set(lives)  # nothing was reported that the churner did not make
    print(
        f"{snapshots} snapshots against {created} containers created, {removed} removed; "
        f"{source.reused} without an API call"
    )
    assert snapshots >= 1000 and created >= 20 and removed >= 10, (snapshots, created, removed)
