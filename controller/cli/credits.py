"""`governor credits top-up|adjust|show|history`: the prepaid credit ledger of each tenant."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import redis
import typer
from rich.table import Table

from controller.cli._plans import registered_plan
from controller.cli._redis import (
    JSON_OPTION,
    NUMBER_ARGUMENTS,
    Stores,
    console,
    default_actor,
    echo_json,
    require_reason,
    shown,
    stores,
    when,
)
from controller.cli.usage import plan_of
from controller.contract.catalog import PlanInfo
from controller.errors import ConfigurationError
from controller.gateway.credits import CreditLedger, CreditState

app = typer.Typer(
    help="Prepaid credits (USD) per tenant: requests are charged at each model's price and "
    "answered 402 once the balance would fall below the plan's credits.min_balance_usd.",
    no_args_is_help=True,
)

# Said when credits are booked for a tenant that is not registered (a typo strands them).
_BOOKED_ANYWAY = (
    "The credits are booked anyway, for when it sends traffic; if this is a typo, take them "
    "back with `governor credits adjust TENANT --charge USD`"
)
TENANT = typer.Argument(..., help="Tenant id (letters, digits, ._:+=~-).")


def _state_json(state: CreditState) -> dict[str, object]:
    return {
        "tenant": state.tenant,
        "balance_usd": state.balance_usd,
        "reserved_usd": state.reserved_usd,
        "available_usd": state.available_usd,
    }


def _print_state(state: CreditState) -> None:
    table = Table(title=f"credits of {state.tenant}")
    for column in ("balance (USD)", "held by requests in flight", "available"):
        table.add_column(column, justify="right")
    table.add_row(
        f"{state.balance_usd:,.6f}", f"{state.reserved_usd:,.6f}", f"{state.available_usd:,.6f}"
    )
    console().print(table)


@app.command("top-up", context_settings=NUMBER_ARGUMENTS)
def top_up(
    tenant: str = TENANT,
    usd: float = typer.Argument(..., help="Amount to add, in USD (e.g. 25 or 12.50)."),
    reason: str = typer.Option(..., "--reason", help="Why (invoice, goodwill...), for the log."),
    actor: str | None = typer.Option(None, "--actor", help="Who does this; default: the OS user."),
    as_json: bool = JSON_OPTION,
) -> None:
    """Add USD to TENANT's balance; the top-up is logged in the credit history."""
    _book(tenant, usd, reason, actor, as_json, "added_usd", CreditLedger.top_up)


@app.command("adjust")
def adjust(
    tenant: str = TENANT,
    charge: float | None = typer.Option(
        None, "--charge", help="USD to take from the balance (e.g. usage served but not charged)."
    ),
    credit: float | None = typer.Option(
        None, "--credit", help="USD to give back (e.g. a refund), unlike a top-up not paid for."
    ),
    reason: str = typer.Option(..., "--reason", help="Why (incident, ticket...), for the log."),
    actor: str | None = typer.Option(None, "--actor", help="Who does this; default: the OS user."),
    as_json: bool = JSON_OPTION,
) -> None:
    """Correct TENANT's balance by hand: --charge takes, --credit gives; logged in the credit
    history as an adjustment with who and why."""
    if (charge is None) == (credit is None):
        raise typer.BadParameter("give exactly one of --charge USD or --credit USD")
    given = charge if charge is not None else credit or 0.0
    if not given > 0:
        raise typer.BadParameter(f"{given:g}: the amount is a positive number of USD (e.g. 12.50)")
    amount = -given if charge is not None else given
    _book(tenant, amount, reason, actor, as_json, "adjusted_usd", CreditLedger.adjust)


def _book(
    tenant: str,
    usd: float,
    reason: str,
    actor: str | None,
    as_json: bool,
    name: str,
    entry: Callable[[CreditLedger, str, float, str, str], CreditState],
) -> None:
    """One ledger entry (top-up or adjustment), then the new balance."""
    why = require_reason(reason)
    with stores() as s:
        warning = registered_plan(s, tenant, _BOOKED_ANYWAY)[1]
        state = entry(CreditLedger(s.client, s.keys.prefix), tenant, usd, why,
                      actor or default_actor())  # fmt: skip
    if warning is not None:
        typer.echo(warning, err=True)
    if as_json:
        echo_json({**_state_json(state), name: usd})
        return
    typer.echo(f"tenant {tenant}: {usd:+,.2f} USD, balance {state.balance_usd:,.6f} USD")


@app.command("show")
def show(tenant: str = TENANT, as_json: bool = JSON_OPTION) -> None:
    """Print TENANT's balance, what requests in flight hold, and what is available."""
    with stores() as s:
        state = CreditLedger(s.client, s.keys.prefix).state(tenant)
        note = None if as_json else _uncharged(s, tenant)
    if as_json:
        echo_json(_state_json(state))
    else:
        _print_state(state)
        if note is not None:
            console().print(note)


def _uncharged(s: Stores, tenant: str) -> str | None:
    """Why the balance shown does not move: the tenant's plan charges no credits (a 0 there
    read as "spent"). None when the plan does, or when it cannot be told."""
    try:
        plan = plan_of(s, tenant, None)
        raw = s.client.hget(s.keys.catalog, plan)
        info = PlanInfo.from_json(raw) if raw is not None else None
    except (ConfigurationError, ValueError, redis.RedisError):
        return None
    if info is None or info.credits is not None:
        return None
    return (
        f"plan {plan!r} of tenant {tenant!r} charges no credits: its requests are limited by "
        f"its token budgets (governor usage {tenant}), not by this balance"
    )


@app.command("history")
def history(
    tenant: str = TENANT,
    count: int = typer.Option(20, "-n", "--count", min=1, help="How many entries, newest first."),
    as_json: bool = JSON_OPTION,
) -> None:
    """Print TENANT's newest credit entries: top-ups and per-request charges."""
    with stores() as s:
        entries = CreditLedger(s.client, s.keys.prefix).history(tenant, count)
    if as_json:
        echo_json([{**dataclasses.asdict(e), "at": e.at} for e in entries])
        return
    table = Table(title=f"credit history of {tenant} ({len(entries)} newest)")
    for column in ("at (UTC)", "kind", "USD", "balance", "request / reason", "model", "tokens"):
        table.add_column(column)
    for e in entries:
        table.add_row(
            when(e.at),
            shown(e.kind),
            f"{e.amount_usd:+,.6f}",
            f"{e.balance_usd:,.6f}",
            shown(e.request or f"{e.reason} ({e.actor})"),
            shown(e.model or "-"),
            "-" if e.tokens is None else str(e.tokens),
        )
    console().print(table)
