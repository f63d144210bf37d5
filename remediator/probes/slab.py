"""The size of one slab cache (the `dentry` cache, for the dentries probe), read cheaply.

Two sources, the cheap one first:

* SLUB's sysfs directory `/sys/kernel/slab/<name>/` (CONFIG_SLUB_SYSFS;
  Documentation/ABI/testing/sysfs-kernel-slab): one small file per counter. `total_objects`
  and `slabs` are per-node counters, `objects` subtracts the free objects of the partial slabs
  (what slabinfo's active_objs is); `object_size`, `objs_per_slab` and `order` are fixed for
  a cache's life, read once. Four small reads a cycle, ~60 us here.
* `/proc/slabinfo` (slabinfo(5), version 2.1), which walks every cache (~150) under
  slab_mutex to print them all: ~0.5 ms of CPU for the one line the probe uses, and it waits
  for the mutex while another task creates or destroys a cache. Root-only (mode 0400). Used
  when the sysfs directory is absent (SLAB kernels before 6.8, CONFIG_SLUB_SYSFS off, a
  fixture tree), and at most once a second per process.

A cache merged with others (SLUB merges caches of equal size and flags) has no counts of its
own: its sysfs name is then a link to the shared directory, whose `aliases` counts the caches
merged into it, and slabinfo shows the shared cache under the first one's name. The `dentry`
cache is never merged (its usercopy region, `d_iname`, makes it unmergeable), so a merged
one falls back to slabinfo, which says so.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from remediator.host import HostRoot
from remediator.probes.counter_files import CounterFiles

# /proc/slabinfo walks every cache under slab_mutex: at most once a second per process.
SLABINFO_MIN_INTERVAL = 1.0
_slabinfo_cache: dict[Path, tuple[float, str]] = {}
# sysfs directory -> (object_size, objs_per_slab, pages per slab): fixed while the cache lives.
_fixed: dict[str, tuple[int, int, int]] = {}
# The real host's SLUB counters of the caches read every cycle (a few files: never swept).
_SYSFS = CounterFiles()


@dataclass(frozen=True)
class SlabCache:
    """One cache's counts, as a line of /proc/slabinfo 2.1 gives them (the tunables are
    SLAB-only and not kept)."""

    name: str
    active_objs: int
    num_objs: int
    objsize: int  # bytes per object
    objperslab: int
    pagesperslab: int
    active_slabs: int
    num_slabs: int

    @property
    def size_bytes(self) -> int:
        """Bytes in allocated objects. Slab pages also hold slack, so the pages used are more."""
        return self.num_objs * self.objsize


_SLABINFO_HEADER = re.compile(r"^slabinfo - version: 2\.\d+\s*$")


def parse_slabinfo(text: str, only: str | None = None) -> dict[str, SlabCache]:
    """/proc/slabinfo version 2.x -> {cache name: SlabCache}; `only`: just that cache's line
    (the probe's case: ~140 caches parsed to use one cost more than the rest of its read).

    Line format (slabinfo(5)): "name active_objs num_objs objsize objperslab pagesperslab
    : tunables limit batchcount sharedfactor : slabdata active_slabs num_slabs sharedavail".
    """
    lines = text.splitlines()
    if not lines or not _SLABINFO_HEADER.match(lines[0]):
        head = lines[0] if lines else ""
        raise ValueError(f"slabinfo: expected 'slabinfo - version: 2.x', got {head!r}")
    caches: dict[str, SlabCache] = {}
    prefix = None if only is None else only + " "
    for line in lines[1:]:
        if prefix is not None and not line.startswith(prefix):
            continue
        if not line.strip() or line.startswith("#"):
            continue
        sections = [s.split() for s in line.split(":")]
        if len(sections) != 3 or len(sections[0]) != 6 or len(sections[2]) != 4:
            raise ValueError(f"slabinfo: cannot parse line {line!r}")
        name, *counts = sections[0]
        slabdata = sections[2]  # ["slabdata", active_slabs, num_slabs, sharedavail]
        try:
            active_objs, num_objs, objsize, objperslab, pagesperslab = (int(c) for c in counts)
            active_slabs, num_slabs = int(slabdata[1]), int(slabdata[2])
        except ValueError:
            raise ValueError(f"slabinfo: cannot parse line {line!r}") from None
        caches[name] = SlabCache(
            name, active_objs, num_objs, objsize, objperslab, pagesperslab, active_slabs, num_slabs
        )
    return caches


def _number(directory: str, name: str, held: bool) -> int:
    """The first number of a SLUB sysfs file ("87381 N0=87381" -> 87381); `held`: through a
    descriptor kept open (the real host's files, read every cycle)."""
    path = f"{directory}/{name}"
    if held:
        text = _SYSFS.read(path)
    else:
        with open(path, "rb") as f:
            text = f.read(4096)
    fields = text.split()
    if not fields:
        raise ValueError(f"{directory}/{name}: empty")
    return int(fields[0])


def parse_slub_sysfs(directory: Path, name: str, held: bool = False) -> SlabCache | None:
    """The cache's counts from its SLUB sysfs directory; None when it has none of its own
    (merged with other caches: `aliases` > 0). Raises OSError / ValueError when unreadable.
    `held`: read through descriptors kept open (counter_files), for the real host's files."""
    where = str(directory)
    if _number(where, "aliases", held) > 0:
        return None
    fixed = _fixed.get(where)
    if fixed is None:
        if len(_fixed) >= 64:
            _fixed.clear()
        order = _number(where, "order", False)  # read once: not worth a descriptor
        fixed = _fixed[where] = (
            _number(where, "object_size", False),
            _number(where, "objs_per_slab", False),
            1 << order,
        )
    objsize, per_slab, pages = fixed
    slabs = _number(where, "slabs", held)
    # SLUB's slabinfo line: num_objs is total_objects, active_objs what `objects` counts, and
    # active_slabs equals num_slabs (mm/slub.c, get_slabinfo).
    return SlabCache(
        name,
        _number(where, "objects", held),
        _number(where, "total_objects", held),
        objsize,
        per_slab,
        pages,
        slabs,
        slabs,
    )


def read_slab_cache(host: HostRoot, name: str, now: float) -> tuple[SlabCache | None, str]:
    """(the cache's counts or None, where they came from: "sysfs" or "slabinfo"). None: the
    cache has no line of its own (merged). Raises OSError / ValueError when neither source can
    be read."""
    directory = host.sys / "kernel" / "slab" / name
    try:
        cache = parse_slub_sysfs(directory, name, held=host.is_real)
    except (OSError, ValueError):
        cache = None  # no SLUB sysfs here (or a half-readable one): slabinfo decides
    if cache is not None:
        return cache, "sysfs"
    return parse_slabinfo(_read_slabinfo(host, now), only=name).get(name), "slabinfo"


def _read_slabinfo(host: HostRoot, now: float) -> str:
    path = host.proc / "slabinfo"
    cached = _slabinfo_cache.get(path)
    if cached is not None and 0 <= now - cached[0] < SLABINFO_MIN_INTERVAL:
        return cached[1]
    text = host.read_text(path)
    _slabinfo_cache[path] = (now, text)
    return text


__all__ = ["SLABINFO_MIN_INTERVAL", "SlabCache", "parse_slabinfo", "parse_slub_sysfs", "read_slab_cache"]
