"""Persisting a raise across reboots, and finding other owners of a sysctl.

A raise written only to /proc/sys is lost at the next boot, when the leak comes back and the
limit is the old one. raise-sysctl therefore keeps one file of its own, `etc/sysctl.d/
90-remediator.conf`, which systemd-sysctl and `sysctl --system` apply at boot. The file is
replaced whole and atomically (a temporary file in the same directory, fsync, rename(2), fsync of
the directory), through a directory fd and O_NOFOLLOW so that a symlink planted in its place is
refused, not followed.

Another owner of a key is any other file that sets it: a sysctl.d(5) file (etc, run, usr/local/
lib, usr/lib, lib; a name in an earlier directory masks the same name in a later one, and a link
to /dev/null masks it outright), /etc/sysctl.conf, or the [sysctl] section of an active tuned
profile (tuned-profiles(7), including the profiles it `include=`s). Remediator never fights an
owner: the boot would set their value after ours or tuned would revert ours, so it reports the
owner and stops. Parsing (`parse_sysctl_conf`, `parse_tuned_sysctls`) is pure.
"""

from __future__ import annotations

import configparser
import contextlib
import fnmatch
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from remediator.clock import SystemClock
from remediator.host import HostRoot

OWN_FILE = "90-remediator.conf"
HEADER = (
    "# Managed by remediator (raise-sysctl): replaced whole on every raise; edits are lost.\n"
    "# Each key is a raise applied live and kept here for the next boot. To undo one, remove its\n"
    "# line and write the value you want to /proc/sys (or own the key in a file of your own).\n"
)
_MAX_READ = 1 << 20  # a sysctl.d file larger than 1 MiB is not a config file
_TUNED_INCLUDE_DEPTH = 5


@dataclass(frozen=True)
class SysctlLine:
    line: int
    key: str  # dotted, may be a glob (systemd >= 243: net.ipv4.conf.*.rp_filter)
    value: str

    def sets(self, key: str) -> bool:
        return self.key == key or (any(c in self.key for c in "*?[") and fnmatch.fnmatchcase(key, self.key))


def normalize_key(key: str) -> str:
    """sysctl.d(5): when the first separator is "/", "/" separates and "." is literal."""
    key = key.strip().lstrip("-")
    slash, dot = key.find("/"), key.find(".")
    if slash != -1 and (dot == -1 or slash < dot):
        key = key.translate(str.maketrans("./", "/."))
    return key


def parse_sysctl_conf(text: str) -> tuple[SysctlLine, ...]:
    """The assignments of a sysctl.conf / sysctl.d file. Comments start with "#" or ";"."""
    out = []
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        key, sep, value = line.partition("=")
        if not sep or not key.strip():
            continue  # systemd-sysctl ignores it with a warning; so do we
        out.append(SysctlLine(n, normalize_key(key), value.strip()))
    return tuple(out)


def parse_tuned_sysctls(text: str) -> tuple[dict[str, str], tuple[str, ...]]:
    """A tuned.conf -> ({sysctl key: value} of its [sysctl] section, profiles it includes)."""
    cp = configparser.ConfigParser(interpolation=None, strict=False, delimiters=("=",))
    cp.optionxform = str  # type: ignore[assignment,method-assign]  # keys are case-sensitive sysctl names
    try:
        cp.read_string(text)
    except configparser.Error as exc:
        raise ValueError(f"tuned.conf: {exc}") from None
    sysctls = {normalize_key(k): v for k, v in cp.items("sysctl")} if cp.has_section("sysctl") else {}
    include = cp.get("main", "include", fallback="") if cp.has_section("main") else ""
    return sysctls, tuple(p.strip() for p in include.split(",") if p.strip())


@dataclass(frozen=True)
class Owner:
    where: str  # path[:line], or "tuned profile NAME (path)"
    value: str

    def __str__(self) -> str:
        return f"{self.where} (= {self.value})"


def _read_small(path: Path, looked: list[Path] | None = None) -> str:
    if looked is not None:
        looked.append(path)
    with open(path, encoding="utf-8", errors="replace") as f:
        return f.read(_MAX_READ)


def _inside(host: HostRoot, path: Path) -> Path:
    """Follow one symlink level the way the host would, but inside the config root: an absolute
    target such as /etc/sysctl.conf is taken under `host.config`."""
    if not path.is_symlink():
        return path
    target = Path(os.readlink(path))
    if target.is_absolute():
        return host.config / target.relative_to("/")
    return Path(os.path.normpath(path.parent / target))


