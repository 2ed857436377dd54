"""`governor run`: the control loop (daemon), or one tick with `--once`."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.table import Table

from controller.cli._redis import console, number
from controller.cli.config import load_settings
from controller.errors import GovernorError
from controller.logging import configure_logging
from controller.reconcile import Change


def register(app: typer.Typer) -> None:
    """Add the top-level `run` command."""
    app.command("run")(run)


def run(
    once: bool = typer.Option(
        False, "--once", help="Run one tick, print what it did, exit 0 (1 when not ready)."
    ),
    dry_run: bool = typer.Option(
        False,
        "--dry-run",
        help="Compute and journal what would change (marked dry_run); write no limit.",
    ),
    policies: Path | None = typer.Option(
        None,
        "--policies",
        help="Policy directory (default GOVERNOR_CONTROLLER__POLICY_DIR, else ./policies).",
    ),
    as_json: bool = typer.Option(False, "--json", help="With --once: print the tick as JSON."),
) -> None:
    """Run the controller: every tick reads Prometheus, evaluates the policies and writes the
    resulting limits to Redis, journalling every change with its reasons.

    Settings come from GOVERNOR_* variables (`governor config show`). Without
    GOVERNOR_REDIS__URL an embedded Redis is started (for a laptop; limits are lost on exit).
    Telemetry: /metrics, /healthz, /readyz on GOVERNOR_TELEMETRY__PORT (default 9100).
    SIGTERM or Ctrl-C finishes the running tick, flushes the journal and steps down.
    """
    from controller.daemon import build, run_forever

    settings = load_settings()
    if policies is not None:
        settings.controller.policy_dir = policies
    # With --once the result is printed on stdout (`--json`: one parseable document), so the
    # log lines go to stderr; the daemon logs to stdout.
    configure_logging(settings.log_level, "stderr" if once else "stdout")
    try:
        daemon = build(settings, once=once, dry_run=dry_run)
    except GovernorError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    if not once:
        raise typer.Exit(run_forever(daemon))
    try:
        outcome = daemon.controller.tick()
    finally:
        daemon.close()
    summary = {
        "tick": outcome.tick,
        "leader": outcome.leader,
        "ready": outcome.ready,
        "reasons": outcome.reasons,
        "dry_run": daemon.controller.dry_run,
        "changes": [
            {"address": str(c.address), "old": c.old, "new": c.new} for c in outcome.changes
        ],
    }
    if as_json:
        typer.echo(json.dumps(summary, indent=2))
    else:
        _print_changes(outcome.changes, outcome.tick, daemon.controller.dry_run)
        for reason in outcome.reasons:
            typer.echo(f"not ready: {reason}", err=True)
    raise typer.Exit(0 if outcome.ready else 1)


def _print_changes(changes: tuple[Change, ...], tick: int, dry_run: bool) -> None:
    """A rich table of the tick's changes (old → new per address)."""
    verb = "would change" if dry_run else "changed"
    typer.echo(f"tick {tick}: {verb} {len(changes)} limits")
    if not changes:
        return
    table = Table()
    for column in ("address", "old", "new"):
        table.add_column(column, justify="left" if column == "address" else "right")
    for change in changes:
        table.add_row(str(change.address), number(change.old), number(change.new))
    console().print(table)
