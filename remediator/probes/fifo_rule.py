"""The orphan rule for containerd FIFO directories: pure, on what one walk has read.

The case (containerd issue #2421, `../shared/seeds/containerd-fifo-inode-leak-issue.txt`): every
task or exec a containerd client starts gets a directory `<fifo root>/<random>` holding
`<id>-stdin`, `<id>-stdout` and `<id>-stderr` FIFOs (4 inodes). When the client does not clean
up, the directory stays behind until the filesystem (a tmpfs with a fixed inode count) is out of
inodes and no container can start.

A directory of a fifo root is an orphan only if ALL of these hold. Anything we cannot check
counts as "not an orphan": deleting a live container's stdio breaks its logging; leaving a leaked
directory for one more cycle costs 4 inodes.

(a) It is a real directory on the fifo root's filesystem and not a mount point: opened with
    O_NOFOLLOW|O_DIRECTORY relative to the root, its inode (fstat) is the one the root's own
    listing names (getdents `d_ino`) and its device is the root's. At a mount point getdents
    reports the covered directory's inode and fstat the mounted one, so any mount, same device
    or not (a bind mount of `/run/victim` onto `<root>/d`), differs; the one mount that does not
    differ is a directory bind-mounted onto itself, whose contents are inside the root anyway.
(b) It holds only FIFOs, at least one and at most `MAX_ENTRIES` (16), none of them a mount
    point (same `d_ino` test), and every name parses as `<id>-stdin|stdout|stderr` (what
    containerd's `cio.NewFIFOSetInDir` creates). An empty directory names no container, so (e)
    cannot be checked: it is kept (`empty`), except one this program emptied itself and marked
    (see `EMPTIED_XATTR`).
(c) The directory and every FIFO in it were last modified more than `min_age` (10 minutes) ago:
    clients create the FIFOs before the task starts (image unpacking can take minutes), and a
    write to a FIFO updates its mtime.
(d) No process on the host has any of its FIFOs open: one scan of every `/proc/<pid>/fd/<n>`
    per walk, compared by (st_dev, st_ino).
(e) No containerd that can own the root knows an id the FIFOs are named after (namespaces,
    containers, tasks, and the exec processes of every task). If any of those sockets cannot
    be queried, or its answer cannot be parsed, no directory is an orphan.

Everything here is pure: `judge` takes what the walk read (plain tuples of stat fields and
`d_ino`s) and the two once-per-walk answers of (d) and (e) in a `RuleInputs`.
"""

from __future__ import annotations

import enum
import functools
import stat
from collections.abc import Sequence
from dataclasses import dataclass

# Clause (c): containerd clients create the FIFO set before the task starts; 10 minutes covers
# slow image unpacking and shim start-up.
DEFAULT_MIN_AGE = 600.0
# Clause (b): containerd creates 3 FIFOs per process (2 with a terminal); 16 leaves room for any
# future stream while still rejecting directories used for something else.
MAX_ENTRIES = 16
# Clause (b)'s exception: set (through the directory's fd, so on exactly that inode) on a
# directory whose FIFOs this program unlinked but which it could not rmdir because its name had
# been moved meanwhile (the rename race); the next walk finishes it if it is still empty. A
# `user.*` attribute (xattr(7)) may be set only by the directory's owner or with CAP_FOWNER:
# root, for containerd's root-owned 0700 fifo dirs, and root could remove the directory anyway.
# (`trusted.*` would need CAP_SYS_ADMIN, which the bundled systemd units drop.) Where the
# filesystem has no user xattrs (tmpfs before Linux 6.6), such a directory stays `empty`.
EMPTIED_XATTR = "user.remediator.emptied"

# containerd's cio: filepath.Join(dir, id+"-stdin"), "-stdout", "-stderr".
_STREAMS = frozenset(("stdin", "stdout", "stderr"))
_S_IFMT, _S_IFIFO = 0o170000, stat.S_IFIFO  # stat.S_IFMT() is a function; this is its mask


