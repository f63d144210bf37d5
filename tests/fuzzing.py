"""Mutated policy files for the fuzz tests: the bundled policies and the fixtures, changed the
way a hurried or hostile person would change them (byte flips, truncation, type swaps, deep
nesting, aliases, huge numbers, NUL, odd unicode).

One set of mutators serves two drivers: `Pick` is "choose a number below n", given by
hypothesis (tests/unit/test_loader_fuzz.py: shrinking, a printed reproduction) or by a seeded
`random.Random` (tests/fuzz/: files for the real CLI and daemon, the same files every run).
"""

from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).parent.parent
Pick = Callable[[int], int]


def seed_documents() -> list[bytes]:
    """Every bundled policy file and fixture, whole and split into its documents, plus a few
    documents that use the fields the bundled set leaves at their defaults."""
    files = sorted((ROOT / "policies").glob("*.yaml")) + sorted(
        (ROOT / "tests" / "fixtures" / "policies").rglob("*.yaml")
    )
    out: list[bytes] = []
    for f in files:
        data = f.read_bytes()
        out.append(data)
        parts = data.split(b"\n---\n")
        if len(parts) > 1:
            out.extend(parts)
    out.extend(EXTRA)
    return out


EXTRA = [
    b"""apiVersion: remediator.io/v1
kind: Policy
metadata: {name: every-field, description: "fields the bundled set leaves at defaults"}
spec:
  mode: audit
  interval: 1m
  watch: {probe: dentries, metric: negative, scope: host, above: 5M, clearBelow: 4M, for: 0s}
  actions:
    - {action: drop-caches, mode: audit, settle: 30s, params: {what: dentries-inodes}}
    - action: reclaim-cgroup
      params: {target: top, rankBy: slab_reclaimable_bytes, amount: 256Mi}
    - {action: recreate-container, params: {target: top, rankBy: slab_reclaimable_bytes, stopTimeout: 30s}}
  cooldown: 8m20s
  budget: {max: 4, per: 2h}
  containers:
    include: [{name: "web-*"}, {label: tier=batch}]
    exclude: [{name: db}]
    protectLabel: example.com/keep=true
""",
    b"""apiVersion: remediator.io/v1
kind: Controller
metadata: {name: ctl}
spec:
  breaker: {maxActions: 5, window: 30m}
  protect: [{name: kubelet}, {label: critical}]
""",
    b"""apiVersion: remediator.io/v1
kind: Policy
metadata: {name: limits}
spec:
  watch: {probe: limits, metric: file_handles, above: 90%, clearBelow: 70%}
  actions:
    - action: raise-sysctl
      params: {key: fs.file-max, factor: 1.5, step: 1024, ceiling: 16M}
""",
]

# Things that break parsers, each as it would be typed into a file.
TOKENS: list[bytes] = [
    b"\x00",
    b"\x01",
    b"\x7f",
    b"\x1b[31m",
    b"\t",
    b"\r",
    b"\r\n",
    b"\xff\xfe",
    b"\xed\xa0\x80",  # an encoded UTF-16 surrogate: not UTF-8
    b"\xc3",  # a cut-off two-byte sequence
    "\ufeff".encode(),  # BOM in the middle
    "\u202e".encode(),  # right-to-left override
    "\u2028".encode(),  # line separator (a line break to YAML 1.1)
    "\x85".encode(),  # NEL
    "\u200b".encode(),  # zero-width space
    "\u0663\u0660".encode(),  # Arabic-Indic 30
    "\uff13\uff10".encode(),  # full-width 30
    "e\u0301".encode(),  # combining accent
    "\U0001f600".encode(),
    "\ufffd".encode(),
    b"1" + b"0" * 400,
    b"9" * 5000,
    b"1e400",
    b"-1e400",
    b".nan",
    b".inf",
    b"-.inf",
    b"0x7fffffffffffffffff",
    b"0o777",
    b"1_000",
    b"1:30:00",  # YAML 1.1 sexagesimal
    b"2001-13-45",
    b"2001-12-14t21:59:43.10-05:00",
    b"~",
    b"null",
    b"yes",
    b"on",
    b"&a ",
    b"*a",
    b"&a [*a]",
    b"<<: ",
    b"<<: {kind: Controller}",
    b"!!python/object/apply:os.system ['true'] ",
    b"!!binary ",
    b"!!float ",
    b"!!int ",
    b"!!timestamp ",
    b"!!set ",
    b"!custom ",
    b"? ",
    b"---\n",
    b"...\n",
    b"%YAML 1.1\n",
    b"%TAG ! tag:example.com,2000:\n",
    b": ",
    b"- ",
    b"'",
    b'"',
    b"#",
    b"|",
    b">",
    b"[",
    b"{",
    b"]",
    b"}",
    b",",
    b"1000000000d",
    b"99999999999999999999d",
    b"0s",
    b"-5m",
    b"100%",
    b"101%",
    b"0.000001ms",
]

