"""How loaded the dentry hash table is: its bucket count, and the growth of negatives over time.

Pure functions only (the `dentries` probe reads, these compute), so every edge is tested with
fixture text and a fake clock.

Why buckets: the harm a negative dentry does is a longer hash chain for every path lookup on the
host (fs/dcache.c `__d_lookup` walks the bucket's chain). The table is sized once at boot and
never resized, so "how many negatives per bucket" is what predicts the slowdown, not an
absolute count: the case report saw lookups 1.7-1.9x slower at ~2.4 negatives per bucket.
"""

from __future__ import annotations

import itertools
import operator
import re
from collections.abc import Iterable, Sequence
from typing import NamedTuple

# printk from mm/mm_init.c (mm/page_alloc.c before 6.2) alloc_large_system_hash():
#   "Dentry cache hash table entries: 4194304 (order: 13, 33554432 bytes, linear)"
_DENTRY_HASH_LINE = re.compile(r"Dentry cache hash table entries: (\d+)")

PAGE_SIZE = 4096
PAGE_SHIFT = 12
BUCKET_SIZE = 8  # sizeof(struct hlist_bl_head): one pointer
DENTRY_HASH_SCALE = 13  # fs/dcache.c dcache_init_early(): one bucket per 2^13 bytes of memory
ADAPT_SCALE_NPAGES = (64 << 30) >> PAGE_SHIFT  # mm/mm_init.c ADAPT_SCALE_BASE >> PAGE_SHIFT
ADAPT_SCALE_SHIFT = 2


def parse_dentry_hash_entries(log_lines: Iterable[str]) -> int | None:
    """The bucket count from the kernel log (dmesg text or /dev/kmsg records), or None."""
    for line in log_lines:
        m = _DENTRY_HASH_LINE.search(line)
        if m:
            return int(m.group(1))
    return None


def _roundup_pow_of_two(n: int) -> int:
    return 1 << (n - 1).bit_length() if n > 1 else 1


