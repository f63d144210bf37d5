"""Durations and numbers as people read them."""

from __future__ import annotations

import pytest

from remediator.quantity import format_duration, format_number, parse_duration


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (0, "0ms"),
        (0.25, "250ms"),
        (0.0015, "1.5ms"),
        (0.123456, "123ms"),
        (1, "1s"),
        (5.82944, "5.83s"),
        (59.99, "60s"),
        (60, "1m"),
        (425.82944, "7m6s"),
        (3580, "59m40s"),
        (3600, "1h"),
        (3661.4, "1h1m1s"),
        (86400 + 7200, "1d2h"),
    ],
)
def test_format_duration(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text


@pytest.mark.parametrize("text", ["250ms", "30s", "5m", "1h", "59m40s", "1d2h", "1h1m1s"])
def test_format_duration_round_trips_whole_units(text: str) -> None:
    assert format_duration(parse_duration(text)) == text


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("30s", 30), ("1.5s", 1.5), ("250ms", 0.25), ("1h30m", 5400), ("1d12h", 129600), ("2m30s500ms", 150.5)],
)
def test_parse_duration(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("bad", ["30", "", "5 m", "30m1h", "1m1m", "1h-5m", "5min", "-5s", 30, True])
def test_parse_duration_rejects(bad: object) -> None:
    with pytest.raises(ValueError, match="expected a duration such as 30s, 5m, 1h30m or 1d"):
        parse_duration(bad)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (None, "-"),
        (0, "0"),
        (8678, "8678"),
        (12_000, "12k"),
        (1_234_567, "1.23M"),
        (0.5, "0.5"),
        (102.4, "102.4"),
    ],
)
def test_format_number(value: float | None, text: str) -> None:
    assert format_number(value) == text
