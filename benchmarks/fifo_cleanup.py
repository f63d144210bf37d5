"""How fast is clean-fifos compared with `find -delete`, and how much memory does it take?

Mounts its own tmpfs, leaks N FIFO directories (3 FIFOs each, like containerd's cio), then:

1. the `fifos` probe reads them (lstat of every entry, one /proc scan, the ctr queries),
2. `clean-fifos` plans and applies (re-checks every directory through directory fds, then
   unlinkat/rmdir), timed including its own /proc scan and containerd query,
3. the same N directories are made again and `find <root> -mindepth 1 -delete` removes them.

It prints wall times, the ratio, the cost per directory, and peak RSS. Needs root (mount). With
containerd running, its real socket is queried (as in production); `--no-containerd` uses a
stand-in that knows no ids, to time the filesystem work alone.

    sudo .venv/bin/python benchmarks/fifo_cleanup.py --dirs 20000
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from remediator.actions.base import ApplyContext, PlanContext
from remediator.actions.fifo_cleanup import CleanFifos, CleanFifosParams
from remediator.clock import FakeClock, SystemClock
from remediator.host import HostRoot
from remediator.model import Plan
from remediator.probes.base import ProbeContext
from remediator.probes.fifos import CtrRunner, FifosProbe

REAL = HostRoot()
AHEAD = 3600.0  # the probe's and the action's clock run an hour ahead: everything is "old"


def stub_ctr(address: str, args: Sequence[str]) -> str:
    """A containerd with one empty namespace."""
    return "default\n" if list(args) == ["namespaces", "ls", "-q"] else ""


def leak(fifo_root: Path, n: int) -> None:
    for i in range(n):
        d = fifo_root / f"{i:010d}"
        d.mkdir(mode=0o700)
        for s in ("stdin", "stdout", "stderr"):
            os.mkfifo(d / f"bench.{i}-{s}", 0o700)


def peak_rss_mib() -> float:
    # ru_maxrss is in KiB on Linux (getrusage(2)).
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def inodes_used(path: Path) -> int:
    vfs = os.statvfs(path)
    return vfs.f_files - vfs.f_ffree


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dirs", type=int, default=20_000)
    ap.add_argument("--no-containerd", action="store_true", help="do not query the real containerd")
    args = ap.parse_args()
    n = args.dirs

    work = Path(tempfile.mkdtemp(prefix="remediator-bench-"))
    run = work / "run"
    run.mkdir()
    (work / "proc").symlink_to(REAL.proc)
    nr_inodes = 4 * n + 1000
    subprocess.run(
        [
            "mount",
            "-t",
            "tmpfs",
            "-o",
            f"size=256M,nr_inodes={nr_inodes},mode=0755",
            "remediator-bench",
            str(run),
        ],
        check=True,
    )
    try:
        fifo_root = run / "containerd" / "fifo"
        fifo_root.mkdir(parents=True, mode=0o700)
        real_sock = REAL.run / "containerd" / "containerd.sock"
        ctr: CtrRunner | None = stub_ctr
        if not args.no_containerd:
            (run / "containerd" / "containerd.sock").symlink_to(real_sock)
            ctr = None  # the real CtrCli
        else:
            os.mknod(run / "containerd" / "containerd.sock", 0o600 | stat.S_IFSOCK)
        host = HostRoot(work)

        t0 = time.perf_counter()
        leak(fifo_root, n)
        t_leak = time.perf_counter() - t0
        used_leaked = inodes_used(run)
        rss_before = peak_rss_mib()

        now = SystemClock().now() + AHEAD
        probe = FifosProbe(ctr=ctr, max_listed=n)
        t0 = time.perf_counter()
        reading = probe.read(ProbeContext(host, FakeClock(now)))
        t_probe = time.perf_counter() - t0
        assert reading.values.get("orphan_fifo_dirs") == n, reading.detail.get("kept")
        detail_json = len(json.dumps(dict(reading.detail)))
        rss_probe = peak_rss_mib()

        action = CleanFifos(ctr=ctr)
        plan = action.plan(
            PlanContext(
                policy="bench",
                metric="run_inodes_used",
                subject="host",
                reading=reading,
                params=CleanFifosParams(maxDirs=n),
                eligible=lambda c: True,
                now=now,
            )
        )
        assert isinstance(plan, Plan), plan
        t0 = time.perf_counter()
        result = action.execute(plan, ApplyContext(host, FakeClock(now), dry_run=False))
        t_apply = time.perf_counter() - t0
        assert result.after.get("removed_dirs") == n, result.message
        rss_apply = peak_rss_mib()
        used_after = inodes_used(run)

        leak(fifo_root, n)
        t0 = time.perf_counter()
        subprocess.run(["find", str(fifo_root), "-mindepth", "1", "-delete"], check=True)
        t_find = time.perf_counter() - t0
        assert not os.listdir(fifo_root)
        # Peak RSS of find itself: getrusage(RUSAGE_CHILDREN) would report the forked Python.
        leak(fifo_root, n)
        timed = subprocess.run(
            ["/usr/bin/time", "-f", "%M", "find", str(fifo_root), "-mindepth", "1", "-delete"],
            capture_output=True,
            text=True,
            check=True,
        )
        rss_find = int(timed.stderr.strip().splitlines()[-1]) / 1024

        print(f"dirs: {n} (3 fifos each, {4 * n} inodes); made in {t_leak:.2f} s")
        print(f"containerd: {'stand-in' if args.no_containerd else f'real, {real_sock}'}")
        print(f"inodes used on the tmpfs: {used_leaked} leaked -> {used_after} after clean-fifos")
        print(
            f"fifos probe:      {t_probe:7.3f} s  {t_probe / n * 1e6:6.1f} us/dir  "
            f"detail JSON {detail_json / 1e6:.1f} MB for {n} orphans listed"
        )
        print(
            f"clean-fifos apply:{t_apply:7.3f} s  {t_apply / n * 1e6:6.1f} us/dir  "
            f"(incl. /proc scan, ctr query, verify)"
        )
        print(f"find -delete:     {t_find:7.3f} s  {t_find / n * 1e6:6.1f} us/dir")
        print(f"ratio apply/find: {t_apply / t_find:.2f}x")
        print(
            f"peak RSS (python): {rss_before:.1f} MiB after leaking, {rss_probe:.1f} MiB after "
            f"the probe, {rss_apply:.1f} MiB after apply; find: {rss_find:.1f} MiB"
        )
        print(f"result: {result.outcome.value}, verified={result.verified}: {result.message}")
    finally:
        subprocess.run(["umount", str(run)], check=False)
        (work / "proc").unlink()
        run.rmdir()
        work.rmdir()
    return 0


if __name__ == "__main__":
    sys.exit(main())
