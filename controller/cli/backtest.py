"""`governor backtest`: the policies replayed over a real Prometheus's history, open loop."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from controller.errors import GovernorError
from controller.policy.documents import parse_duration


def register(root: typer.Typer) -> None:
    """Add the top-level `backtest` command."""
    root.command("backtest")(backtest)


def _time(text: str) -> float:
    """RFC 3339 (with a zone) or unix seconds."""
    try:
        return float(text)
    except ValueError:
        pass
    try:
        moment = dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise typer.BadParameter(
            f"{text!r} is not a time: give RFC 3339 (2026-03-02T09:00:00Z) or unix seconds"
        ) from None
    if moment.tzinfo is None:
        raise typer.BadParameter(f"{text!r} needs a time zone, e.g. 2026-03-02T09:00:00Z")
    return moment.timestamp()


def _stamp(t: float) -> str:
    return dt.datetime.fromtimestamp(t, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def backtest(
    start: str = typer.Option(..., "--from", help="Start: RFC 3339 or unix seconds."),
    end: str = typer.Option(..., "--to", help="End: RFC 3339 or unix seconds."),
    policies: Path = typer.Option(Path("policies"), "--policies", help="Policy directory."),
    step: str = typer.Option("30s", "--step", help="Evaluation interval (like the tick)."),
    prometheus: str | None = typer.Option(
        None, "--prometheus", help="Prometheus URL (default GOVERNOR_PROMETHEUS__URL)."
    ),
    tenant: list[str] = typer.Option(
        [], "--tenant", help="TENANT=PLAN for the tenant registry the policies assume; repeat."
    ),
    out: Path | None = typer.Option(None, "--out", help="Directory for the PNG."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
) -> None:
    """OPEN-LOOP replay: evaluate the policies over Prometheus's history (range queries)
    and show when each would have fired and which limits it would have written. The history
    is what happened under the limits in force then: the writes shown never feed back."""
    from prometheus_api_client import PrometheusConnect

    from controller.cli.config import load_settings
    from controller.policy.loader import load_directory
    from controller.sim.backtest import OPEN_LOOP
    from controller.sim.backtest import backtest as run_backtest
    from controller.sim.plots import plot_backtest

    console = Console()
    try:
        begin, finish, every = _time(start), _time(end), parse_duration(step)
        if finish <= begin or every <= 0:
            raise GovernorError("--to must be after --from, and --step positive")
        registry = dict(t.split("=", 1) for t in tenant if "=" in t)
        url = prometheus or load_settings().prometheus.url
        client = PrometheusConnect(url=url, disable_ssl=True)
        loaded = load_directory(policies)
        result = run_backtest(client, loaded, begin, finish, every, registry)
        picture = plot_backtest(result, (out or Path("sim-out") / "backtest") / "backtest.png")
    except (GovernorError, ValueError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    if as_json:
        payload = {
            "open_loop": True,
            "note": OPEN_LOOP,
            "from": begin,
            "to": finish,
            "step": every,
            "firings": [vars(f) for f in result.firings],
            "writes": [vars(w) for w in result.writes],
            "errors": result.errors,
            "png": str(picture),
        }
        typer.echo(json.dumps(payload, indent=2))
        return
    console.print(f"[bold yellow]{OPEN_LOOP}[/bold yellow]")
    fired = Table(title=f"when each policy would have fired ({_stamp(begin)} → {_stamp(finish)})")
    for column in ("time", "policy", "label value", "event"):
        fired.add_column(column)
    for f in result.firings:
        fired.add_row(_stamp(f.at), f.policy, f.key or "—", f.event)
    console.print(fired)
    wrote = Table(title="what it would have written")
    for column in ("time", "address", "old → new", "policy"):
        wrote.add_column(column)
    for w in result.writes:
        wrote.add_row(_stamp(w.at), w.address, f"{w.old} → {w.new}", w.policy or "—")
    console.print(wrote)
    for error in result.errors:
        console.print(f"[red]{error}[/red]")
    console.print(f"plot: {picture}")
