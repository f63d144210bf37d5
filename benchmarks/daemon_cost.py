"""What the daemon costs the host, against the raw reads it is built on, in one run.

1. **Cycle cost** at `--cycle-containers` (100) containers: one cycle's reads of the bundled
   probes (`dentries`, `fifos`, `limits`, sharing one inventory snapshot as a daemon cycle
   does) RUNS times through the engine, in the steady state of the daemon (the same engine,
   event-fed inventory, probe memory and canary scratch directory across reads, the pool
   files held open as the daemon holds them, after a warm-up; the probes' clock moves 10 s per
   cycle, as in the daemon), against the raw reads of the same kernel files (`dentry-state`,
   the dentry slab's counters in sysfs (else `slabinfo`), `file-nr`, `loadavg`, the inotify
   sysctls, statvfs of /run, a listing of /run/containerd/fifo) done with plain
   `open().read()`. Medians, per probe and for the cycle, and ratios; the cycle's quartiles,
   the median of its steady cycles (no periodic re-check or memory write in them) and the mean
   of all (what the host pays, periodic work included). Measured once the host is quiet after
   the containers' start (dockerd and containerd work on for a while). The cycle's inventory
   snapshot (one Docker list call, dockerd's answer included) is taken first and shown on its
   own line, so the probes' own cost is not hidden behind it; the total is shown too. And the
   inventory alone: the daemon's incremental snapshot against a listing that inspects every
   container (the old way).
2. **Daemon share.** `remediator run --dry-run` with the bundled policies, its own state
   directory and the metrics endpoint on a free loopback port, for WINDOW seconds: its CPU time
   (utime + stime from /proc/<pid>/stat) as a share of one core, and its resident memory
   (VmRSS: mean and max, sampled every second), against the CPU the raw reads of the same
   number of cycles would take.

`--containers N` (200) starts N labelled containers of the test image (`sleep`;
scripts/make-test-image.sh) on the system dockerd for the daemon share (the first
`--cycle-containers` of them for the cycle cost) and removes them at the end, also on
failure, so the inventory and the per-container attribution have work. Targets (issue 11):
daemon <= 0.5 % of one core and <= 60 MB RSS at 200 containers; a cycle's probes <= 5 ms at
100 containers; each is printed with its measured value.
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
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import docker

from remediator import audit, handles
from remediator.clock import FakeClock, stopwatch
from remediator.engine import Engine
from remediator.host import HostRoot
from remediator.model import Reading
from remediator.probes.base import ProbeContext, ProbeOptions
from remediator.probes.containers import DockerListing, make_inventory_factory
from remediator.runtime import DaemonMemory, load, probe_files
from remediator.settings import bundled_policies
from remediator.state import DRY_RUN, StateStore

BIN = Path(sys.executable).parent
LABEL = "remediator.benchmark=daemon_cost"
IMAGE = "remediator-test/busybox:latest"  # scripts/make-test-image.sh builds it, offline
DOCKER_URL = "unix:///var/run/docker.sock"
# The dentry slab as the probe reads it (probes/slab.py): SLUB's sysfs counters, else slabinfo.
_SLUB = Path("/sys/kernel/slab/dentry")
SLAB_FILES = (
    tuple(str(_SLUB / f) for f in ("aliases", "slabs", "objects", "total_objects"))
    if _SLUB.is_dir()
    else ("/proc/slabinfo",)
)
RAW_FILES = (
    "/proc/sys/fs/dentry-state",
    *SLAB_FILES,
    "/proc/sys/fs/file-nr",
    "/proc/sys/fs/file-max",
    "/proc/loadavg",
    "/proc/sys/kernel/threads-max",
    "/proc/sys/kernel/pid_max",
    "/proc/sys/fs/inotify/max_user_watches",
    "/proc/sys/fs/inotify/max_user_instances",
)
# Issue 11's targets.
TARGET_SHARE_PCT = 0.5
TARGET_RSS_MB = 60.0
TARGET_CYCLE_MS = 5.0
CYCLE_SECONDS = 10.0  # the daemon's cycle with the bundled set: the dentries policies' interval


def raw_reads() -> None:
    for f in RAW_FILES:
        with open(f, "rb") as fh:
            fh.read()
    os.statvfs("/run")
    fifo = Path("/run/containerd/fifo")
    if fifo.is_dir():
        os.listdir(fifo)


def median_of(fn: Callable[[], object], runs: int) -> float:
    times = []
    for _ in range(runs):
        t = stopwatch()
        fn()
        times.append(t())
    return statistics.median(times)


def running_benchmark_containers(client: docker.DockerClient) -> int:
    return len(client.api.containers(filters={"label": LABEL, "status": "running"}))


def settle(most: float = 90.0, busy: float = 0.15) -> float:
    """Wait (up to `most` seconds) until the host has been quiet for 3 s in a row: all CPUs
    together busy less than `busy` of one (dockerd and containerd go on working for a while
    after a batch of starts, which measured up to 30 % above the quiet host). Returns the
    seconds waited."""

    def ticks() -> tuple[int, int]:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        return sum(fields), fields[3] + fields[4]  # all, idle + iowait

    started = time.monotonic()
    quiet = 0
    last = ticks()
    while quiet < 3 and time.monotonic() - started < most:
        time.sleep(1.0)
        now = ticks()
        total, idle = now[0] - last[0], now[1] - last[1]
        last = now
        used_cpus = (total - idle) / max(total, 1) * (os.cpu_count() or 1)
        quiet = quiet + 1 if used_cpus < busy else 0
    return time.monotonic() - started


def start_containers(client: docker.DockerClient, total: int) -> None:
    """Run containers until `total` of ours run (4 at a time: dockerd serialises most of it)."""
    have = running_benchmark_containers(client)

    def one(i: int) -> None:
        client.containers.run(
            IMAGE,
            ["sleep", "3600"],
            detach=True,
            labels=dict([LABEL.split("=", 1)]),
            name=f"rmd-bench-{os.getpid()}-{i}",
        )

    with ThreadPoolExecutor(4) as pool:
        list(pool.map(one, range(have, total)))


def remove_containers() -> None:
    ids = subprocess.run(
        ["docker", "ps", "-aq", "--filter", f"label={LABEL}"], capture_output=True, text=True, check=False
    ).stdout.split()
    if ids:
        subprocess.run(["docker", "rm", "-f", *ids], check=False, stdout=subprocess.DEVNULL)


def cpu_seconds(pid: int) -> tuple[float, float]:
    """(this process's utime + stime, its waited-for children's: the `ctr` it runs), seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / tick, (int(fields[13]) + int(fields[14])) / tick


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def verdict(ok: bool) -> str:
    return "meets the target" if ok else "MISSES the target"


