"""The recreate procedure as a journalled state machine (docs/recreate.md).

Phases, each written to the journal *before* it is taken (so after a kill -9 the journal names
the phase that may have half-happened):

    stopping_dependents (only with dependents) stop them; their ids are journalled
    creating        create the copy under a temporary name "<name>.rmd-<nonce>"
    created         (its id is recorded) connect its other networks; diff its configuration
    stopping_old    stop the original (its own StopTimeout, else the policy's)
    copying_volumes copy each anonymous volume's data into the copy's own anonymous volume
    renaming_old    rename the original aside, "<name>.rmd-old-<nonce>"
    renaming_copy   give the copy the original name
    starting_copy   start it
    settling        watch it: running, not restarting, healthy when it has a healthcheck;
                    diff its configuration again
    removing_old    remove the original (and its anonymous volumes, whose data the copy has)
    rolling_back    undo: remove the copy, rename the original back, start it

Undo never goes by name: the copy is removed only by the id this procedure recorded, or, when
the crash came between the create call and recording its answer, by the id of the container
holding the temporary name, a name with a random nonce written to the journal before the
create. The original is never removed before the copy has settled, so any failure and any
crash leaves exactly one of them serving under the name.

Recovery (`recover`): an entry left in `removing_old` is finished (the copy had settled);
any earlier phase is rolled back.
"""

from __future__ import annotations

import os
import secrets
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog

from remediator.actions.base import Journal
from remediator.actions.docker_config import (
    AnonymousVolume,
    CreateSpec,
    anonymous_volumes,
    configuration,
    differences,
    has_healthcheck,
    name_of,
)
from remediator.actions.docker_engine import DockerEngine
from remediator.clock import Clock

log = structlog.get_logger(__name__)

PHASES = (
    "stopping_dependents",
    "creating",
    "created",
    "stopping_old",
    "copying_volumes",
    "renaming_old",
    "renaming_copy",
    "starting_copy",
    "settling",
    "removing_old",
)
ROLLING_BACK = "rolling_back"
# How often the settle watch inspects the copy. Half a second sees a crash loop's first restart
# (Docker waits 100 ms, then doubles) and costs two small API calls a second.
WATCH_POLL_SECONDS = 0.5
# cp -a of an anonymous volume: bounded by the size check before acting; this bounds a hang.
COPY_TIMEOUT_SECONDS = 600


class RecreateFailed(Exception):
    """A step failed; the message says which and why. The caller rolls back."""


def temp_names(name: str, nonce: str | None = None) -> tuple[str, str]:
    """(the copy's temporary name, the original's aside name). The nonce makes the temporary
    name one nobody else can have chosen: holding it proves a container is this run's copy."""
    nonce = nonce or secrets.token_hex(6)
    return f"{name}.rmd-{nonce}", f"{name}.rmd-old-{nonce}"


def copy_tree(src: str, dst: str) -> None:
    """Copy a volume's data with owners, modes, links, xattrs and sparse files (cp -a)."""
    if any(os.scandir(dst)):
        # A fresh anonymous volume is empty; content here would be merged with the original's.
        raise RecreateFailed(f"the copy's volume {dst} is not empty")
    result = subprocess.run(
        ["cp", "-a", "--reflink=auto", "--", f"{src}/.", dst],
        capture_output=True,
        text=True,
        timeout=COPY_TIMEOUT_SECONDS,
        check=False,
    )
    if result.returncode:
        raise RecreateFailed(f"copying volume data {src} -> {dst}: {result.stderr.strip()}")


def tree_size(root: str, limit: int) -> int:
    """Bytes under `root` (apparent sizes, no link following), stopping once over `limit`."""
    total = 0
    stack = [Path(root)]
    while stack and total <= limit:
        with os.scandir(stack.pop()) as it:
            for entry in it:
                st = entry.stat(follow_symlinks=False)
                total += st.st_size
                if entry.is_dir(follow_symlinks=False):
                    stack.append(Path(entry.path))
    return total


