"""Running the engine: one-shot cycles (timer) and what the daemon (daemon.py) shares with them:
the engine and its inventory, the instance lock, the files held in advance, the probe memory,
heap trimming and the locked cycle."""

from __future__ import annotations

import ctypes  # malloc_trim; the Docker SDK's dependencies import it already
import fcntl
import functools
import os
import socket
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from remediator import handles, metrics
from remediator.actions import cap_memory
from remediator.actions.docker_engine import DockerEngine
from remediator.actions.sysctl_persist import find_owners
from remediator.audit import get_logger
from remediator.clock import Clock, SystemClock
from remediator.engine import CycleReport, Engine, catalog, interrupted_actions, keep_state_bounded
from remediator.errors import LockHeld, UserError
from remediator.handles import HeldPath
from remediator.host import HostRoot
from remediator.kube.status import NodeReporter, node_reporter
from remediator.model import ActionResult, Outcome, Reading
from remediator.notify import Notifier
from remediator.policy.loader import load_policies
from remediator.policy.rules import PolicySet
from remediator.probes.base import PROBES, Inventory, ProbeContext, ProbeOptions
from remediator.probes.containers import connect, make_inventory_factory
from remediator.probes.inventory import InventoryFeed
from remediator.probes.inventory_multi import node_inventory_factory
from remediator.probes.kube_api import client_factory as kube_client_factory
from remediator.probes.limits import LimitsProbe
from remediator.probes.memory import FileMemory, ProbeMemory
from remediator.settings import Settings
from remediator.state import DRY_RUN, LIVE, InstanceLock, StateStore, check_state_dir

log = get_logger()

# In the state directory: init pids of the containers one-shot runs inspected (probes/containers.py).
CONTAINER_PIDS_FILE = "container-pids.json"


def load(paths: list[Path]) -> PolicySet:
    return load_policies(paths, catalog())


def docker_factory(settings: Settings) -> Callable[[], Any]:
    """A lazy Docker client for actions (most cycles never need one)."""
    return functools.partial(connect, settings.docker_url, settings.docker_timeout)


def make_engine(
    settings: Settings,
    policies: PolicySet,
    store: StateStore,
    clock: Clock | None = None,
    *,
    log_namespace: str | None = None,
    inventory: Callable[[], Inventory] | None = None,
    memory: ProbeMemory | None = None,
) -> Engine:
    """`inventory`: the node's container inventory to use (the daemon keeps one for its life);
    None: a one-shot one, whose Docker feed keeps inspected pids in the state directory.
    `memory`: the probe memory to use (the daemon's `DaemonMemory`); None: the state file's."""
    host = HostRoot(
        settings.host_root, config_root=settings.config_root, extra_fifo_roots=settings.fifo_roots
    )
    if inventory is None:
        docker = inventory_feed(settings, host, readonly=store.readonly or store.path == Path(":memory:"))
        inventory = node_inventory_factory(settings, host, clock or SystemClock(), docker=docker)
    return Engine(
        policies,
        host=host,
        clock=clock or SystemClock(),
        store=store,
        dry_run=settings.dry_run,
        log_namespace=log_namespace,
        inventory_factory=inventory,
        docker_factory=docker_factory(settings),
        kube_factory=kube_client_factory(settings.kubeconfig),
        # Samples for growth rates, shared by the daemon, the timer and audit (which only reads).
        probe_memory=memory
        if memory is not None
        else None
        if store.path == Path(":memory:")
        else FileMemory(settings.probe_memory_path, readonly=store.readonly),
        probe_options=ProbeOptions(
            dentry_hash_buckets=settings.dentry_hash_buckets,
            scratch_dir=None if store.readonly else settings.state_dir / "canary",
            ebpf=settings.ebpf,
            bcc_dir=settings.state_dir / "bcc",
            docker_url=settings.docker_url,
            docker_timeout=settings.docker_timeout,
        ),
    )


def inventory_feed(
    settings: Settings, host: HostRoot, *, readonly: bool, events: bool = False
) -> InventoryFeed:
    """The Docker inventory: one-shot runs keep the pids they inspected in the state directory
    for the next run (audit only reads them); the daemon (`events`) keeps them in memory and
    follows Docker's event stream."""
    return make_inventory_factory(
        settings.docker_url,
        host,
        settings.docker_timeout,
        pids_path=None if events else settings.state_dir / CONTAINER_PIDS_FILE,
        readonly=readonly,
        events=events,
    )


def read_limits(settings: Settings) -> Reading:
    """One full read of the limits probe (no CPU budget: an operator asked and waits)."""
    host = HostRoot(settings.host_root, config_root=settings.config_root)
    clock = SystemClock()
    ctx = ProbeContext(host, clock, node_inventory_factory(settings, host, clock))
    return LimitsProbe(budget=None).read(ctx)


def probe_files(host: HostRoot, probes: Iterable[str]) -> list[HeldPath]:
    """The files the named probes read every cycle (each probe's `held_files`), each once."""
    found: dict[Path, HeldPath] = {}
    for name in sorted(probes):
        cls = PROBES.get(name)
        for held in cls.held_files(host) if cls is not None else ():
            found.setdefault(held.path, held)
    return list(found.values())


