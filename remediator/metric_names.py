"""Prometheus names of probe readings: one table, and the rule for metrics it does not list.

Names and labels are part of the operations contract (docs/metrics.md lists every one). A probe
metric becomes a gauge named for what it counts, with its unit as suffix (`_bytes`, `_seconds`,
`_ratio`); the live limit beside it gets `_limit`; its per-container attribution gets the
`remediator_container_` prefix. A metric a probe adds later and this table does not know yet is
still exported, as `remediator_<probe>_<metric>` plus its unit's suffix, so new readings never
need a change here to be seen (only to be named well).

Pure: no I/O, no prometheus_client (so the docs test and the alert rules can use the table).
"""

from __future__ import annotations

import re

from remediator.policy.catalog import MetricSpec

# (probe, metric) -> host-wide gauge name. Chosen so that a reader of a dashboard knows the
# kernel counter behind it without the docs: `negative_dentries` is dentry-state's nr_negative.
NAMES: dict[tuple[str, str], str] = {
    ("dentries", "total"): "remediator_dentries",
    ("dentries", "unused"): "remediator_dentries_unused",
    ("dentries", "negative"): "remediator_negative_dentries",
    ("dentries", "slab_bytes"): "remediator_dentry_slab_bytes",
    ("dentries", "slab_reclaimable_bytes"): "remediator_slab_reclaimable_bytes",
    ("dentries", "negative_projected"): "remediator_negative_dentries_projected",
    ("dentries", "growth_per_second"): "remediator_negative_dentries_growth_per_second",
    ("dentries", "hash_buckets"): "remediator_dentry_hash_buckets",
    ("dentries", "negative_per_bucket"): "remediator_negative_dentries_per_bucket",
    ("dentries", "forecast_seconds"): "remediator_negative_dentries_forecast_seconds",
    ("dentries", "lookup_slowdown"): "remediator_canary_lookup_slowdown_ratio",
    ("dentries", "lookup_ns"): "remediator_canary_lookup_ns",
    ("dentries", "lookup_baseline_ns"): "remediator_canary_lookup_baseline_ns",
    ("dentries", "failed_lookups_per_second"): "remediator_failed_lookups_per_second",
    ("dentries", "slab_growth_bytes_per_second"): "remediator_slab_growth_bytes_per_second",
    ("fifos", "run_inodes_used"): "remediator_run_inodes_used",
    ("fifos", "run_inodes_free"): "remediator_run_inodes_free",
    ("fifos", "fifo_dirs"): "remediator_containerd_fifo_dirs",
    ("fifos", "orphan_fifo_dirs"): "remediator_containerd_orphan_fifo_dirs",
    ("fifos", "fifo_fs_inodes_used"): "remediator_fifo_fs_inodes_used",
    ("fifos", "leaked_shims"): "remediator_containerd_leaked_shims",
    ("fifos", "stale_shim_sockets"): "remediator_containerd_stale_shim_sockets",
    ("fifos", "fifo_dirs_per_hour"): "remediator_containerd_fifo_dirs_per_hour",
    ("fifos", "fifo_inodes_needed_next_hour"): "remediator_fifo_fs_inodes_needed_next_hour",
    ("fifos", "fifo_inodes_exhausted_in_seconds"): "remediator_fifo_fs_inodes_exhausted_in_seconds",
    ("limits", "file_handles"): "remediator_file_handles",
    ("limits", "inotify_watches_max_uid"): "remediator_inotify_watches_max_uid",
    ("limits", "inotify_instances_max_uid"): "remediator_inotify_instances_max_uid",
    ("limits", "tasks"): "remediator_tasks",
    ("limits", "inotify_watches"): "remediator_inotify_watches",
    ("limits", "inotify_instances"): "remediator_inotify_instances",
    ("limits", "aio_requests"): "remediator_aio_requests",
    ("limits", "keys_max_uid"): "remediator_keys_max_uid",
    ("limits", "key_bytes_max_uid"): "remediator_key_bytes_max_uid",
    ("limits", "conntrack_entries"): "remediator_conntrack_entries",
    ("limits", "netdev_backlog_drops"): "remediator_netdev_backlog_drops",
    ("limits", "epoll_watches_max_uid"): "remediator_epoll_watches_max_uid",
    ("limits", "epoll_watches"): "remediator_epoll_watches",
    ("limits", "pipe_pages_max_uid"): "remediator_pipe_pages_max_uid",
    ("limits", "pipe_pages"): "remediator_pipe_pages",
    ("limits", "inotify_degraded"): "remediator_inotify_degraded_processes",
}

_SUFFIX = {"bytes": "_bytes", "seconds": "_seconds", "ratio": "_ratio"}
_BAD = re.compile(r"[^a-zA-Z0-9_]")


def _clean(s: str) -> str:
    return _BAD.sub("_", s).strip("_").lower()


def host_name(probe: str, metric: str, spec: MetricSpec | None = None) -> str:
    """The host-wide gauge of one probe metric."""
    known = NAMES.get((probe, metric))
    if known is not None:
        return known
    name = f"remediator_{_clean(probe)}_{_clean(metric)}"
    # `_total` is reserved for counters (promtool check metrics flags a gauge that ends so).
    if name.endswith("_total"):
        name = name.removesuffix("_total") + "_all"
    suffix = _SUFFIX.get(spec.unit if spec else "", "")
    if suffix and not name.endswith(suffix):
        name += suffix
    return name


def limit_name(probe: str, metric: str, spec: MetricSpec | None = None) -> str:
    """The limit beside a usage: `remediator_file_handles_limit`; a unit suffix stays last
    (`remediator_x_limit_bytes`), as Prometheus naming wants the unit at the end."""
    name = host_name(probe, metric, spec)
    for suffix in _SUFFIX.values():
        if name.endswith(suffix):
            return name.removesuffix(suffix) + "_limit" + suffix
    return name + "_limit"


def container_name(probe: str, metric: str, spec: MetricSpec | None = None) -> str:
    """The per-container gauge of one probe metric (top N containers by value)."""
    return "remediator_container_" + host_name(probe, metric, spec).removeprefix("remediator_")


def per_uid_name(key: str, field: str) -> str:
    """A per-uid gauge from a reading's `detail["<x>_by_uid"][uid][field]`:
    `inotify_by_uid` / `watches` -> `remediator_inotify_watches_per_uid`."""
    base = _clean(key.removesuffix("_by_uid"))
    return f"remediator_{base}_{_clean(field)}_per_uid"