@dataclass
class Recreation:
    """One recreate in progress. `data()` is what the journal holds: enough to undo or finish
    it from another process."""

    engine: DockerEngine
    journal: Journal
    clock: Clock
    old_id: str
    name: str
    temp_name: str
    aside_name: str
    started: float
    new_id: str | None = None
    phase: str = "begin"
    group: str | None = None  # the target's id: a target and its dependents recover together
    spec: CreateSpec | None = None
    # Dependents this group stopped before the target (journalled, so a rollback after a crash
    # starts them again even if it never got to recreate them).
    stopped: list[str] = field(default_factory=list)
    steps: list[str] = field(default_factory=list)

    def data(self) -> dict[str, Any]:
        return {
            "old_id": self.old_id,
            "name": self.name,
            "temp_name": self.temp_name,
            "aside_name": self.aside_name,
            "new_id": self.new_id,
            "started": self.started,
            "group": self.group or self.old_id,
            "stopped_dependents": list(self.stopped),
        }

    @classmethod
    def from_journal(
        cls, engine: DockerEngine, journal: Journal, clock: Clock, phase: str, data: Mapping[str, Any]
    ) -> Recreation:
        return cls(
            engine,
            journal,
            clock,
            old_id=str(data["old_id"]),
            name=str(data["name"]),
            temp_name=str(data["temp_name"]),
            aside_name=str(data["aside_name"]),
            started=float(data.get("started") or 0.0),
            new_id=data.get("new_id"),
            phase=phase,
            group=data.get("group"),
            stopped=list(data.get("stopped_dependents") or []),
        )

    def enter(self, phase: str) -> None:
        self.phase = phase
        self.journal.record(phase, self.data(), at=self.clock.now())

    # the way forward ----------------------------------------------------------------------
    def run(
        self,
        old: Mapping[str, Any],
        spec: CreateSpec,
        *,
        stop_timeout: int,
        watch_for: float,
        health_timeout: float,
    ) -> dict[str, Any]:
        """Do the whole procedure; return the copy's final inspect. Raises RecreateFailed (or
        an adapter error) with the state as the journal says: the caller rolls back."""
        e = self.engine
        self.enter("creating")
        self.new_id = e.create(spec.body, self.temp_name)
        self.enter("created")
        self.steps.append(f"created copy {self.new_id[:12]} as {self.temp_name}")
        for network, endpoint in spec.extra_networks.items():
            e.connect(self.new_id, network, endpoint)
            self.steps.append(f"connected {network}")
        self._check_same(old, e.inspect(self.new_id), "before touching the original")

        self.enter("stopping_old")
        e.stop(self.old_id, stop_timeout)
        self.steps.append(f"stopped original (timeout {stop_timeout}s)")

        copy_attrs = e.inspect(self.new_id)
        volumes = _pair_volumes(anonymous_volumes(old), anonymous_volumes(copy_attrs))
        if volumes:
            self.enter("copying_volumes")
            for src, dst in volumes:
                copy_tree(src.source, dst.source)
                self.steps.append(f"copied anonymous volume {src.destination}")

        self.enter("renaming_old")
        e.rename(self.old_id, self.aside_name)
        self.steps.append(f"renamed original to {self.aside_name}")
        self.enter("renaming_copy")
        e.rename(self.new_id, self.name)
        self.steps.append(f"renamed copy to {self.name}")
        self.enter("starting_copy")
        e.start(self.new_id)
        self.steps.append("started copy")

        self.enter("settling")
        problem = self.watch(watch_for, health_timeout)
        if problem is not None:
            raise RecreateFailed(problem)
        final = e.inspect(self.new_id)
        self._check_same(old, final, "after it started")
        self.steps.append(f"copy settled ({watch_for:g}s)")
        return final

    def commit(self) -> str | None:
        """Remove the original; None when done, else what went wrong (the copy serves)."""
        if self.phase != "removing_old":
            self.enter("removing_old")
        try:
            if self.engine.find(self.old_id) is not None:
                # volumes=True: `docker rm -v` takes exactly its anonymous volumes, whose data
                # the copy now holds in its own; named volumes and binds are never removed.
                self.engine.remove(self.old_id, volumes=True)
        except Exception as exc:  # the copy runs; the original lingers, stopped, aside
            self.journal.close("applied: original kept", at=self.clock.now())
            return f"original kept as {self.aside_name}: {exc}"
        self.journal.close("applied", at=self.clock.now())
        return None

    def _check_same(self, old: Mapping[str, Any], new: Mapping[str, Any], when: str) -> None:
        diff = differences(configuration(old), configuration(new, extra_own=[self.temp_name]))
        if diff:
            raise RecreateFailed(
                f"the copy's configuration differs {when}: {'; '.join(diff[:5])}"
                + (f" (+{len(diff) - 5} more)" if len(diff) > 5 else "")
            )

    def watch(self, period: float, health_timeout: float) -> str | None:
        """None once the copy has run for `period` without exiting, restarting or turning
        unhealthy, and (with a healthcheck) is healthy; else what is wrong. Bounded by
        max(period, health_timeout)."""
        assert self.new_id is not None
        start = self.clock.now()
        first = self.engine.inspect(self.new_id)
        restarts = int(first.get("RestartCount") or 0)
        needs_health = has_healthcheck(first)
        deadline = start + max(period, health_timeout if needs_health else period)
        while True:
            attrs = self.engine.inspect(self.new_id)
            state = attrs.get("State") or {}
            if not state.get("Running"):
                error = f", {state['Error']}" if state.get("Error") else ""
                return f"the copy exited (code {state.get('ExitCode')}{error})"
            if state.get("Restarting") or int(attrs.get("RestartCount") or 0) > restarts:
                return "the copy is restarting"
            health = (state.get("Health") or {}).get("Status")
            if health == "unhealthy":
                return "the copy is unhealthy"
            now = self.clock.now()
            if now - start >= period and (not needs_health or health == "healthy"):
                return None
            if now >= deadline:
                return f"the copy did not become healthy within {max(period, health_timeout):g}s"
            self.clock.sleep(WATCH_POLL_SECONDS)

    # the way back -------------------------------------------------------------------------
    def rollback(self) -> list[str]:
        """Remove the copy (by id), give the original its name back, start it. Idempotent, and
        reads the state instead of assuming it, so it also undoes what a crash half-did."""
        done = self.discard_copy()
        if not any(d.startswith("the original") for d in done):
            done += self.restore_original()
        self.journal.close("rolled back", at=self.clock.now())
        return done

    def discard_copy(self) -> list[str]:
        """First half of a rollback: remove the copy, only by the id this run recorded (or
        the journalled temporary name's holder). If the original is gone, keep the copy."""
        self.enter(ROLLING_BACK)
        e, done = self.engine, []
        try:
            old = e.find(self.old_id)
        except Exception as exc:
            return [f"COULD NOT inspect the original: {exc}"]
        if old is None:
            # Only the commit removes the original; if it is gone, the copy is all there is:
            # keep it serving rather than leave nothing.
            done.append(f"the original {self.old_id[:12]} is gone: kept the copy")
            copy = e.find(self.new_id) if self.new_id else None
            if copy is not None:
                if name_of(copy) != self.name and e.find(self.name) is None:
                    e.rename(str(copy["Id"]), self.name)
                    done.append(f"renamed copy to {self.name}")
                if not (copy.get("State") or {}).get("Running"):
                    e.start(str(copy["Id"]))
                    done.append("started copy")
            return done
        copy_id = self.new_id
        if copy_id is None:
            # The create may have happened with its answer lost: the temporary name's holder is
            # this run's copy (the nonce was journalled before the create).
            holder = e.find(self.temp_name)
            copy_id = str(holder["Id"]) if holder is not None else None
        if copy_id is not None and copy_id != self.old_id:
            try:
                if e.find(copy_id) is not None:
                    e.remove(copy_id, volumes=True, force=True)
                    done.append(f"removed copy {copy_id[:12]}")
            except Exception as exc:
                done.append(f"COULD NOT remove copy {copy_id[:12]}: {exc}")
        return done

    def restore_original(self) -> list[str]:
        """Second half: the original gets its name back and runs again."""
        e, done = self.engine, []
        old = e.find(self.old_id)
        if old is None:
            return [f"COULD NOT restore: the original {self.old_id[:12]} is gone"]
        if name_of(old) != self.name:
            holder = e.find(self.name)
            if holder is None:
                try:
                    e.rename(self.old_id, self.name)
                    done.append(f"renamed original back to {self.name}")
                except Exception as exc:
                    done.append(f"COULD NOT rename the original back to {self.name}: {exc}")
            else:
                # Someone else's container took the name meanwhile: never touch it. The original
                # still runs, under its aside name.
                done.append(
                    f"COULD NOT rename the original back: {self.name} is now held by "
                    f"{str(holder['Id'])[:12]}, not ours; original runs as {name_of(old)}"
                )
        if not (old.get("State") or {}).get("Running"):
            try:
                e.start(self.old_id)
                done.append("started original")
            except Exception as exc:
                done.append(f"COULD NOT start the original: {exc}")
        return done


