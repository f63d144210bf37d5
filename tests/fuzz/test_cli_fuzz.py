"""Mutated policy files through the real `remediator validate`, one process per file: every
one exits 0 or 1 (never 4, the bug code), prints no traceback, and every error it reports
names its file and line.

The files are the same every run (tests/fuzzing.py, seed 6); the in-process fuzz
(tests/unit/test_loader_fuzz.py) tries 10,000 more, this checks the CLI's own handling."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests import fuzzing

FILES = 200
SEED = 6


def validate(path: Path) -> tuple[Path, subprocess.CompletedProcess[str], float]:
    started = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "remediator", "validate", "--json", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={**os.environ, "REMEDIATOR_STATE_DIR": str(path.parent / "state")},
    )
    return path, proc, time.monotonic() - started


# ~1 s per process on an idle 2-core machine (interpreter and import start-up), so ~110 s for
# the 200; measured 260 s while other test suites loaded the same 2 cores (load average 8).
@pytest.mark.timeout(900)
def test_mutated_files_through_the_real_validate(tmp_path: Path) -> None:
    files = fuzzing.mutated_files(tmp_path / "mutated", FILES, SEED)
    started = time.monotonic()
    # Two at a time: the machine has two cores, and each run is mostly interpreter start-up.
    with ThreadPoolExecutor(max_workers=2) as pool:
        results = list(pool.map(validate, files))
    wall = time.monotonic() - started
    codes: dict[int, int] = {}
    for path, proc, _ in results:
        where = f"{path} (exit {proc.returncode}):\n{proc.stderr[-2000:]}"
        codes[proc.returncode] = codes.get(proc.returncode, 0) + 1
        assert proc.returncode in (0, 1), where
        assert "Traceback" not in proc.stderr + proc.stdout, where
        doc = json.loads(proc.stdout)
        if proc.returncode == 1:
            assert doc["valid"] is False and doc["errors"], where
            for err in doc["errors"]:
                assert err["file"] == str(path) and isinstance(err["line"], int), (err, where)
        else:
            assert doc["valid"] is True, where
    slowest = max(r[2] for r in results)
    print(f"\ncli fuzz: {len(results)} files in {wall:.1f} s, exit codes {codes}, slowest {slowest:.2f} s")
    assert codes.get(1, 0) > FILES // 2  # the mutators do break most files
