"""Policy files -> YAML documents with a line number for every field, within fixed bounds.

This is the part of the loader that meets untrusted bytes, so everything it does is bounded
and every way it can fail is a `PolicyIssue` with file and line, never an exception:

* Which files: the paths given, directories expanded (not recursively) into their `*.yaml` /
  `*.yml` files. Names starting with `.` are skipped (editor lock files such as Emacs'
  `.#x.yaml`, a dangling symlink, appear while someone edits). Anything that is not a regular
  file (a FIFO, `/dev/null`, a socket) is refused before it is opened, and again after, so a
  FIFO can never block a reload.
* How much: at most `MAX_FILE_BYTES` per file, `MAX_SET_BYTES` and `MAX_FILES` per set.
* What: UTF-8 text without control characters; YAML without anchors, aliases, merge keys
  (`<<`) or tags other than the core ones; at most `MAX_DEPTH` levels of nesting.

Anchors and aliases are refused outright rather than expanded within a bound: a policy is a
handful of fields that people review line by line in a pull request, and an alias makes a line
mean something defined elsewhere; refusing them also removes "billion laughs" (exponential
expansion) and self-referencing structures (`a: &a [*a]`) at the root instead of bounding them.
Merge keys go for the same reason, and because a merged key silently overrides another, which
defeats the duplicate-key check.

Documents are built here, in one pass over the parser's events with an explicit stack, instead
of by PyYAML's recursive composer and constructor: depth is checked before a level is built, so
deep nesting is an error and never a `RecursionError`, and the line of every field is recorded
on the way. Events come from libyaml when PyYAML has it: a 1 MB policy file compiles in
0.26-0.48 s, 1.2-1.4 times the time of a bare libyaml `load_all` of the same bytes and 7-10
times faster than `yaml.safe_load_all` (benchmarks/policy_load.py).
"""

from __future__ import annotations

import os
import re
import stat
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from remediator.errors import PolicyIssue
from remediator.quantity import shown

Loc = tuple[str | int, ...]
SUFFIXES = (".yaml", ".yml")

# The bundled policy set is 6.4 KB in 4 files; its largest file is 2.6 KB. 1 MiB per file is
# 400 times that (about 800 policies with comments like the bundled ones) and compiles in
# ~0.3 s, or ~0.6 s for 1,600 policies without comments (benchmarks/policy_load.py, 2 cores),
# so no real file comes near it and a wrong one (a log, a core dump named *.yaml) is refused
# before it costs the daemon time or memory. The set cap bounds a reload: 4 MiB of dense
# policies compiles in ~2.5 s with a peak of ~110 MiB of Python objects, which with the
# daemon's own ~55 MB stays under the unit's MemoryMax=256M. 1000 files: no one reviews more;
# a directory with more is a mistake (the wrong --policies), not a policy set.
MAX_FILE_BYTES = 1 << 20
MAX_SET_BYTES = 4 << 20
MAX_FILES = 1000
# A policy nests 6 levels deep at most (spec.actions[0].params.<field>, containers.include[0]);
# 32 leaves room for any future field and stays far below Python's recursion limit (1000),
# which pydantic's validation and anything else that walks the data would otherwise meet.
MAX_DEPTH = 32
SET_TOO_LARGE = f"the policy set is larger than {MAX_SET_BYTES >> 20} MiB (this file goes over it)"

# What YAML itself forbids in a stream (YAML 1.1 "printable", PyYAML's Reader.NON_PRINTABLE).
_NON_PRINTABLE = re.compile("[^\x09\x0a\x0d\x20-\x7e\x85\xa0-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")
_CORE_TAGS = frozenset(
    f"tag:yaml.org,2002:{t}" for t in ("str", "int", "float", "bool", "null", "seq", "map")
)
_MERGE = "tag:yaml.org,2002:merge"
_Loader: type[Any] = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def _file_type(mode: int) -> str:
    for test, name in (
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISFIFO, "a FIFO (named pipe)"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISSOCK, "a socket"),
    ):
        if test(mode):
            return name
    return "not a regular file"


@dataclass
class Doc:
    """One YAML document of one file: its data and the line of every field in it."""

    file: str
    index: int
    data: Any
    lines: dict[Loc, int] = field(default_factory=dict)

    def line(self, loc: Sequence[str | int]) -> int | None:
        """Line of the deepest part of `loc` that exists in the file."""
        loc = tuple(loc)
        while loc:
            if loc in self.lines:
                return self.lines[loc]
            loc = loc[:-1]
        return self.lines.get(())