def cycle_cost(runs: int) -> None:
    policies = load([bundled_policies() or Path("policies")])
    host = HostRoot(Path("/"))
    probes = sorted(policies.probes())
    feed = make_inventory_factory(DOCKER_URL, host, 10.0, events=True)
    # The files the probes read every cycle held open, as the daemon holds them
    # (runtime.hold_files): read with pread at offset 0, not open/read/close.
    for held in probe_files(host, probes):
        handles.HELD.hold(held.path, records=held.records)
    with tempfile.TemporaryDirectory() as state:
        store = StateStore(Path(state) / "state.db", namespace=DRY_RUN)
        # The probes see time pass as in the daemon: 10 s per cycle (the dentries policies'
        # interval), so that what they keep between reads (growth-rate samples, caches with an
        # age) is what the daemon keeps. Back to back on the system clock they would all be
        # milliseconds apart. The cost itself is measured with a real stopwatch.
        clock = FakeClock(time.time())
        memory = DaemonMemory(Path(state) / "probe-memory.json", clock)  # written once a minute
        engine = Engine(
            policies,
            host=host,
            clock=clock,
            store=store,
            dry_run=True,
            inventory_factory=feed,
            # Samples between cycles, as the daemon keeps them (growth rates need no pause).
            probe_memory=memory,
            # The canary in a scratch directory, as the daemon runs it.
            probe_options=ProbeOptions(scratch_dir=Path(state) / "canary"),
        )
        try:
            per_probe: dict[str, list[float]] = {p: [] for p in probes}
            cycles: list[float] = []
            steady: list[float] = []  # cycles in which no probe ran one of its periodic re-checks
            snapshots: list[float] = []
            for i in range(runs + 3):  # 3 warm-up cycles: first scans, the first snapshot
                clock.advance(CYCLE_SECONDS)
                seconds: dict[str, float] = {}
                ctx = ProbeContext(
                    host, engine.clock, feed, memory=engine.probe_memory, options=engine.probe_options
                )
                t = stopwatch()
                ctx.inventory()  # the cycle's one snapshot, which the probes then share
                snap = t()
                written = memory.written_at
                t = stopwatch()
                readings = engine.read_probes(probes, ctx, seconds)
                took = t()
                if i >= 3:
                    cycles.append(took)
                    if not rechecked(readings) and memory.written_at == written:
                        steady.append(took)
                    snapshots.append(snap)
                    for p in probes:
                        per_probe[p].append(seconds[p])
            raw = median_of(raw_reads, runs)
            print(f"raw reads of the same kernel files     median {raw * 1000:8.3f} ms")
            for p in probes:
                med = statistics.median(per_probe[p])
                print(
                    f"probe {p:10s}                       median {med * 1000:8.3f} ms   {med / raw:8.1f}x raw"
                )
            cyc = statistics.median(cycles)
            snap = statistics.median(snapshots)
            total = statistics.median(a + b for a, b in zip(cycles, snapshots, strict=True))
            q1, _, q3 = statistics.quantiles(cycles, n=4)
            print(
                f"one cycle's probes                     median {cyc * 1000:8.3f} ms   {cyc / raw:8.1f}x raw"
                f"   (target <= {TARGET_CYCLE_MS:.0f} ms: {verdict(cyc * 1000 <= TARGET_CYCLE_MS)})"
            )
            # The spread of this machine's timings (a shared VM: neighbours move them by a
            # quarter from one minute to the next), so one median is not read as the truth.
            print(f"one cycle's probes, quartiles          {q1 * 1000:8.3f} - {q3 * 1000:.3f} ms")
            # A quarter of the cycles carry periodic work (the limits probe's full scan every 10th
            # read, the shim sockets' check, the probe memory written once a minute, the
            # canary's measurement): the median of all cycles sits near the top of the steady
            # ones. Both, and the mean, which is what the host pays.
            if steady:
                med = statistics.median(steady)
                print(
                    f"one steady cycle ({len(steady):2d} of {len(cycles)} cycles)"
                    f"     median {med * 1000:8.3f} ms"
                    f"   {med / raw:8.1f}x raw"
                    f"   (target <= {TARGET_CYCLE_MS:.0f} ms: {verdict(med * 1000 <= TARGET_CYCLE_MS)})"
                )
            print(f"one cycle's probes, re-checks spread   mean   {statistics.mean(cycles) * 1000:8.3f} ms")
            print(f"the cycle's inventory snapshot         median {snap * 1000:8.3f} ms")
            print(
                f"one cycle, snapshot included           median {total * 1000:8.3f} ms"
                f"   {total / raw:8.1f}x raw"
                f"   (target <= {TARGET_CYCLE_MS:.0f} ms: {verdict(total * 1000 <= TARGET_CYCLE_MS)})"
            )
            inventory_cost(host, feed, runs)
        finally:
            store.close()
            feed.close()
            handles.HELD.close()