# Values a field might be given instead of the right one.
VALUES: list[bytes] = [
    b"[1, 2]",
    b"{a: 1}",
    b"[Policy]",
    b"{}",
    b"[]",
    b"null",
    b"true",
    b"''",
    b'""',
    b"-1",
    b"0",
    b"1",
    b"1.5",
    b"1e308",
    b"1e400",
    b".nan",
    b".inf",
    b"1" + b"0" * 400,
    b'"1' + b"0" * 400 + b'"',
    b"1" + b"0" * 400 + b"s",
    b"1" + b"0" * 400 + b"%",
    b"1" + b"0" * 400 + b"Ki",
    b"1000000000d",
    b"3000000d",
    b"366d",
    b"367d",
    b"1d1s",
    b"7d",
    b"30d1s",
    b"1ms",
    b"0s",
    b"x" * 10_000,
    b"&x [*x]",
    b"*nowhere",
    b"!!str 30s",
    b"!!binary aGVsbG8=",
    b"2001-12-14",
    b"1:30",
    b"0x10",
    "\u0663\u0660s".encode(),
    b"Policy\n",
    b"|\n  multi\n  line",
]


def _deep(pick: Pick) -> bytes:
    n = [1, 10, 31, 32, 33, 100, 550, 2000, 5000][pick(9)]
    if pick(2):
        return b"[" * n + b"]" * n
    return b"{a: " * n + b"}" * n


def _laughs(pick: Pick) -> bytes:
    levels = 3 + pick(8)
    lines = [b'l0: &l0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    for i in range(1, levels):
        lines.append(b"l%d: &l%d [" % (i, i) + b", ".join([b"*l%d" % (i - 1)] * 9) + b"]")
    return b"\n".join(lines) + b"\n"


def _value_span(data: bytes, pick: Pick) -> tuple[int, int] | None:
    """(start, end) of the value part of one `key: value` line, if there is one."""
    lines = data.split(b"\n")
    candidates = [i for i, line in enumerate(lines) if b": " in line]
    if not candidates:
        return None
    i = candidates[pick(len(candidates))]
    start = sum(len(x) + 1 for x in lines[:i]) + lines[i].index(b": ") + 2
    return start, start + len(lines[i]) - lines[i].index(b": ") - 2


def mutate_once(data: bytes, pick: Pick) -> bytes:
    kind = pick(12)
    pos = pick(len(data) + 1)
    if kind == 0 and data:  # flip a bit
        p = min(pos, len(data) - 1)
        return data[:p] + bytes([data[p] ^ (1 << pick(8))]) + data[p + 1 :]
    if kind == 1:  # truncate
        return data[:pos]
    if kind == 2:  # insert a token
        return data[:pos] + TOKENS[pick(len(TOKENS))] + data[pos:]
    if kind in (3, 4):  # swap a value's type
        span = _value_span(data, pick)
        if span is not None:
            return data[: span[0]] + VALUES[pick(len(VALUES))] + data[span[1] :]
        return data + b"\nx: " + VALUES[pick(len(VALUES))]
    if kind == 5:  # nest a value deeply
        span = _value_span(data, pick)
        if span is not None:
            return data[: span[0]] + _deep(pick) + data[span[1] :]
        return _deep(pick)
    if kind == 6:  # alias bombs and self-references
        return _laughs(pick) + data if pick(2) else data + b"\n" + _laughs(pick)
    if kind == 7:  # duplicate, drop or swap lines
        lines = data.split(b"\n")
        i, j = pick(len(lines)), pick(len(lines))
        op = pick(3)
        if op == 0:
            lines.insert(j, lines[i])
        elif op == 1:
            del lines[i]
        else:
            lines[i], lines[j] = lines[j], lines[i]
        return b"\n".join(lines)
    if kind == 8:  # a run of random bytes (one draw for all of them: draws are what costs)
        noise = random.Random(pick(1 << 30)).randbytes(pick(64) + 1)
        return data[:pos] + noise + data[pos:]
    if kind == 9:  # change indentation of a line
        lines = data.split(b"\n")
        i = pick(len(lines))
        lines[i] = b" " * pick(9) + lines[i].lstrip(b" ")
        return b"\n".join(lines)
    if kind == 10:  # merge key into a mapping
        return data.replace(b"\nspec:\n", b"\nspec:\n  <<: {mode: enforce}\n", 1)
    # kind 11: a second copy of the document (duplicate names, a second Controller)
    return data + b"\n---\n" + data


def mutate(seeds: list[bytes], pick: Pick) -> bytes:
    data = seeds[pick(len(seeds))]
    for _ in range(pick(4) + 1):
        data = mutate_once(data, pick)
    return data


def random_pick(rng: random.Random) -> Pick:
    return lambda n: rng.randrange(n) if n > 0 else 0


def mutated_files(directory: Path, count: int, seed: int) -> list[Path]:
    """`count` mutated policy files, the same ones for the same seed."""
    rng = random.Random(seed)
    seeds = seed_documents()
    directory.mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(count):
        p = directory / f"m{i:04d}.yaml"
        p.write_bytes(mutate(seeds, random_pick(rng)))
        out.append(p)
    return out