def hold_files(settings: Settings, policies: PolicySet) -> dict[str, Any]:
    """Open in advance what reading and raising the pools of `policies` needs (handles.py):
    the files its probes read every cycle read-only, the /proc/sys file of every key a
    raise-sysctl step may raise read-write (read-only in dry-run, which never writes); let go
    of the rest. Also
    looks once for other owners of those keys, so the action's owner check can answer from
    that look when no file handle is left. Returns what was held, for the log."""
    host = HostRoot(settings.host_root, config_root=settings.config_root)
    keys = sorted(
        {
            str(getattr(step.params, "key", ""))
            for p in policies.policies
            for step in p.steps
            if step.action == "raise-sysctl"
        }
        - {""}
    )
    readable = probe_files(host, policies.probes())
    writable = [host.sysctl_path(k) for k in keys]
    problems = []
    for want in [*readable, *(HeldPath(p) for p in writable)]:
        error = handles.HELD.hold(
            want.path, writable=want.path in writable and not settings.dry_run, records=want.records
        )
        # A missing file is a sysctl this kernel does not have (a module not loaded): the probe
        # has no data for it and an action on it says so; only other failures are problems.
        if error is not None and want.path.exists():
            problems.append(error)
    handles.HELD.keep_only([*(h.path for h in readable), *writable])
    for key in keys:
        try:
            find_owners(host, key)
        except OSError as e:
            problems.append(f"owners of {key}: {e}")
    held = handles.HELD.held()
    return {
        "read_only": sum(1 for w in held.values() if not w),
        "read_write": sorted(k for k, w in held.items() if w),
        "problems": problems,
    }


def open_store(settings: Settings, *, readonly: bool = False) -> StateStore:
    return StateStore(settings.db_path, namespace=DRY_RUN if settings.dry_run else LIVE, readonly=readonly)


def _libc_malloc_trim() -> Callable[[int], int] | None:
    try:
        fn: Callable[[int], int] = ctypes.CDLL("libc.so.6").malloc_trim
        return fn
    except (OSError, AttributeError):  # not glibc
        return None


_MALLOC_TRIM = _libc_malloc_trim()


def trim_heap() -> None:
    """Give the memory a cycle freed back to the kernel (glibc's malloc_trim(3)).

    A cycle allocates and frees a few MiB (Docker's container list, JSON of the readings); glibc
    keeps freed chunks in its arenas (one per thread that allocated), so the daemon's resident
    size stayed at its peak. malloc_trim releases the free pages of every arena (madvise), for
    well under a millisecond at this heap size. A no-op where libc is not glibc."""
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


class DaemonMemory(FileMemory):
    """The probe memory for the daemon's life (probes/memory.py's file, kept in memory).

    A one-shot run loads the file and writes it back once; the daemon did the same every cycle,
    and at 200 containers (a few samples each) that was ~10 ms of JSON parsing and ~20 ms of
    writing every 10 s. Kept, it is loaded again only when another process (`remediator once`)
    replaced the file since this one last wrote or read it (its inode, size or mtime moved,
    looked at once per cycle), and written at most every `flush_every` seconds and when the
    daemon stops. A daemon killed
    without a stop loses up to that much of its samples: the next reads then compute their
    rates over a shorter history, or take the one-second second sample a fresh host takes."""

    def __init__(self, path: Path, clock: Clock, flush_every: float = 60.0) -> None:
        super().__init__(path)
        self.clock = clock
        self.flush_every = flush_every
        self._seen: tuple[int, int, int] | None = None
        self._flushed_at: float | None = None

    def _stat(self) -> tuple[int, int, int] | None:
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        return (st.st_ino, st.st_size, st.st_mtime_ns)

    def refresh(self) -> None:
        """Before a cycle: take another process's samples if it replaced the file and this one
        has nothing unwritten (else this one's samples win at its next write)."""
        if self._data is not None and not self._dirty and self._stat() != self._seen:
            self._data = None

    def _load(self) -> dict[str, Any]:
        if self._data is None:
            self._seen = self._stat()
        return super()._load()

    @property
    def written_at(self) -> float | None:
        """When this process last wrote the file (by its clock), or None."""
        return self._flushed_at

    def flush(self) -> None:
        now = self.clock.now()
        if self._flushed_at is not None and 0 <= now - self._flushed_at < self.flush_every:
            return
        self.write_now()

    def write_now(self) -> None:
        was_dirty = self._dirty
        super().flush()
        if was_dirty and not self._dirty:
            self._seen = self._stat()
            self._flushed_at = self.clock.now()


