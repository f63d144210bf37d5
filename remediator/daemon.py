"""The daemon: APScheduler ticks, signals, systemd notifications (READY, STATUS, WATCHDOG,
STOPPING) and policy reloads.

The daemon keeps running on its last good policy set when a reload fails; a bad set at start-up
is fatal (exit 1, which the unit lists in RestartPreventExitStatus= so systemd does not loop).
One-shot runs and what both share (the engine, the inventory, the lock, the held files, the
probe memory) are in runtime.py.
"""

from __future__ import annotations

import datetime
import math
import os
import signal
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from apscheduler.executors.pool import ThreadPoolExecutor
from apscheduler.schedulers.background import BackgroundScheduler

from remediator import handles, metrics
from remediator.audit import get_logger
from remediator.clock import Clock, SystemClock
from remediator.errors import LockHeld, PolicyError, UserError
from remediator.host import HostRoot
from remediator.kube.status import node_reporter
from remediator.policy.rules import PolicySet
from remediator.probes.base import Inventory
from remediator.probes.inventory import InventoryFeed
from remediator.probes.inventory_multi import node_inventory_factory
from remediator.runtime import (
    DaemonMemory,
    HeldLock,
    hold_files,
    inventory_feed,
    load,
    locked_cycle,
    make_notifier,
    open_store,
    trim_heap,
)
from remediator.settings import Settings
from remediator.state import StateStore

log = get_logger()


def tick_period(intervals: list[float], floor: float = 1.0) -> float:
    """The daemon's scheduling period: the greatest common divisor of the policies' intervals
    (to the millisecond), at least `floor` seconds, so that each policy runs at its interval
    and policies of equal or related intervals share one cycle and one read of each probe."""
    ms = [max(1, round(i * 1000)) for i in intervals]
    if not ms:
        return 30.0
    return max(floor, math.gcd(*ms) / 1000)


# systemd ------------------------------------------------------------------------------------
# A unix datagram socket queues only net.unix.max_dgram_qlen messages (10 by default); when
# the reader (PID 1) is busy, send blocks. A late watchdog ping is better than a wedged daemon.
NOTIFY_TIMEOUT_S = 2.0


def sd_notify(message: str) -> bool:
    """sd_notify(3) without libsystemd: one datagram to $NOTIFY_SOCKET. False if not under
    systemd, or the socket is gone or stayed full for NOTIFY_TIMEOUT_S."""
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr:
        return False
    if addr.startswith("@"):
        addr = "\0" + addr[1:]  # abstract namespace socket
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            s.settimeout(NOTIFY_TIMEOUT_S)
            s.connect(addr)
            s.sendall(message.encode())
        return True
    except OSError:
        return False


