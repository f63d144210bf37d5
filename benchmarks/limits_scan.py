"""What does one read of the `limits` probe cost on a busy host, against C and shell baselines?

The limits probe walks every /proc/<pid>/fd: it counts open files per container, finds inotify
and epoll instances and pipes, parses their fdinfo (one line per watch), de-duplicates shared
instances with kcmp(2), and reads every process's stat and status (start time, uid, threads).
This script starts N extra processes, each holding F plain file descriptors and I inotify
instances with W watches, and optionally H inotify-heavy processes each holding one instance with
HW watches (one per file of a scratch directory: a 100 k-watch fdinfo is ~12 MB), then times, in
one run:

1. the probe's full scan (a fresh cache: every process read fd by fd),
2. its steady-state incremental scan (a warm cache, nothing changed: only fd counts, start
   times and the known inotify/epoll fds are re-read),
3. a C scan (benchmarks/fdscan.c, built here with cc -O2) that readlinks every fd and reads the
   fdinfo of inotify fds only, with no attribution: the floor for this walk in any language,
4. the shell one-liner that only *finds* inotify fds: `find /proc/[0-9]*/fd -lname anon_inode:inotify`,

and prints wall times, ratios against the C and find baselines, and peak RSS.

    sudo .venv/bin/python benchmarks/limits_scan.py --procs 2000 --fds 100 --instances 1 --watches 8
    sudo .venv/bin/python benchmarks/limits_scan.py --procs 2000 --fds 100 --heavy 4 --heavy-watches 100000

It raises fs.inotify.max_user_instances / max_user_watches for the run when needed and puts them
back (run it under the shared test lock then).
"""

from __future__ import annotations

import argparse
import ctypes
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from remediator.clock import SystemClock
from remediator.host import HostRoot
from remediator.probes.base import ProbeContext
from remediator.probes.limits import LimitsProbe
from remediator.probes.limits_fdread import NATIVE_READER, PYTHON_READER, FdReader
from remediator.probes.limits_fdscan import ScanCache

IN_ALL_EVENTS = 0x00000FFF
WATCHED = ("/", "/tmp", "/etc", "/usr", "/var", "/bin", "/sbin", "/lib", "/opt", "/srv", "/home")


