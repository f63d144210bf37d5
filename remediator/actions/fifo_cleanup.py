"""`clean-fifos`: remove containerd FIFO directories the `fifos` probe found orphaned.

Not disruptive, and safe by construction rather than by the probe's word alone:

* `plan()` (pure) takes the orphans listed in the `fifos` reading, oldest first, keeps those
  older than `minAge` at planning time, and caps the batch at `maxDirs`.
* `recheck()` confirms the fifo root is still a directory on the planned device.
* `apply()` opens the fifo root once with O_NOFOLLOW and works only through directory file
  descriptors (openat/fstatat/unlinkat), so a path component swapped for a symlink after
  planning is never followed and nothing outside the root is reachable. It asks containerd
  for its known ids once and scans /proc for open FIFOs once, then for each planned directory,
  right before touching it: opens it with O_NOFOLLOW|O_DIRECTORY relative to the root, checks
  it is the same inode on the same device as planned, re-reads its entries and re-applies the
  whole orphan rule (`probes.fifos.judge_static` and `judge_dynamic`) with the FIFO names
  exactly those planned. Only then it unlinks those FIFOs and rmdirs the directory; rmdir
  refuses a directory that gained an entry in between, which counts as skipped. No recursive
  removal, no path-based removal, no crossing of devices.

Remaining race, accepted: between the re-check of a FIFO and its unlink (microseconds), a
process could open it or replace it. Inside a root-only (0700) directory that nobody has
touched for `minAge` and whose id containerd does not know, nobody has a reason to.
"""

from __future__ import annotations

import errno
import os
import stat
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import structlog
from pydantic import Field, field_validator

from remediator.actions.base import Action, ActionParams, ApplyContext, PlanContext, register
from remediator.model import ActionResult, Outcome, Plan, Reading, Target, TargetKind
from remediator.probes.fifos import (
    DIR_FLAGS,
    MAX_ENTRIES,
    MAX_TASK_QUERIES,
    CtrCli,
    CtrRunner,
    Keep,
    KnownIds,
    OrphanDir,
    containerd_sockets,
    judge_dynamic,
    judge_static,
    open_dir_at,
    parse_fifo_name,
    query_known_ids,
    scan_open_fifos,
    snapshot_open_dir,
)
from remediator.quantity import DURATION_HELP, parse_duration

log = structlog.get_logger(__name__)


class CleanFifosParams(ActionParams):
    # Directories (and every FIFO in them) younger than this are never removed: containerd
    # clients create the FIFO set before the task starts. The probe already leaves out anything
    # younger than its own 10m, so a smaller value has no effect beyond that floor.
    minAge: str = Field(default="10m", description=f"minimum age, {DURATION_HELP}")
    # The batch bound per run: 1000 directories are 4000 inodes and take ~0.06 s to re-check and
    # remove (benchmarks/fifo_cleanup.py: ~55 us per directory); the leak of the case report
    # grew by ~2600 directories an hour, so a run every few minutes keeps up while one run, and
    # the plan the audit log stores (~300 bytes per directory), stay small.
    maxDirs: int = Field(default=1000, ge=1, le=100_000, description="directories per run")

    @field_validator("minAge")
    @classmethod
    def _duration(cls, v: str) -> str:
        parse_duration(v)
        return v

    @property
    def min_age_seconds(self) -> float:
        return parse_duration(self.minAge)


def _fifos_reading(ctx: PlanContext) -> Reading | None:
    if "fifos" in ctx.readings:
        return ctx.readings["fifos"]
    return ctx.reading if ctx.reading.probe == "fifos" else None


def _inode_usage(path: str) -> dict[str, int]:
    vfs = os.statvfs(path)
    return {"inodes_used": vfs.f_files - vfs.f_ffree, "inodes_free": vfs.f_ffree}


def _plain_name(name: str) -> bool:
    """One path component: a planned name must not walk out of the root (plans are stored)."""
    return bool(name) and name not in (".", "..") and "/" not in name and "\0" not in name


@dataclass
class _Tally:
    removed: int = 0
    fifos: int = 0
    skipped: Counter[str] = field(default_factory=Counter)

    def skip(self, reason: Keep) -> None:
        self.skipped[reason.value] += 1

    @property
    def skipped_total(self) -> int:
        return sum(self.skipped.values())


