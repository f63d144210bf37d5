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

Cost: LOOKUPS failed stat() calls and two mkdir/rmdir per run, ~1-3 ms of one core on a quiet
host (see benchmarks/canary_cost.py; 10-30 ms measured on a loaded 2-core machine), and no memory
beyond the names. The daemon reads the dentries probe every 10 s, so a write-capable read runs the
canary only when its answer can have changed: the harm it measures is the length of the hash
chains, which is the number of dentries per bucket, so while that moved by less than
`RERUN_PER_BUCKET` since the last run (and that run is younger than `MAX_REUSE_AGE`), the last
measurement stands, compared with the current baseline, and the detail says it was reused.
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
# Re-measure when the dentries per hash bucket moved this much since the last run: a tenth of
# an entry per chain is ~5 % of the extra walk at the harm line (2 per bucket), far below the
# 1.5x the bundled slowdown policy acts on. Without a bucket count: 5 % of the dentry count.
RERUN_PER_BUCKET = 0.1
RERUN_RELATIVE = 0.05
# ... and at least this often, so the baseline keeps following the host (a kernel upgrade, a new
# disk) and a slowdown from a cause the count does not show is seen within five minutes.
MAX_REUSE_AGE = 300.0
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
                # One urandom call for all names (one token_hex per name cost as much as the
                # lookups themselves); 16 hex digits each, as before.
                pool = secrets.token_hex(8 * (lookups + WARMUP))
                names = [pool[i : i + 16] for i in range(0, len(pool), 16)]
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
    ctx: ProbeContext,
    per_bucket: float | None,
    now: float,
    dentries: float | None = None,
    buckets: float | None = None,
) -> tuple[dict[str, float], dict[str, Any]]:
    """The canary's metrics for the dentries probe: measured in the scratch dir (write-capable
    runs), or the last measurement (read-only runs); and facts for the reading's detail.

    `dentries` (nr_dentry now) and `buckets` (the hash table's size) let a write-capable read
    reuse the last run while the chains cannot have grown (`rerun_reason`); without them every
    read measures."""
    memory = ctx.memory
    baseline = parse_baseline(memory.recall(_BASELINE_KEY)) if memory is not None else None
    scratch = ctx.options.scratch_dir
    if scratch is None:
        return _last(ctx, now)
    last = memory.recall(_LAST_KEY) if memory is not None else None
    if dentries is not None and isinstance(last, dict) and rerun_reason(last, now, dentries, buckets) is None:
        return _reused(last, baseline, now, dentries, buckets)
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
        memory.remember(_LAST_KEY, {"at": now, "values": values, "dentries": dentries})
    return values, detail


def rerun_reason(last: Any, now: float, dentries: float, buckets: float | None) -> str | None:
    """Why the canary must run again now; None while the last run still answers (pure)."""
    if not isinstance(last, dict) or not isinstance(last.get("at"), int | float):
        return "no earlier run"
    if not isinstance(last.get("dentries"), int | float):
        return "the earlier run did not record the dentry count"
    if not isinstance(last.get("values"), dict) or "lookup_ns" not in last["values"]:
        return "the earlier run measured nothing"
    age = now - float(last["at"])
    if not 0 <= age < MAX_REUSE_AGE:
        return f"the last run is {age:.0f}s old"
    moved = abs(dentries - float(last["dentries"]))
    if buckets:
        if moved / buckets >= RERUN_PER_BUCKET:
            return f"dentries moved by {moved / buckets:.2f} per bucket"
    elif moved >= RERUN_RELATIVE * max(float(last["dentries"]), 1.0):
        return f"dentries moved by {moved:.0f}"
    return None


def _reused(
    last: dict[str, Any], baseline: Baseline | None, now: float, dentries: float, buckets: float | None
) -> tuple[dict[str, float], dict[str, Any]]:
    """The last run's lookup time, against the baseline as it is now."""
    ns = float(last["values"]["lookup_ns"])
    values: dict[str, float] = {"lookup_ns": ns}
    moved = abs(dentries - float(last["dentries"]))
    detail: dict[str, Any] = {
        "calibrated": False,
        "reused": {
            "measured_seconds_ago": round(now - float(last["at"]), 1),
            "dentries_moved": moved,
            **({"dentries_moved_per_bucket": round(moved / buckets, 4)} if buckets else {}),
        },
    }
    if baseline is not None:
        values["lookup_baseline_ns"] = baseline.ns
        values["lookup_slowdown"] = ns / baseline.ns
        detail["baseline_runs"] = baseline.runs
    else:
        detail["baseline"] = f"none yet: calibrated only below {HEALTHY_PER_BUCKET} negatives per bucket"
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


__all__ = [
    "Baseline",
    "canary_values",
    "measure_failed_lookups",
    "rerun_reason",
    "run_canary",
    "update_baseline",
]
