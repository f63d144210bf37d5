"""What a Kubernetes node tells its API server after each cycle: Node conditions, Events and an
opt-in taint (docs/kubernetes.md).

It reads the cycle's report (it runs after the cycle, never inside it) and writes through the
API client of `remediator.probes.kube_api`. It must never block or fail a cycle: an API server
that does not answer makes it wait (bounded) and say so, while the node-local actions go on. It
writes nothing in audit mode or in a dry run (it says what it would write), and never touches a
condition or taint that is not its own.
"""
