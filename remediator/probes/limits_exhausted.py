"""Which shared pools were seen exhausted, and when: remembered across restarts in the state dir.

A consumer that came up while a pool was exhausted stays degraded after the limit is raised (a
`tail -f` that fell back to polling, a kubelet without its watches), so "was the pool exhausted
while this process started?" must outlive the process that saw it: the daemon restarts, the
timer runs one process per cycle. The answer lives in the probe memory (probes/memory.py, a JSON
file in the state dir; audit recalls but never writes), under one key:

    {"boot": "<boot id>", "pools": {"inotify:0": [first, last], "file_handles": [first, last]}}

`first` / `last` are seconds since boot (/proc/uptime) of the first and latest reading that saw
the pool exhausted. A new boot id discards all of it (every process is new after a reboot).
Bounded: at most MAX_POOLS entries, the oldest `last` dropped first.

A consumer is degraded by a pool when it holds none of that pool's resource and started no later
than the pool's `last` exhaustion: one started after the pool had room again is merely idle.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from remediator.host import HostRoot
from remediator.probes.limits_fdscan import ConsumerProc
from remediator.probes.memory import ProbeMemory

KEY = "limits/exhausted"
MAX_POOLS = 256


@dataclass(frozen=True)
class Exhausted:
    first: float  # seconds since boot
    last: float


def parse_uptime(text: str) -> float:
    """/proc/uptime "12345.67 23456.78" -> 12345.67 (seconds since boot)."""
    try:
        return float(text.split(maxsplit=1)[0])
    except (IndexError, ValueError):
        raise ValueError(f"uptime: unexpected format {text.strip()!r}") from None


def recall(memory: ProbeMemory | None, boot: str | None) -> dict[str, Exhausted]:
    raw = memory.recall(KEY) if memory is not None else None
    if not isinstance(raw, dict) or boot is None or raw.get("boot") != boot:
        return {}
    out = {}
    pools = raw.get("pools")
    for name, pair in pools.items() if isinstance(pools, dict) else ():
        if isinstance(pair, list) and len(pair) == 2 and all(isinstance(x, int | float) for x in pair):
            out[str(name)] = Exhausted(float(pair[0]), float(pair[1]))
    return out


def update(known: dict[str, Exhausted], now_exhausted: Iterable[str], uptime: float) -> dict[str, Exhausted]:
    """`known` plus this reading's exhausted pools at `uptime` (pure), bounded to MAX_POOLS."""
    out = dict(known)
    for name in now_exhausted:
        before = out.get(name)
        out[name] = Exhausted(before.first if before else uptime, uptime)
    if len(out) > MAX_POOLS:
        keep = sorted(out.items(), key=lambda kv: kv[1].last, reverse=True)[:MAX_POOLS]
        out = dict(keep)
    return out


def remember(memory: ProbeMemory | None, boot: str | None, pools: dict[str, Exhausted]) -> None:
    if memory is None or boot is None:
        return
    memory.remember(
        KEY,
        {"boot": boot, "pools": {k: [round(v.first, 2), round(v.last, 2)] for k, v in sorted(pools.items())}},
    )


def file_nr_slack(cpus: int | None = None) -> int:
    """How far below the true count /proc/sys/fs/file-nr may read.

    file-nr is percpu_counter_read_positive(&nr_files) (fs/file_table.c): each CPU keeps up to
    percpu_counter_batch - 1 increments of its own before folding them in, and the batch is
    max(32, 2 * nr_cpus) (lib/percpu_counter.c). alloc_empty_file() refuses with ENFILE on the
    exact sum, so a pool that is full can read up to cpus * batch short of fs.file-max."""
    n = cpus if cpus is not None else os.cpu_count() or 1
    return n * max(32, 2 * n)


def inotify_pool(uid: int) -> str:
    return f"inotify:{uid}"


# The running kernel's boot_id, per proc root: it names the boot, and this process does not
# outlive it, so it is read once. Fixture trees (a test may "reboot" one) are read each time.
_BOOT_IDS: dict[Path, str] = {}


def boot_and_uptime(host: HostRoot) -> tuple[str | None, float | None]:
    """This boot's id and seconds since boot; None where unreadable (fixture trees)."""
    boot: str | None = _BOOT_IDS.get(host.proc)
    if boot is None:
        try:
            boot = host.read_text(host.proc / "sys" / "kernel" / "random" / "boot_id").strip()
        except OSError:
            boot = None
        else:
            if host.is_real:
                _BOOT_IDS[host.proc] = boot
    if host.is_real:
        # /proc/uptime's first field is CLOCK_BOOTTIME (in a time namespace both carry its
        # offset): read from the vDSO, no file to open (twice a read of the limits probe, and
        # under file-max a file may not open at all).
        return boot, time.clock_gettime(time.CLOCK_BOOTTIME)
    try:
        uptime: float | None = parse_uptime(host.read_text(host.proc / "uptime"))
    except (OSError, ValueError):
        uptime = None
    return boot, uptime


def clock_ticks() -> int:
    """USER_HZ: the unit of /proc/<pid>/stat's starttime (proc(5)); 100 on every Linux ABI."""
    try:
        return os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError):
        return 100


def degraded_by_inotify(
    consumers: Sequence[ConsumerProc], known: dict[str, Exhausted], seen_here: set[int]
) -> list[ConsumerProc]:
    """Consumers holding no inotify fd whose uid's pool was exhausted when they started (by the
    remembered `last` exhaustion), or, with nothing remembered, that this process saw exhausted."""
    tick = clock_ticks()
    out = []
    for c in consumers:
        if c.has_inotify:
            continue
        seen = known.get(inotify_pool(c.uid))
        if seen is not None:
            if c.starttime / tick <= seen.last:  # started before the pool had room again
                out.append(c)
        elif c.uid in seen_here:
            out.append(c)
    return out


__all__ = [
    "KEY",
    "MAX_POOLS",
    "Exhausted",
    "boot_and_uptime",
    "clock_ticks",
    "degraded_by_inotify",
    "file_nr_slack",
    "inotify_pool",
    "parse_uptime",
    "recall",
    "remember",
    "update",
]
