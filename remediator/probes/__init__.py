"""Probes read the host into typed `Reading`s. One module per probe.

Must never: change anything on the host. The one write is the canary's: a run directory of its
own under STATE_DIR/canary, removed in the same read, and never in read-only runs. Only
`containers` (Docker) and `ebpf` (BCC) are adapters that import third-party clients.
"""

from __future__ import annotations

from remediator.policy.catalog import ProbeSpec
from remediator.probes import dentries, fifos, limits
from remediator.probes.base import PROBES, Probe, ProbeContext


def specs() -> dict[str, ProbeSpec]:
    return {name: cls.spec() for name, cls in sorted(PROBES.items())}


__all__ = ["PROBES", "Probe", "ProbeContext", "dentries", "fifos", "limits", "specs"]
