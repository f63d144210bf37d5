"""Prometheus metrics: served by the daemon (`run --metrics-address`), written as a
node_exporter textfile by `once --textfile` (docs/metrics.md lists every series).

An `Exporter` keeps what the last cycles saw (the last reading of each probe, the conditions,
the breaker) and the counters, and renders them at scrape time as a custom collector, so:
- a probe whose last read failed exports `remediator_probe_up 0` and none of its readings (a
  stale value is never repeated; `remediator_probe_last_success_timestamp_seconds` says how old
  the last good one is);
- per-container and per-uid series are the top N by value (`top_n`), so a host with 500
  containers exports a bounded number of series, and a container that went away leaves none;
- conditions in phase `ok` are counted (`remediator_conditions`), not listed one by one.

For the textfile (one process per run) the counters are carried over from the previous file,
which is what makes them counters across timer runs.
"""

from __future__ import annotations

import math
import threading
from collections import defaultdict
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    start_http_server,
    write_to_textfile,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.process_collector import ProcessCollector

from remediator import metric_names as names
from remediator.engine import CycleReport, catalog
from remediator.model import Condition, Phase, Reading
from remediator.policy.catalog import ProbeSpec
from remediator.state import BreakerState

# Default of `top_n`: enough to see the few containers that cause a leak and the next ones,
# few enough that 4 per-container metrics stay under a hundred series.
TOP_N = 10

_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)

# Counters the exporter keeps: family -> (help, label names).
_COUNTERS: dict[str, tuple[str, tuple[str, ...]]] = {
    "remediator_actions": ("Actions by outcome", ("policy", "action", "outcome")),
    "remediator_step_verdicts": (
        "Ladder steps judged after their settle time, by verdict",
        ("policy", "action", "verdict"),
    ),
    "remediator_probe_errors": ("Probe reads that failed", ("probe",)),
    "remediator_cycles": ("Cycles run", ()),
}


def _finite(v: Any) -> float | None:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


