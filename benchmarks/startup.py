"""Start-up cost of the command against a bare interpreter, in one run.

`remediator --help` is what every timer run, shell completion and `ExecReload=` pays before
doing anything; the target is under 2x a bare `python -c pass` of the same interpreter (same
venv, same site hooks). Both are run alternately, RUNS times each, after a warm-up; the medians
and their ratio are printed (wall time, so run it on a quiet machine; the ratio is what counts).
Also `remediator validate` on the bundled policies, which imports the policy compiler.

    .venv/bin/python benchmarks/startup.py [--runs 20]
"""

from __future__ import annotations

import argparse
import compileall
import statistics
import subprocess
import sys
import time
from pathlib import Path

import remediator

BIN = Path(sys.executable).parent


def wall(cmd: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=20)
    args = ap.parse_args()
    cmds = {
        "python -c pass": [sys.executable, "-c", "pass"],
        "remediator --help": [str(BIN / "remediator"), "--help"],
        "remediator validate": [str(BIN / "remediator"), "validate"],
    }
    # The bytecode an install has: pip compiles every module at `pip install .`, but an editable
    # checkout run with PYTHONDONTWRITEBYTECODE=1 would compile remediator's modules from
    # source at every start (~9 ms of `--help` here), which no installed host pays.
    compileall.compile_dir(str(Path(remediator.__file__).parent), quiet=1)
    for cmd in cmds.values():  # warm the page cache
        wall(cmd)
    times: dict[str, list[float]] = {name: [] for name in cmds}
    for _ in range(args.runs):
        for name, cmd in cmds.items():
            times[name].append(wall(cmd))
    base = statistics.median(times["python -c pass"])
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"{name:22s} median {med * 1000:7.1f} ms   ratio to bare interpreter {med / base:5.2f}x")


if __name__ == "__main__":
    main()
