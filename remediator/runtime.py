"""Running the engine: one-shot cycles (timer) and the daemon (APScheduler), signals, systemd
notifications, the instance lock and policy reloads.

The daemon keeps running on its last good policy set when a reload fails; a bad set at start-up
is fatal (exit 1, which the unit lists in RestartPreventExitStatus= so systemd does not loop).
"""

from __future__ import annotations

import datetime
import functools
import os
import signal
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from apscheduler.executors.pool import ThreadPoolExecutor
from apscheduler.schedulers.background import BackgroundScheduler

from remediator import metrics
from remediator.audit import get_logger
from remediator.clock import Clock, SystemClock
from remediator.engine import CycleReport, Engine, catalog, forget_removed, interrupted_actions
from remediator.errors import LockHeld, PolicyError, UserError
from remediator.host import HostRoot
from remediator.policy.loader import load_policies
from remediator.policy.rules import PolicySet
from remediator.probes.containers import connect, make_inventory_factory
from remediator.settings import Settings
from remediator.state import DRY_RUN, LIVE, InstanceLock, StateStore

log = get_logger()


def load(paths: list[Path]) -> PolicySet:
    return load_policies(paths, catalog())


def docker_factory(settings: Settings) -> Callable[[], Any]:
    """A lazy Docker client for actions (most cycles never need one)."""
    return functools.partial(connect, settings.docker_url, settings.docker_timeout)


def make_engine(
    settings: Settings, policies: PolicySet, store: StateStore, clock: Clock | None = None
) -> Engine:
    host = HostRoot(settings.host_root, settings.fifo_roots)
    return Engine(
        policies,
        host=host,
        clock=clock or SystemClock(),
        store=store,
        dry_run=settings.dry_run,
        inventory_factory=make_inventory_factory(settings.docker_url, host, settings.docker_timeout),
        docker_factory=docker_factory(settings),
    )


def open_store(settings: Settings, *, readonly: bool = False) -> StateStore:
    return StateStore(settings.db_path, namespace=DRY_RUN if settings.dry_run else LIVE, readonly=readonly)


def run_once(settings: Settings, policies: PolicySet, clock: Clock | None = None) -> CycleReport:
    """One locked cycle over every policy, persisted: what the systemd timer runs."""
    with InstanceLock(settings.lock_path, settings.lock_timeout):
        store = open_store(settings)
        try:
            for row in interrupted_actions(store):
                log.warning("action_interrupted", **row)
            forget_removed(store, policies)
            return make_engine(settings, policies, store, clock).cycle()
        finally:
            store.close()


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
        self._store_lock = threading.Lock()

    def _run_policy(self, name: str) -> None:
        try:
            with InstanceLock(self.settings.lock_path, self.settings.lock_timeout):
                started = time.monotonic()
                store = open_store(self.settings)
                try:
                    report = make_engine(self.settings, self.policies, store, self.clock).cycle([name])
                finally:
                    store.close()
                metrics.CYCLE.labels(name).observe(time.monotonic() - started)
            metrics.observe_cycle(report)
        except LockHeld as e:
            log.warning("cycle_skipped", policy=name, reason=str(e))
        except Exception as e:  # never let one failed cycle kill the daemon
            log.exception("cycle_failed", policy=name, error=f"{type(e).__name__}: {e}")

    def _schedule(self) -> None:
        for job in self.scheduler.get_jobs():
            if job.id.startswith("policy:"):
                job.remove()
        for p in self.policies.policies:
            # First evaluation right away, then every interval.
            self.scheduler.add_job(
                self._run_policy,
                "interval",
                args=[p.name],
                id=f"policy:{p.name}",
                seconds=p.interval,
                next_run_time=self._now_dt(),
            )
        metrics.POLICIES.set(len(self.policies.policies))

    def _now_dt(self) -> datetime.datetime:
        return datetime.datetime.fromtimestamp(self.clock.now(), datetime.UTC)

    def reload(self) -> bool:
        sd_notify("RELOADING=1")
        try:
            new = load(self.policy_paths)
        except PolicyError as e:
            metrics.RELOAD_FAILURES.inc()
            log.error(
                "policies_reload_failed",
                errors=[str(i) for i in e.issues],
                kept=len(self.policies.policies),
                commit=self.policies.commit,
            )
            sd_notify(f"READY=1\nSTATUS=reload failed ({len(e.issues)} errors); running last good set")
            return False
        self.policies = new
        self._schedule()
        log.info(
            "policies_reloaded", policies=[p.name for p in new.policies], commit=new.commit, dirty=new.dirty
        )
        sd_notify(f"READY=1\nSTATUS={self._status()}")
        return True

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
        store = open_store(self.settings)
        try:
            for row in interrupted_actions(store):
                log.warning("action_interrupted", **row)
        finally:
            store.close()
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
                if info is None:
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
            if in_main:
                signal.pthread_sigmask(signal.SIG_UNBLOCK, signals)
            log.info("daemon_stopped")
        return 0
