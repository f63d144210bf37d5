"""The `remediator` command.

Exit codes (docs/cli.md): 0 success; 1 invalid policies; 2 usage error (bad flag or argument,
unreadable file); 3 a cycle ran but an action failed; 4 internal error (a bug: please report);
75 another instance holds the lock (a timer run may just try again).
"""

from __future__ import annotations

import functools
import json
import os
import socket
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from remediator import __version__, audit
from remediator.errors import PolicyError, UserError
from remediator.model import Outcome
from remediator.settings import Settings, default_policies, parse_fifo_root

F = TypeVar("F", bound=Callable[..., Any])

EXIT_OK = 0
EXIT_POLICY = 1
EXIT_USAGE = 2
EXIT_ACTION_FAILED = 3
EXIT_INTERNAL = 4


def common_options(f: F) -> F:
    """Options every command takes (also from REMEDIATOR_* environment variables)."""
    opts = [
        click.option(
            "--policies",
            "policies",
            type=click.Path(path_type=Path),
            multiple=True,
            envvar="REMEDIATOR_POLICIES",
            help="Policy directory or file (repeatable). Default: /etc/remediator/policies, "
            "else the bundled policies.",
        ),
        click.option(
            "--state-dir",
            type=click.Path(path_type=Path),
            envvar="REMEDIATOR_STATE_DIR",
            default=Path("/var/lib/remediator"),
            show_default=True,
            help="Where state.db, the lock and audit.jsonl live.",
        ),
        click.option(
            "--audit-log",
            type=click.Path(path_type=Path),
            envvar="REMEDIATOR_AUDIT_LOG",
            help="JSON-lines audit trail. Default: STATE_DIR/audit.jsonl.",
        ),
        click.option(
            "--host-root",
            type=click.Path(path_type=Path, exists=True, file_okay=False),
            envvar="REMEDIATOR_HOST_ROOT",
            default=Path("/"),
            show_default=True,
            help="Root of the host's /proc, /sys and /run (tests use fixture trees).",
        ),
        click.option(
            "--fifo-root",
            "fifo_roots",
            multiple=True,
            envvar="REMEDIATOR_FIFO_ROOTS",
            callback=_fifo_roots,
            metavar="PATH=SOCKET[,SOCKET...]",
            help="A containerd fifo root to judge besides /run/containerd/fifo (a private "
            "containerd's, any `ctr --fifo-dir`), with the sockets of the containerds that can own "
            "it (repeatable; the environment variable takes them space-separated).",
        ),
        click.option(
            "--lock-timeout",
            type=click.FloatRange(min=0),
            envvar="REMEDIATOR_LOCK_TIMEOUT",
            default=30.0,
            show_default=True,
            help="Seconds to wait for another instance's cycle to finish (exit 75 after).",
        ),
        click.option(
            "--docker-url",
            envvar="REMEDIATOR_DOCKER_URL",
            default="unix:///var/run/docker.sock",
            show_default=True,
        ),
        click.option(
            "--log-level",
            type=click.Choice(list(audit.LOG_LEVELS)),
            envvar="REMEDIATOR_LOG_LEVEL",
            default=None,
            help="Verbosity of events on stderr (default: info for run/once, warning "
            "otherwise). The audit file always gets info and above.",
        ),
        click.option(
            "--log-format",
            type=click.Choice(["json", "console"]),
            envvar="REMEDIATOR_LOG_FORMAT",
            default="json",
            show_default=True,
        ),
    ]
    for opt in reversed(opts):
        f = opt(f)
    return f


def _fifo_roots(
    ctx: click.Context, param: click.Parameter, value: tuple[str, ...]
) -> tuple[tuple[str, tuple[str, ...]], ...]:
    try:
        return tuple(parse_fifo_root(v) for v in value)
    except ValueError as e:
        raise click.BadParameter(str(e)) from None


def _settings(kw: dict[str, Any], *, dry_run: bool = False) -> Settings:
    return Settings(
        fifo_roots=kw.get("fifo_roots", ()),
        host_root=kw["host_root"],
        state_dir=kw["state_dir"],
        audit_log=kw["audit_log"],
        docker_url=kw["docker_url"],
        lock_timeout=kw["lock_timeout"],
        dry_run=dry_run,
    )


