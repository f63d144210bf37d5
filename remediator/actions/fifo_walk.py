"""Reading and removing containerd FIFO directories through handles, in one streaming pass.

`walk()` is what `clean-fifos` runs: it lists the fifo root once (getdents, streamed: no list of
every directory is ever held) and, for each directory in turn, reads it through a directory fd,
judges it with the orphan rule (`probes.fifo_rule.judge`) and, when it is an orphan, removes it
at once. The re-check therefore *is* the judgement, made microseconds before the removal; the
tree is read once per cycle. The system-call loop is C (`_fifowalk.c`); the rule is Python.

How a removal stays on what was judged (the kernel has handles for some steps, not all):

* The root is opened once (O_NOFOLLOW); every other name is resolved relative to a directory fd,
  one component at a time, so nothing outside the root is reachable through a swapped symlink.
* Each directory is opened with O_NOFOLLOW|O_DIRECTORY; before anything is read from it its
  device must be the root's and its inode the one the root's listing names (`d_ino`): at a mount
  point those differ, so a mount is never entered (`probes.fifo_rule`, clause a). Its entries are read
  and unlinked through that fd, which pins the directory judged even if its name is moved.
* unlinkat and rmdir take names, not handles. Right before each call the name is looked up again
  (fstatat) and must still give the inode that was judged; ENOENT from either is the one error
  taken to mean "someone else removed it". Anything else (EBUSY from a mount point, EROFS, EPERM
  from an immutable file) is counted for that directory and the walk goes on: one failing
  directory never aborts the rest, and the tally always says what was removed.
* A directory emptied by us whose name was moved before its rmdir (the rename race) is marked
  through its fd with `probes.fifo_rule.EMPTIED_XATTR`; the next walk removes it if it is still empty.

What remains: between a name's re-check and its unlinkat/rmdir (about a microsecond) another
root process could swap the name. Inside a root-only (0700) directory, on entries nobody has
touched for `min_age` and that no containerd knows, only an attacker with root would, and root
can remove those files itself.
"""

from __future__ import annotations

import errno
import os
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from remediator.actions import _fifowalk
from remediator.probes.fifo_rule import EMPTIED_XATTR, RuleInputs, judge


@dataclass
class WalkTally:
    """What one walk saw and did. Counts only: memory does not grow with the tree."""

    entries: int = 0  # names of the root looked at
    orphans: int = 0  # directories judged orphans (removed, or would be without `remove`)
    removed_dirs: int = 0
    removed_fifos: int = 0
    kept: Counter[str] = field(default_factory=Counter)
    failed: Counter[str] = field(default_factory=Counter)  # errno name -> directories
    failures: list[dict[str, str]] = field(default_factory=list)  # the first few, described
    marked: int = 0  # emptied in a rename race and marked for the next walk
    stopped_at_max: bool = False

    @property
    def failed_total(self) -> int:
        return sum(self.failed.values())

    def to_dict(self) -> dict[str, Any]:
        return {
            "entries": self.entries,
            "orphans": self.orphans,
            "removed_dirs": self.removed_dirs,
            "removed_fifos": self.removed_fifos,
            "kept": dict(sorted(self.kept.items())),
            "failed": dict(sorted(self.failed.items())),
            "failures": list(self.failures),
            "marked": self.marked,
            "stopped_at_max": self.stopped_at_max,
        }


def walk(rootfd: int, rule: RuleInputs, *, remove: bool, max_dirs: int) -> WalkTally:
    """Judge every directory of the open root; remove each orphan right after judging it.

    Stops after `max_dirs` orphans. Raises OSError only for the root itself (its listing
    failing); every per-directory error is counted in the tally. The loop is `_fifowalk.walk`
    (C, see its header); the judgement is `fifo_rule.judge`, called once per directory.
    """
    raw = _fifowalk.walk(
        rootfd, rule.root_dev, rule.max_entries, max_dirs, remove, judge, rule, EMPTIED_XATTR
    )
    tally = WalkTally(
        entries=raw["entries"],
        orphans=raw["orphans"],
        removed_dirs=raw["removed_dirs"],
        removed_fifos=raw["removed_fifos"],
        kept=Counter({str(k): v for k, v in raw["kept"].items()}),
        failed=Counter({errno.errorcode.get(k, str(k)): v for k, v in raw["failed"].items()}),
        marked=raw["marked"],
        stopped_at_max=raw["stopped_at_max"],
    )
    for name, step, err in raw["failures"]:
        code = errno.errorcode.get(err, str(err))
        tally.failures.append({"dir": name, "step": step, "error": f"{code}: {os.strerror(err)}"})
    return tally
