"""`governor tenants set|get|list`: the tenant registry (tenant → plan) in Redis."""

from __future__ import annotations

import typer
from rich.table import Table

from controller.audit import JournalEvent, Kind
from controller.cli._redis import JSON_OPTION, console, default_actor, echo_json, stores
from controller.gateway.keys import KeyStore

app = typer.Typer(help="The tenant registry: which plan each tenant is on.", no_args_is_help=True)


@app.command("set")
def set_plan(
    tenant: str = typer.Argument(..., help="Tenant id (letters, digits, ._:+=~-)."),
    plan: str = typer.Argument(..., help="Plan name, as in a `kind: Plan` document."),
    actor: str | None = typer.Option(None, "--actor", help="Who does this; default: the OS user."),
    reason: str = typer.Option("registered by hand", "--reason", help="Why, for the journal."),
) -> None:
    """Put TENANT on PLAN, and its API keys with it (journalled). A JWT's plan claim is the
    token issuer's: change it there."""
    with stores() as s:
        previous = s.control.set_tenant(tenant, plan)
        moved = KeyStore(s.client, s.keys, None).move_tenant(tenant, plan)
        s.record(
            JournalEvent(
                kind=Kind.TENANT_SET,
                actor=actor or default_actor(),
                reason=reason,
                details={
                    "tenant": tenant,
                    "plan": plan,
                    "previous_plan": previous,
                    "keys_moved": list(moved),
                },
            )
        )
    typer.echo(
        f"tenant {tenant}: plan {plan}"
        + (f" (was {previous})" if previous else "")
        + (f"; {len(moved)} API key(s) moved to {plan}" if moved else "")
    )


@app.command("get")
def get(
    tenant: str = typer.Argument(..., help="Tenant id."),
    as_json: bool = JSON_OPTION,
) -> None:
    """Print TENANT's plan; exit 1 if the tenant is not registered."""
    with stores() as s:
        plan = s.control.tenant_plan(tenant)
    if as_json:
        echo_json({"tenant": tenant, "plan": plan})
    elif plan is not None:
        typer.echo(plan)
    if plan is None:
        typer.echo(f"tenant {tenant!r} is not registered (it takes the default plan)", err=True)
        raise typer.Exit(1)


@app.command("list")
def list_tenants(as_json: bool = JSON_OPTION) -> None:
    """Print every registered tenant and its plan."""
    with stores() as s:
        registry = s.control.tenants()
    if as_json:
        echo_json(registry)
        return
    table = Table(title=f"tenants ({len(registry)})")
    table.add_column("tenant")
    table.add_column("plan")
    for tenant, plan in registry.items():
        table.add_row(tenant, plan)
    console().print(table)
