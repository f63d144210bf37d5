"""Hash-table load of the dentry cache: bucket count, growth rate, forecast, and the probe's use
of them (fixture trees, a fake clock, an in-memory sample store)."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from remediator.clock import FakeClock
from remediator.host import HostRoot
from remediator.model import ContainerRef
from remediator.probes.base import ProbeContext, ProbeOptions
from remediator.probes.containers import StaticInventory
from remediator.probes.dentries import DentriesProbe, dentry_hash_buckets
from remediator.probes.dentry_hash import (
    FALL,
    MAX_SAMPLE_AGE,
    MAX_SAMPLES,
    RATE_WINDOW,
    Ordered,
    Sample,
    advance,
    forecast_seconds,
    growth_rate,
    keep_samples,
    kept_with,
    parse_dentry_hash_entries,
    parse_meminfo_total,
    sized_dentry_hash_entries,
)
from remediator.probes.memory import (
    DictMemory,
    FileMemory,
    recall_samples,
    recall_samples_many,
    remember_samples,
    remember_samples_many,
)
from tests.helpers import make_host

PROC = Path(__file__).resolve().parent.parent / "fixtures" / "proc" / "linux-6.18"
# As printed by 6.x kernels (mm/mm_init.c) on the 24 GiB host of the case measurements.
DMESG = [
    "[    0.000000] Linux version 6.18.44-fc-v595",
    "[    0.011021] Dentry cache hash table entries: 4194304 (order: 13, 33554432 bytes, linear)",
    "[    0.011432] Inode-cache hash table entries: 2097152 (order: 12, 16777216 bytes, linear)",
]
KMSG = ["6,101,11021,-;Dentry cache hash table entries: 131072 (order: 8, 1048576 bytes, linear)\n"]


def dentry_state(negative: int) -> str:
    return f"{negative + 1000}\t{negative + 500}\t45\t0\t{negative}\t0\n"


def test_parse_dentry_hash_entries_dmesg_and_kmsg_forms() -> None:
    assert parse_dentry_hash_entries(DMESG) == 4194304
    assert parse_dentry_hash_entries(KMSG) == 131072
    assert parse_dentry_hash_entries(DMESG[2:]) is None  # the inode line is not the dentry one


def test_sizing_rule_matches_kernel_logs() -> None:
    # This host: MemTotal 24683584 kB and the kernel said 4194304 (issue 9's measurements).
    assert sized_dentry_hash_entries(parse_meminfo_total((PROC / "meminfo").read_text())) == 4194304
    # Debian 6.1 in a 1 GiB VM (MemTotal ~ 980 MiB) prints 131072.
    assert sized_dentry_hash_entries(980 << 20) == 131072
    # Adaptive scale above 64 GiB: 256 GiB gives 2^24, not 2^25.
    assert sized_dentry_hash_entries(256 << 30) == 1 << 24
    # Tiny memory: at least one page of buckets.
    assert sized_dentry_hash_entries(1 << 20) == 4096 // 8


def test_parse_meminfo_total_rejects_garbage() -> None:
    with pytest.raises(ValueError, match="MemTotal"):
        parse_meminfo_total("MemFree: 1 kB\n")


def test_growth_rate_daemon_window_and_timer_gap() -> None:
    now = Sample(1000.0, 1_000_000.0)
    # Daemon: samples every 10 s; the oldest within the 60 s window is the reference.
    daemon = [Sample(1000.0 - 10 * i, 1_000_000.0 - 4_000_000 * i) for i in range(1, 10)]
    rate = growth_rate(daemon, now)
    assert rate == (400_000.0, 60.0)
    # Timer: one sample 5 minutes ago.
    assert growth_rate([Sample(700.0, 400_000.0)], now) == (2000.0, 300.0)
    # Too old, or too recent to be a trend: no rate.
    assert growth_rate([Sample(1000.0 - MAX_SAMPLE_AGE - 1, 0.0)], now) is None
    assert growth_rate([Sample(999.9, 0.0)], now) is None
    assert growth_rate([], now) is None


def test_keep_samples_bounds_and_orders() -> None:
    kept = keep_samples([Sample(float(t), 0.0) for t in range(100, -1, -1)], 100.0)
    assert len(kept) == 32 and kept[-1].at == 100.0 and kept[0].at == 69.0
    assert keep_samples([Sample(0.0, 0.0), Sample(2000.0, 0.0)], 1000.0) == []
    # The window and the newest sample before it: all a later rate can use.
    daemon = [Sample(float(t), 0.0) for t in range(0, 301, 10)]
    assert [k.at for k in keep_samples(daemon, 300.0)] == [230.0, *range(240, 301, 10)]


@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.tuples(
            # Seconds between reads: the daemon's few (at least 2 s, so that RATE_WINDOW holds
            # no more than MAX_SAMPLES), or a timer's minutes.
            st.one_of(st.floats(2.0, 20.0), st.floats(20.0, 400.0)),
            st.one_of(st.floats(0.0, 1e9), st.sampled_from([0.0, 1e6, 2e6])),
            st.booleans(),
        ),
        min_size=1,
        max_size=60,
    )
)
def test_trimmed_samples_give_the_rate_all_samples_give(steps: list[tuple[float, float, bool]]) -> None:
    """What keep_samples drops never changes a later growth_rate: reads at random gaps (the
    daemon's seconds, a timer's minutes) with random values (falls included), each rate from the
    trimmed history equal to the rate from everything read before."""
    at, everything, kept = 0.0, [], []
    for gap, value, keep in steps:
        at += gap
        now = Sample(at, value)
        assert growth_rate(kept, now) == growth_rate(everything, now)
        everything.append(now)
        # Trimmed at some reads only: an untrimmed history must give the same rates too.
        kept = keep_samples([*kept, now], at) if keep else [*kept, now]


@pytest.mark.parametrize(
    ("value", "rate", "expected"),
    [
        (9e6, 1e5, 0.0),
        (8e6, 1e5, 0.0),
        (4e6, 1e5, 40.0),
        (4e6, 0.0, None),
        (4e6, -5.0, None),
        (4e6, None, None),
    ],
)
def test_forecast_seconds(value: float, rate: float | None, expected: float | None) -> None:
    assert forecast_seconds(value, 8e6, rate) == expected


def test_bucket_source_precedence(tmp_path: Path) -> None:
    clock = FakeClock()
    host = make_host(tmp_path, {"proc/meminfo": (PROC / "meminfo").read_text()})
    got, source = dentry_hash_buckets(ProbeContext(host, clock))
    assert got == 4194304 and source.startswith("estimated from MemTotal")
    got, source = dentry_hash_buckets(
        ProbeContext(host, clock, options=ProbeOptions(dentry_hash_buckets=1000))
    )
    assert (got, source) == (1000, "configured (REMEDIATOR_DENTRY_HASH_BUCKETS)")
    bare = dentry_hash_buckets(ProbeContext(make_host(tmp_path / "bare", {}), clock))
    assert bare[0] is None and bare[1].startswith("unknown")


def _host(tmp_path: Path, negative: int) -> HostRoot:
    return make_host(
        tmp_path,
        {
            "proc/sys/fs/dentry-state": dentry_state(negative),
            "proc/sys/kernel/osrelease": "6.18.44\n",
            "proc/meminfo": (PROC / "meminfo").read_text(),
        },
    )


def test_probe_rate_limit_and_forecast_across_reads(tmp_path: Path) -> None:
    clock, memory = FakeClock(1000.0), DictMemory()
    ctx = ProbeContext(_host(tmp_path, 1_000_000), clock, memory=memory, options=ProbeOptions(1_000_000))
    first = DentriesProbe().read(ctx)
    assert first.values["growth_per_second"] == 0.0  # two reads a second apart, no change
    assert first.limits == {"negative": 1_000_000, "negative_projected": 1_000_000}
    assert first.detail["hash_source"].startswith("configured")
    clock.advance(10)
    _host(tmp_path, 5_000_000)  # +4M in 11 s since the first of the two remembered samples
    second = DentriesProbe().read(ProbeContext(ctx.host, clock, memory=memory, options=ctx.options))
    rate = 4_000_000 / 11
    assert second.values["growth_per_second"] == pytest.approx(rate)
    assert second.values["negative_per_bucket"] == 5.0
    assert second.values["forecast_seconds"] == 0.0  # past 2 per bucket already
    assert second.values["negative_projected"] == pytest.approx(5_000_000 + rate * 300)
    assert second.detail["harm_line"] == 2_000_000


def test_probe_timer_rate_from_file_memory(tmp_path: Path) -> None:
    """Two processes (the timer) a minute apart share samples through the state file."""
    clock = FakeClock(1000.0)
    path = tmp_path / "probe-memory.json"
    host = _host(tmp_path / "h", 100_000)
    opts = ProbeOptions(1_000_000)
    DentriesProbe().read(ProbeContext(host, clock, memory=FileMemory(path), options=opts))
    clock.advance(60)
    _host(tmp_path / "h", 700_000)
    later = DentriesProbe().read(ProbeContext(host, clock, memory=FileMemory(path), options=opts))
    # The second of the first process's two reads is the oldest within the 60 s window.
    assert later.values["growth_per_second"] == pytest.approx(600_000 / 60)
    assert later.values["forecast_seconds"] == pytest.approx(1_300_000 / 10_000)


def test_readonly_memory_never_writes(tmp_path: Path) -> None:
    path = tmp_path / "probe-memory.json"
    memory = FileMemory(path, readonly=True)
    DentriesProbe().read(ProbeContext(_host(tmp_path / "h", 5), FakeClock(), memory=memory))
    assert not path.exists()


def test_probe_container_slab_growth(tmp_path: Path) -> None:
    cid = "a" * 64
    files = {
        "sys/fs/cgroup/memory/memory.stat": "cache 0\n",
        f"sys/fs/cgroup/memory/docker/{cid}/memory.stat": "cache 0\n",
        f"sys/fs/cgroup/memory/docker/{cid}/memory.kmem.usage_in_bytes": "1000000\n",
    }
    host = _host(tmp_path, 10)
    make_host(tmp_path, files)
    inv = StaticInventory([ContainerRef(id=cid, name="trasher", pid=1, cgroup=f"/docker/{cid}")])
    clock, memory = FakeClock(1000.0), DictMemory()
    first = DentriesProbe().read(ProbeContext(host, clock, lambda: inv, memory=memory))
    assert "slab_growth_bytes_per_second" not in first.containers[0].values
    clock.advance(20)
    make_host(tmp_path, {f"sys/fs/cgroup/memory/docker/{cid}/memory.kmem.usage_in_bytes": "5000000\n"})
    second = DentriesProbe().read(ProbeContext(host, clock, lambda: inv, memory=memory))
    assert second.containers[0].values["slab_growth_bytes_per_second"] == pytest.approx(4_000_000 / 21)
    # A container that is gone is forgotten.
    DentriesProbe().read(ProbeContext(host, clock, lambda: StaticInventory([]), memory=memory))
    assert not [k for k in memory.data if k.startswith("dentries.slab.")]


def test_growth_rate_restarts_after_a_fall() -> None:
    # A trasher reclaimed between two timer runs: 12 M at t=0, 10 M regrown by t=35 after a
    # reclaim to ~0 in between. Across the fall the average is negative; the rate must not be.
    assert growth_rate([Sample(0.0, 12_000_000.0)], Sample(35.0, 10_000_000.0)) is None
    # With a sample since the fall (the probe's second read a second later), the regrowth shows.
    past = [Sample(0.0, 12_000_000.0), Sample(35.0, 10_000_000.0)]
    assert growth_rate(past, Sample(36.0, 10_400_000.0)) == (400_000.0, 1.0)
    # Daemon: samples every 10 s, a reclaim after the third; the reference is the first after it.
    daemon = [Sample(0.0, 1e6), Sample(10.0, 5e6), Sample(20.0, 9e6)]
    daemon += [Sample(30.0, 0.2e6), Sample(40.0, 4.2e6)]
    assert growth_rate(daemon, Sample(50.0, 8.2e6)) == (400_000.0, 20.0)
    # Jitter of a quiet host (under FALL) does not end a trend.
    quiet = [Sample(0.0, 100_000.0), Sample(10.0, 99_000.0)]
    assert growth_rate(quiet, Sample(20.0, 100_500.0)) == (25.0, 20.0)


# --- the single-pass versions against the plain definitions ---------------------------------


def reference_keep_samples(samples: list[Sample], now: float) -> list[Sample]:
    """keep_samples as first written: filter, sort, slice."""
    kept = [s for s in samples if 0 <= now - s.at <= MAX_SAMPLE_AGE]
    kept.sort(key=lambda s: s.at)
    first = next((i for i, s in enumerate(kept) if now - s.at <= RATE_WINDOW), len(kept))
    return kept[max(0, first - 1) :][-MAX_SAMPLES:]


def reference_growth_rate(
    samples: list[Sample], current: Sample, min_span: float = 0.5
) -> tuple[float, float] | None:
    """growth_rate as first written: the whole chain, the last fall, then the reference."""
    ordered = sorted((s for s in samples if s.at < current.at), key=lambda s: s.at)
    chain = [*ordered, current]
    start = 0
    for i in range(1, len(chain)):
        if chain[i].value < chain[i - 1].value * (1 - FALL):
            start = i
    past = [s for s in chain[start:-1] if min_span <= current.at - s.at <= MAX_SAMPLE_AGE]
    if not past:
        return None
    in_window = [s for s in past if current.at - s.at <= RATE_WINDOW]
    ref = min(in_window, key=lambda s: s.at) if in_window else max(past, key=lambda s: s.at)
    span = current.at - ref.at
    return (current.value - ref.value) / span, span


# Times on a coarse grid (ties, samples at `now`, in the future, beyond MAX_SAMPLE_AGE) and
# values with falls, rises and repeats, in any order.
samples_anyhow = st.lists(
    st.builds(
        Sample,
        st.integers(-20, 200).map(lambda t: 1000.0 - 5.0 * t),
        st.sampled_from([0.0, 1.0, 100.0, 89.0, 91.0, 1e6, 5e5, 2e6]),
    ),
    max_size=40,
)


@settings(max_examples=2000, deadline=None)
@given(samples_anyhow, st.sampled_from([1000.0, 1002.5, 1600.0]))
def test_keep_samples_is_the_plain_definition(samples: list[Sample], now: float) -> None:
    assert keep_samples(samples, now) == reference_keep_samples(samples, now)


@settings(max_examples=3000, deadline=None)
@given(
    samples_anyhow,
    st.builds(Sample, st.sampled_from([1000.0, 1002.5, 1600.0]), st.sampled_from([0.0, 90.0, 1e6, 3e6])),
    st.sampled_from([0.5, 5.0, 61.0, 200.0]),
)
def test_growth_rate_is_the_plain_definition(samples: list[Sample], current: Sample, min_span: float) -> None:
    assert growth_rate(samples, current, min_span) == reference_growth_rate(samples, current, min_span)


# --- samples known ordered (the daemon's per-container path) --------------------------------


@settings(max_examples=2000, deadline=None)
@given(samples_anyhow, st.sampled_from([990.0, 1000.0]), st.sampled_from([1000.0, 1002.5, 1600.0]))
def test_kept_with_is_keep_samples_of_past_and_current(
    samples: list[Sample], then: float, now: float
) -> None:
    """kept_with (one copy, on samples kept before) equals keep_samples of the past and the new
    sample, for kept (Ordered) pasts and for plain lists in any order."""
    current = Sample(now, 7.0)
    past = keep_samples(samples, then)
    assert isinstance(past, Ordered)
    for p in (past, samples):
        got = kept_with(p, current)
        assert got == keep_samples([*p, current], now)
        assert isinstance(got, Ordered) and got.upto == now


@settings(max_examples=3000, deadline=None)
@given(
    samples_anyhow,
    st.sampled_from([990.0, 1000.0, 1002.5]),
    st.builds(Sample, st.sampled_from([1000.0, 1002.5, 1600.0]), st.sampled_from([0.0, 90.0, 1e6, 3e6])),
)
def test_growth_rate_of_kept_samples_is_the_plain_definition(
    samples: list[Sample], then: float, current: Sample
) -> None:
    """growth_rate takes samples kept before (Ordered: no sort, no check) as it takes any."""
    kept = keep_samples(samples, then)
    assert growth_rate(kept, current) == reference_growth_rate(list(kept), current)


@settings(max_examples=3000, deadline=None)
@given(
    samples_anyhow,
    st.sampled_from([990.0, 1000.0, 1002.5]),
    st.builds(Sample, st.sampled_from([1000.0, 1002.5, 1600.0]), st.sampled_from([0.0, 90.0, 1e6, 3e6])),
)
def test_advance_is_growth_rate_and_kept_with(samples: list[Sample], then: float, current: Sample) -> None:
    """The one-pass `advance` gives what growth_rate and kept_with give, for kept (Ordered)
    pasts (its own path, ties with `current` included) and for plain lists in any order."""
    kept = keep_samples(samples, then)
    for past in (kept, samples):
        rate, keep = advance(past, current)
        assert rate == growth_rate(past, current)
        assert keep == kept_with(past, current)
        assert isinstance(keep, Ordered) and keep.upto == current.at


def test_the_daemon_walk_keeps_rates_and_samples_of_the_plain_path() -> None:
    """Cycle after cycle as _per_container runs them (recall_samples_many hands back what was
    kept, untrimmed for the new time; the rate; kept_with; remember_samples_many), against the
    plain path (recall_samples, growth_rate, keep_samples, remember_samples) on another memory."""
    fast, plain = DictMemory(), DictMemory()
    values = [100.0, 120.0, 150.0, 15.0, 30.0, 60.0, 60.0, 900.0, 950.0]
    at = 1000.0
    for i in range(200):
        at += 10.0 if i % 17 else 130.0  # now and then a cycle late (beyond the window)
        current = Sample(at, values[i % len(values)] * (1 + i // len(values)))
        (past,) = recall_samples_many(fast, ["k"], at)
        rate, keep = advance(past, current)
        remember_samples_many(fast, [("k", keep)])
        old = recall_samples(plain, "k", at)
        assert rate == growth_rate(old, current)
        remember_samples(plain, "k", keep_samples([*old, current], at))
        assert fast.recall("k") == plain.recall("k")


def test_samples_stored_as_pairs_come_back_exactly_from_the_file(tmp_path: Path) -> None:
    """Samples are stored as they are kept (pairs, not copied into lists); the file holds them as
    JSON arrays, and a process that loads it recalls the very same numbers."""
    path = tmp_path / "memory.json"
    mine = FileMemory(path)
    kept = keep_samples([Sample(1000.0 + i * 10.1, 1e6 / 3 + i) for i in range(9)], 1090.9)
    remember_samples_many(mine, [("a", kept)])
    remember_samples(mine, "b", [Sample(1.5, 2.25)])
    mine.flush()
    other = FileMemory(path)
    assert recall_samples(other, "a", 1090.9) == kept
    assert recall_samples(other, "b", 2.0) == [Sample(1.5, 2.25)]
    assert recall_samples_many(mine, ["a"], 1090.9) == [kept]  # this process: the list it kept
    assert recall_samples_many(mine, ["a"], 1090.9)[0] is kept
