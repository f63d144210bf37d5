"""The `remediator` command.

Exit codes (docs/cli.md): 0 success; 1 invalid policies; 2 usage error (bad flag or argument,
unreadable file); 3 a cycle ran but an action failed; 4 internal error (a bug: please report);
75 another instance holds the lock (a timer run may just try again).
"""

from __future__ import annotations

import functools
import os
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from remediator import __version__
from remediator.errors import PolicyError, UserError
from remediator.settings import LOG_LEVEL_NAMES, Settings, default_policies, parse_fifo_root

# structlog imports rich, when it is installed, for its console renderer's tracebacks: 100 ms of
# every start-up and megabytes of a daemon's memory that JSON logging never uses. This program
# (not the library) opts out: a None entry in sys.modules makes `import rich` raise ImportError,
# which structlog handles by rendering plain tracebacks. `audit` itself (structlog) is imported
# by the commands that log, so `--help` imports neither.
sys.modules.setdefault("rich", None)  # type: ignore[arg-type]  # None is how sys.modules says "absent"
# Likewise requests' character-set guessing (charset_normalizer: 2.4 MiB of the daemon's 60 MB
# budget, measured): every body we read through requests is the Docker API's JSON, whose
# encoding JSON itself fixes, and requests decodes such bodies as UTF-8 without a guesser. It
# warns once that none is installed; that warning is about us, and silenced.
for _guesser in ("charset_normalizer", "chardet"):
    sys.modules.setdefault(_guesser, None)  # type: ignore[arg-type]
warnings.filterwarnings("ignore", message="Unable to find acceptable character detection", module="requests")

F = TypeVar("F", bound=Callable[..., Any])

EXIT_OK = 0
EXIT_POLICY = 1
EXIT_USAGE = 2
EXIT_ACTION_FAILED = 3
EXIT_INTERNAL = 4


def _hostname() -> str:
    import socket  # noqa: PLC0415

    return socket.gethostname()


def _dumps(obj: Any, **kw: Any) -> str:
    import json  # noqa: PLC0415 (keeps `--help` fast: every import counts at start-up)

    return json.dumps(obj, **kw)


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
            # readable=False: click would refuse an unreadable default even for commands that
            # never open the state (validate, schema); the state store checks it when used.
            type=click.Path(path_type=Path, readable=False),
            envvar="REMEDIATOR_STATE_DIR",
            default=Path("/var/lib/remediator"),
            show_default=True,
            help="Where state.db, the lock and audit.jsonl live.",
        ),
        click.option(
            "--audit-log",
            type=click.Path(path_type=Path, dir_okay=False, readable=False),
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
            "--config-root",
            type=click.Path(path_type=Path, exists=True, file_okay=False),
            envvar="REMEDIATOR_CONFIG_ROOT",
            default=None,
            help="Root of the host's etc/sysctl.d, usr/lib/sysctl.d and etc/tuned, where "
            "raise-sysctl persists raises and looks for other owners. Default: the host root.",
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
            "--kubeconfig",
            type=click.Path(path_type=Path, dir_okay=False, readable=False),
            envvar="REMEDIATOR_KUBECONFIG",
            default=None,
            help="A kubeconfig for this node's API server, to name the pods of CRI containers. "
            "Default: in-cluster credentials when run in a pod, else no Kubernetes.",
        ),
        click.option(
            "--log-level",
            type=click.Choice(list(LOG_LEVEL_NAMES)),
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
        config_root=kw["config_root"],
        state_dir=kw["state_dir"],
        audit_log=kw["audit_log"],
        docker_url=kw["docker_url"],
        lock_timeout=kw["lock_timeout"],
        dry_run=dry_run,
        dentry_hash_buckets=_env_positive_int("REMEDIATOR_DENTRY_HASH_BUCKETS"),
        ebpf=_env_choice("REMEDIATOR_EBPF", ("auto", "always", "off"), "auto"),
        kubeconfig=kw.get("kubeconfig"),
        kube_node_name=os.environ.get("REMEDIATOR_KUBE_NODE_NAME", "").strip() or None,
        cri_containerd_socket=os.environ.get("REMEDIATOR_CRI_CONTAINERD_SOCKET", "").strip()
        or Settings.cri_containerd_socket,
        containerd_namespaces=_env_choice("REMEDIATOR_CONTAINERD_NAMESPACES", ("off", "on"), "off") == "on",
    )