def rollback_group(jobs: Sequence[Recreation]) -> list[str]:
    """Undo a target and its dependents together: every copy goes first (newest first), then
    the originals come back, the target first (a dependent's original joins its namespaces)."""
    done: list[str] = []
    kept: set[int] = set()
    for i in reversed(range(len(jobs))):
        out = jobs[i].discard_copy()
        if any(d.startswith("the original") for d in out):
            kept.add(i)
        done += [f"{jobs[i].name}: {d}" for d in out] if len(jobs) > 1 else out
    for i, job in enumerate(jobs):
        if i not in kept:
            out = job.restore_original()
            done += [f"{job.name}: {d}" for d in out] if len(jobs) > 1 else out
    # Dependents stopped for the target but never recreated: their target is back, so are they.
    recreated = {job.old_id for job in jobs}
    for did in (d for job in jobs for d in job.stopped if d not in recreated):
        e = jobs[0].engine
        try:
            attrs = e.find(did)
            if attrs is not None and not (attrs.get("State") or {}).get("Running"):
                e.start(did)
                done.append(f"started dependent {name_of(attrs)}")
        except Exception as exc:
            done.append(f"COULD NOT start dependent {did[:12]}: {exc}")
    for job in jobs:
        job.journal.close("rolled back", at=job.clock.now())
    return done