def rechecked(readings: Mapping[str, Reading]) -> bool:
    """Whether a probe ran one of its periodic re-checks this cycle, by what its reading says:
    the limits probe's full scan, the shim sockets checked again, the canary measured again
    (the shims' command lines are read again with the full scan here: the same 10th read)."""
    limits, fifos, dentries = (readings.get(p) for p in ("limits", "fifos", "dentries"))
    return bool(
        (limits is not None and limits.detail.get("scan", {}).get("full"))
        or (fifos is not None and fifos.detail.get("shims", {}).get("sockets_checked") == "now")
        or (dentries is not None and "reused" not in dentries.detail.get("canary", {}))
    )


def inventory_cost(host: HostRoot, feed: Callable[[], object], runs: int) -> None:
    """The daemon's snapshot (list + inspect of what changed) against inspecting everyone."""
    incremental = median_of(feed, runs)
    client = docker.DockerClient(base_url=DOCKER_URL, timeout=10, version="auto")
    try:
        listing = DockerListing(client, host)

        def full() -> None:
            listing.pids.forget()
            listing.snapshot()

        every = median_of(full, max(3, runs // 4))
    finally:
        client.close()
    print(
        f"inventory snapshot, incremental        median {incremental * 1000:8.3f} ms;"
        f" inspecting every container {every * 1000:8.3f} ms ({every / incremental:.0f}x)"
    )


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
            (own0, kids0), t0 = cpu_seconds(proc.pid), time.monotonic()
            rss = []
            while time.monotonic() - t0 < window:
                rss.append(rss_mib(proc.pid))
                time.sleep(1)
            own1, kids1 = cpu_seconds(proc.pid)
            own, kids = own1 - own0, kids1 - kids0
            cpu = own + kids
            elapsed = time.monotonic() - t0
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(30)
    policies = load([bundled_policies() or Path("policies")])
    tick = min(p.interval for p in policies.policies)
    raw = median_of(raw_reads, 50) * (elapsed / tick)
    share = 100 * cpu / elapsed
    rss_mb = max(rss) * 1.048576  # MiB -> MB, the unit of the target
    print(
        f"daemon over {elapsed:.0f} s: CPU {cpu:.2f} s ({own:.2f} s its own, {kids:.2f} s its `ctr` "
        f"children) = {share:.3f} % of one core "
        f"(raw reads of {elapsed / tick:.0f} cycles: {100 * raw / elapsed:.4f} %; "
        f"target <= {TARGET_SHARE_PCT} %: {verdict(share <= TARGET_SHARE_PCT)}); "
        f"RSS mean {statistics.mean(rss):.1f} MiB, max {max(rss):.1f} MiB = {rss_mb:.1f} MB "
        f"(target <= {TARGET_RSS_MB:.0f} MB: {verdict(rss_mb <= TARGET_RSS_MB)})"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--window", type=float, default=180.0, help="seconds of daemon measured")
    ap.add_argument("--containers", type=int, default=200, help="busybox containers for the daemon share")
    ap.add_argument("--cycle-containers", type=int, default=100, help="busybox containers for the cycle cost")
    ap.add_argument("--runs", type=int, default=60, help="cycles read for the cycle cost")
    ap.add_argument("--skip-daemon", action="store_true", help="only the cycle cost")
    args = ap.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("run as root: the limits probe reads every process's fds")
    audit.configure(level="error")  # the engine's events would drown the numbers
    client = docker.DockerClient(base_url=DOCKER_URL, timeout=60, version="auto")
    try:
        start_containers(client, args.cycle_containers)
        print(f"containers running: {len(client.api.containers())} ({args.cycle_containers} of ours)")
        print(f"host quiet after {settle():.0f} s")
        cycle_cost(args.runs)
        if not args.skip_daemon:
            start_containers(client, args.containers)
            print(f"containers running: {len(client.api.containers())} ({args.containers} of ours)")
            print(f"host quiet after {settle():.0f} s")
            daemon_share(args.window)
    finally:
        remove_containers()
        client.close()


if __name__ == "__main__":
    main()
