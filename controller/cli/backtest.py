"""`governor backtest`: the policies replayed over a real Prometheus's history, open loop."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path
from typing import TYPE_CHECKING

import typer
from rich.table import Table

from controller.cli._redis import console, stores
from controller.cli.config import load_settings
from controller.durations import parse_duration
from controller.errors import GovernorError, SignalError
from controller.settings import PrometheusSettings, Settings

if TYPE_CHECKING:
    from controller.sim.backtest import BacktestResult


def register(root: typer.Typer) -> None:
    """Add the top-level `backtest` command."""
    root.command("backtest")(backtest)


# The unix times a datetime holds: 1970-01-01 to 9999-12-31.
_LATEST = 253_402_300_799.0


def _time(text: str) -> float:
    """RFC 3339 (with a zone) or unix seconds from 1970 to 9999 (not nan, inf, 1e300)."""
    try:
        seconds = float(text)
    except ValueError:
        pass
    else:
        if not 0 <= seconds <= _LATEST:  # False for nan too
            raise typer.BadParameter(
                f"{text!r} is not a time: unix seconds from 0 to {_LATEST:.0f} (9999-12-31), "
                "or RFC 3339 (2026-03-02T09:00:00Z)"
            )
        return seconds
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


def _registry(entries: list[str]) -> dict[str, str]:
    """`--tenant TENANT=PLAN` entries; a malformed one is refused, not dropped."""
    registry = {}
    for entry in entries:
        tenant, _, plan = entry.partition("=")
        if not tenant or not plan:
            raise typer.BadParameter(
                f"{entry!r}: give TENANT=PLAN, e.g. acme=paid", param_hint="--tenant"
            )
        registry[tenant] = plan
    return registry


def _tenants(settings: Settings, given: dict[str, str]) -> tuple[dict[str, str], str]:
    """The tenant registry the policies assume: Redis's (when GOVERNOR_REDIS__URL is set),
    then --tenant on top; and one line saying where it came from."""
    if settings.redis.url is None:
        if given:
            return given, f"tenant registry: {len(given)} tenants from --tenant"
        return {}, (
            "tenant registry: none, so every tenant is on the default plan; give --tenant "
            "TENANT=PLAN, or GOVERNOR_REDIS__URL to read the registry from Redis"
        )
    with stores() as s:
        stored = s.control.tenants()
    return {**stored, **given}, (
        f"tenant registry: {len(stored)} tenants from Redis, {len(given)} from --tenant"
    )


def _prometheus(settings: Settings, url: str | None) -> PrometheusSettings:
    """The live path's Prometheus settings (auth, TLS, headers, timeouts); --prometheus
    replaces only the URL, validated like GOVERNOR_PROMETHEUS__URL."""
    if url is None:
        return settings.prometheus
    return PrometheusSettings.model_validate({**settings.prometheus.model_dump(), "url": url})


def backtest(
    start: str = typer.Option(..., "--from", help="Start: RFC 3339 or unix seconds."),
    end: str = typer.Option(..., "--to", help="End: RFC 3339 or unix seconds."),
    policies: Path = typer.Option(Path("policies"), "--policies", help="Policy directory."),
    step: str = typer.Option("30s", "--step", help="Evaluation interval (like the tick)."),
    prometheus: str | None = typer.Option(
        None, "--prometheus", help="Prometheus URL (default GOVERNOR_PROMETHEUS__URL)."
    ),
    tenant: list[str] = typer.Option(
        [],
        "--tenant",
        help="TENANT=PLAN for the tenant registry the policies assume; repeat. Added to the "
        "registry in Redis when GOVERNOR_REDIS__URL is set.",
    ),
    out: Path | None = typer.Option(None, "--out", help="Directory for the PNG."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
) -> None:
    """Replay the policies over Prometheus's history (OPEN LOOP): when each would have fired.

    Evaluates the policies over range queries and shows when each would have fired and which
    limits it would have written. The history is what happened under the limits in force
    then: the writes shown never feed back.

    Prometheus is read with the live settings (GOVERNOR_PROMETHEUS__*: auth, TLS, headers);
    the tenant registry from Redis when GOVERNOR_REDIS__URL is set. Exit 1 when Prometheus
    or Redis cannot be read, or no query has a sample in the range; 2 on bad input.
    """
    from controller.policy.loader import load_directory
    from controller.signals.prometheus import PrometheusSource
    from controller.sim.backtest import backtest as run_backtest
    from controller.sim.backtest import window_problem

    given = _registry(tenant)
    try:
        begin, finish, every = _time(start), _time(end), parse_duration(step)
        problem = window_problem(begin, finish, every)
        if problem is not None:
            raise GovernorError(problem)
        settings = load_settings()
        loaded = load_directory(policies)
        registry, where = _tenants(settings, given)
        with PrometheusSource(_prometheus(settings, prometheus)) as source:
            source.check()
            result = run_backtest(source, loaded, begin, finish, every, registry)
            url = source.url
    except SignalError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None
    except (GovernorError, ValueError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    if result.all_empty:
        typer.echo(
            f"error: every signal was empty from {_stamp(begin)} to {_stamp(finish)}: "
            f"Prometheus at {url} holds no sample for any of the {result.queries} policy "
            "queries in that range (check --from/--to against its retention)",
            err=True,
        )
        raise typer.Exit(1)
    _report(result, (out or Path("sim-out") / "backtest") / "backtest.png", where, as_json)


def _report(result: BacktestResult, png: Path, where: str, as_json: bool) -> None:
    from controller.sim.backtest import OPEN_LOOP
    from controller.sim.plots import plot_backtest

    picture = plot_backtest(result, png)
    notes = [where, *(f"{q!r} returned no series in the range" for q in result.empty)]
    notes += [f"{_stamp(at)}: {note}" for note, at in result.notes.items()]
    if as_json:
        payload = {
            "open_loop": True,
            "note": OPEN_LOOP,
            "from": result.start,
            "to": result.end,
            "step": result.step,
            "firings": [vars(f) for f in result.firings],
            "writes": [vars(w) for w in result.writes],
            "notes": notes,
            "empty": result.empty,
            "errors": result.errors,
            "png": str(picture),
        }
        typer.echo(json.dumps(payload, indent=2))
        return
    _print(result, notes)
    console().print(f"plot: {picture}")


def _print(result: BacktestResult, notes: list[str]) -> None:
    from controller.sim.backtest import OPEN_LOOP

    show = console()
    show.print(f"[bold yellow]{OPEN_LOOP}[/bold yellow]")
    fired = Table(title=f"when each policy would have fired ({_stamp(result.start)} → "
                  f"{_stamp(result.end)})")  # fmt: skip
    for column in ("time", "policy", "label value", "event"):
        fired.add_column(column)
    for f in result.firings:
        fired.add_row(_stamp(f.at), f.policy, f.key or "—", f.event)
    show.print(fired)
    wrote = Table(title="what it would have written")
    for column in ("time", "address", "old → new", "policy", "why"):
        wrote.add_column(column)
    for w in result.writes:
        wrote.add_row(_stamp(w.at), w.address, f"{w.old} → {w.new}", w.policy or "—", w.reason)
    show.print(wrote)
    for note in notes:
        show.print(f"note: {note}", markup=False)
    for error in result.errors:
        show.print(f"[red]error: {error}[/red]")