class Keep(enum.StrEnum):
    """Why a directory is not removed. Counted in the probe's and the action's details."""

    SYMLINK = "symlink"  # (a)
    NOT_A_DIRECTORY = "not_a_directory"  # (a)
    OTHER_DEVICE = "other_device"  # (a)
    MOUNT_POINT = "mount_point"  # (a), (b): the dir or one of its entries has something mounted
    NOT_ONLY_FIFOS = "not_only_fifos"  # (b)
    TOO_MANY_ENTRIES = "too_many_entries"  # (b)
    EMPTY = "empty"  # (b)
    UNKNOWN_NAME = "unknown_name"  # (b)
    TOO_YOUNG = "too_young"  # (c)
    OPEN = "open"  # (d)
    KNOWN_TO_CONTAINERD = "known_to_containerd"  # (e)
    UNREADABLE = "unreadable"  # open/fstat/readdir failed with something other than ENOENT
    GONE = "gone"  # vanished between listing and checking
    CHANGED = "changed"  # removal only: a name no longer points at the inode that was judged
    NOT_EMPTY = "not_empty"  # removal only: rmdir found new entries
    RACED = "raced"  # removal only: emptied, but the dir's name was moved before rmdir


def parse_fifo_name(name: str) -> str | None:
    """'test.32583-stdout' -> 'test.32583'; None for a name containerd's cio does not make."""
    ident, sep, stream = name.rpartition("-")
    if not sep or not ident or stream not in _STREAMS or "\n" in ident:
        return None
    return ident


@dataclass(frozen=True)
class RuleInputs:
    """What every directory of one walk is judged against."""

    root_dev: int
    now: float
    min_age: float
    open_fifos: frozenset[tuple[int, int]]  # (d): (st_dev, st_ino) of every FIFO held open
    known_ids: frozenset[str]  # (e): every id the root's containerds know
    max_entries: int = MAX_ENTRIES

    @functools.cached_property
    def open_inodes(self) -> frozenset[int]:
        """The inodes of `open_fifos` on the root's device: what `judge` looks up per FIFO."""
        return frozenset(ino for dev, ino in self.open_fifos if dev == self.root_dev)


# What the walk read of a directory, through its fd: (st_dev, st_ino, st_mtime).
DirRead = tuple[int, int, float]
# One entry of it: (name, d_ino from getdents, and from lstat: st_mode, st_dev, st_ino, st_mtime).
EntryRead = tuple[str, int, int, int, int, float]


def judge(
    listed_ino: int,
    dir_read: DirRead,
    entries: Sequence[EntryRead],
    rule: RuleInputs,
    overflow: bool = False,
    emptied_mark: bool = False,
) -> Keep | None:
    """The whole rule for one directory. None: an orphan.

    `listed_ino` is the `d_ino` the root's listing gave for the name, `dir_read` the fstat of
    the directory opened (O_NOFOLLOW) through that name, `entries` what its listing and an lstat
    of each name gave (empty when the directory was not read: another device, a mount point).
    `overflow`: it has more than `rule.max_entries` entries (the listing stopped there).
    `emptied_mark`: it carries `EMPTIED_XATTR`.

    Called once per directory of the walk (126,064 times for the case report's pile), hence
    plain loops over tuples and set lookups: about 2 us a call.
    """
    dev, ino, newest = dir_read
    root_dev = rule.root_dev
    if dev != root_dev:
        return Keep.OTHER_DEVICE
    if ino != listed_ino:
        return Keep.MOUNT_POINT
    if overflow or len(entries) > rule.max_entries:
        return Keep.TOO_MANY_ENTRIES
    if not entries:
        return None if emptied_mark else Keep.EMPTY
    ids = []
    held = False
    open_inodes = rule.open_inodes
    for name, d_ino, mode, e_dev, e_ino, mtime in entries:
        if e_dev != root_dev or e_ino != d_ino:
            return Keep.MOUNT_POINT
        if mode & _S_IFMT != _S_IFIFO:
            return Keep.NOT_ONLY_FIFOS
        ident, _, stream = name.rpartition("-")
        if not ident or stream not in _STREAMS or "\n" in ident:
            return Keep.UNKNOWN_NAME
        ids.append(ident)
        if mtime > newest:  # noqa: PLR1730 (max() is a call: this runs 3 times a directory)
            newest = mtime
        if e_ino in open_inodes:
            held = True
    if rule.now - newest < rule.min_age:
        return Keep.TOO_YOUNG
    if held:
        return Keep.OPEN
    if not rule.known_ids.isdisjoint(ids):
        return Keep.KNOWN_TO_CONTAINERD
    return None
