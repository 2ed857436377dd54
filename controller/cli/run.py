"""`governor run`: the control loop (daemon), or one tick with `--once`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import typer
from rich.table import Table

from controller.changes import Change
from controller.cli._redis import console, number, shown
from controller.cli.config import load_settings
from controller.errors import GovernorError
from controller.logging import configure_logging

if TYPE_CHECKING:
    from controller.control.tick import TickOutcome
    from controller.model import Decision

# What the journal says of a change that no decision stands behind (a limit deleted).
_NO_DECISION = "no longer in the desired state"


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
    """Run the controller (the daemon), or one tick with --once.

    Every tick reads Prometheus, evaluates the policies and writes the resulting limits to
    Redis, journalling every change with its reasons.

    Settings come from GOVERNOR_* variables (`governor config show`). Without
    GOVERNOR_REDIS__URL an embedded Redis is started (for a laptop; limits are lost on exit).
    Telemetry: /metrics, /healthz, /readyz on GOVERNOR_TELEMETRY__PORT (default 9100).
    SIGTERM or Ctrl-C finishes the running tick, flushes the journal and steps down.
    """
    from controller.control.daemon import build, run_forever

    settings = load_settings()
    if policies is not None:
        settings.controller.policy_dir = policies
    # With --once the result is printed on stdout (`--json`: one parseable document), so the
    # log lines go to stderr; the daemon logs to stdout.
    configure_logging(settings.log_level, "stderr" if once else "stdout")
    try:
        _require_directory(settings.controller.policy_dir)
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
        "changes": [_change_json(c, _decision(outcome, c)) for c in outcome.changes],
    }
    if as_json:
        typer.echo(json.dumps(summary, indent=2))
    else:
        _print_changes(outcome, daemon.controller.dry_run)
        for reason in outcome.reasons:
            typer.echo(f"not ready: {reason}", err=True)
    raise typer.Exit(0 if outcome.ready else 1)


def _require_directory(directory: Path) -> None:
    """Refuse a policy directory that is not there, saying so (not as an invalid policy)."""
    if not directory.is_dir():
        what = "is not a directory" if directory.exists() else "does not exist"
        raise GovernorError(
            f"policy directory {str(directory)!r} {what} (looked in {Path.cwd()}): "
            "run where policies/ is, or give --policies DIR or GOVERNOR_CONTROLLER__POLICY_DIR"
        )


def _decision(outcome: TickOutcome, change: Change) -> Decision | None:
    return outcome.resolution.desired.get(change.address) if outcome.resolution else None


def _change_json(change: Change, decision: Decision | None) -> dict[str, object]:
    """One change with why, as the journal's `limit.changed` event says it."""
    return {
        "address": str(change.address),
        "old": change.old,
        "new": change.new,
        "policy": decision.policy if decision else None,
        "source": str(decision.source) if decision else None,
        "reason": decision.reason if decision else _NO_DECISION,
    }


def _print_changes(outcome: TickOutcome, dry_run: bool) -> None:
    """A rich table of the tick's changes: old → new per address, and why."""
    verb = "would change" if dry_run else "changed"
    typer.echo(f"tick {outcome.tick}: {verb} {len(outcome.changes)} limits")
    if not outcome.changes:
        return
    table = Table()
    for column in ("address", "old", "new", "policy", "why"):
        table.add_column(column, justify="right" if column in ("old", "new") else "left")
    for change in outcome.changes:
        decision = _decision(outcome, change)
        table.add_row(
            str(change.address), number(change.old), number(change.new),
            (decision.policy or str(decision.source)) if decision else "-",
            shown(decision.reason) if decision else _NO_DECISION,
        )  # fmt: skip
    console().print(table)
