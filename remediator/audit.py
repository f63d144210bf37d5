"""Structured events: every evaluation and action is one event with key-value context.

Events go to two places: the process's log stream (stderr: journald under systemd; JSON or a
console rendering) and, as JSON lines, to the audit file (the durable trail; rotate it with
logrotate's copytruncate or by size, see docs/operations.md). Event names are snake_case and
documented in docs/operations.md; tests assert on them with structlog's `capture_logs()`.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import threading
from collections.abc import MutableMapping
from pathlib import Path
from typing import Any, TextIO

import structlog

from remediator.settings import LOG_LEVEL_NAMES

LOG_LEVELS = {name: logging.getLevelNamesMapping()[name.upper()] for name in LOG_LEVEL_NAMES}


class AuditFile:
    """Appends one JSON object per line; opened O_APPEND so concurrent writers interleave whole
    lines (each line is written with a single write(2)). Debug events stay out of the trail."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)

    def __call__(self, logger: Any, method: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
        if LOG_LEVELS.get(str(event.get("level", method)), logging.INFO) < logging.INFO:
            return event
        line = json.dumps(dict(event), default=str, sort_keys=False) + "\n"
        with self._lock:
            os.write(self._fd, line.encode())
        return event

    def close(self) -> None:
        os.close(self._fd)


_audit_file: AuditFile | None = None


def configure(
    *, level: str = "info", fmt: str = "json", audit_path: Path | None = None, stream: TextIO | None = None
) -> None:
    """Set up structlog for the process. Safe to call again (tests, reload)."""
    global _audit_file  # noqa: PLW0603 (one process-wide sink, like logging's root handler)
    if _audit_file is not None:
        _audit_file.close()
        _audit_file = None
    processors: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        # Tracebacks (internal errors only) become one string field, in the file and the stream.
        structlog.processors.format_exc_info,
    ]
    if audit_path is not None:
        try:
            _audit_file = AuditFile(audit_path)
            processors.append(_audit_file)
        except OSError as e:
            print(f"remediator: cannot open audit log {audit_path}: {e}", file=sys.stderr)
    stream = stream or sys.stderr
    if fmt == "json":
        processors.append(structlog.processors.JSONRenderer(default=str))
    else:
        processors.append(structlog.dev.ConsoleRenderer(colors=False))
    # The audit file keeps everything at info and above whatever the stream's verbosity is, so
    # the loggers let through the lower of the two levels and the gate in front of the stream's
    # renderer applies the stream's own.
    min_level = LOG_LEVELS.get(level, logging.INFO)
    let_through = min(min_level, logging.INFO) if _audit_file is not None else min_level
    _bridge_stdlib_logging()
    structlog.configure(
        processors=[*processors[:-1], _LevelGate(min_level, processors[-1])],
        wrapper_class=structlog.make_filtering_bound_logger(let_through),
        logger_factory=structlog.PrintLoggerFactory(stream),
        cache_logger_on_first_use=False,
    )


class _StdlibBridge(logging.Handler):
    """Hands records of libraries that use the standard `logging` module (APScheduler's "run
    time of job was missed", urllib3's retries from the Docker SDK) to structlog as events, so
    the JSON stream and the audit file hold JSON only. Without it, Python's last-resort handler
    writes them to stderr as plain text, in the middle of the JSON lines."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            level = record.levelname.lower()
            method = level if level in LOG_LEVELS else ("error" if record.levelno > logging.ERROR else "info")
            getattr(structlog.get_logger(), method)(
                "library_log", logger=record.name, message=record.getMessage()
            )
        except Exception:  # logging must never raise into the library that logged
            self.handleError(record)


_BRIDGE = _StdlibBridge()


def _bridge_stdlib_logging() -> None:
    root = logging.getLogger()
    if _BRIDGE not in root.handlers:
        root.addHandler(_BRIDGE)
    # Libraries' info chatter (APScheduler logs every job run at info) is not an audit fact.
    root.setLevel(logging.WARNING)


class _LevelGate:
    """Renders events at or above `min_level` for the stream, drops the rest (after the audit
    file has seen them)."""

    def __init__(self, min_level: int, renderer: Any) -> None:
        self.min_level = min_level
        self.renderer = renderer

    def __call__(self, logger: Any, method: str, event: MutableMapping[str, Any]) -> Any:
        level = LOG_LEVELS.get(str(event.get("level", method)), logging.INFO)
        if level < self.min_level:
            raise structlog.DropEvent
        return self.renderer(logger, method, event)


def get_logger(**context: Any) -> Any:
    """A lazy logger: it picks up the configuration in force when it logs, not when it is made
    (modules create theirs at import time, before `configure`)."""
    return structlog.get_logger(**context)