def format_loc(loc: Sequence[str | int]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else part
    return out


# -- Which files ------------------------------------------------------------------------------


def policy_files(paths: Iterable[Path]) -> tuple[list[Path], list[PolicyIssue]]:
    """Expand directories (non-recursive, sorted) into their *.yaml / *.yml files."""
    files: list[Path] = []
    issues: list[PolicyIssue] = []
    for p in paths:
        try:
            st = p.stat()
        except FileNotFoundError:
            issues.append(PolicyIssue(str(p), None, "", "no such file or directory"))
            continue
        except OSError as e:
            issues.append(PolicyIssue(str(p), None, "", f"cannot read: {e.strerror or e}"))
            continue
        if stat.S_ISREG(st.st_mode):
            files.append(p)
        elif stat.S_ISDIR(st.st_mode):
            try:
                found = sorted(f for f in p.iterdir() if f.suffix in SUFFIXES and not f.name.startswith("."))
            except OSError as e:
                issues.append(PolicyIssue(str(p), None, "", f"cannot list this directory: {e.strerror or e}"))
                continue
            if not found:
                issues.append(PolicyIssue(str(p), None, "", "no *.yaml policy files in this directory"))
            files.extend(found)
        else:
            issues.append(
                PolicyIssue(
                    str(p),
                    None,
                    "",
                    f"is {_file_type(st.st_mode)}; expected a policy file (*.yaml) or a directory of them",
                )
            )
    if len(files) > MAX_FILES:
        issues.append(
            PolicyIssue(
                str(files[MAX_FILES]),
                None,
                "",
                f"too many policy files ({len(files)}; a set may have at most {MAX_FILES})",
            )
        )
        files = files[:MAX_FILES]
    return files, issues


def read_text(path: Path, budget: int) -> tuple[str | None, int, PolicyIssue | None]:
    """(text, bytes read, issue) of one policy file, reading at most min(MAX_FILE_BYTES, budget)
    bytes (budget: what is left of MAX_SET_BYTES)."""

    def bad(msg: str, line: int | None = None) -> tuple[None, int, PolicyIssue]:
        return None, 0, PolicyIssue(str(path), line, "", msg)

    try:
        st = path.stat()
    except FileNotFoundError:
        return bad("no such file or directory (a dangling symlink?)")
    except OSError as e:
        return bad(f"cannot read: {e.strerror or e}")
    if not stat.S_ISREG(st.st_mode):
        return bad(f"is {_file_type(st.st_mode)}, not a policy file")
    cap = min(MAX_FILE_BYTES, budget)
    # O_NONBLOCK: should the file have been replaced by a FIFO since the stat above, open()
    # does not wait for a writer; the fstat below then refuses it.
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except OSError as e:
        return bad(f"cannot read: {e.strerror or e}")
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            return bad(f"is {_file_type(st.st_mode)}, not a policy file")
        chunks: list[bytes] = []
        size = 0
        while size <= cap:
            chunk = os.read(fd, cap + 1 - size)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
    except OSError as e:
        return bad(f"cannot read: {e.strerror or e}")
    finally:
        os.close(fd)
    if size > cap:
        if cap < MAX_FILE_BYTES:
            return bad(SET_TOO_LARGE)
        return bad(f"larger than {MAX_FILE_BYTES >> 20} MiB; a policy file is a few kilobytes")
    data = b"".join(chunks)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        return bad(f"not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start}): a binary file?", line)
    m = _NON_PRINTABLE.search(text)
    if m:
        line = text.count("\n", 0, m.start()) + 1
        return bad(f"contains the control character U+{ord(m.group()):04X}, which YAML does not allow", line)
    return text, size, None


# -- YAML -> values and lines ------------------------------------------------------------------------------


class _Refused(yaml.MarkedYAMLError):
    """Valid YAML that a policy may not use (an alias, a merge key, a tag, too deep), or a
    scalar that cannot become a value; the message is shown without "not valid YAML"."""


_STR = "tag:yaml.org,2002:str"
_VALUE = "tag:yaml.org,2002:value"  # a plain `=`; PyYAML builds no value for it: a string here
_SEQ = "tag:yaml.org,2002:seq"
_MAP = "tag:yaml.org,2002:map"
_IMPLICIT = frozenset({"tag:yaml.org,2002:timestamp", _MERGE, _VALUE})


def _scalar(loader: Any, ev: Any, start: Any) -> Any:
    """The value of a scalar event: a string, or what the safe constructor makes of its tag."""
    tag = ev.tag
    if tag is None or tag == "!":
        tag = loader.resolve(yaml.ScalarNode, ev.value, ev.implicit)
    elif tag not in _CORE_TAGS:
        raise _Refused(None, None, f"tags such as {shown(tag, 40)} are not supported here", start)
    if tag in (_STR, _VALUE):
        return ev.value
    if tag == _MERGE:
        raise _Refused(None, None, "merge keys (<<) are not supported: write the keys out", start)
    if tag not in _CORE_TAGS and tag not in _IMPLICIT:  # pragma: no cover - the resolver's tags
        raise _Refused(None, None, f"tags such as {shown(tag, 40)} are not supported here", start)
    node = yaml.ScalarNode(tag, ev.value, start, ev.end_mark, style=ev.style)
    try:
        return loader.yaml_constructors[tag](loader, node)
    except yaml.MarkedYAMLError:
        raise
    except (ArithmeticError, LookupError, ValueError, TypeError) as e:
        # e.g. a date that does not exist (2026-13-45), `!!int x`, `!!int ""` (IndexError,
        # found by tests/unit/test_loader_fuzz.py), an integer of more than 4300 digits
        # (Python's int() limit, whose message suggests a Python setting).
        if len(ev.value) > 100:
            raise _Refused(
                None, None, f"a number of {len(ev.value)} characters is out of range", start
            ) from None
        raise _Refused(None, None, f"cannot read {shown(ev.value)}: {e}", start) from None


@dataclass
class _Frame:
    value: dict[Any, Any] | list[Any]
    loc: Loc
    key: tuple[Any, str, int] | None = None  # a mapping's key waiting for its value
    seen: dict[str, int] = field(default_factory=dict)  # key -> line, for duplicates


def _document(loader: Any, file: str, issues: list[PolicyIssue]) -> tuple[Any, dict[Loc, int]]:
    """The next document's value and the line of every field in it, in one pass over the
    parser's events with an explicit stack (no node tree, no recursion)."""
    loader.get_event()  # DocumentStartEvent
    lines: dict[Loc, int] = {}
    stack: list[_Frame] = []
    root: Any = None
    while True:
        ev = loader.get_event()
        # Typed as Any: libyaml's marks (yaml._yaml.Mark) are not the class PyYAML's stubs name.
        start: Any = ev.start_mark
        anchor: str | None = getattr(ev, "anchor", None)
        if isinstance(ev, yaml.AliasEvent):
            raise _Refused(
                None, None, f"aliases (*{str(anchor)[:30]}) are not supported: write the value out", start
            )
        if anchor is not None:
            raise _Refused(
                None, None, f"anchors (&{anchor[:30]}) are not supported: write the value out", start
            )
        if isinstance(ev, yaml.SequenceEndEvent | yaml.MappingEndEvent):
            stack.pop()
            if not stack:
                break
            continue
        value: Any
        if isinstance(ev, yaml.ScalarEvent):
            value = _scalar(loader, ev, start)
        elif isinstance(ev, yaml.SequenceStartEvent | yaml.MappingStartEvent):
            if len(stack) >= MAX_DEPTH:
                raise _Refused(None, None, f"nested more than {MAX_DEPTH} levels deep", start)
            is_seq = isinstance(ev, yaml.SequenceStartEvent)
            if ev.tag not in (None, "!", _SEQ if is_seq else _MAP):
                raise _Refused(None, None, f"tags such as {shown(ev.tag, 40)} are not supported here", start)
            value = [] if is_seq else {}
        else:  # pragma: no cover - the parser emits nothing else inside a document
            raise _Refused(None, None, f"unexpected YAML event {type(ev).__name__}", start)

        line = start.line + 1
        loc: Loc = ()
        if not stack:
            root = value
            lines[()] = line
        else:
            parent = stack[-1]
            if isinstance(parent.value, list):
                loc = (*parent.loc, len(parent.value))
                lines[loc] = line
                parent.value.append(value)
            elif parent.key is None:
                if not isinstance(ev, yaml.ScalarEvent):
                    raise _Refused(None, None, "a key must be a plain name, not a list or mapping", start)
                parent.key = (value, str(ev.value), line)
                continue
            else:
                key, name, key_line = parent.key
                parent.key = None
                loc = (*parent.loc, name)
                if name in parent.seen:
                    # The document is rejected; its value is built (and checked) and dropped.
                    issues.append(
                        PolicyIssue(
                            file,
                            key_line,
                            format_loc(loc),
                            f"duplicate key (first given on line {parent.seen[name]})",
                        )
                    )
                else:
                    parent.seen[name] = key_line
                    lines[loc] = key_line
                    parent.value[key] = value
        if isinstance(value, dict | list):
            stack.append(_Frame(value, loc))
        elif not stack:
            break  # a document that is one scalar
    loader.get_event()  # DocumentEndEvent
    return root, lines


def parse_yaml(text: str, file: str) -> tuple[list[Doc], list[PolicyIssue]]:
    """Every non-empty document of `text`, or the issues that stop it being read."""
    docs: list[Doc] = []
    issues: list[PolicyIssue] = []
    empty = True
    loader = None
    try:
        loader = _Loader(text)
        loader.get_event()  # StreamStartEvent
        index = 0
        while not loader.check_event(yaml.StreamEndEvent):
            before = len(issues)
            data, lines = _document(loader, file, issues)
            if data is not None:
                empty = False
            if len(issues) == before and data is not None:
                docs.append(Doc(file, index, data, lines))
            index += 1
    except yaml.MarkedYAMLError as e:
        empty = False
        mark = e.problem_mark or e.context_mark
        line = mark.line + 1 if mark else 1
        message = str(e.problem) if isinstance(e, _Refused) else f"not valid YAML: {e.problem or e}"
        issues.append(PolicyIssue(file, line, "", message))
    except yaml.YAMLError as e:
        # ReaderError (a character YAML does not allow) carries a position, not a mark;
        # read_text() refuses those characters first, so this is a fallback.
        empty = False
        position = getattr(e, "position", None)
        line = text.count("\n", 0, position) + 1 if isinstance(position, int) else 1
        issues.append(PolicyIssue(file, line, "", f"not valid YAML: {e}"))
    finally:
        if loader is not None:
            loader.dispose()
    if empty:
        issues.append(
            PolicyIssue(file, 1, "", "no policy documents: the file is empty or holds only comments")
        )
    return docs, issues