class HeldLock(InstanceLock):
    """The daemon's instance lock: the same flock(2) as `InstanceLock`, on a descriptor opened
    once at start and kept, so that taking the lock for a cycle needs no new file. At
    fs.file-max a process without CAP_SYS_ADMIN (the units drop it) cannot open anything
    (ENFILE; docs/operations.md), and the cycle that would raise the limit must still run."""

    def __init__(self, path: Path, timeout: float) -> None:
        super().__init__(path, timeout)
        check_state_dir(path.parent, create=True)
        try:
            self._held = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
        except OSError as e:
            raise UserError(f"{path}: cannot open the instance lock: {e.strerror or e}") from None

    def acquire(self) -> None:
        deadline = time.monotonic() + self.timeout
        while True:
            try:
                fcntl.flock(self._held, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    holder = os.pread(self._held, 32, 0).decode(errors="replace").strip() or "unknown"
                    raise LockHeld(
                        f"another remediator instance (pid {holder}) is acting on this host "
                        f"({self.path}); waited {self.timeout:g}s"
                    ) from None
                time.sleep(0.1)
        os.ftruncate(self._held, 0)
        os.pwrite(self._held, f"{os.getpid()}\n".encode(), 0)
        self._fd = self._held

    def release(self) -> None:
        self._unlock()

    def _unlock(self) -> None:
        fcntl.flock(self._held, fcntl.LOCK_UN)
        self._fd = None

    def close(self) -> None:
        os.close(self._held)


def locked_cycle(
    settings: Settings,
    policies: PolicySet,
    clock: Clock,
    only: list[str] | None = None,
    inventory: Callable[[], Inventory] | None = None,
    *,
    lock: InstanceLock | None = None,
    store: StateStore | None = None,
    node: NodeReporter | None = None,
    memory: ProbeMemory | None = None,
) -> CycleReport:
    """One cycle (of `only`, or of every policy) under the instance lock, persisted.

    Under the lock, before the cycle: actions that a dead process left `started` are reported
    (only here can no other instance be in the middle of one). After it: the state is kept
    bounded (history retention), in every mode that writes state. `lock` and `store`: the
    daemon's, opened once and kept (a one-shot run opens and closes its own). `node`: the
    Kubernetes node reporter (conditions, Events, taint), fed the report under the same lock."""
    with lock or InstanceLock(settings.lock_path, settings.lock_timeout):
        own_store = store is None
        store = store or open_store(settings)
        try:
            for row in interrupted_actions(store):
                log.warning("action_interrupted", **row)
            engine = make_engine(settings, policies, store, clock, inventory=inventory, memory=memory)
            # A multi-phase action (recreate) cut short by a crash is finished or undone before
            # any policy acts again (its journal says how far it got).
            engine.recover_interrupted()
            report = engine.cycle(only)
            if node is not None:
                node.cycle(report, policies)  # never raises for the API server's sake
            removed = keep_state_bounded(store, policies, clock.now())
            if removed:
                log.debug("state_pruned", actions=removed, namespace=store.ns)
            return report
        finally:
            if own_store:
                store.close()


def restore_memory(settings: Settings, container: str, by: str) -> ActionResult:
    """Put back the memory limit cap-memory recorded for `container` (a name or an id)."""
    with InstanceLock(settings.lock_path, settings.lock_timeout):
        store = open_store(settings)
        try:
            engine = DockerEngine(docker_factory(settings)())
            attrs = engine.find(container)
            cid = str(attrs["Id"]) if attrs is not None else container
            record = store.pending_undo(cap_memory.CapMemory.name, cid) or next(
                (
                    r
                    for r in store.pending_undos(cap_memory.CapMemory.name)
                    if container in (r.target_name, r.target)
                ),
                None,
            )
            if record is None:
                raise UserError(
                    f"no recorded memory cap for container {container!r} (see `remediator status`)"
                )
            result = cap_memory.restore(engine, HostRoot(settings.host_root), record.target, record.original)
            if result.outcome is Outcome.APPLIED:
                store.mark_undone(record.id, SystemClock().now(), by)
            log.warning("memory_restored", container=container, by=by, **result.to_dict())
            return result
        finally:
            store.close()


# `once`: how long to try delivering notifications after the cycle before leaving the rest in
# the queue for the next run or the daemon. Short: the timer's next run must not find us.
ONCE_NOTIFY_FLUSH_S = 10.0


def make_notifier(settings: Settings, policies: PolicySet, clock: Clock) -> Notifier:
    return Notifier(settings.state_dir, policies.controller.notify, clock, socket.gethostname())


def run_once(settings: Settings, policies: PolicySet, clock: Clock | None = None) -> CycleReport:
    """One locked cycle over every policy, persisted, then its notifications: what the systemd
    timer runs."""
    clock = clock or SystemClock()
    report = locked_cycle(settings, policies, clock, node=node_reporter(settings, clock.now))
    notifier = make_notifier(settings, policies, clock)
    notifier.cycle(report)
    notifier.flush(ONCE_NOTIFY_FLUSH_S)
    return report


def write_textfile(path: Path, report: CycleReport, top_n: int) -> None:
    """The metrics of one `once` run as a node_exporter textfile; its counters continue from
    the file the previous run wrote."""
    exporter = metrics.Exporter(top_n)
    exporter.carry_over(path)
    exporter.observe(report)
    try:
        metrics.write_textfile(exporter, path)
    except OSError as e:
        raise UserError(f"--textfile: cannot write {path}: {e.strerror or e}") from None
