"""`clean-fifos`: judge and remove orphaned containerd FIFO directories, one pass per root.

Safe by construction rather than by the probe's word: the probe only counted (one listing per
root); this action is where every directory is judged, by the whole orphan rule
(`probes.fifo_rule`), right before it is removed:

* `plan()` (pure) picks the fifo roots of the reading whose orphan check was complete and whose
  estimate is above zero, and records each root's device and mount id.
* `recheck()` confirms each root is still a directory on the planned device.
* `apply()`, per root: opens it with O_NOFOLLOW and refuses it when its device or mount id is
  not the planned one (something mounted over it since the probe); asks the root's containerds
  which ids they know and scans /proc for open FIFOs (once each, right before the walk; when
  either is incomplete the root is skipped, fail closed); then `actions.fifo_walk.walk` lists the
  root once and, for each directory, reads it through its fd, judges it and removes it at once,
  re-checking every name against the judged inode right before each unlinkat/rmdir. At most
  `maxDirs` orphans per run. A directory that fails (EBUSY, EROFS, ...) is counted and the walk
  goes on. Nothing is removed recursively or by a path.

Declares `rechecks_target`: the engine does not re-read the whole probe before acting, since
the walk re-checks each directory itself (the whole-tree re-read was the second read of the
tree per cycle).
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path
from typing import Any

import structlog
from pydantic import Field, field_validator

from remediator.actions.base import Action, ActionParams, ApplyContext, PlanContext, register
from remediator.actions.fifo_walk import WalkTally, walk
from remediator.model import ActionResult, Outcome, Plan, Reading, Target, TargetKind
from remediator.probes.containerd import MAX_TASK_QUERIES, CtrCli, CtrRunner, query_known_ids
from remediator.probes.fifo_rule import MAX_ENTRIES, RuleInputs
from remediator.probes.fifo_scan import mount_id, open_root, scan_open_fifos
from remediator.probes.fifos import default_roots
from remediator.quantity import DURATION_HELP, parse_duration

log = structlog.get_logger(__name__)


class CleanFifosParams(ActionParams):
    # Directories (and every FIFO in them) younger than this are never removed: containerd
    # clients create the FIFO set before the task starts, and image unpacking can take minutes.
    minAge: str = Field(default="10m", description=f"minimum age, {DURATION_HELP}")
    # The bound per run. The walk costs ~20 us per directory (benchmarks/fifo_cleanup.py: the
    # case report's 126,064 dirs in ~2.5 s, about find -delete's time), and keeps counts only,
    # so the default lets one run clear a pile several times the case report's (systemd's
    # /run has 819,200 inodes: ~200,000 dirs) while still ending a runaway walk.
    maxDirs: int = Field(default=1_000_000, ge=1, le=100_000_000, description="directories per run")

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


def _inodes_used(path: str) -> int | None:
    try:
        vfs = os.statvfs(path)
    except OSError:
        return None
    return vfs.f_files - vfs.f_ffree


def _planned_root(d: Any) -> dict[str, Any] | None:
    """One root of the reading in the shape the plan stores, or None when it is not usable."""
    if not isinstance(d, dict) or d.get("orphan_check") != "complete" or not d.get("present"):
        return None
    path, sockets, dev = d.get("path"), d.get("sockets"), d.get("dev")
    if not isinstance(path, str) or not isinstance(dev, int) or not isinstance(sockets, list):
        return None
    if not all(isinstance(s, str) for s in sockets):
        return None
    mnt = d.get("mount_id")
    return {
        "path": path,
        "sockets": sockets,
        "dev": dev,
        "mount_id": mnt if isinstance(mnt, int) else None,
        "estimate": int(d.get("orphan_estimate") or 0),
    }


@register
class CleanFifos(Action):
    name = "clean-fifos"
    help = (
        "Remove orphaned containerd FIFO directories from the fifo roots (<run>/containerd/fifo), "
        "judging each by the whole orphan rule through directory fds right before removing it"
    )
    Params = CleanFifosParams
    disruptive = False
    rechecks_target = True

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
        listed = reading.detail.get("roots")
        if not isinstance(listed, list):
            return "unusable fifos reading: no roots"
        roots = [r for r in map(_planned_root, listed) if r is not None and r["estimate"] > 0]
        if not roots:
            check = reading.detail.get("orphan_check", "complete")
            return f"no orphaned fifo dirs (orphan check {check})"
        paths = ", ".join(r["path"] for r in roots)
        estimate = sum(r["estimate"] for r in roots)
        return Plan(
            action=self.name,
            target=Target(TargetKind.PATH, id=paths, name=paths),
            summary=(
                f"judge and remove orphaned fifo dirs under {paths} "
                f"(about {estimate} by the probe's estimate, at most {params.maxDirs})"
            ),
            params={"minAge": params.minAge, "maxDirs": params.maxDirs},
            expect={"roots": roots, "min_age": params.min_age_seconds, "max_dirs": params.maxDirs},
        )

    # -- re-check, apply, verify ------------------------------------------------------------------

    def recheck(self, plan: Plan, ctx: ApplyContext) -> str | None:
        for r in plan.expect["roots"]:
            root = r["path"]
            try:
                st = os.lstat(root)
            except FileNotFoundError:
                return f"{root} no longer exists"
            if not stat.S_ISDIR(st.st_mode):
                return f"{root} is no longer a directory"
            if st.st_dev != r["dev"]:
                return f"{root} is on another device than planned"
        return None

    def apply(self, plan: Plan, ctx: ApplyContext) -> ActionResult:
        roots: list[dict[str, Any]] = plan.expect["roots"]
        before: dict[str, Any] = {"inodes_used": {r["path"]: _inodes_used(r["path"]) for r in roots}}
        min_age = float(plan.expect["min_age"])
        budget = int(plan.expect["max_dirs"])
        per_root: dict[str, dict[str, Any]] = {}
        skipped: dict[str, str] = {}
        total = WalkTally()
        for r in roots:
            path = r["path"]
            tally_or_reason = self._clean_root(r, ctx, min_age, budget - total.orphans)
            if isinstance(tally_or_reason, str):
                skipped[path] = tally_or_reason
                log.warning("fifo_root_skipped", root=path, reason=tally_or_reason)
                continue
            t = tally_or_reason
            per_root[path] = t.to_dict()
            total.entries += t.entries
            total.orphans += t.orphans
            total.removed_dirs += t.removed_dirs
            total.removed_fifos += t.removed_fifos
            total.marked += t.marked
            total.kept.update(t.kept)
            total.failed.update(t.failed)
            total.stopped_at_max |= t.stopped_at_max
        after: dict[str, Any] = {
            "inodes_used": {r["path"]: _inodes_used(r["path"]) for r in roots},
            "removed_dirs": total.removed_dirs,
            "removed_fifos": total.removed_fifos,
            "kept_dirs": sum(total.kept.values()),
            "failed_dirs": total.failed_total,
            "kept": dict(sorted(total.kept.items())),
            "failed": dict(sorted(total.failed.items())),
            "roots": per_root,
            "skipped_roots": skipped,
        }
        inodes = total.removed_dirs + total.removed_fifos
        message = f"removed {total.removed_dirs} orphaned fifo dirs ({inodes} inodes)"
        if total.kept:
            message += "; kept " + ", ".join(f"{k}: {v}" for k, v in sorted(total.kept.items()))
        if total.failed:
            message += "; failed " + ", ".join(f"{k}: {v}" for k, v in sorted(total.failed.items()))
        if total.stopped_at_max:
            message += f"; stopped at maxDirs {budget}"
        for path, reason in skipped.items():
            message += f"; {path} skipped: {reason}"
        log.info("fifo_cleanup_done", before=before, after=after)
        # Failed only when directories failed and none could be removed: a partial success is
        # APPLIED, with its failures in the result.
        if total.removed_dirs:
            outcome = Outcome.APPLIED
        elif total.failed:
            outcome = Outcome.FAILED
        else:
            outcome = Outcome.SKIPPED
        return ActionResult(outcome, message, before, after)

    def _clean_root(
        self, r: dict[str, Any], ctx: ApplyContext, min_age: float, budget: int
    ) -> WalkTally | str:
        """Walk one planned root, or say why not."""
        path = r["path"]
        if budget <= 0:
            return "maxDirs reached on an earlier root"
        # Only a configured root, judged against exactly its configured sockets: a plan is data,
        # and a root or socket list that is not ours would make strangers' FIFOs look orphaned.
        configured = {str(c.path): [str(s) for s in c.sockets] for c in default_roots(ctx.host)}
        if configured.get(path) != r["sockets"]:
            return f"{path} is not a configured fifo root with these sockets"
        try:
            rootfd = open_root(path)
        except OSError as e:
            if e.errno in (errno.ELOOP, errno.ENOTDIR):
                return f"{path} is no longer a directory"
            return f"{path}: {e.strerror}"
        try:
            st = os.fstat(rootfd)
            if st.st_dev != r["dev"]:
                return f"{path} is on another device than planned"
            if r["mount_id"] is not None and mount_id(rootfd) != r["mount_id"]:
                return f"{path} is another mount than planned (mount id {r['mount_id']})"
            # Right before the walk: the containerd query, then the /proc scan (clauses e, d).
            known = query_known_ids(self.ctr, [Path(s) for s in r["sockets"]], self.max_task_queries)
            if not known.complete:
                return "containerd could not be asked which ids it knows: " + "; ".join(known.errors)
            open_fifos = scan_open_fifos(ctx.host.proc, {st.st_dev})
            if not open_fifos.complete:
                return f"cannot tell which fifos are open: {open_fifos.error}"
            rule = RuleInputs(
                st.st_dev, ctx.clock.now(), min_age, open_fifos.keys, known.ids, self.max_entries
            )
            return walk(rootfd, rule, remove=True, max_dirs=budget)
        finally:
            os.close(rootfd)

    def verify(self, plan: Plan, result: ActionResult, ctx: ApplyContext) -> ActionResult:
        """The fifo filesystems have fewer inodes in use than before the walk."""
        freed = 0
        for path, used_before in result.before["inodes_used"].items():
            used = _inodes_used(path)
            if used is not None and used_before is not None:
                freed += int(used_before) - used
        removed = int(result.after["removed_dirs"]) + int(result.after["removed_fifos"])
        verified = removed == 0 or freed > 0
        after = {**result.after, "inodes_freed": freed}
        return ActionResult(
            result.outcome, f"{result.message}; {freed} inodes freed", result.before, after, verified=verified
        )
