"""remediator: repairs the kernel-resource leaks that containers cause on a shared host.

Data flows one way: probes read the host into readings -> policy evaluation (pure) turns
readings + state + now into decisions -> actions plan / apply / verify -> state and audit
record it all. runtime (scheduler, signals, lock) and cli sit on top.
"""

__version__ = "0.1.0"
