"""Error types. Two kinds of failure (see docs/operations.md):

* `TemporaryError`: the host or a daemon said "not now" (Docker API timeout, containerd busy).
  Adapters retry these with tenacity, bounded; what is left is reported, never fatal.
* `PermanentError`: retrying cannot help (target gone, permission denied, unsupported kernel).

`UserError` and its subclasses are mistakes a person can fix (bad policy, bad flag, lock held);
the CLI prints them as one clear message and exits with a documented code, never a traceback.
"""

from __future__ import annotations

from dataclasses import dataclass


class RemediatorError(Exception):
    """Base of every error remediator raises on purpose."""


class TemporaryError(RemediatorError):
    def __init__(self, message: str, delay: float | None = None) -> None:
        super().__init__(message)
        self.delay = delay


class PermanentError(RemediatorError):
    pass


class UserError(RemediatorError):
    exit_code = 2


@dataclass(frozen=True)
class PolicyIssue:
    """One problem in one policy file: where, which field, what was expected."""

    file: str
    line: int | None
    field: str  # dotted path, e.g. spec.actions[1].settle
    message: str

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" if self.line else self.file
        return f"{where}: {self.field}: {self.message}" if self.field else f"{where}: {self.message}"


class PolicyError(UserError):
    """A policy set did not compile. Carries every issue found, in every file."""

    exit_code = 1

    def __init__(self, issues: list[PolicyIssue]) -> None:
        self.issues = list(issues)
        super().__init__("\n".join(str(i) for i in self.issues))


class LockHeld(UserError):
    """Another remediator instance is acting on this host right now."""

    exit_code = 75  # EX_TEMPFAIL: a timer run may simply try again next time
