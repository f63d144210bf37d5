"""Actions change the host: plan (pure) / re-check / apply / verify. One module per action.

Must never: act without re-checking its target right before acting, act in dry-run mode, delete
recursively by path, or act without a bound (the engine enforces cooldowns, budgets and the
breaker; each action bounds its own batch size).
"""

from __future__ import annotations

from remediator.actions import (
    cap_memory,
    drop_caches,
    evict_pod,
    fifo_cleanup,
    reclaim,
    reclaim_parent,
    recreate,
    restart_degraded,
    sysctl,
)
from remediator.actions.base import ACTIONS, Action, ApplyContext, PlanContext
from remediator.policy.catalog import ActionSpec


def specs() -> dict[str, ActionSpec]:
    return {name: cls.spec() for name, cls in sorted(ACTIONS.items())}


__all__ = [
    "ACTIONS",
    "Action",
    "ApplyContext",
    "PlanContext",
    "cap_memory",
    "drop_caches",
    "evict_pod",
    "fifo_cleanup",
    "reclaim",
    "reclaim_parent",
    "recreate",
    "restart_degraded",
    "specs",
    "sysctl",
]
