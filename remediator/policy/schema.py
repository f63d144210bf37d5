"""The policy file format, version `remediator.io/v1`.

A policy directory holds YAML files; each file holds one or more documents (`---`). A document
is either a `Policy` or the (at most one) `Controller` document with host-wide settings such as
the circuit breaker. Unknown keys, wrong types, bad durations and bad amounts are errors.

These pydantic models check shape and scalar syntax. Cross-references that need the catalog
(does the probe exist, does it have that metric, are the action's params right) are checked by
the loader, which knows the catalog.

They are also the one source of the field reference: each field's `description` (its meaning,
also in the JSON Schema for editors) and its `Doc` (why the default, and the type or default as
people read them) are what `remediator schema --markdown docs/policies.md` writes into the
reference tables (remediator/policy/reference.py). Change a field here, then regenerate.
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass
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
# kubernetes.heartbeat: under a minute is a write a minute per firing policy for nothing (the
# condition did not change); over a day and nobody can tell a stale condition from a live one.
HEARTBEAT_RANGE = (60.0, DAY)
BUDGET_MAX_RANGE = (1, 1000)  # 1000 actions of one policy per window is already a runaway
BREAKER_MAX_RANGE = (1, 100_000)


@dataclass(frozen=True)
class Doc:
    """Reference facts of a field or type that validation does not need (pydantic ignores this
    annotation): why the default is what it is, and, where the annotation or the value would
    read badly, the type or the default as the reference shows them (Markdown)."""

    why: str = ""
    type: str = ""
    default: str = ""


def _duration(v: Any) -> float:
    return parse_duration(v)


@dataclass(frozen=True)
class Within:
    """The range check of a duration type; a class, not a closure, so the reference can show
    the range it checks."""

    lo: float
    hi: float

    def __call__(self, v: float) -> float:
        lo, hi = self.lo, self.hi
        if v < lo or v > hi:
            if lo > 0 and v <= 0:
                raise ValueError("must be longer than 0s")
            raise ValueError(
                f"must be from {format_duration(lo) if lo else '0s'} to {format_duration(hi)}, "
                f"got {format_duration(v)}"
            )
        return v


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
    Doc(type="duration"),
]
Interval = Annotated[Duration, AfterValidator(Within(*INTERVAL_RANGE))]
Hold = Annotated[Duration, AfterValidator(Within(*HOLD_RANGE))]
Settle = Annotated[Duration, AfterValidator(Within(*SETTLE_RANGE))]
Cooldown = Annotated[Duration, AfterValidator(Within(*COOLDOWN_RANGE))]
Window = Annotated[Duration, AfterValidator(Within(*WINDOW_RANGE))]
HistoryAge = Annotated[Duration, AfterValidator(Within(*HISTORY_AGE_RANGE))]
NotifyTimeout = Annotated[Duration, AfterValidator(Within(*NOTIFY_TIMEOUT_RANGE))]
NotifyBackoff = Annotated[Duration, AfterValidator(Within(*NOTIFY_BACKOFF_RANGE))]
Heartbeat = Annotated[Duration, AfterValidator(Within(*HEARTBEAT_RANGE))]
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
    Doc(type="amount"),
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
    Doc(type="count"),
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
    include: Annotated[list[Matcher], Doc(default="`[]` (all)")] = Field(
        default_factory=list,
        description="Only these containers are subjects (scope `container`) or action targets.",
    )
    exclude: list[Matcher] = Field(
        default_factory=list, description="Never subjects or targets, even if included."
    )
    protectLabel: Annotated[
        str,
        AfterValidator(_check_label),
        Doc(type="`key` or `key=value`", why="One label that container owners can set themselves."),
    ] = Field(
        default=DEFAULT_PROTECT_LABEL,
        description="Containers with this label are never acted on.",
    )


class Watch(Strict):
    probe: Annotated[str, Doc(type="probe name")] = Field(
        description="Which probe produces the metric ([probes](#probes-and-metrics))."
    )
    metric: Annotated[str, Doc(type="metric name")] = Field(description="A metric of that probe.")
    scope: Annotated[Scope, Field(strict=False), Doc(why="Most shared-kernel problems are host-wide.")] = (
        Field(
            default=Scope.HOST,
            description="`host`: one condition for the whole host. `container`: one condition per "
            "container in the reading; the metric must be per-container.",
        )
    )
    above: AmountField = Field(
        description="The trigger: the condition starts to hold when the value is above this. "
        "A percentage is of the metric's live kernel limit."
    )
    clearBelow: Annotated[
        AmountField | None, Doc(type="amount", default="the trigger", why="No hysteresis unless asked for.")
    ] = Field(
        default=None,
        description="Hysteresis: once holding, the condition clears only when the value is "
        "below this. Must not be above `above` when both are absolute or both are percentages.",
    )
    for_: Annotated[Hold, Doc(why="No delay unless asked for; every bundled policy sets one (1m-10m).")] = (
        Field(
            default=0.0,
            alias="for",
            description="Hold-down: how long the condition must hold before the first step acts.",
        )
    )

    @model_validator(mode="after")
    def _clear_not_above_trigger(self) -> Watch:
        c, a = self.clearBelow, self.above
        if c is not None and c.percent == a.percent and c.value > a.value:
            raise ValueError(f"clearBelow ({c}) must not be above the trigger `above` ({a})")
        return self


class Step(Strict):
    action: Annotated[str, Doc(type="action name")] = Field(description="Which action ([actions](#actions)).")
    mode: Annotated[LooseMode | None, Doc(default="the policy's mode")] = Field(
        default=None,
        description="Overrides the policy's mode for this step, in either direction. The usual "
        "use: keep a disruptive step in `audit` while the policy enforces the safe ones.",
    )
    allowDisruptive: Annotated[
        bool,
        Doc(
            why="Restarting a service or emptying every tenant's caches needs an explicit yes, "
            "not a convention."
        ),
    ] = Field(
        default=False,
        description="Opt in to a disruptive action (`recreate-container`, `evict-pod`, "
        "`drop-caches`, `restart-degraded`). Without it the step runs in audit mode whatever "
        "`mode` says; the engine enforces this, and `remediator validate` warns about a "
        "disruptive step in an enforcing policy without it.",
    )
    settle: Annotated[
        Settle,
        Doc(
            why="Long enough for the kernel counters and a restarted container to show the "
            "effect; short enough that a failing step does not hold up the next one for long."
        ),
    ] = Field(
        default=60.0,
        description="After the step, wait this long before judging it and escalating.",
    )
    params: dict[str, Any] = Field(
        default_factory=dict,
        description="The action's parameters, checked against the action's own schema ([actions](#actions)).",
    )


class Budget(Strict):
    max: Annotated[
        int,
        Field(ge=BUDGET_MAX_RANGE[0], le=BUDGET_MAX_RANGE[1]),
        Doc(why="A policy that needs more than three actions an hour is not fixing the problem."),
    ] = Field(description="At most this many actions of this policy ...")
    per: Window = Field(
        description="... within any window of this length. Applied, failed and would-apply "
        "actions count; skipped ones do not. When `budget` is given, both keys are required."
    )


class PolicySpec(Strict):
    mode: Annotated[LooseMode, Doc(why="A new policy shows what it would do before it does it.")] = Field(
        default=Mode.AUDIT,
        description="`audit` plans and records what it would do and changes nothing; `enforce` "
        "acts. See [the effective-mode rule](how-it-works.md#modes-audit-enforce-dry-run).",
    )
    interval: Annotated[
        Interval,
        Doc(
            why="The probes are cheap (one cycle reads all three in well under a second), and "
            "30 s is short next to any sensible hold-down."
        ),
    ] = Field(
        default=30.0,
        description="How often the daemon evaluates this policy. Not used by `remediator once`, "
        "which evaluates every policy on every run (the timer period is the interval).",
    )
    watch: Watch
    actions: Annotated[list[Step], Field(min_length=1), Doc(type="list of steps, at least one")] = Field(
        description="The escalation ladder, first step first."
    )
    cooldown: Annotated[
        Cooldown,
        Doc(why="A problem that comes back at once is not fixed by running the same steps again at once."),
    ] = Field(
        default=600.0,
        description="After a ladder ends (resolved or exhausted), how long before the same "
        "condition may start a new ladder.",
    )
    budget: Budget = Field(default_factory=lambda: Budget.model_validate({"max": 3, "per": "1h"}))
    containers: Containers = Field(default_factory=Containers)


def _check_name(v: str) -> str:
    if not _NAME.fullmatch(v):
        raise ValueError(
            f"expected a lower-case name of letters, digits and '-' (at most 63), got {shown(v)}"
        )
    return v


class Metadata(Strict):
    name: Annotated[str, AfterValidator(_check_name)] = Field(
        description="Lower-case letters, digits and `-`, 1-63 characters, starting and ending "
        "with a letter or digit; unique in the set. It keys the stored state, the metrics labels "
        "and the audit events."
    )
    description: str = Field(default="", description="For people.")


class PolicyDoc(Strict):
    apiVersion: Literal["remediator.io/v1"] = Field(
        description="Format version ([upgrading.md](upgrading.md#the-policy-apiversion))."
    )
    kind: Literal["Policy"] = Field(description="What the document is.")
    metadata: Metadata
    spec: PolicySpec


class Breaker(Strict):
    maxActions: Annotated[
        int,
        Field(ge=BREAKER_MAX_RANGE[0], le=BREAKER_MAX_RANGE[1]),
        Doc(
            why="Far above what the bundled policies do on a healthy host; reaching it means the "
            "host or a policy is in a state no one planned for."
        ),
    ] = Field(
        default=20,
        description="More applied actions than this, host-wide, within `window` open the circuit "
        "breaker: every action runs in audit mode until `remediator reset-breaker`. Audit actions "
        "do not count.",
    )
    window: Window = Field(default=3600.0, description="The window `maxActions` is counted in.")


class History(Strict):
    """How much action history state.db keeps (conditions are kept while their policy exists)."""

    maxAge: Annotated[
        HistoryAge,
        Doc(why="A month of `remediator status` and reviews; the audit log is the long-term record."),
    ] = Field(
        default=30 * 86400.0,
        description="Action history rows older than this are removed from `state.db`, after every "
        "locked cycle (`run` and `once`, live and dry-run). Rows inside the longest budget `per` "
        "or breaker `window`, and rows still `started`, are kept whatever this says: budgets and "
        "the breaker count them, and a crash is found by them.",
    )
    maxActions: Annotated[
        int,
        Field(ge=100, le=1_000_000),
        Doc(why="Keeps `state.db` to a few MB whatever the actions report."),
    ] = Field(
        default=5000,
        description="At most this many action rows per state namespace; the oldest go first "
        "(with the same exceptions). Lists inside a stored plan or result keep their first 100 "
        "items and a note of how many more there were; the audit log keeps the whole event.",
    )


def _check_url(v: str) -> str:
    if not re.match(r"^https?://[^\s/]+(/\S*)?$", v):
        raise ValueError(f"expected an http:// or https:// URL, got {v!r}")
    return v


NotifyOn = Literal["applied", "failed", "escalation", "breaker"]


class Webhook(Strict):
    """One receiver of notifications: a JSON POST per notification."""

    url: Annotated[str, AfterValidator(_check_url), Doc(type="`http://` or `https://` URL")] = Field(
        description="Receiver of a JSON POST per notification. For `format: alertmanager`, "
        "Alertmanager's `/api/v2/alerts`."
    )
    format: Literal["generic", "alertmanager"] = Field(
        default="generic",
        description="`generic`: one `remediator.notification/v1` object. `alertmanager`: a list "
        "of one alert, as Alertmanager's `/api/v2/alerts` takes it.",
    )
    timeout: Annotated[
        NotifyTimeout,
        Doc(why="A receiver slower than that is down for our purposes; the POST is retried."),
    ] = Field(default=5.0, description="Per POST.")


class Notify(Strict):
    """Notifications of actions, failures, escalations and breaker trips. Every one is an event
    in the journal (`notification`); `webhooks` also get it, from a queue in the state directory
    that a restart resumes."""

    # Not `on:`: YAML 1.1 (PyYAML) reads that key as the boolean true.
    events: Annotated[
        list[NotifyOn], Doc(default="all four", why="Everything that changed the host or needs a person.")
    ] = Field(
        default_factory=lambda: list(get_args(NotifyOn)),
        description="What is notified: actions applied, actions failed, escalations (a ladder "
        "step after the first, applied or failed), the breaker tripping. Each is a "
        "`notification` event in the journal, and a POST to every webhook "
        "([operations.md](operations.md#notifications)). (The key is not `on`: YAML 1.1 reads "
        "that as `true`.)",
    )
    webhooks: Annotated[list[Webhook], Doc(type="list of webhooks")] = Field(
        default_factory=list, description="Receivers of the notifications."
    )
    attempts: Annotated[
        int,
        Field(ge=1, le=20),
        Doc(why="With back-off 1, 2, 4, 8 s: a receiver restart is ridden out."),
    ] = Field(
        default=5,
        description="POSTs per notification and webhook (across restarts) before it is given up "
        "(`notification_dropped`).",
    )
    backoffMax: NotifyBackoff = Field(
        default=60.0, description="Longest wait between two attempts (exponential from 1 s)."
    )
    queueMax: Annotated[
        int,
        Field(ge=10, le=100_000),
        Doc(why="A receiver down for days must not grow the state directory without bound."),
    ] = Field(
        default=1000,
        description="Undelivered notifications kept in `notify.db`; past it the oldest are dropped.",
    )


class Kubernetes(Strict):
    """What a Kubernetes node tells its API server ([kubernetes.md](kubernetes.md#node-conditions)).
    Only where a kubeconfig or in-cluster credentials are configured; never in audit mode."""

    conditions: Annotated[bool, Doc(why="What node-problem-detector users look at.")] = Field(
        default=True,
        description="Each firing policy sets a condition `Remediator<PolicyName>` on this Node "
        "(status True), cleared (False, reason `NoProblem`) when it resolves.",
    )
    events: Annotated[bool, Doc(why="`kubectl describe` shows what happened and why.")] = Field(
        default=True,
        description="Events on the Node and on the affected pod when a policy fires, an action "
        "is applied or fails, and a condition clears (aggregated, rate-limited).",
    )
    heartbeat: Annotated[
        Heartbeat, Doc(why="As node-problem-detector's default: fresh enough, one write per 5 min.")
    ] = Field(
        default=300.0,
        description="How often a firing condition's `lastHeartbeatTime` is refreshed; a condition "
        "that did not change is otherwise never written.",
    )
    taint: Annotated[list[str], Doc(default="`[]` (none)", type="list of policy names")] = Field(
        default_factory=list,
        description="Opt-in: while one of these policies fires, the Node carries the taint "
        "`remediator.io/<policy>=true:NoSchedule`; it is removed when the condition clears.",
    )


class ControllerSpec(Strict):
    breaker: Breaker = Field(default_factory=Breaker)
    history: History = Field(default_factory=History)
    notify: Notify = Field(default_factory=Notify)
    kubernetes: Kubernetes = Field(default_factory=Kubernetes)
    protect: list[Matcher] = Field(
        default_factory=list,
        description="Containers that no policy may ever act on, whatever their labels say; added "
        "to every policy's protection. Put the control plane here.",
    )


class ControllerDoc(Strict):
    apiVersion: Literal["remediator.io/v1"] = Field(description="Format version.")
    kind: Literal["Controller"] = Field(
        description="What the document is: the host-wide settings, at most one per set."
    )
    metadata: Metadata | None = Field(default=None, description="Optional.")
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
