"""The fd scan's totals kept incrementally (limits_totals) against a count from nothing, after
every step of random histories: processes come, change (fds, threads, watches, pipes, uid,
container) and go; records are kept as the scan keeps them (the same object while unchanged,
the same watch tuple when a refresh found the same watches)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from hypothesis import given, settings
from hypothesis import strategies as st

from remediator.probes.limits_dedup import EpollFd, InotifyFd
from remediator.probes.limits_fdscan import ConsumerProc, ProcRecord
from remediator.probes.limits_parse import ProcStatus, WatchSet
from remediator.probes.limits_totals import PIPE_DEF_PAGES, Totals

WATCHES = [WatchSet(1, 11), WatchSet(3, 33), WatchSet(8, 88)]


def record(fds: int, threads: int, uid: int, container: str | None, inotify: int, pipes: int) -> ProcRecord:
    return ProcRecord(
        starttime=1,
        fd_count=fds,
        fds=fds,
        inotify=tuple((3 + i, WATCHES[i % 3]) for i in range(inotify)),
        epoll=((9, WATCHES[0]),) if fds % 2 else (),
        pipes=frozenset(range(100 + pipes, 100 + 2 * pipes)),  # some pipes shared between pids
        status=ProcStatus("tail" if inotify == 0 else "p", (uid, uid, uid, uid), threads),
        container_id=container,
        attributed=True,
    )


records = st.builds(
    record,
    st.integers(0, 50),
    st.integers(1, 9),
    st.sampled_from([0, 1000]),
    st.sampled_from([None, "a" * 64, "b" * 64]),
    st.integers(0, 3),
    st.integers(0, 3),
)
# (pid, None: it goes | a new record | "cpu": only its CPU time moved, same watches)
steps = st.lists(st.tuples(st.integers(1, 12), st.one_of(st.none(), records, st.just("cpu"))), max_size=60)


def consumer(pid: int) -> Callable[[ProcRecord], ConsumerProc | None]:
    def of(rec: ProcRecord) -> ConsumerProc | None:
        if rec.status.name != "tail":
            return None
        return ConsumerProc(pid, rec.starttime, rec.status.name, rec.status.euid, bool(rec.inotify), None)

    return of


def from_nothing(current: dict[int, ProcRecord]) -> Totals:
    fresh = Totals()
    for pid, rec in sorted(current.items()):
        fresh.count(pid, rec, consumer(pid))
    return fresh


def key(f: InotifyFd | EpollFd) -> tuple[object, ...]:
    return (f.pid, f.fd, f.uid, f.signature)


@settings(max_examples=400, deadline=None)
@given(steps)
def test_kept_totals_are_the_totals_of_the_records(history: list[tuple[int, object]]) -> None:
    kept, current = Totals(), dict[int, ProcRecord]()
    for pid, step in history:
        if step is None:
            current.pop(pid, None)
            kept.drop(pid)
        else:
            old = current.get(pid)
            if step == "cpu":
                if old is None:
                    continue
                rec = dataclasses.replace(old, runtime_ns=old.runtime_ns + 1)  # same watch tuple
            else:
                assert isinstance(step, ProcRecord)
                rec = step
            current[pid] = rec
            kept.count(pid, rec, consumer(pid))
        fresh = from_nothing(current)
        assert (kept.fds, kept.usage, kept.in_containers) == (fresh.fds, fresh.usage, fresh.in_containers)
        assert kept.consumers == fresh.consumers
        (ki, ke), (fi, fe) = kept.anon_fds(), fresh.anon_fds()
        assert list(map(key, ki)) == list(map(key, fi)) and list(map(key, ke)) == list(map(key, fe))
        assert kept.pipe_pages_by_uid() == fresh.pipe_pages_by_uid()
        assert sum(fresh.pipe_pages_by_uid().values()) == PIPE_DEF_PAGES * len(
            set().union(*(r.pipes for r in current.values()))
        )


def test_the_same_watches_keep_the_same_fd_objects_and_lists() -> None:
    """A record that changed only its CPU time (a refresh found the same watches) keeps its fd
    objects, and the lists of all fds stay the very same tuples (the grouping's reuse)."""
    totals = Totals()
    rec = record(10, 1, 0, None, 2, 1)
    totals.count(7, rec, consumer(7))
    before = totals.anon_fds()
    totals.count(7, dataclasses.replace(rec, runtime_ns=5), consumer(7))
    assert all(a is b for a, b in zip(totals.anon_fds(), before, strict=True))
    watches = ((3, WatchSet(2, 22)), *rec.inotify[1:])  # a watch added: new fd objects
    totals.count(7, dataclasses.replace(rec, inotify=watches), consumer(7))
    assert totals.anon_fds()[0] is not before[0]
    assert [len(f.watches) for f in totals.anon_fds()[0]] == [2, 3]