def _policy_paths(kw: dict[str, Any]) -> list[Path]:
    return list(kw["policies"]) or [default_policies()]


def _setup_logging(
    kw: dict[str, Any], settings: Settings | None, default_level: str, write_audit: bool = True
) -> None:
    audit_path = settings.audit_path if settings is not None and write_audit else None
    if audit_path is not None and not _writable_dir(audit_path.parent):
        audit_path = None
    audit.configure(level=kw["log_level"] or default_level, fmt=kw["log_format"], audit_path=audit_path)


def _writable_dir(d: Path) -> bool:
    probe = d
    while not probe.exists():
        probe = probe.parent
    return os.access(probe, os.W_OK)


def _load(kw: dict[str, Any]) -> Any:
    from remediator.runtime import load  # noqa: PLC0415 (keeps `--help` fast)

    return load(_policy_paths(kw))


def handle_errors(f: F) -> F:
    """User mistakes -> one clear message and a documented exit code, never a traceback."""

    @functools.wraps(f)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return f(*args, **kwargs)
        except PolicyError as e:
            click.echo(f"remediator: {len(e.issues)} error(s) in policies:", err=True)
            for issue in e.issues:
                click.echo(f"  {issue}", err=True)
            sys.exit(EXIT_POLICY)
        except UserError as e:
            click.echo(f"remediator: {e}", err=True)
            sys.exit(e.exit_code)
        except PermissionError as e:
            click.echo(f"remediator: permission denied: {e.filename or e} (run as root)", err=True)
            sys.exit(EXIT_USAGE)
        except (click.exceptions.Exit, click.ClickException, SystemExit, KeyboardInterrupt):
            raise
        except Exception as e:
            audit.get_logger().exception("internal_error", error=f"{type(e).__name__}: {e}")
            click.echo(
                f"remediator: internal error: {type(e).__name__}: {e} "
                "(this is a bug; the audit log has the traceback)",
                err=True,
            )
            sys.exit(EXIT_INTERNAL)

    return wrapper  # type: ignore[return-value]  # functools.wraps keeps the signature


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="remediator")
def main() -> None:
    """Repairs the kernel-resource leaks that containers cause on a shared host.

    Policies (YAML, kept in git) say what to watch, when to act and how far to escalate.
    Start with `remediator validate` and `remediator audit`: they change nothing.
    """