def commit_group(jobs: Sequence[Recreation]) -> list[str]:
    """Every copy has settled: mark them all committed first, then remove the originals.
    Recovery finishes a group as soon as one of its entries says `removing_old`."""
    for job in jobs:
        job.enter("removing_old")
    return [f"{job.name}: {problem}" for job in jobs if (problem := job.commit()) is not None]


def _pair_volumes(
    old: Sequence[AnonymousVolume], new: Sequence[AnonymousVolume]
) -> list[tuple[AnonymousVolume, AnonymousVolume]]:
    by_dst = {v.destination: v for v in new}
    pairs = []
    for v in old:
        other = by_dst.get(v.destination)
        if other is None:
            raise RecreateFailed(f"the copy has no anonymous volume at {v.destination}")
        if not (v.source and other.source):
            raise RecreateFailed(f"anonymous volume at {v.destination} has no local data path")
        pairs.append((v, other))
    return pairs


def recover_group(
    engine: DockerEngine, clock: Clock, entries: Sequence[tuple[Journal, str, Mapping[str, Any]]]
) -> tuple[bool, list[str]]:
    """Finish or undo an interrupted recreate: one container, or a target and its dependents
    (one journal entry each, oldest first, the target first). Forward when any entry reached
    `removing_old` (every copy had settled before the first was marked); else back."""
    jobs = [Recreation.from_journal(engine, j, clock, phase, data) for j, phase, data in entries]
    if any(phase == "removing_old" for _, phase, _ in entries):
        problems = [p for job in jobs if (p := job.commit()) is not None]
        return True, problems or [f"removed the original {job.old_id[:12]}" for job in jobs]
    return False, rollback_group(jobs)