def sysctl_d_files(host: HostRoot, looked: list[Path] | None = None) -> list[Path]:
    """The sysctl.d files the host applies at boot, in order, masked names removed.
    `looked`: receives every directory listed (or found missing)."""
    chosen: dict[str, Path] = {}
    for d in host.sysctl_d_dirs:
        if looked is not None:
            looked.append(d)
        try:
            names = sorted(os.listdir(d))
        except (FileNotFoundError, NotADirectoryError):
            continue
        for name in names:
            if name.endswith(".conf") and name not in chosen:
                chosen[name] = d / name
    files = []
    for name in sorted(chosen):
        path = chosen[name]
        if path.is_symlink() and os.readlink(path) == "/dev/null":
            continue  # masked
        files.append(path)
    return files


def find_owners(host: HostRoot, key: str) -> list[Owner]:
    """Every file other than remediator's own that sets `key` (or a glob matching it).

    Answered from the last look while every file and directory that look read (or found
    missing) is unchanged by stat(2) (`_OWNERS`): a stat needs no file handle, so the owner
    check still answers when the host has none left, and it costs no open at all when nothing
    changed. Any change (a file added, removed, renamed, edited, a symlink moved) looks again."""
    cached = _OWNERS.get((str(host.config), key))
    if cached is not None and cached[0] == _fingerprint([p for p, _ in cached[0]]):
        return list(cached[1])
    looked: list[Path] = []
    looked_at = SystemClock().now()
    owners = _find_owners(host, key, looked)
    seen = _fingerprint(looked)
    _OWNERS.pop((str(host.config), key), None)
    # Like git's "racily clean" rule: file times tick coarsely (a jiffy), so a change made in
    # the same tick as our look, to the same size, would leave every stat as it was. A look at
    # anything modified within RACY_SECONDS before it is therefore not reused.
    newest = max((max(st[1], st[5]) for _, st in seen if st is not None), default=0)
    if newest / 1e9 < looked_at - RACY_SECONDS:
        if len(_OWNERS) >= _MAX_CACHED_KEYS:
            _OWNERS.pop(next(iter(_OWNERS)))
        _OWNERS[(str(host.config), key)] = (seen, tuple(owners))
    return owners


# (config root, key) -> (what the look saw of each path it read, the owners it found).
_OWNERS: dict[tuple[str, str], tuple[tuple[tuple[Path, tuple[int, ...] | None], ...], tuple[Owner, ...]]] = {}
_MAX_CACHED_KEYS = 64
RACY_SECONDS = 2.0


def _fingerprint(paths: Iterable[Path]) -> tuple[tuple[Path, tuple[int, ...] | None], ...]:
    """lstat of each path, and stat of what it points to: inode, size, mtime and ctime (ns)."""
    out: list[tuple[Path, tuple[int, ...] | None]] = []
    for path in dict.fromkeys(paths):
        try:
            lst = os.lstat(path)
            st = os.stat(path) if os.path.islink(path) else lst
        except OSError:
            out.append((path, None))
            continue
        out.append(
            (
                path,
                (
                    lst.st_ino,
                    lst.st_mtime_ns,
                    lst.st_ctime_ns,
                    st.st_ino,
                    st.st_size,
                    st.st_mtime_ns,
                    st.st_ctime_ns,
                ),
            )
        )
    return tuple(out)


def _find_owners(host: HostRoot, key: str, looked: list[Path]) -> list[Owner]:
    owners: list[Owner] = []
    seen: set[Path] = set()
    own = host.sysctl_d_dirs[0] / OWN_FILE
    candidates = [p for p in sysctl_d_files(host, looked) if p != own] + [host.sysctl_conf]
    for path in candidates:
        looked.append(path)
        real = _inside(host, path)
        if real in seen:
            continue  # Debian's 99-sysctl.conf is a link to /etc/sysctl.conf
        seen.add(real)
        try:
            text = _read_small(real, looked)
        except (FileNotFoundError, NotADirectoryError):
            continue
        owners.extend(
            Owner(f"{_shown(host, path)}:{s.line}", s.value) for s in parse_sysctl_conf(text) if s.sets(key)
        )
    owners.extend(_tuned_owners(host, key, looked))
    return owners


def _shown(host: HostRoot, path: Path) -> str:
    """A path as the operator knows it (/etc/...), not under a test's config root."""
    try:
        return "/" + str(path.relative_to(host.config))
    except ValueError:
        return str(path)