def watchdog_interval() -> float | None:
    """Half of WatchdogSec= (systemd's advice), when the watchdog is for this process."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or (pid and pid != str(os.getpid())):
        return None
    try:
        return int(usec) / 1e6 / 2
    except ValueError:
        return None


@dataclass
class Daemon:
    settings: Settings
    policy_paths: list[Path]
    policies: PolicySet
    clock: Clock
    metrics_address: tuple[str, int] | None = None  # (host, port) for the Prometheus endpoint

    def __post_init__(self) -> None:
        # One worker: cycles never overlap, and a wedged cycle also stalls the watchdog ping,
        # so systemd restarts us instead of us pinging happily while nothing works.
        self.scheduler = BackgroundScheduler(
            executors={"default": ThreadPoolExecutor(max_workers=1)},
            job_defaults={"coalesce": True, "max_instances": 1, "misfire_grace_time": 300},
        )
        # When each policy is next due (clock seconds); guarded: reload replans from the main
        # thread while the tick runs in the scheduler's worker.
        self._due_lock = threading.Lock()
        self._due: dict[str, float] = {}
        self._tick_s = 1.0
        self._plans = 0  # schedules made (the tick job's id: see _schedule)
        self.notifier = make_notifier(self.settings, self.policies, self.clock)
        # One container inventory for the daemon's life: Docker's event stream says which
        # containers changed, so a cycle inspects only those (probes/docker_events.py).
        self.docker_feed: InventoryFeed | None = None
        # The node's inventory (Docker's feed, and Kubernetes when configured), also for life:
        # the Kubernetes source keeps its pod list between cycles (bounded relists).
        self.inventory: Callable[[], Inventory] | None = None
        # Opened at start and kept: a cycle then needs no new descriptor for its lock and its
        # state (SQLite in WAL mode keeps the database, -wal and -shm open), which matters
        # when the host is out of file handles (HeldLock).
        self.lock: HeldLock | None = None
        self.store: StateStore | None = None
        # Node conditions, Events and taint on a Kubernetes node (None elsewhere), kept for life:
        # its Event aggregation and back-off are in memory.
        self.node_status = node_reporter(self.settings, self.clock.now)
        self.memory = DaemonMemory(self.settings.probe_memory_path, self.clock)

    def _run_policy(self, name: str) -> None:
        """One cycle of one policy now (tests; the scheduler runs `_tick`)."""
        self._run_cycle([name])

    def _run_cycle(self, names: list[str]) -> bool:
        """One locked cycle of these policies, every probe they use read once. False when the
        lock was held (the policies stay due) or the cycle failed."""
        try:
            if self.store is None:
                # In the worker thread that runs every cycle: a connection is one thread's.
                self.store = open_store(self.settings)
            self.memory.refresh()
            report = locked_cycle(
                self.settings,
                self.policies,
                self.clock,
                names,
                self.inventory,
                lock=self.lock,
                store=self.store,
                node=self.node_status,
                memory=self.memory,
            )
        except LockHeld as e:
            log.warning("cycle_skipped", policies=names, reason=str(e))
            return False
        except Exception as e:  # never let one failed cycle kill the daemon
            log.exception("cycle_failed", policies=names, error=f"{type(e).__name__}: {e}")
            return True  # a bug: do not retry it at every tick
        metrics.observe_cycle(report)
        trim_heap()
        try:
            self.notifier.cycle(report)
        except Exception as e:  # notifying must never stop the daemon
            log.exception("notification_failed", error=f"{type(e).__name__}: {e}")
        return True

    def _tick(self) -> None:
        """Run every policy that is due, together: a probe that several due policies use is read
        once (the bundled set: 6 policies on 3 probes, every 30 s, is one cycle of 3 reads
        instead of 6 cycles that read 6 times)."""
        with self._due_lock:
            now = self.clock.now()
            # Half a tick of slack: the scheduler fires each tick a few ms after its planned
            # time, by a different amount each time, and a policy planned for "now + interval"
            # from a late tick must not miss the next, slightly less late one (it used to: a
            # 30 s policy then ran about every 60 s).
            slack = self._tick_s / 2
            due = [p.name for p in self.policies.policies if self._due.get(p.name, 0.0) <= now + slack]
            by_name = self.policies.by_name()
            plan = self._plans
        if not due or not self._run_cycle(due):
            return
        with self._due_lock:
            if self._plans != plan:
                return  # reloaded meanwhile: the new plan has every policy due now, ran next
            for name in due:
                p = by_name.get(name)
                if p is not None and name in self._due:
                    # From the planned time, not from when the cycle ended, so that a slow cycle
                    # does not make every later one late; a missed one runs once, not many times.
                    self._due[name] = max(self._due[name] + p.interval, now + min(p.interval, self._tick_s))

    def _schedule(self) -> None:
        """(Re)plan: every policy due now, then every `interval`; the scheduler ticks at the
        largest period that hits every interval (their greatest common divisor, >= 1 s)."""
        for job in self.scheduler.get_jobs():
            if job.id.startswith("tick-"):
                job.remove()
        with self._due_lock:
            now = self.clock.now()
            self._due = {p.name: now for p in self.policies.policies}
            self._tick_s = tick_period([p.interval for p in self.policies.policies])
        # A new id for each plan: APScheduler counts running instances per job id, so a plan
        # made while the last plan's tick still runs (a reload mid-cycle) would have its first
        # run, "now", skipped as a second instance, and the new set evaluated a whole tick
        # period later (an hour for hourly policies). Under its own id it waits for the one
        # worker instead, and runs right after the cycle in progress: cycles still never overlap.
        self._plans += 1
        self.scheduler.add_job(
            self._tick,
            "interval",
            id=f"tick-{self._plans}",
            seconds=self._tick_s,
            next_run_time=self._now_dt(),
        )
        metrics.POLICIES.set(len(self.policies.policies))

    def _now_dt(self) -> datetime.datetime:
        return datetime.datetime.fromtimestamp(self.clock.now(), datetime.UTC)

    def reload(self) -> bool:
        """Load the policy files again; on any failure keep the last good set and say why.

        Whatever the files contain, this returns: a set that does not compile is a
        PolicyError (every issue with file:line), and any other exception is a bug in the
        loader, logged with its traceback, which must not take the repairs down with it."""
        sd_notify("RELOADING=1")
        try:
            new = load(self.policy_paths)
        except PolicyError as e:
            return self._reload_failed([str(i) for i in e.issues])
        except Exception as e:
            log.exception("internal_error", during="reload", error=f"{type(e).__name__}: {e}")
            return self._reload_failed([f"internal error: {type(e).__name__}: {e} (a bug: please report)"])
        old = self.policies
        self.policies = new
        self._hold_files()
        try:
            self._schedule()
        except Exception as e:  # the loader range-checks intervals; this is a second line
            log.exception("internal_error", during="reload", error=f"{type(e).__name__}: {e}")
            self.policies = old
            self._schedule()
            return self._reload_failed([f"cannot schedule the new set: {type(e).__name__}: {e}"])
        if new.controller.notify != self.notifier.notify:
            self.notifier.stop()  # a POST in flight finishes; back-off ends at once
            self.notifier = make_notifier(self.settings, new, self.clock)
            self.notifier.start()
        metrics.EXPORTER.keep_only([p.name for p in new.policies], new.probes())
        log.info(
            "policies_reloaded", policies=[p.name for p in new.policies], commit=new.commit, dirty=new.dirty
        )
        sd_notify(f"READY=1\nSTATUS={self._status()}")
        return True

    def _hold_files(self) -> None:
        held = hold_files(self.settings, self.policies)
        (log.warning if held["problems"] else log.info)("files_held", **held)

    def _reload_failed(self, errors: list[str]) -> bool:
        metrics.RELOAD_FAILURES.inc()
        log.error(
            "policies_reload_failed",
            errors=errors,
            kept=len(self.policies.policies),
            commit=self.policies.commit,
        )
        sd_notify(f"READY=1\nSTATUS=reload failed ({len(errors)} errors); running last good set")
        return False

    def _status(self) -> str:
        mode = "dry-run" if self.settings.dry_run else "live"
        return f"{len(self.policies.policies)} policies, {mode}"

    def run(self, stop: threading.Event | None = None) -> int:
        """Block until SIGTERM/SIGINT (or `stop`). SIGHUP reloads policies."""
        signals = {signal.SIGHUP, signal.SIGTERM, signal.SIGINT}
        in_main = threading.current_thread() is threading.main_thread()
        if in_main:
            # Block the signals before any thread starts (threads inherit the mask), then take
            # them synchronously with sigtimedwait: no Python code runs inside a signal handler
            # while scheduler locks are held, and no other thread can receive a SIGHUP whose
            # default action would kill the process (the kernel hands a process-directed signal
            # to any thread that does not block it).
            signal.pthread_sigmask(signal.SIG_BLOCK, signals)
        if self.metrics_address is not None:
            host, port = self.metrics_address
            try:
                metrics.serve(host, port)
            except OSError as e:
                if in_main:
                    signal.pthread_sigmask(signal.SIG_UNBLOCK, signals)
                raise UserError(
                    f"--metrics-address: cannot listen on {host}:{port}: {e.strerror or e}"
                ) from None
        # Fail at start, with one clear line, on a state directory that cannot work. Actions a
        # crash left half-done are reported by the first locked cycle, not here: without the
        # lock a `started` row may be a running `remediator once`'s action.
        open_store(self.settings).close()
        self.lock = HeldLock(self.settings.lock_path, self.settings.lock_timeout)
        self._hold_files()
        node = HostRoot(self.settings.host_root, config_root=self.settings.config_root)
        self.docker_feed = inventory_feed(self.settings, node, readonly=False, events=True)
        self.inventory = node_inventory_factory(self.settings, node, SystemClock(), docker=self.docker_feed)
        self.notifier.start()
        self._schedule()
        wd = watchdog_interval()
        if wd:
            self.scheduler.add_job(lambda: sd_notify("WATCHDOG=1"), "interval", seconds=wd, id="watchdog")
        self.scheduler.start()
        log.info(
            "daemon_started",
            policies=[p.name for p in self.policies.policies],
            dry_run=self.settings.dry_run,
            commit=self.policies.commit,
            pid=os.getpid(),
        )
        sd_notify(f"READY=1\nSTATUS={self._status()}")
        try:
            while stop is None or not stop.is_set():
                if not in_main:
                    (stop or threading.Event()).wait(0.5)
                    continue
                info = signal.sigtimedwait(signals, 1.0)
                if info is None or info.si_signo not in signals:
                    # Not one of ours: seen as si_signo 0 when a profiler (ptrace) attached.
                    continue
                if info.si_signo == signal.SIGHUP:
                    log.info("reload_requested")
                    self.reload()
                else:
                    log.info("stop_requested", signal=signal.Signals(info.si_signo).name)
                    break
        finally:
            sd_notify("STOPPING=1")
            self.scheduler.shutdown(wait=True)
            self.notifier.stop()
            self.memory.write_now()
            if self.docker_feed is not None:
                self.docker_feed.close()
            # The worker thread that opened the store is gone: SQLite connections may only be
            # closed by their own thread, so the last reference goes and the finalizer closes it.
            self.store = None
            if self.lock is not None:
                self.lock.close()
            handles.HELD.close()
            if in_main:
                signal.pthread_sigmask(signal.SIG_UNBLOCK, signals)
            log.info("daemon_stopped")
        return 0
