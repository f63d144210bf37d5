"""The daemon's probe memory: loaded once, written at most every `flush_every` seconds (and at
stop), and loaded again only when another process (`remediator once`) replaced the file."""

from __future__ import annotations

import json
from pathlib import Path

from remediator.clock import FakeClock
from remediator.probes.memory import FileMemory
from remediator.runtime import DaemonMemory


def test_written_at_most_every_flush_every_and_at_stop(tmp_path: Path) -> None:
    path = tmp_path / "probe-memory.json"
    clock = FakeClock(1000.0)
    m = DaemonMemory(path, clock, flush_every=60.0)
    m.remember("a", 1)
    m.flush()
    assert json.loads(path.read_text()) == {"a": 1}  # the first write is at once
    clock.advance(10)
    m.remember("a", 2)
    m.flush()
    assert json.loads(path.read_text()) == {"a": 1}  # too soon
    clock.advance(50)
    m.flush()
    assert json.loads(path.read_text()) == {"a": 2}
    m.remember("a", 3)
    m.write_now()  # the daemon stops
    assert json.loads(path.read_text()) == {"a": 3}


def test_another_process_s_file_is_taken_unless_ours_is_unwritten(tmp_path: Path) -> None:
    path = tmp_path / "probe-memory.json"
    clock = FakeClock(1000.0)
    m = DaemonMemory(path, clock)
    m.remember("a", 1)
    m.flush()
    reads: list[int] = []
    real = Path.read_text

    def counting(self: Path, *args: object, **kw: object) -> str:
        reads.append(1)
        return real(self, *args, **kw)  # type: ignore[arg-type]

    Path.read_text = counting  # type: ignore[method-assign]
    try:
        for _ in range(3):
            m.refresh()
            assert m.recall("a") == 1
        assert reads == []  # kept: not loaded again
        other = FileMemory(path)  # `remediator once` in between
        other.remember("b", 7)
        other.flush()
        before = len(reads)
        m.refresh()
        assert m.recall("b") == 7 and len(reads) == before + 1
    finally:
        Path.read_text = real  # type: ignore[method-assign]
    # Unwritten samples of the daemon win over the other process's file.
    m.remember("a", 5)
    other = FileMemory(path)
    other.remember("c", 9)
    other.flush()
    m.refresh()
    assert m.recall("a") == 5 and m.recall("c") is None


def test_remembered_samples_are_recalled_without_parsing_and_equal_the_files(tmp_path: Path) -> None:
    from remediator.probes.dentry_hash import Sample
    from remediator.probes.memory import _PARSED, recall_samples, remember_samples

    path = tmp_path / "probe-memory.json"
    clock = FakeClock(1000.0)
    m = DaemonMemory(path, clock)
    samples = [Sample(990.123456789, 5.0), Sample(995.5, 7.0)]
    remember_samples(m, "c", samples)
    assert recall_samples(m, "c", 1000.0) == samples
    assert _PARSED[m]["c"] is m.recall("c")  # the hit: the very list stored
    m.write_now()
    # Another process's file (what `once` wrote) is parsed again, to the same samples.
    other = DaemonMemory(path, clock)
    assert recall_samples(other, "c", 1000.0) == samples
    assert other not in _PARSED
    # A list put under the key by other means is not mistaken for the parsed one.
    m.remember("c", [[999.0, 1.0], ["x", 2], [998.0]])
    assert recall_samples(m, "c", 1000.0) == [Sample(999.0, 1.0)]