@main.command()
@click.argument("paths", nargs=-1, type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Machine-readable result.")
@common_options
@handle_errors
def validate(paths: tuple[Path, ...], as_json: bool, **kw: Any) -> None:
    """Check policy files; report every error in every file (exit 1 if any)."""
    from remediator.runtime import load  # noqa: PLC0415

    _setup_logging(kw, None, "warning")
    targets = list(paths) or _policy_paths(kw)
    try:
        ps = load(targets)
    except PolicyError as e:
        if as_json:
            click.echo(
                json.dumps(
                    {
                        "valid": False,
                        "errors": [
                            {"file": i.file, "line": i.line, "field": i.field, "message": i.message}
                            for i in e.issues
                        ],
                    },
                    indent=2,
                )
            )
            sys.exit(EXIT_POLICY)
        raise
    if as_json:
        click.echo(
            json.dumps(
                {"valid": True, "files": list(ps.files), "policies": [p.name for p in ps.policies]}, indent=2
            )
        )
    else:
        click.echo(
            f"ok: {len(ps.policies)} policies in {len(ps.files)} files "
            f"({', '.join(p.name for p in ps.policies)})"
        )


@main.command("audit")
@click.option("--json", "as_json", is_flag=True, help="Print the cycle as JSON (docs/cli.md).")
@click.option(
    "--record",
    type=click.Path(path_type=Path, dir_okay=False),
    help="Append the readings seen to FILE, for `remediator replay`.",
)
@common_options
@handle_errors
def audit_cmd(as_json: bool, record: Path | None, **kw: Any) -> None:
    """One evaluation of every policy on this host, in audit mode: nothing is changed.

    Uses the persisted state (hold-downs, cooldowns, budgets) read-only, so it shows what the
    controller would do right now.
    """
    from remediator import render, replay  # noqa: PLC0415
    from remediator.runtime import make_engine, open_store  # noqa: PLC0415

    settings = _settings(kw, dry_run=True)
    _setup_logging(kw, settings, "warning")
    ps = _load(kw)
    live = _settings(kw, dry_run=False)
    store = open_store(live, readonly=True)  # the live state, never written
    try:
        engine = make_engine(settings, ps, store)
        report = engine.cycle()
    finally:
        store.close()
    if record is not None:
        try:
            with open(record, "a", encoding="utf-8") as f:
                f.write(replay.record_line(report.at, report.readings, socket.gethostname()))
        except OSError as e:
            raise UserError(f"{record}: cannot write recording: {e.strerror or e}") from None
    if as_json:
        click.echo(json.dumps(render.cycle_json(report, ps), indent=2, default=str))
    else:
        click.echo(render.cycle_text(report, ps))


@main.command()
@click.option("--dry-run", is_flag=True, help="Run every action in audit mode (separate state).")
@click.option("--json", "as_json", is_flag=True)
@common_options
@handle_errors
def once(dry_run: bool, as_json: bool, **kw: Any) -> None:
    """One cycle of every policy, acting per policy mode: what the systemd timer runs."""
    from remediator import render  # noqa: PLC0415
    from remediator.runtime import run_once  # noqa: PLC0415

    settings = _settings(kw, dry_run=dry_run)
    _setup_logging(kw, settings, "info")
    ps = _load(kw)
    report = run_once(settings, ps)
    if as_json:
        click.echo(json.dumps(render.cycle_json(report, ps), indent=2, default=str))
    else:
        click.echo(render.cycle_text(report, ps))
    if Outcome.FAILED in report.outcomes():
        sys.exit(EXIT_ACTION_FAILED)


def _listen_address(ctx: click.Context, param: click.Parameter, value: str | None) -> tuple[str, int] | None:
    """HOST:PORT to listen on: `127.0.0.1:9464`, `[::1]:9464`, or `:9464` for 127.0.0.1."""
    if value is None:
        return None
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise click.BadParameter(f"expected HOST:PORT with a port from 1 to 65535, got {value!r}")
    return host.removeprefix("[").removesuffix("]") or "127.0.0.1", int(port)


@main.command()
@click.option("--dry-run", is_flag=True, help="Run every action in audit mode (separate state).")
@click.option(
    "--metrics-address",
    envvar="REMEDIATOR_METRICS_ADDRESS",
    metavar="HOST:PORT",
    callback=_listen_address,
    help="Serve Prometheus metrics here (e.g. 127.0.0.1:9464).",
)
@common_options
@handle_errors
def run(dry_run: bool, metrics_address: tuple[str, int] | None, **kw: Any) -> None:
    """The daemon: each policy at its interval. SIGHUP reloads policies, SIGTERM stops."""
    from remediator.clock import SystemClock  # noqa: PLC0415
    from remediator.runtime import Daemon  # noqa: PLC0415

    settings = _settings(kw, dry_run=dry_run)
    _setup_logging(kw, settings, "info")
    ps = _load(kw)
    sys.exit(Daemon(settings, _policy_paths(kw), ps, SystemClock(), metrics_address).run())


@main.command()
@click.option("--json", "as_json", is_flag=True)
@click.option("--dry-run", is_flag=True, help="Show the dry-run state instead of the live one.")
@click.option("--limit", default=20, show_default=True, help="How many recent actions to show.")
@common_options
@handle_errors
def status(as_json: bool, dry_run: bool, limit: int, **kw: Any) -> None:
    """Readings now, condition states, cooldowns, budgets and the last actions."""
    from remediator import render  # noqa: PLC0415
    from remediator.clock import SystemClock  # noqa: PLC0415
    from remediator.policy.evaluate import budget_used  # noqa: PLC0415
    from remediator.runtime import make_engine, open_store  # noqa: PLC0415

    settings = _settings(kw, dry_run=dry_run)
    _setup_logging(kw, settings, "warning", write_audit=False)
    ps = _load(kw)
    now = SystemClock().now()
    store = open_store(settings, readonly=True)
    try:
        readings = make_engine(settings, ps, store).read_probes(list(ps.probes()))
        conditions = store.conditions()
        actions = store.actions(limit=limit)
        breaker = store.breaker()
        window = max([p.budget_window for p in ps.policies] or [0.0])
        history = store.history(since=now - window)
    finally:
        store.close()
    budgets = {
        p.name: {
            "used": len(budget_used(history, p.name, now, p.budget_window)),
            "max": p.budget_max,
            "window_seconds": p.budget_window,
        }
        for p in ps.policies
    }
    doc = render.status_json(ps, readings, conditions, actions, breaker, budgets, now, store.ns)
    if as_json:
        click.echo(json.dumps(doc, indent=2, default=str))
    else:
        click.echo(render.status_text(doc, now))


@main.command("reset-breaker")
@click.option("--dry-run", is_flag=True, help="Reset the dry-run state's breaker.")
@click.option(
    "--by",
    default=lambda: os.environ.get("SUDO_USER") or os.environ.get("USER") or "unknown",
    help="Who resets it (recorded). Default: $SUDO_USER or $USER.",
)
@common_options
@handle_errors
def reset_breaker(dry_run: bool, by: str, **kw: Any) -> None:
    """Close the circuit breaker after an operator has reviewed why it opened."""
    from remediator.clock import SystemClock  # noqa: PLC0415
    from remediator.runtime import open_store  # noqa: PLC0415
    from remediator.state import InstanceLock  # noqa: PLC0415

    settings = _settings(kw, dry_run=dry_run)
    _setup_logging(kw, settings, "info")
    with InstanceLock(settings.lock_path, settings.lock_timeout):
        store = open_store(settings)
        try:
            before = store.reset_breaker(SystemClock().now(), by)
        finally:
            store.close()
    audit.get_logger().warning("breaker_reset", by=by, was_open=before.open, reason=before.reason)
    click.echo(
        "breaker closed"
        + (f" (was open since {before.opened_at}: {before.reason})" if before.open else " (it was not open)")
    )


def _duration(ctx: click.Context, param: click.Parameter, value: str) -> float:
    """A duration option (`15m`, `1h30m`) in seconds; a bad one names the option."""
    from remediator.quantity import parse_duration  # noqa: PLC0415

    try:
        return parse_duration(value)
    except ValueError as e:
        raise click.BadParameter(str(e)) from None


@main.command("replay")
@click.argument("recording", type=click.Path(path_type=Path, dir_okay=False))
@click.option(
    "--hold",
    default="0s",
    show_default=True,
    callback=_duration,
    help="Keep the last recording in force this long (e.g. 15m).",
)
@click.option(
    "--every", default="30s", show_default=True, callback=_duration, help="Evaluation step while holding."
)
@click.option("--json", "as_json", is_flag=True)
@common_options
@handle_errors
def replay_cmd(recording: Path, hold: float, every: float, as_json: bool, **kw: Any) -> None:
    """Run recorded readings through the policies on a simulated clock; print the decisions."""
    from remediator import render, replay  # noqa: PLC0415

    _setup_logging(kw, None, "warning")
    if every <= 0:
        raise click.BadParameter("must be longer than 0s", param_hint="'--every'")
    ps = _load(kw)
    reports = replay.replay(ps, replay.load_recordings(recording), hold=hold, every=every)
    if as_json:
        click.echo(
            json.dumps(
                {"format": "remediator.replay/v1", "cycles": [render.cycle_json(r, ps) for r in reports]},
                indent=2,
                default=str,
            )
        )
        return
    rows = []
    for r in reports:
        for pr in r.policies:
            for d in pr.decisions:
                rows.append(
                    (
                        render.iso(r.at),
                        pr.policy.name,
                        d.subject[:12],
                        d.phase.value,
                        render.human(d.value),
                        d.kind.value,
                        d.action or "-",
                        d.reason,
                    )
                )
    click.echo(
        render.table(("time", "policy", "subject", "phase", "value", "decision", "action", "reason"), rows)
    )


@main.command("schema")
def schema_cmd() -> None:
    """Print the JSON Schema of policy documents (for editors and CI)."""
    from remediator.engine import catalog  # noqa: PLC0415
    from remediator.policy.schema import json_schema  # noqa: PLC0415

    cat = catalog()
    params = {n: s.params.model_json_schema() for n, s in cat.actions.items()}
    click.echo(json.dumps(json_schema(params), indent=2, sort_keys=True))