def _tuned_owners(host: HostRoot, key: str, looked: list[Path]) -> Iterable[Owner]:
    looked.append(host.tuned_dirs[0])
    try:
        active = _read_small(host.tuned_dirs[0] / "active_profile", looked).split()
    except (FileNotFoundError, NotADirectoryError):
        return []
    owners: list[Owner] = []
    pending = [(name, 0) for name in active]
    visited: set[str] = set()
    while pending:
        name, depth = pending.pop(0)
        if name in visited or depth > _TUNED_INCLUDE_DEPTH or "/" in name or name.startswith("."):
            continue
        visited.add(name)
        for d in host.tuned_dirs:
            conf = d / name / "tuned.conf"
            try:
                sysctls, includes = parse_tuned_sysctls(_read_small(conf, looked))
            except (FileNotFoundError, NotADirectoryError):
                continue
            except ValueError:
                owners.append(Owner(f"tuned profile {name} ({_shown(host, conf)}, unparsable)", "?"))
                break
            for k, v in sysctls.items():
                if k == key or fnmatch.fnmatchcase(key, k):
                    owners.append(Owner(f"tuned profile {name} ({_shown(host, conf)})", v))
            pending.extend((inc, depth + 1) for inc in includes)
            break
    return owners


# --- remediator's own file ------------------------------------------------------------------


def render_own_file(values: dict[str, tuple[int, str]]) -> str:
    """{key: (value, note)} -> the whole file, keys sorted."""
    body = "".join(f"# {note}\n{key} = {value}\n" for key, (value, note) in sorted(values.items()))
    return HEADER + body


def parse_own_file(text: str) -> dict[str, tuple[int, str]]:
    """The file `render_own_file` writes -> {key: (value, note)}. Lines it did not write are
    dropped at the next replace (the header says so)."""
    out: dict[str, tuple[int, str]] = {}
    note = ""
    for raw in text.splitlines():
        line = raw.strip()
        if line.startswith("#"):
            note = line[1:].strip()
            continue
        key, sep, value = line.partition("=")
        if sep and value.strip().lstrip("-").isdigit():
            out[normalize_key(key)] = (int(value.strip()), note)
        note = ""
    return out


def _open_dir(path: Path) -> int:
    return os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)


def read_own_file(host: HostRoot) -> dict[str, tuple[int, str]]:
    """Remediator's persisted raises; {} when there is no file yet. Raises OSError when the
    file is a symlink (ELOOP) or unreadable."""
    d = host.sysctl_d_dirs[0]
    try:
        dfd = _open_dir(d)
    except FileNotFoundError:
        return {}
    try:
        try:
            fd = os.open(OWN_FILE, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dfd)
        except FileNotFoundError:
            return {}
        with os.fdopen(fd, encoding="utf-8", errors="replace") as f:
            return parse_own_file(f.read(_MAX_READ))
    finally:
        os.close(dfd)


def persist(host: HostRoot, key: str, value: int, note: str) -> Path:
    """Set `key = value` in remediator's sysctl.d file, replacing the file atomically.

    The directory is created (one level, 0755) when missing. Raises OSError on failure; the old
    file is then intact (the rename is the only step that changes what the boot will read).
    """
    d = host.sysctl_d_dirs[0]
    try:
        dfd = _open_dir(d)
    except FileNotFoundError:
        os.mkdir(d, 0o755)
        dfd = _open_dir(d)
    tmp = f".{OWN_FILE}.{os.getpid()}.tmp"
    try:
        values = read_own_file(host)
        values[key] = (value, note)
        data = render_own_file(values).encode()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp, dir_fd=dfd)  # left by a crashed earlier run of this pid number
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        fd = os.open(tmp, flags, 0o644, dir_fd=dfd)
        try:
            os.fchmod(fd, 0o644)  # like every sysctl.d file, whatever the daemon's UMask
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, OWN_FILE, src_dir_fd=dfd, dst_dir_fd=dfd)
        os.fsync(dfd)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp, dir_fd=dfd)
        raise
    finally:
        os.close(dfd)
    return d / OWN_FILE


__all__ = [
    "OWN_FILE",
    "Owner",
    "SysctlLine",
    "find_owners",
    "normalize_key",
    "parse_own_file",
    "parse_sysctl_conf",
    "parse_tuned_sysctls",
    "persist",
    "read_own_file",
    "render_own_file",
    "sysctl_d_files",
]
