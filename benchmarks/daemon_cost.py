"""What the daemon costs the host, against the raw reads it is built on, in one run.

1. **Cycle cost.** Each bundled probe (`dentries`, `fifos`, `limits`) read RUNS times through
   the engine (real host, real Docker inventory), against the raw reads of the same kernel
   files (`dentry-state`, `slabinfo`, `file-nr`, `loadavg`, the inotify sysctls, statvfs of
   /run, a listing of /run/containerd/fifo) done with plain `open().read()`. Medians and ratio.
2. **Daemon share.** `remediator run --dry-run` with the bundled policies, its own state
   directory and the metrics endpoint on a free loopback port, for WINDOW seconds: its CPU time
   (utime + stime from /proc/<pid>/stat) as a share of one core, and its resident memory
   (VmRSS: mean and max, sampled every second), against the CPU the raw reads of the same
   number of cycles would take.

`--containers N` first starts N labelled containers of the test image (`sleep`;
scripts/make-test-image.sh) on the system dockerd
and removes them at the end, so the inventory and the per-container attribution have work.
Needs root (the limits probe reads every process's fds); `--dry-run` changes nothing on the
host. On a shared machine keep N and the window modest.

    sudo .venv/bin/python benchmarks/daemon_cost.py --window 180 --containers 200
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from remediator import audit
from remediator.clock import SystemClock, stopwatch
from remediator.engine import Engine
from remediator.host import HostRoot
from remediator.probes.containers import make_inventory_factory
from remediator.runtime import load
from remediator.settings import bundled_policies
from remediator.state import DRY_RUN, StateStore

BIN = Path(sys.executable).parent
LABEL = "remediator.benchmark=daemon_cost"
IMAGE = "remediator-test/busybox:latest"  # scripts/make-test-image.sh builds it, offline
RAW_FILES = (
    "/proc/sys/fs/dentry-state",
    "/proc/slabinfo",
    "/proc/sys/fs/file-nr",
    "/proc/sys/fs/file-max",
    "/proc/loadavg",
    "/proc/sys/kernel/threads-max",
    "/proc/sys/kernel/pid_max",
    "/proc/sys/fs/inotify/max_user_watches",
    "/proc/sys/fs/inotify/max_user_instances",
)


def raw_reads() -> None:
    for f in RAW_FILES:
        with open(f, "rb") as fh:
            fh.read()
    os.statvfs("/run")
    fifo = Path("/run/containerd/fifo")
    if fifo.is_dir():
        os.listdir(fifo)


def median_of(fn: object, runs: int) -> float:
    times = []
    for _ in range(runs):
        t = stopwatch()
        fn()  # type: ignore[operator]
        times.append(t())
    return statistics.median(times)


def start_containers(n: int) -> None:
    if n <= 0:
        return
    for i in range(n):
        subprocess.run(
            [
                "docker",
                "run",
                "-d",
                "--label",
                LABEL,
                "--name",
                f"rmd-bench-{os.getpid()}-{i}",
                IMAGE,
                "sleep",
                "3600",
            ],
            check=True,
            stdout=subprocess.DEVNULL,
        )


def remove_containers() -> None:
    ids = subprocess.run(
        ["docker", "ps", "-aq", "--filter", f"label={LABEL}"], capture_output=True, text=True, check=False
    ).stdout.split()
    if ids:
        subprocess.run(["docker", "rm", "-f", *ids], check=False, stdout=subprocess.DEVNULL)


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def cycle_cost(runs: int) -> None:
    policies = load([bundled_policies() or Path("policies")])
    host = HostRoot(Path("/"))
    with tempfile.TemporaryDirectory() as state:
        store = StateStore(Path(state) / "state.db", namespace=DRY_RUN)
        engine = Engine(
            policies,
            host=host,
            clock=SystemClock(),
            store=store,
            dry_run=True,
            inventory_factory=make_inventory_factory("unix:///var/run/docker.sock", host, 10.0),
        )
        raw = median_of(raw_reads, runs)
        print(f"raw reads of the same kernel files     median {raw * 1000:8.3f} ms")
        total = 0.0
        for probe in policies.probes():
            med = median_of(lambda p=probe: engine.read_probes([p]), runs)
            total += med
            print(
                f"probe {probe:10s}                       median {med * 1000:8.3f} ms   {med / raw:8.1f}x raw"
            )
        print(
            f"one cycle's probes (sum)               median {total * 1000:8.3f} ms   {total / raw:8.1f}x raw"
        )
        store.close()


def daemon_share(window: float) -> None:
    port = free_port()
    with tempfile.TemporaryDirectory() as state:
        env = {**os.environ, "REMEDIATOR_STATE_DIR": state, "REMEDIATOR_LOG_LEVEL": "warning"}
        proc = subprocess.Popen(
            [str(BIN / "remediator"), "run", "--dry-run", "--metrics-address", f"127.0.0.1:{port}"],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            time.sleep(5)  # start-up and the first cycle are not the steady state
            if proc.poll() is not None:
                raise SystemExit(f"the daemon exited with {proc.returncode}")
            cpu0, t0 = cpu_seconds(proc.pid), time.monotonic()
            rss = []
            while time.monotonic() - t0 < window:
                rss.append(rss_mib(proc.pid))
                time.sleep(1)
            cpu = cpu_seconds(proc.pid) - cpu0
            elapsed = time.monotonic() - t0
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(30)
    policies = load([bundled_policies() or Path("policies")])
    tick = min(p.interval for p in policies.policies)
    raw = median_of(raw_reads, 50) * (elapsed / tick)
    print(
        f"daemon over {elapsed:.0f} s: CPU {cpu:.2f} s = {100 * cpu / elapsed:.3f} % of one core "
        f"(raw reads of {elapsed / tick:.0f} cycles: {100 * raw / elapsed:.4f} %); "
        f"RSS mean {statistics.mean(rss):.1f} MiB, max {max(rss):.1f} MiB"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--window", type=float, default=180.0, help="seconds of daemon measured")
    ap.add_argument("--containers", type=int, default=0, help="busybox containers to start first")
    ap.add_argument("--runs", type=int, default=20, help="reads per probe for the cycle cost")
    args = ap.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("run as root: the limits probe reads every process's fds")
    audit.configure(level="error")  # the engine's events would drown the numbers
    try:
        start_containers(args.containers)
        running = subprocess.run(["docker", "ps", "-q"], capture_output=True, text=True, check=False)
        print(f"containers running: {len(running.stdout.split())}")
        cycle_cost(args.runs)
        daemon_share(args.window)
    finally:
        remove_containers()


if __name__ == "__main__":
    main()
