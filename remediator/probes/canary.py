"""The lookup canary (metrics `lookup_*` of the dentries probe): how slow is a failed path
lookup on this host right now?

Negative dentries hurt by lengthening the dentry hash chains that every path lookup walks. The
most reproducible way to see that harm (issue 9's measurements: 1.7-1.9x slower at 10 M
negatives on 4 M buckets) is to time lookups of *fresh* random names that do not exist: each
one misses the dcache (walking a full chain), asks the filesystem, and fails. A repeated miss of
one name is a cached hit and would show nothing.

The canary does this in the controller's own scratch directory on the host's real filesystem
(`STATE_DIR/canary`, ext4 or xfs where /var/lib is; tmpfs keeps no negatives, so it would not be
a fair canary), in a subdirectory made for the run and removed after it. Removing the directory
frees the negatives the run made (vfs_rmdir shrinks the directory's dentry subtree), so the
canary does not feed the problem it measures.

The result is compared with a baseline calibrated while the host is healthy (fewer than
`HEALTHY_PER_BUCKET` negatives per hash bucket) and kept in the probe memory, so it survives
restarts and the timer. A read-only run (audit) never writes: it reports the last measurement
of a write-capable run, with its age, instead of measuring.

Cost: LOOKUPS failed stat() calls and two mkdir/rmdir per read, ~1-3 ms of one core (see
benchmarks/canary_cost.py), and no memory beyond the names.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from remediator.clock import stopwatch
from remediator.probes.base import ProbeContext

# Lookups per read, in BATCHES batches; the fastest batch is the measurement. On a busy host
# noise only ever adds time (a batch descheduled, caches shared with a co-runner), while the
# harm the canary looks for, longer hash chains, lengthens every lookup and so the fastest batch
# too: the minimum is the estimator that sees the harm and not the load. (A median of 5 read a
# relieved host as 1.3x its baseline while a container kept two cores busy.) 2,000 lookups are
# ~1-3 ms and make 2,000 negatives, all freed when the run directory is removed.
LOOKUPS = 2000
BATCHES = 10
WARMUP = 50
# The host counts as healthy for calibration below this many negatives per bucket: chains of
# ~1.5 entries on average, a fifth of the extra walk at the harm line (2 per bucket), where
# the case measurements saw a 1.7-1.9x slowdown only at ~2.4 per bucket.
HEALTHY_PER_BUCKET = 0.5
# New healthy measurements move the baseline by this weight (an EWMA): one noisy run cannot
# move it far, a kernel upgrade moves it within a few runs.
BASELINE_WEIGHT = 0.2
# A read-only run reports the last measurement only while it is this fresh.
MAX_REPORT_AGE = 600.0
_BASELINE_KEY = "canary.baseline"
_LAST_KEY = "canary.last"


@dataclass(frozen=True)
class Baseline:
    ns: float  # per failed lookup, when healthy
    at: float
    runs: int


def update_baseline(
    old: Baseline | None, measured_ns: float, per_bucket: float | None, now: float
) -> Baseline | None:
    """The baseline after a measurement at load `per_bucket` (None: load unknown, no update)."""
    if per_bucket is None or per_bucket >= HEALTHY_PER_BUCKET:
        return old
    if old is None:
        return Baseline(measured_ns, now, 1)
    return Baseline(old.ns + BASELINE_WEIGHT * (measured_ns - old.ns), now, old.runs + 1)


def parse_baseline(raw: Any) -> Baseline | None:
    if isinstance(raw, dict) and all(isinstance(raw.get(k), int | float) for k in ("ns", "at", "runs")):
        return Baseline(float(raw["ns"]), float(raw["at"]), int(raw["runs"]))
    return None


def measure_failed_lookups(
    dir_fd: int,
    names: list[str],
    batches: int = BATCHES,
    timer: Callable[[], Callable[[], float]] = stopwatch,
) -> float:
    """ns per failed stat() of `names` (all absent) in the directory `dir_fd`, in the fastest
    of `batches` batches."""
    size = max(1, len(names) // batches)
    per_batch = []
    for b in range(batches):
        chunk = names[b * size : (b + 1) * size]
        elapsed = timer()
        for name in chunk:
            try:  # noqa: SIM105 (a `with suppress()` per lookup would be timed too)
                os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
            except FileNotFoundError:
                pass
        per_batch.append(elapsed() * 1e9 / len(chunk))
    return min(per_batch)


def run_canary(scratch: Path, lookups: int = LOOKUPS) -> float:
    """Make `scratch` (0700) if needed and a fresh run directory in it, time failed lookups
    there, remove the run directory. Directories are handled by fd, never followed through a
    symlink; only the empty directory this run made is ever removed."""
    scratch.mkdir(mode=0o700, parents=True, exist_ok=True)
    top = os.open(scratch, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        run = f"run-{os.getpid()}-{secrets.token_hex(4)}"
        os.mkdir(run, 0o700, dir_fd=top)
        try:
            fd = os.open(run, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=top)
            try:
                names = [secrets.token_hex(8) for _ in range(lookups + WARMUP)]
                measure_failed_lookups(fd, names[:WARMUP], batches=1)
                return measure_failed_lookups(fd, names[WARMUP:])
            finally:
                os.close(fd)
        finally:
            with contextlib.suppress(OSError):  # only ever empty: the lookups create no files
                os.rmdir(run, dir_fd=top)
    finally:
        os.close(top)


def canary_values(
    ctx: ProbeContext, per_bucket: float | None, now: float
) -> tuple[dict[str, float], dict[str, Any]]:
    """The canary's metrics for the dentries probe: measured in the scratch dir (write-capable
    runs), or the last measurement (read-only runs); and facts for the reading's detail."""
    memory = ctx.memory
    baseline = parse_baseline(memory.recall(_BASELINE_KEY)) if memory is not None else None
    scratch = ctx.options.scratch_dir
    if scratch is None:
        return _last(ctx, now)
    try:
        measured = run_canary(scratch)
    except OSError as exc:
        return {}, {"error": f"canary in {scratch}: {exc}"}
    new = update_baseline(baseline, measured, per_bucket, now)
    detail: dict[str, Any] = {"calibrated": new is not baseline}
    values: dict[str, float] = {"lookup_ns": measured}
    if new is not None:
        values["lookup_baseline_ns"] = new.ns
        values["lookup_slowdown"] = measured / new.ns
        detail["baseline_runs"] = new.runs
    else:
        detail["baseline"] = f"none yet: calibrated only below {HEALTHY_PER_BUCKET} negatives per bucket"
    if memory is not None:
        if new is not None:
            memory.remember(_BASELINE_KEY, {"ns": new.ns, "at": new.at, "runs": new.runs})
        memory.remember(_LAST_KEY, {"at": now, "values": values})
    return values, detail


def _last(ctx: ProbeContext, now: float) -> tuple[dict[str, float], dict[str, Any]]:
    last = ctx.memory.recall(_LAST_KEY) if ctx.memory is not None else None
    if not isinstance(last, dict) or not isinstance(last.get("at"), int | float):
        return {}, {"canary": "read-only run and no recent measurement"}
    age = now - float(last["at"])
    if not 0 <= age <= MAX_REPORT_AGE:
        return {}, {"canary": f"last measurement is {age:.0f}s old"}
    values = {k: float(v) for k, v in dict(last.get("values") or {}).items() if isinstance(v, int | float)}
    return values, {"measured_seconds_ago": round(age, 1)}


__all__ = ["Baseline", "canary_values", "measure_failed_lookups", "run_canary", "update_baseline"]
