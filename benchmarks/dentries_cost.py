"""What the negative-dentry machinery costs, each against a baseline measured in the same run.

    sudo .venv/bin/python benchmarks/dentries_cost.py probe     [--reads 50]
    sudo .venv/bin/python benchmarks/dentries_cost.py bcc       [--lookups 200000 --rounds 20]
    sudo .venv/bin/python benchmarks/dentries_cost.py reclaim   [--lookups 1000000]
    sudo .venv/bin/python benchmarks/dentries_cost.py relief    [--observe 150]
    sudo .venv/bin/python benchmarks/dentries_cost.py all       (each of the above, in one run)

* probe: one `dentries` read (dentry-state, the dentry slab, rate bookkeeping, the lookup
  canary reused while the host is quiet, as in the daemon; no containers, eBPF off) against raw
  reads of the same files; and a canary run alone. Ratios, not timed asserts.
* bcc: a max-rate failed-lookup loop (tests/real/dcache_load.c, fresh names in a directory on
  the host's real filesystem, removed after each round so the negatives go with it), pinned to
  one CPU, with and without the BCC counter attached, in many short alternating rounds; the
  pairwise ratio's trimmed median and IQR. Target: <= 3 % slowdown.
* reclaim: a busybox container makes N failed lookups under its overlay /tmp; its memory
  cgroup is reclaimed (force_empty on v1, memory.reclaim on v2) and the seconds per million
  negatives freed are printed (the same write reclaim-cgroup does).
* relief: a trasher at its natural rate against the bundled dentry policies, run as the daemon
  and as the timer; the seconds from crossing the act line to under the clear line, for each
  path (the harness of tests/real/test_negative_dentries_relief_real.py). Under the shared lock.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from remediator.clock import SystemClock
from remediator.host import HostRoot
from remediator.probes.base import ProbeContext, ProbeOptions
from remediator.probes.canary import run_canary
from remediator.probes.dentries import DentriesProbe, find_memory_hierarchy, parse_dentry_state
from remediator.probes.memory import DictMemory

HOST = HostRoot()
SOURCE = Path(__file__).resolve().parent.parent / "tests" / "real" / "dcache_load.c"
IMAGE = "remediator-test/busybox:latest"


def negatives() -> int:
    return parse_dentry_state(HOST.read_sysctl("fs.dentry-state")).nr_negative


def build(out: Path) -> Path:
    binary = out / "dcache_load"
    subprocess.run(["cc", "-static", "-O2", "-o", str(binary), str(SOURCE)], check=True)
    return binary


# What one dentries read reads of the kernel: dentry-state and the dentry slab (SLUB's sysfs
# counters, else slabinfo: probes/slab.py); meminfo only when the kernel log lost the hash line,
# once per process.
_SLUB = HOST.sys / "kernel" / "slab" / "dentry"
RAW_FILES = (
    HOST.proc / "sys" / "fs" / "dentry-state",
    *(
        [_SLUB / f for f in ("aliases", "slabs", "objects", "total_objects")]
        if _SLUB.is_dir()
        else [HOST.proc / "slabinfo"]
    ),
)


def bench_probe(reads: int) -> None:
    scratch = Path(tempfile.mkdtemp(prefix="rmd-bench-canary-", dir="/var/tmp"))
    try:
        memory = DictMemory()
        opts = ProbeOptions(scratch_dir=scratch, ebpf="off")
        clock = SystemClock()
        DentriesProbe().read(ProbeContext(HOST, clock, memory=memory, options=opts))  # warm, 1st-rate pause
        probe_s, raw_s, canary_s = [], [], []
        for _ in range(reads):
            time.sleep(1.05)  # slabinfo is read at most once a second: measure the real read
            t = time.perf_counter()
            DentriesProbe().read(ProbeContext(HOST, clock, memory=memory, options=opts))
            probe_s.append(time.perf_counter() - t)
            t = time.perf_counter()
            for raw in RAW_FILES:
                raw.read_bytes()
            raw_s.append(time.perf_counter() - t)
            t = time.perf_counter()
            run_canary(scratch)
            canary_s.append(time.perf_counter() - t)
        p, r, c = (statistics.median(x) * 1e3 for x in (probe_s, raw_s, canary_s))
        # The probe reuses the canary's last lookup time until the dentries per bucket move
        # (probes/canary.py), as in the daemon: a quiet host's reads do not run it.
        print(f"dentries read: {p:.2f} ms median over {reads}; raw reads of the same files: {r:.2f} ms")
        print(f"ratio probe/raw: {p / r:.1f}x (the canary reused, as on a quiet host)")
        print(f"a canary run alone (when the dentries per bucket moved): {c:.2f} ms")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def one_loop(binary: Path, lookups: int) -> float:
    """Failed lookups per CPU-second of the loop process (user + system time from wait4): on a
    shared, loaded machine wall time mostly measures the neighbours."""
    d = Path(tempfile.mkdtemp(prefix="rmd-bench-loop-", dir="/var/tmp"))
    try:
        proc = subprocess.Popen(
            [str(binary), "trash", str(d), str(lookups), "0", "-1"], stdout=subprocess.DEVNULL
        )
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        if proc.returncode != 0:
            sys.exit(f"loop failed: {proc.returncode}")
        return lookups / (usage.ru_utime + usage.ru_stime)
    finally:
        d.rmdir()  # frees this round's negatives (vfs_rmdir shrinks the directory's dentries)


def _pinned(cpu: int) -> Callable[[], None]:
    def pin() -> None:
        os.sched_setaffinity(0, {cpu})

    return pin


def loop_cpu_seconds(binary: Path, lookups: int, cpu: int) -> float:
    """CPU seconds (user + system, from wait4) of one loop of `lookups` failed stat() of fresh
    names, pinned to `cpu`; the directory is removed after, so its negatives go with it."""
    d = Path(tempfile.mkdtemp(prefix="rmd-bench-loop-", dir="/var/tmp"))
    try:
        proc = subprocess.Popen(
            [str(binary), "trash", str(d), str(lookups), "0", "-1"],
            stdout=subprocess.DEVNULL,
            preexec_fn=_pinned(cpu),  # noqa: PLW1509 (single-threaded benchmark process)
        )
        _, status, usage = os.wait4(proc.pid, 0)
        if os.waitstatus_to_exitcode(status) != 0:
            sys.exit(f"loop failed: {status}")
        return usage.ru_utime + usage.ru_stime
    finally:
        d.rmdir()  # frees this round's negatives (vfs_rmdir shrinks the directory's dentries)


def trimmed_median(xs: list[float], trim: float = 0.2) -> float:
    xs = sorted(xs)
    k = int(len(xs) * trim)
    return statistics.median(xs[k : len(xs) - k] if len(xs) > 2 * k else xs)


# The floor: any program on sys_exit makes every syscall take the kernel's slow exit path
# (syscall_exit_work -> trace_sys_exit -> bpf_trace_run2), whatever the program does.
EMPTY_PROGRAM = "RAW_TRACEPOINT_PROBE(sys_exit) { return 0; }"


def bench_bcc(lookups: int, rounds: int) -> None:
    """The counter's cost on a max-rate failed-lookup loop, robust on a shared machine.

    The BCC program (the worker's own, `program_text()`) and an empty program on the same
    tracepoint are compiled and loaded once in this process, then attached and detached between
    rounds (attaching a loaded program takes microseconds, so rounds are short and many). Each
    round of a triple (none, empty, counter; the order reversed every other triple) is one
    pinned loop process whose CPU time (not wall time: neighbours inflate that) is measured.
    Drift of the machine moves adjacent rounds alike; the ratio within each triple cancels it,
    and the trimmed median of those ratios with its interquartile range is the result (the
    minimum of each side is printed too). The empty program shows what the hook itself costs.
    """
    from bcc import BPF  # noqa: PLC0415 (only this mode needs bcc)

    from remediator.probes.ebpf import parse_release3, write_stub_tree  # noqa: PLC0415
    from remediator.probes.ebpf_worker import program_text  # noqa: PLC0415

    cpu = max(os.sched_getaffinity(0))
    sides = ("none", "empty", "counter")
    times: dict[str, list[float]] = {k: [] for k in sides}
    with tempfile.TemporaryDirectory() as tmp:
        binary = build(Path(tmp))
        stub = Path(tmp) / "stub"
        write_stub_tree(stub, parse_release3(HOST.read_sysctl("kernel.osrelease")))
        os.environ["BCC_KERNEL_SOURCE"] = str(stub)
        t = time.perf_counter()
        counter = BPF(text=program_text())  # compiles, loads and attaches sys_exit
        load_s = time.perf_counter() - t
        empty = BPF(text=EMPTY_PROGRAM)
        programs = {"empty": empty, "counter": counter}
        for b in programs.values():
            b.detach_raw_tracepoint(tp=b"sys_exit")
        try:
            loop_cpu_seconds(binary, lookups, cpu)  # warm: caches, the directory's inode
            for r in range(rounds):
                for side in sides if r % 2 == 0 else sides[::-1]:
                    program = programs.get(side)
                    if program is not None:
                        program.attach_raw_tracepoint(tp=b"sys_exit", fn_name=b"raw_tracepoint__sys_exit")
                    try:
                        times[side].append(loop_cpu_seconds(binary, lookups, cpu))
                    finally:
                        if program is not None:
                            program.detach_raw_tracepoint(tp=b"sys_exit")
            counted = sum(int(v.count) for v in counter["by_pid"].values()) + sum(
                int(s.count) for s in counter["current"][0]
            )
        finally:
            for b in programs.values():
                b.cleanup()
    print(f"failed lookup, CPU ns each ({rounds} rounds of {lookups:,} per side, pinned to CPU {cpu}):")
    for side in sides:
        xs = times[side]
        tmed, low = trimmed_median(xs) / lookups * 1e9, min(xs) / lookups * 1e9
        line = f"  {side:8s} trimmed median {tmed:5.0f}, minimum {low:5.0f}"
        if side != "none":
            ratios = sorted(b / a for a, b in zip(times["none"], xs, strict=True))
            q1, q3 = ratios[len(ratios) // 4], ratios[(3 * len(ratios)) // 4]
            line += (
                f"; slowdown {trimmed_median(ratios) - 1:+.1%} (pairwise trimmed median, IQR "
                f"{q1 - 1:+.1%} .. {q3 - 1:+.1%})"
            )
        print(line)
    print("target for the counter: <= +3.0%; `empty` is the floor of any program on sys_exit")
    print(f"counted {counted:,} failed lookups in the counter's rounds (expected {rounds * lookups:,})")
    print(f"BCC compile + load: {load_s:.2f} s")


def bench_reclaim(lookups: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        build(Path(tmp))
        os.chmod(tmp, 0o755)
        name = f"rmd-bench-reclaim-{os.getpid()}"
        subprocess.run(
            [
                "docker",
                "run",
                "-d",
                "--name",
                name,
                "-v",
                f"{tmp}:/load:ro",
                IMAGE,
                "/load/dcache_load",
                "trash",
                "/tmp",
                str(lookups),
                "0",
            ],
            check=True,
            capture_output=True,
        )
        try:
            deadline = time.monotonic() + 120
            while (
                "done"
                not in subprocess.run(
                    ["docker", "logs", name], check=False, capture_output=True, text=True
                ).stdout
            ):
                if time.monotonic() > deadline:
                    sys.exit("the trasher did not finish (container gone?)")
                time.sleep(0.2)
            cid = subprocess.run(
                ["docker", "inspect", "-f", "{{.Id}}", name], check=False, capture_output=True, text=True
            ).stdout.strip()
            h = find_memory_hierarchy(HOST)
            assert h is not None
            cg = h.root / "docker" / cid
            before = negatives()
            t = time.perf_counter()
            if h.version == 1:
                (cg / "memory.force_empty").write_text("0")
            else:
                with contextlib.suppress(OSError):  # EAGAIN: less than asked
                    (cg / "memory.reclaim").write_text(str(8 << 30))
            elapsed = time.perf_counter() - t
            freed = before - negatives()
            print(
                f"{lookups:,} lookups -> reclaim freed {freed:,} negatives in {elapsed:.2f} s: "
                f"{elapsed / max(freed, 1) * 1e6:.2f} s per million (cgroup v{h.version})"
            )
        finally:
            subprocess.run(["docker", "rm", "-f", name], check=False, capture_output=True)


def _docker(*args: str) -> str:
    return subprocess.run(["docker", *args], check=True, capture_output=True, text=True).stdout.strip()


def _pause(name: str) -> None:
    _docker("pause", name)


def bench_relief(observe: float) -> None:
    """Trigger-to-relief with the bundled dentry policies, for the daemon and for the timer.

    The harness is the real test's (tests/real/relief.py): a trasher container at its natural
    rate, a 0.2 s watch of dentry-state, the controller run as remediator.service (daemon) and
    as remediator-once.timer (`once` on the unit's cadence, worst phase and delay). Prints the
    seconds from each crossing of the act line to under the clear line. Changes host state
    (millions of dentries): run it under the shared lock.
    """
    sys.path.insert(0, str(SOURCE.parents[2]))
    from remediator.settings import bundled_policies  # noqa: PLC0415
    from tests.real.relief import (  # noqa: PLC0415 (the test harness, only for this mode)
        CEILING,
        TRASHER_MEMORY,
        Daemon,
        Timer,
        Watch,
        lines_from,
        summary,
        timer_cadence,
    )

    bundled = bundled_policies()
    assert bundled is not None
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        build(root)
        os.chmod(tmp, 0o755)
        policies = root / "policies"
        policies.mkdir()
        for f in bundled.glob("negative-dentries*.yaml"):
            shutil.copy(f, policies / f.name)
        audit = subprocess.run(
            [
                sys.executable,
                "-m",
                "remediator",
                "audit",
                "--json",
                "--policies",
                str(policies),
                "--state-dir",
                str(root / "audit"),
                "--log-level",
                "error",
            ],
            check=True,
            capture_output=True,
            text=True,
        )
        import json  # noqa: PLC0415

        lines = lines_from(json.loads(audit.stdout))
        period, delay = timer_cadence()
        for path in ("daemon", "timer"):
            name = f"rmd-bench-relief-{path}-{os.getpid()}"
            state = root / f"state-{path}"
            controller: Daemon | Timer
            if path == "daemon":
                controller = Daemon(policies, state, root / f"{path}.log")
                controller.warm(25)
            else:
                controller = Timer(policies, state, root / f"{path}.log", period, delay)
                controller.warm()
            watch = Watch(lines.act, lines.clear, negatives() + CEILING, functools.partial(_pause, name))
            try:
                watch.start()
                _docker(
                    "run",
                    "-d",
                    "--name",
                    name,
                    "--memory",
                    TRASHER_MEMORY,
                    "-v",
                    f"{tmp}:/load:ro",
                    IMAGE,
                    "/load/dcache_load",
                    "trash",
                    "/tmp",
                    "0",
                    "0",
                )
                started = time.monotonic()
                time.sleep(observe)
                last = watch.episodes[-1] if watch.episodes else None
                while last is not None and last.relieved_at is None:
                    if time.monotonic() > last.crossed_at + 65:
                        break
                    time.sleep(0.5)
            finally:
                controller.stop()
                watch.stop()
                with contextlib.suppress(subprocess.CalledProcessError):
                    _docker("pause", name)
                cid = _docker("inspect", "-f", "{{.Id}}", name)
                h = find_memory_hierarchy(HOST)
                assert h is not None
                cg = h.root / "docker" / cid
                with contextlib.suppress(OSError):  # EAGAIN on v2: less than asked
                    if h.version == 1:
                        (cg / "memory.force_empty").write_text("0")
                    else:
                        (cg / "memory.reclaim").write_text(str(8 << 30))
                subprocess.run(["docker", "rm", "-f", name], check=False, capture_output=True)
            cadence = "" if path == "daemon" else f" (every {period:g} s + {delay:g} s delay)"
            print(summary(path + cadence, watch, started))
        print(f"act line {lines.act:,}, clear line {lines.clear:,} ({lines.source})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=["probe", "bcc", "reclaim", "relief", "all"])
    ap.add_argument("--observe", type=float, default=150.0, help="relief: seconds of trashing")
    ap.add_argument("--reads", type=int, default=20)
    ap.add_argument("--lookups", type=int, default=None, help="bcc: 200000 per round; reclaim: 1000000")
    ap.add_argument("--rounds", type=int, default=20)
    a = ap.parse_args()
    if a.what == "probe":
        bench_probe(a.reads)
    elif a.what == "bcc":
        bench_bcc(a.lookups or 200_000, a.rounds)
    elif a.what == "reclaim":
        bench_reclaim(a.lookups or 1_000_000)
    elif a.what == "relief":
        bench_relief(a.observe)
    else:  # everything, each against its own baseline, in one run
        steps: tuple[tuple[str, Callable[[], None]], ...] = (
            ("probe cycle vs raw reads; canary", lambda: bench_probe(a.reads)),
            ("BCC overhead", lambda: bench_bcc(a.lookups or 200_000, a.rounds)),
            ("reclaim seconds per million", lambda: bench_reclaim(a.lookups or 1_000_000)),
            ("trigger-to-relief", lambda: bench_relief(a.observe)),
        )
        for title, run in steps:
            print(f"== {title}", flush=True)
            run()


if __name__ == "__main__":
    main()
