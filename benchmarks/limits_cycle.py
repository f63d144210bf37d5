"""What does one daemon cycle cost with the whole bundled policy set, in CPU?

The bundled set has 14 policies on the `limits` probe. Until the engine reads each probe once per
cycle, the daemon evaluates each policy on its own schedule and reads its probe each time, so a
30 s round reads `limits` 14 times. This script measures, in this process's CPU time (user +
system, `time.process_time`), in one run:

1. one `Engine.cycle()` over every bundled policy (each probe read once), from a cold cache,
2. the daemon's round today: one `cycle(only=[policy])` per policy, cold,
3. the same round again with the scan cache warm (steady state: the incremental scan),
4. one `Engine.cycle()` over every policy with the cache warm (the steady-state cycle),
5. a single `limits` read, cold, as the unit.

Dry run with a temporary state: nothing on the host changes. Optionally starts N extra
processes (F fds each) to look like a busy host.

    sudo .venv/bin/python benchmarks/limits_cycle.py --procs 2000 --fds 100
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from remediator import audit
from remediator.clock import SystemClock
from remediator.probes import limits as limits_module
from remediator.probes.base import ProbeContext
from remediator.probes.limits import LimitsProbe
from remediator.probes.limits_fdscan import ScanCache
from remediator.runtime import load, make_engine, open_store
from remediator.settings import Settings, bundled_policies

sys.path.insert(0, str(Path(__file__).parent))
from limits_scan import spawn  # the same busy-host children


def cpu(fn: Callable[[], object]) -> float:
    started = time.process_time()
    fn()
    return time.process_time() - started


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--procs", type=int, default=0, help="extra processes to start")
    ap.add_argument("--fds", type=int, default=100, help="plain fds each holds")
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("run as root: the probes read every process's fds", file=sys.stderr)
        return 2
    audit.configure(level="error", fmt="json", audit_path=None)  # events cost CPU too: not timed here
    bundled = bundled_policies()
    assert bundled is not None
    policies = load([bundled])
    names = [p.name for p in policies.policies]
    on_limits = [p.name for p in policies.policies if p.probe == "limits"]
    # No inotify in the children: root's max_user_instances (128) would stop most of them.
    children = [spawn(args.fds, 0, 0) for _ in range(args.procs)]
    time.sleep(0.5 if children else 0)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            settings = Settings(state_dir=Path(tmp), dry_run=True)
            store = open_store(settings)
            engine = make_engine(settings, policies, store, SystemClock())

            def cold() -> None:
                limits_module._CACHES.clear()

            cold()
            t_once = cpu(engine.cycle)
            cold()
            t_round_cold = cpu(lambda: [engine.cycle(only=[n]) for n in names])
            t_round_warm = cpu(lambda: [engine.cycle(only=[n]) for n in names])
            # Steady state, each probe read once: the cost of one cycle once the scan cache is warm.
            t_once_warm = min(cpu(engine.cycle) for _ in range(3))
            host = engine.host
            t_read = cpu(
                lambda: LimitsProbe(budget=None, cache=ScanCache()).read(ProbeContext(host, SystemClock()))
            )
            store.close()
    finally:
        for pid in children:
            os.kill(pid, signal.SIGKILL)
        for pid in children:
            os.waitpid(pid, 0)
    procs = len([p for p in os.listdir("/proc") if p.isdigit()]) + args.procs
    print(f"bundled set: {len(names)} policies, {len(on_limits)} on the limits probe; ~{procs} processes")
    print(f"one limits read (cold):                 {t_read * 1000:8.1f} ms CPU")
    print(f"one cycle, every policy (probes once):   {t_once * 1000:8.1f} ms CPU")
    print(f"daemon round, one cycle per policy, cold:{t_round_cold * 1000:8.1f} ms CPU")
    print(f"daemon round, steady (incremental scan): {t_round_warm * 1000:8.1f} ms CPU")
    print(f"one cycle, every policy, steady:         {t_once_warm * 1000:8.1f} ms CPU (best of 3)")
    print(
        f"ratios: round-cold/once {t_round_cold / t_once:.2f}x  "
        f"round-steady/once {t_round_warm / t_once:.2f}x  "
        f"round-steady/round-cold {t_round_warm / t_round_cold:.2f}x  one-read/once {t_read / t_once:.2f}x  "
        f"once-steady/once-cold {t_once_warm / t_once:.2f}x"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
