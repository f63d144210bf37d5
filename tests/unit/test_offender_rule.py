"""The offender rule of the shared-pool policies: a container is acted on only when it holds
>= minShare of the pool's usage, or when the pool is critical (>= orTopAbove of its limit) and it
is the top holder. Pure: PlanContext over hand-made readings."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from remediator.actions.base import ContainerTargetParams, OffenderRule, PlanContext, choose_container
from remediator.actions.recreate import RecreateContainer, RecreateContainerParams
from remediator.model import ContainerRef, ContainerSample, Plan, Reading

HOG = ContainerRef("a" * 64, "hog")
SMALL = ContainerRef("b" * 64, "small")
PROTECTED = ContainerRef("c" * 64, "db")


def reading(usage: float | None, limit: float | None, hog: float, small: float = 10) -> Reading:
    values = {} if usage is None else {"inotify_watches_max_uid": usage}
    limits = {} if limit is None else {"inotify_watches_max_uid": limit}
    return Reading(
        "limits",
        0.0,
        values=values,
        limits=limits,
        containers=(
            ContainerSample(HOG, {"inotify_watches": hog}),
            ContainerSample(SMALL, {"inotify_watches": small}),
            ContainerSample(PROTECTED, {"inotify_watches": 10_000}),
        ),
    )


def ctx(r: Reading, **params: object) -> PlanContext:
    p = RecreateContainerParams.model_validate({"target": "top", "rankBy": "inotify_watches", **params})
    return PlanContext(
        "inotify-watches", "inotify_watches_max_uid", "host", r, p, lambda c: c is not PROTECTED, 0.0
    )


def choose(r: Reading, **params: object) -> ContainerRef | str:
    c = ctx(r, **params)
    p = c.params
    assert isinstance(p, ContainerTargetParams)
    return choose_container(c, p.target, p.rankBy, p.offender)


RULE = {"minShare": "50%", "orTopAbove": "95%"}


@pytest.mark.parametrize(
    ("usage", "limit", "hog", "chosen"),
    [
        (1000, 8192, 500, HOG),  # exactly half of the pool: the offender
        (1000, 8192, 499, None),  # just under half, pool at 12 %: nobody
        (1000, 1053, 100, None),  # 10 %, pool at 94.97 %: not yet critical
        (1000, 1052, 100, HOG),  # 10 %, pool at 95.06 %: critical, so the top holder
        (1000, 1000, 20, HOG),  # pool full: the top holder, small as its share is
        (1000, 1000, 5, SMALL),  # ... which is whoever holds the most (small: 10)
    ],
)
def test_share_or_critical_edges(usage: float, limit: float, hog: float, chosen: ContainerRef | None) -> None:
    got = choose(reading(usage, limit, hog), **RULE)
    if chosen is None:
        assert isinstance(got, str) and "under minShare 50%" in got and "under orTopAbove 95%" in got
    else:
        assert got == chosen


def test_the_refusal_says_share_and_fill() -> None:
    got = choose(reading(2001, 8192, 240), **RULE)
    assert got == (
        "hog holds 12% of the pool (240 of 2001), under minShare 50%, and the pool is at 24% of its "
        "limit, under orTopAbove 95%"
    )


def test_a_protected_container_is_never_the_offender_even_holding_most() -> None:
    # db holds 10,000 of 12,000 but is not eligible; hog's 1,000 is 8 %: nobody.
    got = choose(reading(12_000, 100_000, 1000), **RULE)
    assert isinstance(got, str) and got.startswith("hog holds 8%")


def test_without_or_top_above_only_the_share_counts() -> None:
    assert isinstance(choose(reading(1000, 1000, 100), minShare="50%"), str)  # full, but 10 %
    assert choose(reading(1000, 1000, 600), minShare="50%") == HOG


def test_unknown_usage_or_limit() -> None:
    got = choose(reading(None, 1000, 600), **RULE)
    assert got == "pool usage is unknown: cannot tell whether hog holds 50% of it"
    assert choose(reading(1000, None, 600), **RULE) == HOG  # the share alone decides
    got = choose(reading(1000, None, 100), **RULE)
    assert isinstance(got, str) and got.endswith("and the pool's limit is unknown")


def test_no_rule_keeps_the_top_container_whatever_its_share() -> None:
    assert choose(reading(100_000, 100_000, 11)) == HOG


def test_the_plan_of_recreate_carries_the_refusal() -> None:
    c = ctx(reading(1000, 8192, 100), **RULE)
    out = RecreateContainer().plan(c)
    assert isinstance(out, str) and out.startswith("hog holds 10%")
    c = ctx(reading(1000, 8192, 900), **RULE)
    assert isinstance(RecreateContainer().plan(c), Plan)


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"minShare": "150%"}, "minShare: expected a percentage in (0, 100]"),
        ({"minShare": "0.5"}, "minShare: expected a percentage such as 50%"),
        ({"minShare": "50%", "orTopAbove": "0%"}, "orTopAbove: expected a percentage in (0, 100]"),
        ({"orTopAbove": "95%"}, "orTopAbove needs minShare"),
        ({"minShare": "50%", "target": "subject"}, 'minShare picks among containers: it needs target "top"'),
    ],
)
def test_bad_rules_are_refused(params: dict[str, object], message: str) -> None:
    with pytest.raises(ValidationError, match=message.replace("(", r"\(").replace("]", r"\]")):
        RecreateContainerParams.model_validate(params)


def test_rule_fractions() -> None:
    rule = OffenderRule("50%", "95%")
    assert (rule.min_share, rule.or_top_above) == (0.5, 0.95)
    assert rule.judge("x", 50, 100, 1000) is None
