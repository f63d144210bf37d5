"""Parsing of the quantities people write in policies: durations, sizes and counts.

Pure functions that raise `ValueError` with a message saying what was expected; the policy
schema turns that into a file:line:field error.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

# One or more number+unit parts, largest unit first, each unit once: 30s, 5m, 1h30m, 1d12h.
# re.ASCII: \d would also match other scripts' digits (Arabic-Indic 30 is \u0663\u0660),
# which float() then accepts.
_DURATION = re.compile(r"\s*(?:\d+(?:\.\d+)?(?:ms|s|m|h|d))+\s*", re.ASCII)
_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)", re.ASCII)
_DURATION_UNITS = {"d": 86400.0, "h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001}

# Decimal suffixes for counts (5M negative dentries), binary for sizes (256Mi). A bare K/M/G on
# a byte metric is ambiguous; we follow Kubernetes resource quantities: K=1000, Ki=1024.
_COUNT = re.compile(r"\s*(\d+(?:\.\d+)?)\s*(k|K|M|G|T|Ki|Mi|Gi|Ti)?\s*", re.ASCII)
_COUNT_UNITS = {
    None: 1,
    "k": 10**3,
    "K": 10**3,
    "M": 10**6,
    "G": 10**9,
    "T": 10**12,
    "Ki": 2**10,
    "Mi": 2**20,
    "Gi": 2**30,
    "Ti": 2**40,
}
# Above 100% is meaningful for limits that are a scale rather than a ceiling (the dentry hash
# bucket count: `above: 200%` = two negatives per bucket).
MAX_PERCENT = 100_000.0
_PERCENT = re.compile(r"\s*(\d+(?:\.\d+)?)\s*%\s*", re.ASCII)

# The longest duration anything accepts (each field has its own, smaller or equal, range in
# docs/policies.md): longer than a year is never meant, and it keeps every sum of durations the
# evaluator and the scheduler make far from float and datetime limits.
MAX_DURATION_S = 366 * 86400.0
# The largest count or size: kernel counters and limits are at most 64 bits (sysctls signed),
# so a threshold or ceiling above 2^63 can never be reached; it also keeps int() of any
# count exact and finite.
MAX_COUNT = float(2**63)

DURATION_HELP = "a duration such as 30s, 5m, 1h30m or 1d"
AMOUNT_HELP = "a number (20M, 64Mi, 1.5k) or a percentage of the live kernel limit (80%)"


class OutOfRange(ValueError):
    """The value has the right form but is outside what is accepted (more than 2^63, NaN)."""


def shown(value: object, limit: int = 60) -> str:
    """repr() for an error message, cut short: a message stays one readable line even when the
    value is a megabyte of text."""
    try:
        text = repr(value)
    except ValueError:  # an int of more than 4300 digits has no repr (sys.get_int_max_str_digits)
        return f"<{type(value).__name__}>"
    return text if len(text) <= limit else f"{text[: limit - 5]}...{text[-2:]}"


def parse_duration(text: object) -> float:
    """'30s' -> 30.0, at most MAX_DURATION_S. Bare numbers are rejected: '30' is ambiguous
    (seconds? minutes?)."""
    if not isinstance(text, str) or not _DURATION.fullmatch(text):
        raise ValueError(f"expected {DURATION_HELP}, got {shown(text)}")
    parts = _DURATION_PART.findall(text)
    order = [list(_DURATION_UNITS).index(unit) for _, unit in parts]
    if order != sorted(set(order)):
        raise ValueError(f"expected {DURATION_HELP} (largest unit first, each once), got {shown(text)}")
    total = sum(float(number) * _DURATION_UNITS[unit] for number, unit in parts)
    if not total <= MAX_DURATION_S:  # also catches inf from a 400-digit number
        raise OutOfRange(f"must be at most 366d, got {shown(text)}")
    return total


def format_duration(seconds: float) -> str:
    """For people: 3580 -> '59m40s', 3600 -> '1h', 425.83 -> '7m6s', 5.8294 -> '5.83s',
    0.25 -> '250ms'. Whole seconds from a minute up, three significant digits below."""
    if seconds < 1:
        return f"{float(f'{seconds * 1000:.3g}'):g}ms"
    if seconds < 60:
        return f"{float(f'{seconds:.3g}'):g}s"
    rest = round(seconds)
    parts = []
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        n, rest = divmod(rest, size)
        if n:
            parts.append(f"{n}{unit}")
    if rest:
        parts.append(f"{rest}s")
    return "".join(parts)


def format_number(v: float | None) -> str:
    """1234567 -> '1.23M', 8678 -> '8678', 0.5 -> '0.5', None -> '-'. For people, not parsing."""
    if v is None:
        return "-"
    if abs(v) >= 1e15:
        return f"{v:.3g}"
    for size, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(v) >= max(size, 1e4):
            return f"{v / size:.3g}{suffix}"
    return str(int(v)) if v == int(v) else f"{v:.4g}"


def parse_count(text: object) -> float:
    """'5M' -> 5e6, '64Mi' -> 67108864, 12 -> 12; always finite, from 0 to MAX_COUNT."""
    if isinstance(text, bool) or not isinstance(text, str | int | float):
        raise ValueError(f"expected a number such as 20M or 64Mi, got {shown(text)}")
    if isinstance(text, int | float):
        if isinstance(text, float) and math.isnan(text):
            raise OutOfRange("expected a number, got .nan")
        if text < 0:
            raise ValueError(f"expected a non-negative number, got {shown(text)}")
        # Compared before float(): float() of an int above 1.8e308 raises OverflowError.
        if text > MAX_COUNT:
            raise OutOfRange(f"must be at most 2^63 (9.2E18), got {shown(text)}")
        return float(text)
    m = _COUNT.fullmatch(text)
    if not m:
        raise ValueError(f"expected a number such as 20M or 64Mi, got {shown(text)}")
    value = float(m.group(1)) * _COUNT_UNITS[m.group(2)]
    if not value <= MAX_COUNT:
        raise OutOfRange(f"must be at most 2^63 (9.2E18), got {shown(text)}")
    return value


@dataclass(frozen=True)
class Amount:
    """A threshold: an absolute number, or a fraction of the metric's live kernel limit."""

    value: float
    percent: bool = False

    def resolve(self, limit: float | None) -> float | None:
        """The absolute threshold; None when it is a percentage and the limit is unknown."""
        if not self.percent:
            return self.value
        if limit is None:
            return None
        return self.value / 100.0 * limit

    def __str__(self) -> str:
        return f"{self.value:g}%" if self.percent else f"{self.value:g}"


def parse_amount(text: object) -> Amount:
    if isinstance(text, str):
        m = _PERCENT.fullmatch(text)
        if m:
            pct = float(m.group(1))
            # Above 100% is meaningful for limits that are a scale rather than a ceiling: the
            # dentry hash bucket count (`above: 200%` = two negatives per bucket).
            if not 0 < pct <= MAX_PERCENT:
                raise ValueError(f"expected a percentage in (0, {MAX_PERCENT:g}], got {shown(text)}")
            return Amount(pct, percent=True)
    try:
        return Amount(parse_count(text))
    except OutOfRange:
        raise
    except ValueError:
        raise ValueError(f"expected {AMOUNT_HELP}, got {shown(text)}") from None
