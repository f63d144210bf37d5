"""What probes and actions exist, as policy compilation needs to know them.

The policy layer must not import probes or actions (they do I/O). Instead, probes and actions
describe themselves with these plain specs, and whoever compiles policies passes the catalog in.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from pydantic import BaseModel


@dataclass(frozen=True)
class MetricSpec:
    name: str
    help: str
    unit: str = "count"  # count | bytes | seconds | ratio
    limit: str | None = None  # what the live limit is (e.g. "fs.file-max"); enables "80%"
    per_container: bool = False  # the probe attributes this metric to containers


@dataclass(frozen=True)
class ProbeSpec:
    name: str
    help: str
    metrics: tuple[MetricSpec, ...]

    def metric(self, name: str) -> MetricSpec | None:
        return next((m for m in self.metrics if m.name == name), None)


@dataclass(frozen=True)
class ActionSpec:
    name: str
    help: str
    params: type[BaseModel]  # validated strictly at compile time; extra keys are errors
    disruptive: bool  # recreates containers or hurts every tenant (global cache drop)
    # apply() re-checks each target right before acting, so no whole-probe re-read is needed
    rechecks_target: bool = False


@dataclass(frozen=True)
class Catalog:
    probes: Mapping[str, ProbeSpec] = field(default_factory=dict)
    actions: Mapping[str, ActionSpec] = field(default_factory=dict)