def sized_dentry_hash_entries(mem_total_bytes: int) -> int:
    """The bucket count the kernel chooses at boot when `dhash_entries=` is not given.

    alloc_large_system_hash("Dentry cache", 8, 0, 13, ...) (mm/mm_init.c, Linux 6.x): take
    nr_kernel_pages rounded up to a MiB, add one to the scale for every 4x above 64 GiB
    (adaptive scaling, Linux 4.15+), keep one bucket per 2^scale bytes, round up to a power of
    two, and cap the table at 1/16 of memory. nr_kernel_pages is the low memory free at boot,
    which MemTotal approximates from above by the kernel's own image and reservations; as the
    result is rounded to a power of two the estimate is exact except within a few percent of a
    power-of-two boundary, which is why the probe prefers the kernel log when it has it.
    """
    pages = mem_total_bytes // PAGE_SIZE
    per_mib = (1 << 20) // PAGE_SIZE
    numentries = -(-pages // per_mib) * per_mib
    scale = DENTRY_HASH_SCALE
    adapt = ADAPT_SCALE_NPAGES
    while adapt < numentries:
        scale += 1
        adapt <<= ADAPT_SCALE_SHIFT
    numentries >>= scale - PAGE_SHIFT
    if numentries * BUCKET_SIZE < PAGE_SIZE:
        numentries = PAGE_SIZE // BUCKET_SIZE
    numentries = _roundup_pow_of_two(numentries)
    cap = min((pages * PAGE_SIZE >> 4) // BUCKET_SIZE, 0x80000000)
    return max(1, min(numentries, cap))


def parse_meminfo_total(text: str) -> int:
    """/proc/meminfo "MemTotal:  24683584 kB" -> bytes."""
    m = re.search(r"^MemTotal:\s+(\d+) kB", text, re.MULTILINE)
    if not m:
        raise ValueError("meminfo: no 'MemTotal: N kB' line")
    return int(m.group(1)) * 1024


class Sample(NamedTuple):
    """One reading of a growing count (a tuple: the dentries probe makes and sorts a few per
    container every cycle)."""

    at: float  # Unix seconds
    value: float


_AT = operator.attrgetter("at")

# Samples older than this are useless for a "current" rate: a timer that ran 20 minutes ago says
# nothing about the last minute.
MAX_SAMPLE_AGE = 600.0
# The rate is taken over about this long: long enough to smooth a burst of one cycle, short
# enough that a trasher that started a minute ago shows at its full rate.
RATE_WINDOW = 60.0
# Samples kept: the daemon reads every few seconds, so this covers the window with room.
MAX_SAMPLES = 32
# A fall of more than this fraction between two samples ends a trend (a reclaim frees 90 % and
# more; the count's own jitter on a quiet host is well under 1 %).
FALL = 0.10


class Ordered(list[Sample]):
    """Samples known to be oldest first with none taken after `upto`: what `keep_samples` and
    `kept_with` return, so that the next look at them skips the check (the per-container
    bookkeeping looks at each container's samples three times a cycle). Never changed in place."""

    __slots__ = ("upto",)

    def __init__(self, samples: Iterable[Sample], upto: float) -> None:
        super().__init__(samples)
        self.upto = upto


def kept_with(past: Sequence[Sample], current: Sample) -> list[Sample]:
    """keep_samples([*past, current], current.at), in one copy when `past` is known
    ordered (the daemon's case, for every container every cycle): `current` is the newest and
    within the window, so the kept ones are the kept ones of `past`, then it."""
    if type(past) is not Ordered or past.upto > current.at or (past and past[-1].at > current.at):
        return keep_samples([*past, current], current.at)
    return _kept_ordered(past, current)


def _kept_ordered(past: Sequence[Sample], current: Sample) -> Ordered:
    """kept_with for an ordered `past` with none after `current`: the trim, forward from the
    oldest, then `current`."""
    now = current.at
    n = len(past)
    old = 0
    while old < n and now - past[old].at > MAX_SAMPLE_AGE:
        old += 1
    inside = old
    while inside < n and now - past[inside].at > RATE_WINDOW:
        inside += 1
    kept = Ordered(itertools.islice(past, max(old, inside - 1, n + 1 - MAX_SAMPLES), None), now)
    kept.append(current)
    return kept


def _by_time(samples: Sequence[Sample], now: float) -> Sequence[Sample]:
    """The samples taken at or before `now`, oldest first. Samples are stored in that order, so
    the sort (stable: ties keep their order) is only paid for the unusual input, and the check
    not at all for samples known ordered up to `now` (returned as they are: not to be changed)."""
    if type(samples) is Ordered and samples.upto <= now:
        return samples
    kept = [s for s in samples if s.at <= now]
    for a, b in itertools.pairwise(kept):
        if b.at < a.at:
            kept.sort(key=_AT)
            break
    return kept


def keep_samples(samples: Sequence[Sample], now: float) -> list[Sample]:
    """The samples still worth keeping at `now` (young enough, newest last, bounded): those
    within RATE_WINDOW and the newest one before it, which are all `growth_rate` can use at any
    later time (a sample before that one is never its reference, and a fall before it ends no
    trend the kept ones are part of). At the daemon's 10 s cadence that is 7 samples, not 32:
    most of the per-container bookkeeping at 100 containers."""
    ordered = _by_time(samples, now)
    n = len(ordered)
    old = 0  # the first young enough: those before it are older still (oldest first)
    while old < n and now - ordered[old].at > MAX_SAMPLE_AGE:
        old += 1
    inside = old  # the first within the window, or n
    while inside < n and now - ordered[inside].at > RATE_WINDOW:
        inside += 1
    return Ordered(ordered[max(old, inside - 1) :][-MAX_SAMPLES:], now)


def growth_rate(
    samples: Sequence[Sample], current: Sample, min_span: float = 0.5
) -> tuple[float, float] | None:
    """(per-second rate, span in seconds) from the past samples to `current`, or None.

    The reference is the oldest sample within RATE_WINDOW of `current` (the daemon's case), else
    the newest older one up to MAX_SAMPLE_AGE (the timer's case: its previous run). A span
    shorter than `min_span` gives no rate (two reads of one cycle are not a trend).

    Only samples since the last fall (of more than FALL) count: a reclaim (or the kernel's
    shrinker) that freed negatives between two samples ends the old trend, and the rate is the
    regrowth after it.
    Across a fall the average would be negative for a minute, hiding a trasher that came back
    at full speed right after its reclaim (measured: the growth policy then resolved and started
    its ladder over at the reclaim, instead of escalating to the cap). With no sample since the
    fall the rate is unknown (None), and the probe reads again a moment later.

    One walk back from `current` (it runs for every container every cycle): it stops at the
    last fall, at the first sample older than MAX_SAMPLE_AGE, or at the first one beyond the
    window once one inside it was found.
    """
    ref: Sample | None = None
    beyond = False  # ref is the newest sample before the window (none in it)
    later = current
    ordered = _by_time(samples, current.at)
    n = len(ordered)
    while n and ordered[n - 1].at >= current.at:  # taken with `current` (oldest first: at the end)
        n -= 1
    for s in reversed(ordered[:n] if n < len(ordered) else ordered):
        if later.value < s.value * (1 - FALL):
            break  # a fall between s and the sample after it: the trend starts after s
        age = current.at - s.at
        if age > MAX_SAMPLE_AGE:
            break
        if age <= RATE_WINDOW:
            if age >= min_span:
                ref = s  # within the window: the oldest one wins
        elif ref is None:
            if age >= min_span:
                ref, beyond = s, True
        elif not beyond or s.at != ref.at:
            break
        else:
            ref = s  # taken at the same instant as that newest one: the first of them counts
        later = s
    if ref is None:
        return None
    span = current.at - ref.at
    return (current.value - ref.value) / span, span


def advance(past: Sequence[Sample], current: Sample) -> tuple[tuple[float, float] | None, list[Sample]]:
    """(growth_rate(past, current), kept_with(past, current)) in one pass over `past` when it is
    known ordered and older than `current`: the daemon's case, for every container every cycle,
    where the two calls checked and walked the same few samples twice. Anything else: the two."""
    n = len(past)
    now = current.at
    if type(past) is not Ordered or past.upto > now or (n and past[-1].at >= now):
        return growth_rate(past, current), kept_with(past, current)
    # growth_rate's walk back from `current`, over samples all taken before it.
    ref: Sample | None = None
    beyond = False
    later = current.value
    floor = 1 - FALL
    i = n
    while i:
        i -= 1
        s = past[i]
        if later < s.value * floor:
            break
        age = now - s.at
        if age > MAX_SAMPLE_AGE:
            break
        if age <= RATE_WINDOW:
            if age >= 0.5:
                ref = s
        elif ref is None:
            if age >= 0.5:
                ref, beyond = s, True
        elif not beyond or s.at != ref.at:
            break
        else:
            ref = s
        later = s.value
    rate = None if ref is None else ((current.value - ref.value) / (now - ref.at), now - ref.at)
    return rate, _kept_ordered(past, current)


def forecast_seconds(value: float, act_line: float, rate: float | None) -> float | None:
    """Seconds until `value` reaches `act_line` at `rate`: 0 when already there; None when it is
    not growing (no forecast is not "never": the rate may change)."""
    if value >= act_line:
        return 0.0
    if rate is None or rate <= 0:
        return None
    return (act_line - value) / rate


__all__ = [
    "MAX_SAMPLE_AGE",
    "RATE_WINDOW",
    "Ordered",
    "Sample",
    "advance",
    "forecast_seconds",
    "growth_rate",
    "keep_samples",
    "kept_with",
    "parse_dentry_hash_entries",
    "parse_meminfo_total",
    "sized_dentry_hash_entries",
]
