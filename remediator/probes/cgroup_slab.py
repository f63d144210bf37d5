"""A container's reclaimable slab from its memory cgroup, read every cycle for every container.

Which counter (the `dentries` probe's docstring has the why): cgroup v2's `memory.stat`
`slab_reclaimable`; on cgroup v1 the same key if a kernel ever offers it there, else
`memory.kmem.usage_in_bytes`. Which keys memory.stat has is the kernel's, the same for every
cgroup, so after the first look a v1 container costs one read of one counter instead of also
generating its memory.stat (~40 hierarchical sums on v1).

At 100 containers every 10 s the path walk of an open(2) (four kernfs levels down) and the
close(2) after it were most of a read: 11 us a container here, for an 8-byte counter. On the real
host the file is opened once and read with pread(2) at offset 0 afterwards (`CounterFiles`), as
the daemon holds its /proc files (handles.py): a cgroup file produces its value afresh on each
read at offset 0. A held descriptor does not keep the cgroup: its rmdir goes through, and a read
of the removed file fails (ENODEV), which reopens the path once (a restarted container gets a new
cgroup under the same path). Descriptors not read since the previous sweep are closed (the
probe sweeps once a read), so they follow the inventory.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import TYPE_CHECKING

from remediator.host import HostRoot
from remediator.probes.counter_files import MAX_READ, CounterFiles

if TYPE_CHECKING:
    from remediator.probes.dentries import MemoryHierarchy

# The cgroup files of the containers, read every cycle: swept by the `dentries` probe.
COUNTERS = CounterFiles()


def _read(host: HostRoot, path: str) -> bytes:
    """Through a held descriptor on the real host; a fixture tree's file is opened each time
    (tests replace its files)."""
    if host.is_real:
        return COUNTERS.read(path)
    with open(path, "rb") as f:
        return f.read(MAX_READ)


def parse_flat_keyed(text: str) -> dict[str, int]:
    """'key value' lines (memory.stat); lines that are not two fields or not an integer are skipped."""
    out: dict[str, int] = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 2:
            try:
                out[parts[0]] = int(parts[1])
            except ValueError:
                continue
    return out


_KMEM = "memory.kmem.usage_in_bytes"
_STAT_KEY = b"slab_reclaimable "
_STAT_SOURCE = "memory.stat:slab_reclaimable"


# cgroup v1 hierarchies whose memory.stat was seen without slab keys.
_V1_WITHOUT_SLAB_STAT: set[str] = set()
# (hierarchy root, cgroup, file) -> its path, joined once per container.
_PATHS: dict[tuple[str, str, str], str] = {}


def _path(root: str, cgroup: str, name: str) -> str:
    key = (root, cgroup, name)
    path = _PATHS.get(key)
    if path is None:
        if len(_PATHS) >= 4096:  # containers long gone
            _PATHS.clear()
        parts = [p for p in cgroup.split("/") if p not in ("", ".", "..")]
        path = _PATHS[key] = os.path.join(root, *parts, name)
    return path


def slab_reclaimable(host: HostRoot, hierarchy: MemoryHierarchy, cgroup: str) -> tuple[int, str]:
    """(bytes, which counter) for `cgroup` under `hierarchy`. Raises OSError (no such cgroup,
    unreadable) or ValueError (no counter this kernel has)."""
    root = str(hierarchy.root)
    if hierarchy.version == 1 and root in _V1_WITHOUT_SLAB_STAT:
        return _kmem_usage(host, root, cgroup)
    stat = parse_flat_keyed(_read(host, _path(root, cgroup, "memory.stat")).decode("ascii", "replace"))
    if "slab_reclaimable" in stat:
        return stat["slab_reclaimable"], _STAT_SOURCE
    if hierarchy.version == 2:
        raise ValueError("memory.stat has no slab_reclaimable")  # kernels before 4.x
    if stat:  # a real memory.stat (not an empty read): the kernel has no slab keys there
        _V1_WITHOUT_SLAB_STAT.add(root)
    return _kmem_usage(host, root, cgroup)


def slab_reclaimable_many(
    host: HostRoot, hierarchy: MemoryHierarchy, cgroups: Sequence[str]
) -> list[tuple[int, str] | None]:
    """`slab_reclaimable` of every cgroup (None where it cannot be read), the held counter
    files read in one go (counter_files.CounterFiles.read_many)."""
    root = str(hierarchy.root)
    if hierarchy.version == 1 and root not in _V1_WITHOUT_SLAB_STAT:
        return [_or_none(host, hierarchy, cg) for cg in cgroups]  # the first look decides
    name, source = (
        (_KMEM, _KMEM) if hierarchy.version == 1 else ("memory.stat", "memory.stat:slab_reclaimable")
    )
    paths = [_path(root, cg, name) for cg in cgroups]
    if host.is_real:
        raw = COUNTERS.read_many(paths)
    else:
        raw = []
        for path in paths:
            try:
                raw.append(_read(host, path))
            except OSError as exc:
                raw.append(exc)
    out: list[tuple[int, str] | None] = []
    for data in raw:
        value = None
        if type(data) is bytes:
            value = _int(data) if hierarchy.version == 1 else _stat_value(data)
        out.append((value, source) if value is not None else None)
    return out


def _or_none(host: HostRoot, hierarchy: MemoryHierarchy, cgroup: str) -> tuple[int, str] | None:
    try:
        return slab_reclaimable(host, hierarchy, cgroup)
    except (OSError, ValueError):
        return None


def _int(data: bytes) -> int | None:
    try:
        return int(data)
    except ValueError:
        return None


def _stat_value(data: bytes) -> int | None:
    """memory.stat's slab_reclaimable, found without parsing the other ~40 lines."""
    at = 0 if data.startswith(_STAT_KEY) else data.find(b"\n" + _STAT_KEY) + 1
    if at == 0 and not data.startswith(_STAT_KEY):
        return None
    end = data.find(b"\n", at)
    return _int(data[at + len(_STAT_KEY) : end if end >= 0 else len(data)])


def _kmem_usage(host: HostRoot, root: str, cgroup: str) -> tuple[int, str]:
    return int(_read(host, _path(root, cgroup, _KMEM))), _KMEM


__all__ = ["COUNTERS", "parse_flat_keyed", "slab_reclaimable", "slab_reclaimable_many"]
