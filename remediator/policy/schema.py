"""The policy file format, version `remediator.io/v1`.

A policy directory holds YAML files; each file holds one or more documents (`---`). A document
is either a `Policy` or the (at most one) `Controller` document with host-wide settings such as
the circuit breaker. Unknown keys, wrong types, bad durations and bad amounts are errors.

These pydantic models check shape and scalar syntax. Cross-references that need the catalog
(does the probe exist, does it have that metric, are the action's params right) are checked by
the loader, which knows the catalog.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Callable
from typing import Annotated, Any, Literal, get_args

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    WithJsonSchema,
    model_validator,
)

from remediator.model import Mode, Scope
from remediator.quantity import (
    AMOUNT_HELP,
    DURATION_HELP,
    Amount,
    format_duration,
    parse_amount,
    parse_count,
    parse_duration,
    shown,
)

API_VERSION = "remediator.io/v1"
DEFAULT_PROTECT_LABEL = "remediator.protect=true"

_DURATION_PATTERN = r"^\s*\d+(\.\d+)?\s*(ms|s|m|h|d)\s*$"
_AMOUNT_PATTERN = r"^\s*\d+(\.\d+)?\s*(%|k|K|M|G|T|Ki|Mi|Gi|Ti)?\s*$"
# Matched with fullmatch: `$` would also accept a trailing newline ("web\n").
_NAME = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?")
_LABEL = re.compile(r"[A-Za-z0-9_.\-/]{1,253}(=[^\s]{0,253})?")

# Ranges of every duration and count, documented in docs/policies.md ("Ranges"). What they
# protect: the scheduler (APScheduler and datetime overflow past year 9999, which an
# `interval: 1000000000d` reached), the evaluator's sums of times, and the operator from a value
# that can never be meant (a hold-down of a year). Each bound says why.
MINUTE, HOUR, DAY = 60.0, 3600.0, 86400.0
INTERVAL_RANGE = (1.0, DAY)  # below 1s a cycle re-reads /proc for nothing (actions settle for
# minutes); above 1d the leaks of the case reports (thousands of fifo dirs an hour) outrun it
HOLD_RANGE = (0.0, 7 * DAY)  # `for`: a condition that must hold over a week is a report, not a repair
SETTLE_RANGE = (0.001, DAY)  # > 0: a step is judged after it has had a chance to work
COOLDOWN_RANGE = (0.0, 30 * DAY)
# budget.per, breaker.window: history retention (state) must keep at least the longest window.
WINDOW_RANGE = (1.0, 30 * DAY)
# history.maxAge: budgets and the breaker keep their windows' rows whatever it says.
HISTORY_AGE_RANGE = (1.0, 366 * DAY)
NOTIFY_TIMEOUT_RANGE = (0.1, 60.0)  # per POST: a receiver slower than a minute is down
NOTIFY_BACKOFF_RANGE = (1.0, DAY)
BUDGET_MAX_RANGE = (1, 1000)  # 1000 actions of one policy per window is already a runaway
BREAKER_MAX_RANGE = (1, 100_000)


def _duration(v: Any) -> float:
    return parse_duration(v)


def _within(lo: float, hi: float) -> Callable[[float], float]:
    def check(v: float) -> float:
        if v < lo or v > hi:
            if lo > 0 and v <= 0:
                raise ValueError("must be longer than 0s")
            raise ValueError(
                f"must be from {format_duration(lo) if lo else '0s'} to {format_duration(hi)}, "
                f"got {format_duration(v)}"
            )
        return v

    return check


def _amount(v: Any) -> Amount:
    if isinstance(v, Amount):
        return v
    return parse_amount(v)


def _count(v: Any) -> float:
    return parse_count(v)


Duration = Annotated[
    float,
    BeforeValidator(_duration),
    WithJsonSchema({"type": "string", "pattern": _DURATION_PATTERN, "description": DURATION_HELP}),
]
Interval = Annotated[Duration, AfterValidator(_within(*INTERVAL_RANGE))]
Hold = Annotated[Duration, AfterValidator(_within(*HOLD_RANGE))]
Settle = Annotated[Duration, AfterValidator(_within(*SETTLE_RANGE))]
Cooldown = Annotated[Duration, AfterValidator(_within(*COOLDOWN_RANGE))]
Window = Annotated[Duration, AfterValidator(_within(*WINDOW_RANGE))]
HistoryAge = Annotated[Duration, AfterValidator(_within(*HISTORY_AGE_RANGE))]
NotifyTimeout = Annotated[Duration, AfterValidator(_within(*NOTIFY_TIMEOUT_RANGE))]
NotifyBackoff = Annotated[Duration, AfterValidator(_within(*NOTIFY_BACKOFF_RANGE))]
AmountField = Annotated[
    Amount,
    BeforeValidator(_amount),
    WithJsonSchema(
        {
            "anyOf": [
                {"type": "string", "pattern": _AMOUNT_PATTERN},
                {"type": "number", "minimum": 0},
            ],
            "description": AMOUNT_HELP,
        }
    ),
]
Count = Annotated[
    float,
    BeforeValidator(_count),
    WithJsonSchema(
        {
            "anyOf": [
                {"type": "string", "pattern": r"^\s*\d+(\.\d+)?\s*(k|K|M|G|T|Ki|Mi|Gi|Ti)?\s*$"},
                {"type": "integer", "minimum": 0},
            ],
            "description": "a count or size such as 20M or 64Mi",
        }
    ),
]


# Enums are written as plain strings in YAML; strict mode would demand enum instances.
LooseMode = Annotated[Mode, Field(strict=False)]


class Strict(BaseModel):
    # strict=True: YAML `"3"` is not the integer 3, `yes` is not a string. Quantities go through
    # their own BeforeValidators, which accept strings on purpose.
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, populate_by_name=False)


def _check_label(v: str) -> str:
    if not _LABEL.fullmatch(v):
        raise ValueError(f"expected a label as key or key=value, got {shown(v)}")
    return v


def _check_glob(v: str) -> str:
    if not v or len(v) > 253:
        raise ValueError("expected a container name or glob pattern (1-253 characters)")
    fnmatch.translate(v)  # cannot fail for str, but documents that this is a glob
    return v


class Matcher(Strict):
    """Matches a container by name (a glob, e.g. `web-*`) or by label (`key` or `key=value`)."""

    name: Annotated[str, AfterValidator(_check_glob)] | None = None
    label: Annotated[str, AfterValidator(_check_label)] | None = None

    @model_validator(mode="after")
    def _exactly_one(self) -> Matcher:
        if (self.name is None) == (self.label is None):
            raise ValueError("give exactly one of `name` or `label`")
        return self


class Containers(Strict):
    include: list[Matcher] = Field(
        default_factory=list,
        description="Only these containers are candidates (empty: all containers).",
    )
    exclude: list[Matcher] = Field(default_factory=list, description="Never candidates, even if included.")
    protectLabel: Annotated[str, AfterValidator(_check_label)] = Field(
        default=DEFAULT_PROTECT_LABEL,
        description="Containers carrying this label are never touched by any action.",
    )


class Watch(Strict):
    probe: str = Field(description="Probe that produces the metric (see docs/policies.md).")
    metric: str
    scope: Annotated[Scope, Field(strict=False)] = Field(
        default=Scope.HOST,
        description="`host`: one condition for the host; `container`: one per container.",
    )
    above: AmountField = Field(
        description="Trigger: the condition holds when the metric is above this. "
        "A percentage is of the metric's live kernel limit."
    )
    clearBelow: AmountField | None = Field(
        default=None,
        description="Hysteresis: once holding, the condition clears only below this (default: the trigger).",
    )
    for_: Hold = Field(
        default=0.0,
        alias="for",
        description="Hold-down: how long the condition must hold before the first action (0s to 7d).",
    )

    @model_validator(mode="after")
    def _clear_not_above_trigger(self) -> Watch:
        c, a = self.clearBelow, self.above
        if c is not None and c.percent == a.percent and c.value > a.value:
            raise ValueError(f"clearBelow ({c}) must not be above the trigger `above` ({a})")
        return self


class Step(Strict):
    action: str
    mode: LooseMode | None = Field(
        default=None,
        description="Override the policy mode for this step only (e.g. keep a disruptive "
        "step in `audit` while the policy enforces the safe ones).",
    )
    allowDisruptive: bool = Field(
        default=False,
        description="Opt in to a disruptive action (recreate-container, host-wide drop-caches): "
        "without this it runs in audit mode whatever `mode` says.",
    )
    settle: Settle = Field(
        default=60.0,
        description="Wait this long after the step before judging it and escalating (over 0s, at most 1d).",
    )
    params: dict[str, Any] = Field(default_factory=dict)


class Budget(Strict):
    max: Annotated[int, Field(ge=BUDGET_MAX_RANGE[0], le=BUDGET_MAX_RANGE[1])]
    per: Window


class PolicySpec(Strict):
    mode: LooseMode = Field(default=Mode.AUDIT, description="`audit` records what it would do.")
    interval: Interval = Field(default=30.0, description="How often to evaluate (1s to 1d).")
    watch: Watch
    actions: Annotated[list[Step], Field(min_length=1)] = Field(
        description="The escalation ladder, first step first."
    )
    cooldown: Cooldown = Field(
        default=600.0,
        description="After a ladder ends, how long before the same condition may start a new one "
        "(0s to 30d).",
    )
    budget: Budget = Field(
        default_factory=lambda: Budget.model_validate({"max": 3, "per": "1h"}),
        description="At most `max` (1 to 1000) actions of this policy per `per` window (1s to 30d).",
    )
    containers: Containers = Field(default_factory=Containers)


def _check_name(v: str) -> str:
    if not _NAME.fullmatch(v):
        raise ValueError(
            f"expected a lower-case name of letters, digits and '-' (at most 63), got {shown(v)}"
        )
    return v


class Metadata(Strict):
    name: Annotated[str, AfterValidator(_check_name)]
    description: str = ""


class PolicyDoc(Strict):
    apiVersion: Literal["remediator.io/v1"]
    kind: Literal["Policy"]
    metadata: Metadata
    spec: PolicySpec


class Breaker(Strict):
    maxActions: Annotated[int, Field(ge=BREAKER_MAX_RANGE[0], le=BREAKER_MAX_RANGE[1])] = Field(
        default=20,
        description="More applied actions than this, host-wide, within `window` opens the "
        "breaker: everything is audit-only until `remediator reset-breaker`.",
    )
    window: Window = 3600.0


class History(Strict):
    """How much action history state.db keeps (conditions are kept while their policy exists)."""

    maxAge: HistoryAge = Field(
        default=30 * 86400.0,
        description="Action rows older than this are removed (never one still inside a budget "
        "or breaker window, nor one still marked started).",
    )
    maxActions: Annotated[int, Field(ge=100, le=1_000_000)] = Field(
        default=5000,
        description="At most this many action rows per state namespace; the oldest go first.",
    )


def _check_url(v: str) -> str:
    if not re.match(r"^https?://[^\s/]+(/\S*)?$", v):
        raise ValueError(f"expected an http:// or https:// URL, got {v!r}")
    return v


NotifyOn = Literal["applied", "failed", "escalation", "breaker"]


class Webhook(Strict):
    """One receiver of notifications: a JSON POST per notification."""

    url: Annotated[str, AfterValidator(_check_url)] = Field(
        description="http:// or https:// URL. For `format: alertmanager`, Alertmanager's `/api/v2/alerts`."
    )
    format: Literal["generic", "alertmanager"] = Field(
        default="generic",
        description="`generic`: one `remediator.notification/v1` object; `alertmanager`: a list "
        "of one alert as Alertmanager's API v2 takes it.",
    )
    timeout: NotifyTimeout = Field(default=5.0, description="Per POST.")


class Notify(Strict):
    """Notifications of actions, failures, escalations and breaker trips. Every one is an event
    in the journal (`notification`); `webhooks` also get it, from a queue in the state directory
    that a restart resumes."""

    # Not `on:`: YAML 1.1 (PyYAML) reads that key as the boolean true.
    events: list[NotifyOn] = Field(
        default_factory=lambda: list(get_args(NotifyOn)),
        description="What is notified: `applied` actions, `failed` actions, `escalation` (a "
        "ladder step after the first applied or failed), `breaker` (the breaker tripped).",
    )
    webhooks: list[Webhook] = Field(default_factory=list)
    attempts: Annotated[int, Field(ge=1, le=20)] = Field(
        default=5, description="POSTs per notification and webhook before it is given up."
    )
    backoffMax: NotifyBackoff = Field(
        default=60.0, description="Longest wait between attempts (exponential from 1 s)."
    )
    queueMax: Annotated[int, Field(ge=10, le=100_000)] = Field(
        default=1000, description="Undelivered notifications kept; past it the oldest are dropped."
    )


class ControllerSpec(Strict):
    breaker: Breaker = Field(default_factory=Breaker)
    history: History = Field(default_factory=History)
    notify: Notify = Field(default_factory=Notify)
    protect: list[Matcher] = Field(
        default_factory=list,
        description="Containers no policy may ever touch, in addition to protect labels.",
    )


class ControllerDoc(Strict):
    apiVersion: Literal["remediator.io/v1"]
    kind: Literal["Controller"]
    metadata: Metadata | None = None
    spec: ControllerSpec = Field(default_factory=ControllerSpec)


KINDS: dict[str, type[Strict]] = {"Policy": PolicyDoc, "Controller": ControllerDoc}


def json_schema(action_params: dict[str, dict[str, Any]] | None = None) -> dict[str, Any]:
    """JSON Schema (draft 2020-12) for one policy document, for editors and CI.

    With `action_params` (action name -> params JSON schema) each step's `params` is checked
    against its action's schema too.
    """
    policy = PolicyDoc.model_json_schema(by_alias=True)
    controller = ControllerDoc.model_json_schema(by_alias=True)
    defs: dict[str, Any] = {}
    for s in (policy, controller):
        defs.update(s.pop("$defs", {}))
    defs["PolicyDoc"] = policy
    defs["ControllerDoc"] = controller
    if action_params:
        step = defs["Step"]
        step["properties"]["action"] = {"enum": sorted(action_params)}
        step["allOf"] = [
            {
                "if": {"properties": {"action": {"const": name}}},
                "then": {"properties": {"params": schema}},
            }
            for name, schema in sorted(action_params.items())
        ]
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": "https://remediator.invalid/schema/policy-v1.json",
        "title": "remediator policy document (remediator.io/v1)",
        "oneOf": [{"$ref": "#/$defs/PolicyDoc"}, {"$ref": "#/$defs/ControllerDoc"}],
        "$defs": defs,
    }