def _env_choice(name: str, choices: tuple[str, ...], default: str) -> str:
    text = os.environ.get(name, "").strip() or default
    if text not in choices:
        raise click.UsageError(f"{name}: expected one of {', '.join(choices)}, got {text!r}")
    return text


def _env_positive_int(name: str) -> int | None:
    """An optional positive integer from the environment; a bad one is a usage error."""
    text = os.environ.get(name, "").strip()
    if not text:
        return None
    if not text.isdigit() or int(text) <= 0:
        raise click.UsageError(f"{name}: expected a positive integer, got {text!r}")
    return int(text)


def _policy_paths(kw: dict[str, Any]) -> list[Path]:
    return list(kw["policies"]) or [default_policies()]


def _setup_logging(
    kw: dict[str, Any], settings: Settings | None, default_level: str, write_audit: bool = True
) -> None:
    audit_path = settings.audit_path if settings is not None and write_audit else None
    if audit_path is not None and not _writable_dir(audit_path.parent):
        audit_path = None
    from remediator import audit  # noqa: PLC0415 (keeps `--help` fast)

    audit.configure(level=kw["log_level"] or default_level, fmt=kw["log_format"], audit_path=audit_path)


def _writable_dir(d: Path) -> bool:
    """Whether the audit file could be made in `d`: its nearest existing ancestor is a writable
    directory. (Otherwise the state store reports the problem, in one line, when opened.)"""
    probe = d
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    return probe.is_dir() and os.access(probe, os.W_OK)


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
            from remediator import audit  # noqa: PLC0415

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
                _dumps(
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
    warnings = [
        f"{p.source.file}:{step.line or p.source.line or 0}: spec.actions[{i}]: {step.action} is "
        f"disruptive and the policy enforces it without `allowDisruptive: true`; it will run in "
        "audit mode"
        for p in ps.policies
        for i, step in p.disruptive_without_opt_in()
    ]
    if as_json:
        click.echo(
            _dumps(
                {
                    "valid": True,
                    "files": list(ps.files),
                    "policies": [p.name for p in ps.policies],
                    "warnings": warnings,
                },
                indent=2,
            )
        )
    else:
        for w in warnings:
            click.echo(f"warning: {w}", err=True)
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
    from remediator.kube import status as kube_status  # noqa: PLC0415
    from remediator.runtime import make_engine, open_store  # noqa: PLC0415

    settings = _settings(kw, dry_run=True)
    _setup_logging(kw, settings, "warning")
    ps = _load(kw)
    live = _settings(kw, dry_run=False)
    store = open_store(live, readonly=True)  # the live state, never written
    try:
        engine = make_engine(settings, ps, store, log_namespace="audit")
        report = engine.cycle()
    finally:
        store.close()
    # On a Kubernetes node: what the conditions, Events and taint would become (nothing written).
    node = kube_status.node_reporter(settings, engine.clock.now, readonly=True)
    would = node.cycle(report, ps) if node is not None else None
    if record is not None:
        try:
            with open(record, "a", encoding="utf-8") as f:
                f.write(replay.record_line(report.at, report.readings, _hostname()))
        except OSError as e:
            raise UserError(f"{record}: cannot write recording: {e.strerror or e}") from None
    if as_json:
        doc = render.cycle_json(report, ps)
        if would is not None:
            doc["kubernetes"] = would.to_dict()
        click.echo(_dumps(doc, indent=2, default=str))
    else:
        click.echo(render.cycle_text(report, ps))
        for w in would.conditions if would is not None else ():
            click.echo(f"kubernetes: would set condition {w.type}={w.status} ({w.reason})")


def metrics_top_option(f: F) -> F:
    return click.option(
        "--metrics-top",
        type=click.IntRange(min=1),
        envvar="REMEDIATOR_METRICS_TOP",
        default=10,
        show_default=True,
        help="Per-container and per-uid series: only the N largest of each metric.",
    )(f)


@main.command()
@click.option("--dry-run", is_flag=True, help="Run every action in audit mode (separate state).")
@click.option("--json", "as_json", is_flag=True)
@click.option(
    "--textfile",
    type=click.Path(path_type=Path, dir_okay=False, writable=True),
    envvar="REMEDIATOR_TEXTFILE",
    help="Write the metrics to FILE for node_exporter's textfile collector (atomic rename).",
)
@metrics_top_option
@common_options
@handle_errors
def once(dry_run: bool, as_json: bool, textfile: Path | None, metrics_top: int, **kw: Any) -> None:
    """One cycle of every policy, acting per policy mode: what the systemd timer runs."""
    from remediator import render  # noqa: PLC0415
    from remediator.model import Outcome  # noqa: PLC0415
    from remediator.runtime import run_once, write_textfile  # noqa: PLC0415

    settings = _settings(kw, dry_run=dry_run)
    _setup_logging(kw, settings, "info")
    ps = _load(kw)
    report = run_once(settings, ps)
    if textfile is not None:
        write_textfile(textfile, report, metrics_top)
    if as_json:
        click.echo(_dumps(render.cycle_json(report, ps), indent=2, default=str))
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
@metrics_top_option
@common_options
@handle_errors
def run(dry_run: bool, metrics_address: tuple[str, int] | None, metrics_top: int, **kw: Any) -> None:
    """The daemon: each policy at its interval. SIGHUP reloads policies, SIGTERM stops."""
    from remediator import metrics  # noqa: PLC0415
    from remediator.clock import SystemClock  # noqa: PLC0415
    from remediator.daemon import Daemon  # noqa: PLC0415

    metrics.EXPORTER.top_n = metrics_top

    settings = _settings(kw, dry_run=dry_run)
    _setup_logging(kw, settings, "info")
    ps = _load(kw)
    sys.exit(Daemon(settings, _policy_paths(kw), ps, SystemClock(), metrics_address).run())


@main.command()
@click.option("--json", "as_json", is_flag=True)
@click.option("--dry-run", is_flag=True, help="Show the dry-run state instead of the live one.")
@click.option(
    "--limit",
    type=click.IntRange(min=0),
    default=20,
    show_default=True,
    help="How many recent actions to show.",
)
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
        click.echo(_dumps(doc, indent=2, default=str))
    else:
        click.echo(render.status_text(doc, now))


@main.command("limits")
@click.option("--json", "as_json", is_flag=True)
@common_options
@handle_errors
def limits_cmd(as_json: bool, **kw: Any) -> None:
    """Every shared kernel pool: usage against its limit, per uid and per container, sorted."""
    from remediator import render  # noqa: PLC0415
    from remediator.runtime import read_limits  # noqa: PLC0415

    settings = _settings(kw)
    _setup_logging(kw, settings, "warning", write_audit=False)
    doc = render.limits_json(read_limits(settings))
    if as_json:
        click.echo(_dumps(doc, indent=2, default=str))
    else:
        click.echo(render.limits_text(doc))


def _by_option(who: str) -> Callable[[F], F]:
    """`--by`: the person an operator command records, $SUDO_USER or $USER by default."""
    return click.option(
        "--by",
        default=lambda: os.environ.get("SUDO_USER") or os.environ.get("USER") or "unknown",
        help=f"{who} (recorded). Default: $SUDO_USER or $USER.",
    )


@main.command("reset-breaker")
@click.option("--dry-run", is_flag=True, help="Reset the dry-run state's breaker.")
@_by_option("Who resets it")
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
    from remediator import audit  # noqa: PLC0415

    audit.get_logger().warning("breaker_reset", by=by, was_open=before.open, reason=before.reason)
    click.echo(
        "breaker closed"
        + (f" (was open since {before.opened_at}: {before.reason})" if before.open else " (it was not open)")
    )


@main.command("restore-memory")
@click.argument("container")
@_by_option("Who restores it")
@common_options
@handle_errors
def restore_memory_cmd(container: str, by: str, **kw: Any) -> None:
    """Put back the memory limit that cap-memory lowered on CONTAINER (name or id)."""
    from remediator.model import Outcome  # noqa: PLC0415
    from remediator.runtime import restore_memory  # noqa: PLC0415

    settings = _settings(kw)
    _setup_logging(kw, settings, "info")
    result = restore_memory(settings, container, by)
    click.echo(result.message + ("" if result.verified is not False else " (read-back differs)"))
    if result.outcome is Outcome.FAILED or result.verified is False:
        sys.exit(EXIT_ACTION_FAILED)


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
            _dumps(
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


def _instant(value: str, now: float, *, ago: bool) -> float:
    """ISO 8601 time (UTC unless it says otherwise), or for `ago` a duration before now."""
    import datetime  # noqa: PLC0415

    from remediator.quantity import parse_duration  # noqa: PLC0415

    if ago:
        try:
            return now - parse_duration(value)
        except ValueError:
            pass
    try:
        when = datetime.datetime.fromisoformat(value)
    except ValueError:
        expected = "a duration (24h, 90m) or " if ago else ""
        raise click.BadParameter(f"expected {expected}an ISO 8601 time, got {value!r}") from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=datetime.UTC)
    return when.timestamp()


@main.command("report")
@click.option(
    "--since",
    default="24h",
    show_default=True,
    help="Start of the window: a duration before --until (24h, 7d) or an ISO 8601 time.",
)
@click.option("--until", default=None, help="End of the window, ISO 8601 (default: now).")
@click.option("--dry-run", is_flag=True, help="Report on the dry-run state and its events.")
@click.option("--json", "as_json", is_flag=True, help="The report as JSON (remediator.report/v1).")
@common_options
@handle_errors
def report_cmd(since: str, until: str | None, dry_run: bool, as_json: bool, **kw: Any) -> None:
    """What happened, per policy, from the audit trail and state: conditions, actions,
    outcomes, verification, time from trigger to relief."""
    from remediator import report  # noqa: PLC0415
    from remediator.clock import SystemClock  # noqa: PLC0415
    from remediator.runtime import open_store  # noqa: PLC0415

    settings = _settings(kw, dry_run=dry_run)
    _setup_logging(kw, settings, "warning", write_audit=False)
    end = SystemClock().now() if until is None else _instant(until, 0.0, ago=False)
    try:
        start = _instant(since, end, ago=True)
    except click.BadParameter as e:
        raise click.BadParameter(e.message, param_hint="'--since'") from None
    store = open_store(settings, readonly=True)
    try:
        conditions = list(store.conditions().values())
        breaker = store.breaker()
    finally:
        store.close()
    doc = report.summarize(
        report.read_trail(settings.audit_path),
        since=start,
        until=end,
        namespace=store.ns,
        conditions=conditions,
        breaker=breaker,
    )
    click.echo(_dumps(doc, indent=2) if as_json else report.text(doc))


@main.command("schema")
@click.option(
    "--markdown",
    "markdown",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Instead, rewrite the generated parts of this policy reference (docs/policies.md) in place.",
)
@handle_errors
def schema_cmd(markdown: Path | None) -> None:
    """Print the JSON Schema of policy documents (for editors and CI)."""
    from remediator.engine import catalog  # noqa: PLC0415
    from remediator.policy.schema import json_schema  # noqa: PLC0415

    cat = catalog()
    if markdown is not None:
        from remediator.policy import reference  # noqa: PLC0415

        try:
            text = markdown.read_text(encoding="utf-8")
        except OSError as e:
            raise UserError(f"{markdown}: {e.strerror or e}") from None
        try:
            new = reference.render(text, cat)
        except reference.ReferenceError as e:
            raise UserError(f"{markdown}: {e}") from None
        if new != text:
            tmp = markdown.with_name(f".{markdown.name}.tmp")
            tmp.write_text(new, encoding="utf-8")
            tmp.replace(markdown)  # atomic: an editor or a test never reads half a file
        click.echo(f"{markdown}: {'updated' if new != text else 'already current'}")
        return
    params = {n: s.params.model_json_schema() for n, s in cat.actions.items()}
    click.echo(_dumps(json_schema(params), indent=2, sort_keys=True))