def spawn(fds: int, instances: int, watches: int, files: list[bytes] | None = None) -> int:
    """Fork a child that holds the fds and inotify instances across exec of sleep(1); with
    `files`, one more instance watching each of them."""
    ready_r, ready_w = os.pipe()
    pid = os.fork()
    if pid:
        os.close(ready_w)
        ready = os.read(ready_r, 1)  # its watches are in place (a 100 k-watch child takes a moment)
        os.close(ready_r)
        if ready != b"x":
            os.waitpid(pid, 0)
            raise RuntimeError("a child could not set up its fds or inotify watches")
        return pid
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        for _ in range(fds):
            os.set_inheritable(os.open("/dev/null", os.O_RDONLY), True)  # Python opens O_CLOEXEC
        for _ in range(instances):
            ifd = libc.inotify_init1(0)
            if ifd < 0:
                os._exit(3)
            for path in WATCHED[:watches]:
                libc.inotify_add_watch(ifd, path.encode(), IN_ALL_EVENTS)
        if files:
            ifd = libc.inotify_init1(0)
            if ifd < 0:
                os._exit(3)
            for path in files:
                if libc.inotify_add_watch(ifd, path, IN_ALL_EVENTS) < 0:
                    os._exit(4)
        os.write(ready_w, b"x")
        os.execv("/bin/sleep", ["sleep", "3600"])
    finally:
        os._exit(2)


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def best_of(runs: int, fn: object) -> float:
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        fn()  # type: ignore[operator]
        times.append(time.perf_counter() - started)
    return min(times)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--procs", type=int, default=2000, help="extra processes to start")
    ap.add_argument("--fds", type=int, default=20, help="plain fds each holds")
    ap.add_argument("--instances", type=int, default=1, help="inotify instances each holds")
    ap.add_argument("--watches", type=int, default=8, help=f"watches per instance (max {len(WATCHED)})")
    ap.add_argument("--heavy", type=int, default=0, help="inotify-heavy processes to start besides")
    ap.add_argument("--heavy-watches", type=int, default=100_000, help="watches each heavy one holds")
    ap.add_argument("--runs", type=int, default=5, help="timed runs of each; the best is shown")
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("run as root: the probe reads every process's fds", file=sys.stderr)
        return 2
    if args.watches > len(WATCHED):
        ap.error(f"--watches at most {len(WATCHED)}")

    # The instances and watches count against root's inotify limits: make room, put them back.
    inotify = Path("/proc/sys/fs/inotify")
    room = {
        inotify / "max_user_instances": args.procs * args.instances + args.heavy + 1024,
        inotify / "max_user_watches": args.procs * args.instances * args.watches
        + args.heavy * args.heavy_watches
        + 200_000,
    }
    saved = {key: key.read_text() for key in room}
    children: list[int] = []
    scratch = tempfile.TemporaryDirectory(dir="/dev/shm" if os.path.isdir("/dev/shm") else None)
    try:
        for key, needed in room.items():
            if (args.instances or args.heavy) and int(saved[key]) < needed:
                key.write_text(str(needed))  # then run it under the shared test lock
        files: list[bytes] = []
        for i in range(args.heavy_watches if args.heavy else 0):
            path = f"{scratch.name}/{i}"
            os.close(os.open(path, os.O_CREAT | os.O_WRONLY, 0o600))
            files.append(path.encode())
        started = time.perf_counter()
        children = [spawn(args.fds, args.instances, args.watches) for _ in range(args.procs)]
        children += [spawn(0, 0, 0, files) for _ in range(args.heavy)]
        time.sleep(0.5)  # let the last children reach exec
        t_spawn = time.perf_counter() - started

        host = HostRoot()
        readers: list[FdReader] = [r for r in (NATIVE_READER, PYTHON_READER) if r is not None]
        results = {}
        for reader in readers:

            def full(reader: FdReader = reader) -> None:
                probe = LimitsProbe(budget=None, cache=ScanCache(), reader=reader)
                probe.read(ProbeContext(host, SystemClock()))

            reading = LimitsProbe(budget=None, cache=ScanCache(), reader=reader).read(
                ProbeContext(host, SystemClock())
            )
            t_probe = best_of(args.runs, full)
            warm = LimitsProbe(budget=None, cache=ScanCache(), reader=reader)
            warm.read(ProbeContext(host, SystemClock()))
            # Steady state: the daemon's scans between its periodic full ones (every 10th).
            t_incr = best_of(args.runs, lambda warm=warm: warm.read(ProbeContext(host, SystemClock())))
            steady_reading = warm.read(ProbeContext(host, SystemClock()))
            assert steady_reading.detail["scan"]["full"] is False
            # Our children dominate root's inotify counts only when they hold some; other
            # processes on a shared machine move them by a few meanwhile.
            for metric in (
                ("inotify_instances_max_uid", "inotify_watches_max_uid")
                if args.instances or args.heavy
                else ()
            ):
                a, b = steady_reading.values[metric], reading.values[metric]
                assert abs(a - b) <= 0.01 * max(a, b), (metric, a, b)
            results[reader.name] = (reading, steady_reading, t_probe, t_incr)
        if len(results) == 2 and (args.instances or args.heavy):
            for metric in ("inotify_instances_max_uid", "inotify_watches_max_uid"):  # epoll: others move it
                c_val, py_val = results["c"][0].values[metric], results["python"][0].values[metric]
                assert abs(c_val - py_val) <= 0.01 * max(c_val, py_val, 100), (metric, c_val, py_val)
        reading, steady_reading, t_probe, t_incr = results[readers[0].name]
        scan = reading.detail["scan"]
        steady = steady_reading.detail["scan"]

        cc = shutil.which("cc") or shutil.which("gcc")
        if cc is None:
            print("no C compiler for benchmarks/fdscan.c", file=sys.stderr)
            return 2
        with tempfile.TemporaryDirectory() as tmp:
            binary = f"{tmp}/fdscan"
            src = str(Path(__file__).with_name("fdscan.c"))
            subprocess.run([cc, "-O2", "-o", binary, src], check=True)
            c_out = subprocess.run([binary], capture_output=True, text=True, check=True).stdout.split()
            t_c = best_of(args.runs, lambda: subprocess.run([binary], capture_output=True, check=True))
        baseline = ["sh", "-c", "find /proc/[0-9]*/fd -lname anon_inode:inotify 2>/dev/null | wc -l"]
        found = int(subprocess.run(baseline, capture_output=True, text=True, check=True).stdout)
        t_find = best_of(args.runs, lambda: subprocess.run(baseline, capture_output=True, check=True))

        print(
            f"extra processes: {args.procs} x ({args.fds} fds + {args.instances} inotify x "
            f"{args.watches} watches) + {args.heavy} x 1 inotify x {args.heavy_watches} watches, "
            f"started in {t_spawn:.2f} s"
        )
        print(
            f"host scanned: {scan['pids']} processes, {scan['fds']} fds, {scan['inotify_fds']} inotify "
            f"fds -> {scan['inotify_instances']} instances (dedup: {scan['fd_dedup']}); find saw {found}"
        )
        for name, (_r, st, tp, ti) in results.items():
            print(
                f"reader {name:6}: full {tp * 1000:7.1f} ms, incremental {ti * 1000:6.1f} ms "
                f"({st.detail['scan']['refreshed']} refreshed)"
            )
        if "python" in results and "c" in results:
            py = results["python"]
            print(f"C reader / Python reader: full {t_probe / py[2]:.2f}x, incremental {t_incr / py[3]:.2f}x")
        print(
            f"limits probe ({readers[0].name}): {t_probe * 1000:8.1f} ms  "
            f"{t_probe / scan['pids'] * 1e6:6.1f} us/process"
            f"  {t_probe / scan['fds'] * 1e6:5.2f} us/fd  (best of {args.runs})"
        )
        print(
            f"incremental:   {t_incr * 1000:8.1f} ms  (steady state: {steady['examined']} examined, "
            f"{steady['reused']} reused, {steady['refreshed']} refreshed, "
            f"{steady['inotify_fds']} inotify fds)"
        )
        print(
            f"C scan:        {t_c * 1000:8.1f} ms  (readlink + inotify fdinfo, no attribution; saw {c_out})"
        )
        print(f"find baseline: {t_find * 1000:8.1f} ms  (finds inotify fds only)")
        print(
            f"ratios: full/C {t_probe / t_c:.2f}x  full/find {t_probe / t_find:.2f}x  "
            f"incremental/C {t_incr / t_c:.2f}x  incremental/full {t_incr / t_probe:.3f}x"
        )
        print(f"peak RSS: {peak_rss_mib():.0f} MiB")
        print(f"values: {dict(reading.values)}")
    finally:
        for pid in children:
            os.kill(pid, signal.SIGKILL)
        for pid in children:
            os.waitpid(pid, 0)
        for key, value in saved.items():
            if key.read_text() != value:
                key.write_text(value)
        scratch.cleanup()
        for key, value in saved.items():
            assert key.read_text() == value, f"{key} not restored"
    return 0


if __name__ == "__main__":
    sys.exit(main())
