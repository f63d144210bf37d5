"""Pure parsers for the `limits` probe: every /proc file it reads, as text in, values out.

Each is tested on files captured from a real 6.18 kernel (tests/fixtures/proc/linux-6.18) and on
hand-made edge cases; none does I/O.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple


@dataclass(frozen=True)
class FileNr:
    allocated: int
    free: int  # always 0 since Linux 2.6: freed handles are released, not kept in a pool
    maximum: int  # the same value as fs.file-max


def parse_file_nr(text: str) -> FileNr:
    fields = text.split()
    if len(fields) != 3:
        raise ValueError(f"file-nr: expected 3 numbers, got {text!r}")
    try:
        allocated, free, maximum = (int(f) for f in fields)
    except ValueError:
        raise ValueError(f"file-nr: expected 3 numbers, got {text!r}") from None
    return FileNr(allocated, free, maximum)


class InotifyWatch(NamedTuple):
    """One "inotify wd:..." line of an inotify fd's fdinfo (numbers are hex in the file).

    A NamedTuple, not a frozen dataclass: a scan builds one per watch on the host (16,000 at
    2,000 processes), and a tuple builds in a tenth of the time; it is just as immutable."""

    wd: int
    ino: int  # inode watched
    sdev: int  # its device, kernel-internal encoding
    mask: int


def parse_inotify_fdinfo(text: str) -> tuple[InotifyWatch, ...]:
    """/proc/<pid>/fdinfo/<fd> of an inotify fd -> its watches.

    fs/notify/fdinfo.c prints "inotify wd:%x ino:%lx sdev:%x mask:%x ignored_mask:%x" followed by
    the file handle; all numbers hexadecimal. An instance without watches has no such lines.
    """
    watches = []
    for line in text.splitlines():
        if not line.startswith("inotify "):
            continue
        fields = dict(tok.split(":", 1) for tok in line.split()[1:] if ":" in tok)
        try:
            watches.append(
                InotifyWatch(
                    wd=int(fields["wd"], 16),
                    ino=int(fields["ino"], 16),
                    sdev=int(fields["sdev"], 16),
                    mask=int(fields["mask"], 16),
                )
            )
        except (KeyError, ValueError):
            raise ValueError(f"fdinfo: cannot parse inotify line {line!r}") from None
    return tuple(watches)


_MASK64 = (1 << 64) - 1


def _mix(x: int) -> int:
    """splitmix64's finaliser: a 64-bit mixer, the same as mix() in _fdscan.c."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


@dataclass(frozen=True, slots=True)
class WatchSet:
    """What the scan keeps of one inotify or epoll fd's watch list: how many watches, and a
    digest of them (order-independent), not the watches themselves.

    A 100 k-watch inotify fd has a 12 MB fdinfo; keeping a tuple per watch cost more than the
    kernel's read. The counts are all the pools need; the digest only decides which fds may be
    one instance (limits_dedup compares those with kcmp, which has the last word), so a digest
    collision costs a kcmp call, never a wrong count. `len()` is the number of watches, so code
    that counted a tuple of watches counts a WatchSet the same way.
    """

    count: int
    digest: int  # sum mod 2**64 of one mixed hash per watch (_fdscan.c computes the same)

    def __len__(self) -> int:
        return self.count


def inotify_watch_set(watches: Sequence[InotifyWatch]) -> WatchSet:
    total = 0
    for w in watches:
        total += _mix(_mix(_mix(_mix(w.wd) ^ w.ino) ^ w.sdev) ^ w.mask)
    return WatchSet(len(watches), total & _MASK64)


def epoll_watch_set(watches: Sequence[EpollWatch]) -> WatchSet:
    total = 0
    for w in watches:
        total += _mix(_mix(w.tfd) ^ w.ino)
    return WatchSet(len(watches), total & _MASK64)


@dataclass(frozen=True)
class ProcStatus:
    """The lines of /proc/<pid>/status that remediator uses."""

    name: str
    uids: tuple[int, int, int, int]  # real, effective, saved set, filesystem (proc(5))
    threads: int

    @property
    def euid(self) -> int:
        return self.uids[1]


def _status_field(text: str, key: str) -> str | None:
    """The value of one "Key:\tvalue" line, found without splitting all ~55 lines (this runs
    for every process on every scan)."""
    if text.startswith(f"{key}:"):
        at = 0
    else:
        at = text.find(f"\n{key}:") + 1
        if at == 0:
            return None
    end = text.find("\n", at)
    return text[at + len(key) + 1 : end if end != -1 else len(text)].strip()


def parse_proc_status(text: str) -> ProcStatus:
    uid_line = _status_field(text, "Uid")
    if uid_line is None:
        raise ValueError("status: no Uid line")
    parts = uid_line.split()
    if len(parts) != 4:
        raise ValueError(f"status: expected 4 uids, got {uid_line!r}")
    threads = _status_field(text, "Threads")
    return ProcStatus(
        _status_field(text, "Name") or "",
        (int(parts[0]), int(parts[1]), int(parts[2]), int(parts[3])),
        int(threads) if threads is not None else 1,
    )


