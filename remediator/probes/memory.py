"""What a probe remembers between reads: a few recent samples, for rates across cycles.

The daemon reads every few seconds, the systemd timer once per run in a new process; a growth
rate must work for both, so the samples live in a small JSON file in the state directory, not
in process memory. Probes get it through `ProbeContext.memory` and never learn where it is.

A read-only memory (audit mode, `status`) recalls but never writes: audit changes nothing.
"""

from __future__ import annotations

import contextlib
import json
import os
import weakref
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

from remediator.probes.dentry_hash import MAX_SAMPLE_AGE, Ordered, Sample, keep_samples

# A probe stores a few samples per key; a host with hundreds of containers has a key per
# container. Bounded so a bug cannot grow the file without end.
MAX_KEYS = 2000


class ProbeMemory(Protocol):
    def recall(self, key: str) -> Any:
        """The value last remembered under `key` (JSON types), or None."""
        ...

    def remember(self, key: str, value: Any) -> None: ...

    def forget_except(self, prefix: str, keep: set[str]) -> None:
        """Drop keys under `prefix` not in `keep` (containers that are gone)."""
        ...

    def flush(self) -> None:
        """Make what was remembered durable (a probe calls it once at the end of a read)."""
        ...


class DictMemory:
    """In process memory only: tests and one-off reads."""

    def __init__(self) -> None:
        self.data: dict[str, Any] = {}

    def recall(self, key: str) -> Any:
        return self.data.get(key)

    def remember(self, key: str, value: Any) -> None:
        self.data[key] = value

    def forget_except(self, prefix: str, keep: set[str]) -> None:
        for k in [k for k in self.data if k.startswith(prefix) and k not in keep]:
            del self.data[k]

    def flush(self) -> None:
        pass


class FileMemory:
    """A JSON object in one file, loaded once, written atomically (temp file + rename) by `flush`.

    A missing or corrupt file is an empty memory: losing samples costs one cycle's rate, which
    is no reason to fail a cycle.
    """

    def __init__(self, path: Path, *, readonly: bool = False) -> None:
        self.path = path
        self.readonly = readonly
        self._data: dict[str, Any] | None = None
        self._dirty = False

    def _load(self) -> dict[str, Any]:
        if self._data is None:
            try:
                loaded = json.loads(self.path.read_text())
                self._data = loaded if isinstance(loaded, dict) else {}
            except (OSError, ValueError):
                self._data = {}
        return self._data

    def recall(self, key: str) -> Any:
        return self._load().get(key)

    def remember(self, key: str, value: Any) -> None:
        data = self._load()
        data[key] = value
        while len(data) > MAX_KEYS:
            data.pop(next(iter(data)))
        self._dirty = True

    def forget_except(self, prefix: str, keep: set[str]) -> None:
        data = self._load()
        gone = [k for k in data if k.startswith(prefix) and k not in keep]
        for k in gone:
            del data[k]
        if gone:
            self._dirty = True

    def flush(self) -> None:
        if self.readonly or not self._dirty or self._data is None:
            return
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        try:
            with open(tmp, "w") as f:
                json.dump(self._data, f, separators=(",", ":"))
            os.replace(tmp, self.path)
            self._dirty = False
        except OSError:
            with contextlib.suppress(OSError):
                tmp.unlink()


_NUMBERS = frozenset({int, float, bool})
# What this process remembered itself, per memory: key -> the list of samples it stored there.
# The daemon recalls the samples of each of 200 containers every 10 s; parsing them again was
# most of the `dentries` probe. A hit needs the very list object stored (`is`): a memory loaded
# again from its file (another process wrote it) holds JSON arrays, parsed again.
_PARSED: weakref.WeakKeyDictionary[Any, dict[str, list[Sample]]] = weakref.WeakKeyDictionary()


def recall_samples(memory: ProbeMemory | None, key: str, now: float) -> list[Sample]:
    """The samples remembered under `key` that are still worth keeping at `now`."""
    raw = memory.recall(key) if memory is not None else None
    if not isinstance(raw, list):
        return []
    if _PARSED.get(memory, {}).get(key) is raw:
        return keep_samples(raw, now)
    out = []
    for item in raw:  # only pairs of numbers: the file may hold anything
        if (type(item) is list or type(item) is Sample) and len(item) == 2:
            at, value = item
            if type(at) in _NUMBERS and type(value) in _NUMBERS:
                out.append(Sample(float(at), float(value)))
    return keep_samples(out, now)


def remember_samples(memory: ProbeMemory, key: str, samples: list[Sample]) -> None:
    """Store `samples` under `key`, and keep them parsed. They are stored as they are: a list of
    (at, value) pairs, which the file holds as JSON arrays (exact: JSON keeps a float's every
    digit), not copied into lists (900 lists a cycle at 100 containers)."""
    dumped = _stored(samples)
    memory.remember(key, dumped)
    try:
        per_memory = _PARSED.setdefault(memory, {})
    except TypeError:  # a memory that cannot be weakly referenced: parsed at each recall
        return
    per_memory[key] = dumped
    if len(per_memory) > 2 * MAX_KEYS:  # keys of containers long gone
        for k in [k for k, v in per_memory.items() if memory.recall(k) is not v]:
            del per_memory[k]


def recall_samples_many(memory: ProbeMemory | None, keys: Sequence[str], now: float) -> list[list[Sample]]:
    """The samples of every key as `growth_rate` and `keep_samples` use them: what this process
    kept itself comes back as it was kept (in time order, not trimmed again for `now`: the
    rate and the next keep come out the same, tests/unit/test_dentry_hash.py checks that), the
    rest as `recall_samples` gives it. The per-container case: one lookup of the parsed cache
    for all keys, not one per key."""
    if memory is None:
        return [[] for _ in keys]
    try:
        parsed = _PARSED.get(memory) or {}
    except TypeError:
        parsed = {}
    out: list[list[Sample]] = []
    for key in keys:
        kept = parsed.get(key)
        if (
            type(kept) is Ordered
            and kept is memory.recall(key)
            and kept.upto <= now
            and (not kept or now - kept[0].at <= MAX_SAMPLE_AGE)
        ):
            out.append(kept)
            continue
        out.append(recall_samples(memory, key, now))
    return out


def remember_samples_many(memory: ProbeMemory, items: Sequence[tuple[str, list[Sample]]]) -> None:
    """`remember_samples` of every (key, samples)."""
    try:
        per_memory: dict[str, list[Sample]] | None = _PARSED.setdefault(memory, {})
    except TypeError:  # a memory that cannot be weakly referenced: parsed at each recall
        per_memory = None
    for key, samples in items:
        dumped = _stored(samples)
        memory.remember(key, dumped)
        if per_memory is not None:
            per_memory[key] = dumped
    if per_memory is not None and len(per_memory) > 2 * MAX_KEYS:
        for k in [k for k, v in per_memory.items() if memory.recall(k) is not v]:
            del per_memory[k]


def _stored(samples: list[Sample]) -> list[Sample]:
    """What is stored for `samples`: the list itself when it is one of ours that nobody changes
    (`Ordered`), else a copy, so that a caller's later change cannot alter the memory."""
    return samples if type(samples) is Ordered else list(samples)


__all__ = [
    "DictMemory",
    "FileMemory",
    "ProbeMemory",
    "recall_samples",
    "recall_samples_many",
    "remember_samples",
    "remember_samples_many",
]
