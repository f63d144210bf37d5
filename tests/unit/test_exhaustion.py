"""The controller keeps working under the exhaustion it repairs: what forks may fail, quietly.

Git provenance (`policy/loader.git_info`) is the one fork on the way to a policy set: with no
descriptor left for its pipes, the set still loads, only without a commit. Checked in a child
process whose RLIMIT_NOFILE leaves three descriptors free (enough to read a policy file, not for
the three pipes `subprocess.run` needs), against the same child without the limit.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.unit.test_state_faults import checkout  # noqa: F401 (a fixture, used by name)

CHILD = """
import os, resource, sys
from pathlib import Path
from remediator.runtime import load
if sys.argv[2] == "exhausted":
    n = len(os.listdir("/proc/self/fd"))  # counts the listing's own descriptor, closed again
    resource.setrlimit(resource.RLIMIT_NOFILE, (n + 2, n + 2))
policies = load([Path(sys.argv[1])])
print(len(policies.policies), policies.commit)
"""


def run_child(policy_dir: Path, mode: str) -> tuple[int, str]:
    done = subprocess.run(
        [sys.executable, "-c", CHILD, str(policy_dir), mode],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    count, commit = done.stdout.split()
    return int(count), commit


def test_policies_load_without_provenance_when_git_cannot_start(checkout: Path) -> None:  # noqa: F811
    count, commit = run_child(checkout, "normal")
    assert count > 0 and len(commit) == 40
    assert run_child(checkout, "exhausted") == (count, "None")


DAEMON_CHILD = """
import os, resource, sys
from pathlib import Path
from remediator.errors import UserError
from remediator.runtime import HeldLock
from remediator.state import InstanceLock, StateStore
state = Path(sys.argv[1])
# What the daemon opens at start (and its worker at the first cycle), then no descriptor is left.
lock = HeldLock(state / "lock", 1.0)
store = StateStore(state / "state.db")
store.breaker()
n = len(os.listdir("/proc/self/fd")) - 1  # the listing's own descriptor is closed again
resource.setrlimit(resource.RLIMIT_NOFILE, (n, n))
for i in range(3):  # three cycles: lock, write the state, unlock
    with lock:
        store.open_breaker(float(i), "exhaustion test")
        assert store.breaker().open
        store.reset_breaker(float(i), "test")
try:
    InstanceLock(state / "lock", 1.0).acquire()
except UserError as e:
    print("one-shot lock:", e)
"""


def test_the_daemons_lock_and_state_need_no_new_descriptor(tmp_path: Path) -> None:
    """A host out of file handles is what `raise-sysctl` of fs.file-max repairs, and a process
    without CAP_SYS_ADMIN (the units drop it) then cannot open any file: the daemon's lock and
    state are opened in advance. A one-shot run, which opens its own, fails cleanly."""
    done = subprocess.run(
        [sys.executable, "-c", DAEMON_CHILD, str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "one-shot lock:" in done.stdout and "Too many open files" in done.stdout