def parse_loadavg_threads(text: str) -> int:
    """/proc/loadavg "0.12 0.08 0.03 1/145 8142" -> 145, the kernel's nr_threads.

    nr_threads is exactly what copy_process() compares against kernel.threads-max.
    """
    fields = text.split()
    if len(fields) < 4 or "/" not in fields[3]:
        raise ValueError(f"loadavg: unexpected format {text!r}")
    return int(fields[3].split("/", 1)[1])


class EpollWatch(NamedTuple):
    """One "tfd:" line of an eventpoll fd's fdinfo: a file descriptor the instance watches
    (fs/eventpoll.c ep_show_fdinfo). A NamedTuple for the same reason as InotifyWatch."""

    tfd: int
    ino: int  # inode of the watched file (hex in the file)


def parse_epoll_fdinfo(text: str) -> tuple[EpollWatch, ...]:
    """/proc/<pid>/fdinfo/<fd> of an eventpoll fd -> its watches (epitems, charged per uid to
    fs.epoll.max_user_watches). Other fds have no tfd lines."""
    out = []
    for line in text.splitlines():
        if not line.startswith("tfd:"):
            continue
        toks = line.split()
        try:
            tfd = int(toks[1])
            ino = next(int(t[4:], 16) for t in toks if t.startswith("ino:"))
        except (IndexError, ValueError, StopIteration):
            raise ValueError(f"fdinfo: cannot parse epoll line {line!r}") from None
        out.append(EpollWatch(tfd, ino))
    return tuple(out)


@dataclass(frozen=True)
class KeyUser:
    """One line of /proc/key-users (keyrings(7)): a uid's keys against its quota."""

    uid: int
    keys: int  # qnkeys: keys counted against the quota
    max_keys: int
    bytes: int  # qnbytes
    max_bytes: int


def parse_key_users(text: str) -> tuple[KeyUser, ...]:
    """ "    0:    14 13/13 8/1000000 269/25000000" -> KeyUser(0, 8, 1000000, 269, 25000000).

    Fields: uid: usage nkeys/nikeys qnkeys/maxkeys qnbytes/maxbytes. Root's quota is
    kernel.keys.root_maxkeys/root_maxbytes, everyone else's kernel.keys.maxkeys/maxbytes.
    """
    out = []
    for line in text.splitlines():
        if not line.strip():
            continue
        uid, sep, rest = line.partition(":")
        fields = rest.split()
        try:
            if not sep or len(fields) != 4:
                raise ValueError
            qnkeys, maxkeys = (int(x) for x in fields[2].split("/"))
            qnbytes, maxbytes = (int(x) for x in fields[3].split("/"))
            out.append(KeyUser(int(uid), qnkeys, maxkeys, qnbytes, maxbytes))
        except ValueError:
            raise ValueError(f"key-users: cannot parse {line!r}") from None
    return tuple(out)


def parse_softnet_drops(text: str) -> tuple[int, ...]:
    """/proc/net/softnet_stat -> packets dropped per CPU because its input queue (of
    net.core.netdev_max_backlog packets) was full: the second column, hexadecimal."""
    drops = []
    for line in text.splitlines():
        fields = line.split()
        if not fields:
            continue
        if len(fields) < 2:
            raise ValueError(f"softnet_stat: expected columns, got {line!r}")
        try:
            drops.append(int(fields[1], 16))
        except ValueError:
            raise ValueError(f"softnet_stat: not hexadecimal: {line!r}") from None
    return tuple(drops)


def parse_stat_starttime(text: str) -> int:
    """/proc/<pid>/stat -> starttime (field 22, clock ticks after boot): with the pid, it names
    one process for the lifetime of the boot. The command (field 2) may hold spaces and
    parentheses, so fields are counted after its last ")" (proc(5))."""
    _, sep, rest = text.rpartition(")")
    fields = rest.split()
    if not sep or len(fields) < 20:
        raise ValueError("stat: unexpected format")
    return int(fields[19])


def parse_single_count(text: str, what: str) -> int:
    try:
        return int(text.strip())
    except ValueError:
        raise ValueError(f"{what}: expected one integer, got {text.strip()!r}") from None


__all__ = [
    "EpollWatch",
    "FileNr",
    "InotifyWatch",
    "KeyUser",
    "ProcStatus",
    "WatchSet",
    "epoll_watch_set",
    "inotify_watch_set",
    "parse_epoll_fdinfo",
    "parse_file_nr",
    "parse_inotify_fdinfo",
    "parse_key_users",
    "parse_loadavg_threads",
    "parse_proc_status",
    "parse_single_count",
    "parse_softnet_drops",
    "parse_stat_starttime",
]