class Exporter:
    """What the metrics say, fed one `CycleReport` at a time. Thread-safe: the scheduler's
    worker observes while the HTTP server's thread collects."""

    def __init__(self, top_n: int = TOP_N, specs: Mapping[str, ProbeSpec] | None = None) -> None:
        self.top_n = top_n
        self.specs = dict(specs) if specs is not None else dict(catalog().probes)
        self._lock = threading.Lock()
        self._readings: dict[str, Reading] = {}
        self._probe_seconds: dict[str, float] = {}
        self._last_success: dict[str, float] = {}
        self._conditions: dict[str, dict[str, Condition]] = {}
        self._breaker = BreakerState()
        self._last_cycle: float | None = None
        self._counters: dict[str, dict[tuple[str, ...], float]] = {k: defaultdict(float) for k in _COUNTERS}

    # feeding -------------------------------------------------------------------------------
    def observe(self, report: CycleReport) -> None:
        with self._lock:
            self._counters["remediator_cycles"][()] += 1
            self._last_cycle = report.at
            for name, r in report.readings.items():
                self._readings[name] = r
                if r.error:
                    self._counters["remediator_probe_errors"][(name,)] += 1
                else:
                    self._last_success[name] = r.taken_at
                if name in report.probe_seconds:
                    self._probe_seconds[name] = report.probe_seconds[name]
            for pr in report.policies:
                self._conditions[pr.policy.name] = dict(pr.conditions)
                for a in pr.actions:
                    key = (pr.policy.name, a.decision.action or "", a.result.outcome.value)
                    self._counters["remediator_actions"][key] += 1
                for v in pr.verdicts:
                    self._counters["remediator_step_verdicts"][(v.policy, v.action, v.verdict.value)] += 1
            self._breaker = report.breaker

    def keep_only(self, policies: Iterable[str], probes: Iterable[str]) -> None:
        """After a reload: forget the conditions and readings of policies and probes that are
        no longer in the running set (counters stay: they are totals)."""
        keep_p, keep_r = set(policies), set(probes)
        with self._lock:
            for p in set(self._conditions) - keep_p:
                del self._conditions[p]
            for r in set(self._readings) - keep_r:
                self._readings.pop(r, None)
                self._probe_seconds.pop(r, None)

    def carry_over(self, path: Path) -> None:
        """Start the counters from a textfile this exporter wrote before (a timer's previous
        run). A missing or unreadable file starts them at zero, which Prometheus reads as a
        counter reset."""
        try:
            text = path.read_text(encoding="utf-8")
            families = list(text_string_to_metric_families(text))
        except (OSError, ValueError):
            return
        with self._lock:
            for fam in families:
                if fam.name not in _COUNTERS:
                    continue
                labels = _COUNTERS[fam.name][1]
                for s in fam.samples:
                    if s.name != fam.name + "_total":
                        continue
                    key = tuple(s.labels.get(lab, "") for lab in labels)
                    self._counters[fam.name][key] += s.value

    # rendering -----------------------------------------------------------------------------
    def collect(self) -> Iterator[Metric]:
        with self._lock:
            yield from self._collect_probes()
            yield from self._collect_conditions()
            yield from self._collect_counters()
            breaker = GaugeMetricFamily("remediator_breaker_open", "1 while the circuit breaker is open")
            breaker.add_metric([], 1.0 if self._breaker.open else 0.0)
            yield breaker
            if self._breaker.open and self._breaker.opened_at is not None:
                opened = GaugeMetricFamily(
                    "remediator_breaker_opened_timestamp_seconds", "When the open circuit breaker opened"
                )
                opened.add_metric([], self._breaker.opened_at)
                yield opened
            if self._last_cycle is not None:
                last = GaugeMetricFamily(
                    "remediator_last_cycle_timestamp_seconds", "When the last cycle started"
                )
                last.add_metric([], self._last_cycle)
                yield last

    def _collect_probes(self) -> Iterator[Metric]:
        up = GaugeMetricFamily(
            "remediator_probe_up", "1 when the probe's last read succeeded", labels=["probe"]
        )
        success = GaugeMetricFamily(
            "remediator_probe_last_success_timestamp_seconds",
            "When the probe last read successfully",
            labels=["probe"],
        )
        duration = GaugeMetricFamily(
            "remediator_probe_duration_seconds", "Wall time of the probe's last read", labels=["probe"]
        )
        observed = GaugeMetricFamily(
            "remediator_probe_containers",
            "Containers the probe's last reading attributed (the per-container series are the top N)",
            labels=["probe"],
        )
        gauges: dict[str, GaugeMetricFamily] = {}

        def gauge(name: str, doc: str, labels: list[str]) -> GaugeMetricFamily:
            if name not in gauges:
                gauges[name] = GaugeMetricFamily(name, doc, labels=labels)
            return gauges[name]

        for probe in sorted(self._readings):
            r = self._readings[probe]
            up.add_metric([probe], 0.0 if r.error else 1.0)
            if probe in self._last_success:
                success.add_metric([probe], self._last_success[probe])
            if probe in self._probe_seconds:
                duration.add_metric([probe], self._probe_seconds[probe])
            if r.error:
                continue  # stale: say so (probe_up 0), never repeat old values
            observed.add_metric([probe], float(len(r.containers)))
            spec = self.specs.get(probe)
            for metric, value in sorted(r.values.items()):
                ms = spec.metric(metric) if spec else None
                doc = ms.help if ms else f"{probe} probe: {metric}"
                v = _finite(value)
                if v is not None:
                    gauge(names.host_name(probe, metric, ms), doc, []).add_metric([], v)
            for metric, value in sorted(r.limits.items()):
                ms = spec.metric(metric) if spec else None
                what = ms.limit if ms and ms.limit else "the live kernel limit"
                v = _finite(value)
                if v is not None:
                    gauge(names.limit_name(probe, metric, ms), f"Limit of {metric}: {what}", []).add_metric(
                        [], v
                    )
            self._top_containers(probe, r, spec, gauge)
            self._top_uids(r, gauge)
        yield up
        yield success
        yield duration
        yield observed
        yield from gauges.values()

    def _top_containers(self, probe: str, r: Reading, spec: ProbeSpec | None, gauge: Any) -> None:
        per_metric: dict[str, list[tuple[float, str, str]]] = defaultdict(list)
        for sample in r.containers:
            for metric, value in sample.values.items():
                v = _finite(value)
                if v is not None:
                    per_metric[metric].append((v, sample.container.id, sample.container.name))
        for metric, rows in sorted(per_metric.items()):
            ms = spec.metric(metric) if spec else None
            doc = (ms.help if ms else f"{probe} probe: {metric}") + " (per container, top N by value)"
            fam = gauge(names.container_name(probe, metric, ms), doc, ["container_id", "container_name"])
            for v, cid, cname in sorted(rows, key=lambda t: (-t[0], t[1]))[: self.top_n]:
                fam.add_metric([cid[:12], cname], v)

    def _top_uids(self, r: Reading, gauge: Any) -> None:
        for key, by_uid in sorted(r.detail.items()):
            if not key.endswith("_by_uid") or not isinstance(by_uid, Mapping):
                continue
            per_field: dict[str, list[tuple[float, str]]] = defaultdict(list)
            for uid, fields in by_uid.items():
                if isinstance(fields, Mapping):
                    for f, value in fields.items():
                        v = _finite(value)
                        if v is not None:
                            per_field[f].append((v, str(uid)))
            for f, rows in sorted(per_field.items()):
                fam = gauge(names.per_uid_name(key, f), f"{key}: {f} of one uid (top N by value)", ["uid"])
                for v, uid in sorted(rows, key=lambda t: (-t[0], t[1]))[: self.top_n]:
                    fam.add_metric([uid], v)

    def _collect_conditions(self) -> Iterator[Metric]:
        phase = GaugeMetricFamily(
            "remediator_condition_phase",
            "1 for each condition not in phase ok, labelled with its phase (ok ones are counted only)",
            labels=["policy", "subject", "phase"],
        )
        count = GaugeMetricFamily(
            "remediator_conditions", "Conditions per policy and phase", labels=["policy", "phase"]
        )
        value = GaugeMetricFamily(
            "remediator_condition_value",
            "The metric value a condition not in phase ok last saw",
            labels=["policy", "subject"],
        )
        for policy in sorted(self._conditions):
            conds = self._conditions[policy]
            for p in Phase:
                count.add_metric([policy, p.value], float(sum(1 for c in conds.values() if c.phase is p)))
            hot = sorted(
                (c for c in conds.values() if c.phase is not Phase.OK),
                key=lambda c: (-(c.value or 0.0), c.subject),
            )[: self.top_n]
            for c in hot:
                subject = c.subject if c.subject == "host" else c.subject[:12]
                phase.add_metric([policy, subject, c.phase.value], 1.0)
                v = _finite(c.value)
                if v is not None:
                    value.add_metric([policy, subject], v)
        yield phase
        yield count
        yield value

    def _collect_counters(self) -> Iterator[Metric]:
        for name, (doc, labels) in _COUNTERS.items():
            fam = CounterMetricFamily(name, doc, labels=list(labels))
            for key, v in sorted(self._counters[name].items()):
                fam.add_metric(list(key), v)
            yield fam


