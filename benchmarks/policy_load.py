"""How long does compiling a 1 MB policy file take, against parsing the same bytes with PyYAML?

Writes policy files of about `--size` bytes made of copies of a bundled policy (unique names),
in two shapes: "bundled" keeps its comments (as people write them, ~1.2 KB a policy), "dense"
drops them (~5 times more policies in the same bytes: the worst case for the compile step).
For each it times, best of `--runs`:

1. `load_policies` (what `remediator validate` and a reload do: read, bounded YAML, schema,
   catalog cross-checks, provenance),
2. `yaml.load_all` with libyaml's CSafeLoader (the fastest plain parse of the same bytes),
3. `yaml.safe_load_all` (PyYAML's default, pure-Python parser),

and prints the ratios, plus the peak Python memory of one load (tracemalloc). `--set` also
loads a whole set at the set cap (MAX_SET_BYTES in files of MAX_FILE_BYTES), which is what the
cap bounds in the daemon. No root needed.

    .venv/bin/python benchmarks/policy_load.py --size 1000000 --set
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from remediator.engine import catalog
from remediator.policy import reader
from remediator.policy.loader import load_policies
from remediator.settings import bundled_policies


def template(dense: bool) -> str:
    directory = bundled_policies()
    assert directory is not None
    doc = (directory / "shared-limits.yaml").read_text().split("\n---\n")[0]
    if dense:
        doc = "\n".join(line for line in doc.splitlines() if not line.lstrip().startswith("#")) + "\n"
    return doc


def make_file(path: Path, size: int, dense: bool, prefix: str = "p") -> int:
    doc = template(dense)
    parts: list[str] = []
    total = 0
    while True:
        part = re.sub(r"name: \S+", f"name: {prefix}{len(parts)}", doc, count=1)
        if total + len(part) + 4 > size:
            break
        parts.append(part)
        total += len(part) + 4
    path.write_text("\n---\n".join(parts))
    return len(parts)


def best_of(runs: int, fn: Callable[[], Any]) -> float:
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return min(times)


def peak_mib(fn: Callable[[], Any]) -> float:
    tracemalloc.start()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1] / 2**20
    finally:
        tracemalloc.stop()


def measure(path: Path, cat: Any, runs: int) -> str:
    text = path.read_text()
    t_load = best_of(runs, lambda: load_policies([path], cat))
    t_c = best_of(runs, lambda: list(yaml.load_all(text, Loader=yaml.CSafeLoader)))
    t_py = best_of(1, lambda: list(yaml.safe_load_all(text)))
    mem = peak_mib(lambda: load_policies([path], cat))
    return (
        f"{len(text.encode()):>9,} bytes: load_policies {t_load * 1000:5.0f} ms | CSafeLoader "
        f"{t_c * 1000:5.0f} ms (ratio {t_load / t_c:3.1f}x) | safe_load_all {t_py * 1000:5.0f} ms "
        f"(ratio {t_load / t_py:4.2f}x) | peak {mem:3.0f} MiB"
    )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=1_000_000, help="bytes per file")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--set", action="store_true", help="also load a set at MAX_SET_BYTES")
    args = ap.parse_args()
    if not getattr(yaml, "__with_libyaml__", False):
        print("note: PyYAML without libyaml; the loader falls back to the pure-Python parser")
    cat = catalog()
    with tempfile.TemporaryDirectory() as d:
        for shape in ("bundled", "dense"):
            path = Path(d) / f"{shape}.yaml"
            n = make_file(path, args.size, dense=shape == "dense")
            print(f"{shape:8s} {n:5d} policies: {measure(path, cat, args.runs)}")
        if args.set:
            files = reader.MAX_SET_BYTES // reader.MAX_FILE_BYTES
            setdir = Path(d) / "set"
            setdir.mkdir()
            n = sum(
                make_file(setdir / f"{i:02d}.yaml", reader.MAX_FILE_BYTES - 4096, dense=True, prefix=f"s{i}-")
                for i in range(files)
            )
            t_set = best_of(1, lambda: load_policies([setdir], cat))
            mem = peak_mib(lambda: load_policies([setdir], cat))
            print(
                f"set at the cap: {files} dense files, {n} policies: load_policies {t_set:.2f} s, "
                f"peak {mem:.0f} MiB"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