@register
class CleanFifos(Action):
    name = "clean-fifos"
    help = (
        "Remove orphaned containerd FIFO directories under <run>/containerd/fifo (the fifos "
        "probe's orphans), re-checking each through directory file descriptors first"
    )
    Params = CleanFifosParams
    disruptive = False

    def __init__(
        self,
        ctr: CtrRunner | None = None,
        max_entries: int = MAX_ENTRIES,
        max_task_queries: int = MAX_TASK_QUERIES,
    ) -> None:
        self.ctr: CtrRunner = ctr if ctr is not None else CtrCli()
        self.max_entries = max_entries
        self.max_task_queries = max_task_queries

    # -- plan (pure) ----------------------------------------------------------------------------

    def plan(self, ctx: PlanContext) -> Plan | str:
        params = ctx.params
        if not isinstance(params, CleanFifosParams):
            raise TypeError(f"clean-fifos got {type(params).__name__}")
        reading = _fifos_reading(ctx)
        if reading is None:
            return "no fifos reading this cycle"
        if reading.error:
            return f"the fifos probe failed: {reading.error}"
        detail = reading.detail
        if "dev" not in detail or not detail.get("orphans"):
            check = detail.get("orphan_check", "complete")
            return f"no orphaned fifo dirs (orphan check {check})"
        try:
            orphans = [OrphanDir.from_dict(o) for o in detail["orphans"]]
        except ValueError as e:
            return f"unusable fifos reading: {e}"
        min_age = params.min_age_seconds
        chosen = [o for o in orphans if ctx.now - o.mtime >= min_age][: params.maxDirs]
        if not chosen:
            return f"no orphaned fifo dirs older than {params.minAge}"
        root = str(detail["root"])
        inodes = sum(1 + len(o.fifos) for o in chosen)
        return Plan(
            action=self.name,
            target=Target(TargetKind.PATH, id=root, name=root, detail={"device": detail.get("device")}),
            summary=f"remove {len(chosen)} orphaned fifo dirs ({inodes} inodes) under {root}",
            params={"minAge": params.minAge, "maxDirs": params.maxDirs},
            expect={
                "root": root,
                "dev": int(detail["dev"]),
                "min_age": min_age,
                "dirs": [o.to_dict() for o in chosen],
            },
        )

    # -- re-check, apply, verify ------------------------------------------------------------------

    def recheck(self, plan: Plan, ctx: ApplyContext) -> str | None:
        root = plan.expect["root"]
        try:
            st = os.lstat(root)
        except FileNotFoundError:
            return f"{root} no longer exists"
        if not stat.S_ISDIR(st.st_mode):
            return f"{root} is no longer a directory"
        if st.st_dev != plan.expect["dev"]:
            return f"{root} is on another device than planned"
        return None

    def apply(self, plan: Plan, ctx: ApplyContext) -> ActionResult:
        root: str = plan.expect["root"]
        dirs = [OrphanDir.from_dict(d) for d in plan.expect["dirs"]]
        before = {**_inode_usage(root), "planned_dirs": len(dirs)}
        rootfd = os.open(root, DIR_FLAGS)  # a symlink in the root's place fails here
        try:
            root_dev = os.fstat(rootfd).st_dev
            if root_dev != plan.expect["dev"]:
                message = f"{root} is on another device than planned"
                return ActionResult(Outcome.SKIPPED, message, before)
            # One containerd query and one /proc scan per run, not per directory.
            wanted = frozenset(i for d in dirs for f in d.fifos if (i := parse_fifo_name(f)) is not None)
            known = self._known_ids(ctx, wanted)
            if not known.complete:
                return ActionResult(
                    Outcome.SKIPPED,
                    "containerd could not be asked which ids it knows: " + "; ".join(known.errors),
                    before,
                )
            open_fifos = scan_open_fifos(ctx.host.proc, {root_dev})
            if not open_fifos.complete:
                return ActionResult(
                    Outcome.SKIPPED, f"cannot tell which fifos are open: {open_fifos.error}", before
                )
            tally = _Tally()
            now = ctx.clock.now()
            min_age = float(plan.expect["min_age"])
            for d in dirs:
                reason = self._remove_one(
                    rootfd,
                    root_dev,
                    d,
                    now=now,
                    min_age=min_age,
                    open_fifos=open_fifos.keys,
                    known=known.ids,
                    tally=tally,
                )
                if reason is not None:
                    tally.skip(reason)
                    log.debug("fifo_dir_skipped", root=root, dir=d.name, reason=reason.value)
        finally:
            os.close(rootfd)
        after = {
            **_inode_usage(root),
            "removed_dirs": tally.removed,
            "removed_fifos": tally.fifos,
            "skipped_dirs": tally.skipped_total,
            "skipped": dict(sorted(tally.skipped.items())),
        }
        message = (
            f"removed {tally.removed} orphaned fifo dirs ({tally.removed + tally.fifos} inodes) under {root}"
        )
        if tally.skipped:
            reasons = ", ".join(f"{k}: {v}" for k, v in sorted(tally.skipped.items()))
            message += f"; skipped {tally.skipped_total} ({reasons})"
        log.info("fifo_cleanup_done", root=root, before=before, after=after)
        outcome = Outcome.APPLIED if tally.removed else Outcome.SKIPPED
        return ActionResult(outcome, message, before, after)

    def _known_ids(self, ctx: ApplyContext, wanted: frozenset[str]) -> KnownIds:
        sockets = containerd_sockets(ctx.host)
        return query_known_ids(self.ctr, sockets, wanted, self.max_task_queries)

    def _remove_one(
        self,
        rootfd: int,
        root_dev: int,
        planned: OrphanDir,
        *,
        now: float,
        min_age: float,
        open_fifos: frozenset[tuple[int, int]],
        known: frozenset[str],
        tally: _Tally,
    ) -> Keep | None:
        """Re-check one directory through `rootfd` and remove it. Returns why not, or None."""
        if not _plain_name(planned.name):
            return Keep.CHANGED
        try:
            dfd = open_dir_at(rootfd, planned.name)
        except FileNotFoundError:
            return Keep.GONE
        except NotADirectoryError:
            try:
                st = os.stat(planned.name, dir_fd=rootfd, follow_symlinks=False)
            except FileNotFoundError:
                return Keep.GONE
            return Keep.SYMLINK if stat.S_ISLNK(st.st_mode) else Keep.NOT_A_DIRECTORY
        except OSError as e:
            log.warning("fifo_dir_unreadable", dir=planned.name, error=e.strerror)
            return Keep.UNREADABLE
        try:
            snap = snapshot_open_dir(dfd, planned.name, self.max_entries)
            if (snap.dev, snap.ino) != (planned.dev, planned.ino):
                return Keep.CHANGED
            reason = judge_static(
                snap, root_dev=root_dev, now=now, min_age=min_age, max_entries=self.max_entries
            )
            if reason is not None:
                return reason
            # Same FIFO names and the same newest mtime too: inode numbers alone are reused
            # at once on ext4 after an rmdir (tmpfs hands out increasing ones).
            if sorted(x.name for x in snap.entries) != sorted(planned.fifos):
                return Keep.CHANGED
            if snap.newest_mtime != planned.mtime:
                return Keep.CHANGED
            reason = judge_dynamic(snap, open_fifos, known)
            if reason is not None:
                return reason
            for entry in snap.entries:
                try:
                    os.unlink(entry.name, dir_fd=dfd)
                except FileNotFoundError:
                    continue
                tally.fifos += 1
        finally:
            os.close(dfd)
        try:
            os.rmdir(planned.name, dir_fd=rootfd)
        except FileNotFoundError:
            return Keep.GONE
        except OSError as e:
            if e.errno in (errno.ENOTEMPTY, errno.EEXIST):
                return Keep.NOT_EMPTY
            if e.errno == errno.ENOTDIR:
                return Keep.CHANGED
            raise
        # No event per removed directory: a batch is up to maxDirs; fifo_cleanup_done counts them.
        tally.removed += 1
        return None

    def verify(self, plan: Plan, result: ActionResult, ctx: ApplyContext) -> ActionResult:
        """The removed directories are gone and the filesystem has fewer inodes in use."""
        root: str = plan.expect["root"]
        dirs = [OrphanDir.from_dict(d) for d in plan.expect["dirs"]]
        still_there = sum(1 for d in dirs if _same_inode(Path(root) / d.name, d))
        usage = _inode_usage(root)
        freed = int(result.before["inodes_used"]) - usage["inodes_used"]
        # Skipped directories may legitimately remain; removed ones must not.
        gone_ok = still_there <= int(result.after["skipped_dirs"])
        verified = gone_ok and freed > 0
        message = f"{result.message}; {freed} inodes freed"
        if not gone_ok:
            message += f"; {still_there} planned dirs still present"
        after = {**result.after, "inodes_freed": freed}
        return ActionResult(result.outcome, message, result.before, after, verified=verified)


def _same_inode(path: Path, d: OrphanDir) -> bool:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return False
    return (st.st_dev, st.st_ino) == (d.dev, d.ino)