def new_registry(exporter: Exporter, *, process: bool = True) -> CollectorRegistry:
    """A registry with the exporter and (for the daemon) the process's own CPU and memory."""
    reg = CollectorRegistry(auto_describe=False)
    reg.register(exporter)
    if process:
        ProcessCollector(registry=reg)
    return reg


def write_textfile(exporter: Exporter, path: Path) -> None:
    """node_exporter textfile: written to a temporary file in the same directory and renamed
    over PATH (prometheus_client's write_to_textfile), so a scrape never reads half a file."""
    write_to_textfile(str(path), new_registry(exporter, process=False))


# The daemon's process-wide metrics ---------------------------------------------------------
EXPORTER = Exporter()
REGISTRY = new_registry(EXPORTER)
CYCLE = Histogram(
    "remediator_cycle_seconds",
    "Wall time of one policy's cycle: its probe's read (shared with the other policies of the "
    "cycle that use it), decisions, actions and verification",
    ["policy"],
    buckets=_BUCKETS,
    registry=REGISTRY,
)
PROBE_SECONDS = Histogram(
    "remediator_probe_seconds",
    "Wall time of one probe read (once per cycle)",
    ["probe"],
    buckets=_BUCKETS,
    registry=REGISTRY,
)
POLICIES = Gauge("remediator_policies_loaded", "Policies in the running set", registry=REGISTRY)
RELOAD_FAILURES = Counter(
    "remediator_policy_reload_failures",
    "Reloads rejected because the new policy set was invalid",
    registry=REGISTRY,
)

# Written by remediator.kube (Kubernetes nodes only).
KUBE_WRITES = Counter(
    "remediator_kube_api_writes",
    "Writes to the Kubernetes API server by what (condition, taint, event; node, write, "
    "events when failed) and outcome (ok, failed)",
    ["what", "outcome"],
    registry=REGISTRY,
)
KUBE_EVENTS_DROPPED = Counter(
    "remediator_kube_events_dropped",
    "Kubernetes Events not written: over the rate limit, the queue full while the API server "
    "was unreachable, or refused for good (403, 404, 422)",
    registry=REGISTRY,
)


def serve(host: str, port: int) -> None:
    start_http_server(port, addr=host, registry=REGISTRY)


def observe_cycle(report: CycleReport) -> None:
    """The daemon's metrics after one cycle."""
    EXPORTER.observe(report)
    for name, seconds in report.probe_seconds.items():
        PROBE_SECONDS.labels(name).observe(seconds)
    for pr in report.policies:
        CYCLE.labels(pr.policy.name).observe(pr.seconds + report.probe_seconds.get(pr.policy.probe, 0.0))
