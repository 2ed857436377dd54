"""`governor tenants set|get|list`: the tenant registry (tenant → plan) in Redis; a plan must
exist (`controller.cli._plans`), and `list` flags tenants on a plan that no longer does."""

from __future__ import annotations

import typer
from rich.table import Table

from controller.cli._plans import KnownPlans, known_plans
from controller.cli._redis import JSON_OPTION, Stores, console, default_actor, echo_json, stores
from controller.contract.apikeys import KeyRecord
from controller.errors import ConfigurationError
from controller.gateway.keys import KeyStore
from controller.journal.events import JournalEvent, Kind

app = typer.Typer(help="The tenant registry: which plan each tenant is on.", no_args_is_help=True)


@app.command("set")
def set_plan(
    tenant: str = typer.Argument(..., help="Tenant id (letters, digits, ._:+=~-)."),
    plan: str = typer.Argument(..., help="Plan name, as in a `kind: Plan` document."),
    actor: str | None = typer.Option(None, "--actor", help="Who does this; default: the OS user."),
    reason: str = typer.Option("registered by hand", "--reason", help="Why, for the journal."),
) -> None:
    """Put TENANT on PLAN, and its API keys with it (journalled); exit 2 if no `kind: Plan`
    document defines PLAN. A JWT's plan claim is the token issuer's: change it there."""
    with stores() as s:
        known_plans(s).require(plan)
        # The registry and the tenant's keys in one transaction: never one without the other.
        register = s.control.tenant_registration(tenant, plan)
        moved, (previous, _) = KeyStore(s.client, s.keys, None).move_tenant(tenant, plan, register)
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
        # Unregistered, a tenant is on its API keys' plan (what gateways enforce and the
        # controller reads), not on the default one: said, or the check misleads.
        keyed = [] if plan is not None else _key_plans(s, tenant)
    if as_json:
        echo_json({"tenant": tenant, "plan": plan, **({} if plan else {"api_key_plans": keyed})})
    elif plan is not None:
        typer.echo(plan)
    if plan is None:
        typer.echo(_unregistered(tenant, keyed), err=True)
        raise typer.Exit(1)


def _key_plans(s: Stores, tenant: str) -> list[str]:
    return sorted({record.plan for record in KeyStore(s.client, s.keys, None).list(tenant)})


def _unregistered(tenant: str, key_plans: list[str]) -> str:
    """What an unregistered tenant is on, as the controller resolves it (docs/operations.md)."""
    if len(key_plans) == 1:
        return (
            f"tenant {tenant!r} is not registered; its API keys put it on plan "
            f"{key_plans[0]!r} (`governor tenants set {tenant} {key_plans[0]}` registers it)"
        )
    if key_plans:
        return (
            f"tenant {tenant!r} is not registered and its API keys are on several plans "
            f"({', '.join(key_plans)}): it has no plan until `governor tenants set {tenant} "
            "PLAN` registers it"
        )
    return (
        f"tenant {tenant!r} is not registered and has no API key: it takes the default plan "
        "(`default_plan` of the Limits document; a JWT names its own)"
    )


def _known(s: Stores) -> KnownPlans | None:
    """The known plans, or None (said on stderr) when neither source can be read."""
    try:
        return known_plans(s)
    except ConfigurationError as exc:
        typer.echo(f"warning: cannot tell which plans exist: {exc}", err=True)
        return None


@app.command("list")
def list_tenants(as_json: bool = JSON_OPTION) -> None:
    """Print every registered tenant and its plan, flagging a plan no `kind: Plan` document
    defines any more (gateways refuse its tenants 403 unknown-plan until they are moved)."""
    with stores() as s:
        registry = s.control.tenants()
        known = _known(s)
        records = KeyStore(s.client, s.keys, None).list()
    flags = {t: None if known is None else p not in known.names for t, p in registry.items()}
    if as_json:
        echo_json({t: {"plan": p, "unknown_plan": flags[t]} for t, p in registry.items()})
    else:
        table = Table(title=f"tenants ({len(registry)})")
        for column in ("tenant", "plan", "plan known"):
            table.add_column(column)
        marks = {None: "?", True: "NO: refused by gateways", False: "yes"}
        for tenant, plan in registry.items():
            table.add_row(tenant, plan, marks[flags[tenant]])
        console().print(table)
    unknown = sorted(t for t, flagged in flags.items() if flagged)
    if unknown and known is not None:
        typer.echo(
            f"{len(unknown)} tenant(s) on a plan not in {known.source}: {', '.join(unknown)}; "
            "move them (governor tenants set TENANT PLAN)",
            err=True,
        )
    if known is not None:
        _flag_keyed(registry, records, known)


def _flag_keyed(registry: dict[str, str], records: list[KeyRecord], known: KnownPlans) -> None:
    """Tenants known only through their API keys are on their keys' plan: one no longer in
    the catalog is refused 403 all the same, and the 403 sends the caller's operator here."""
    stranded: dict[str, set[str]] = {}
    for record in records:
        if record.tenant not in registry and record.plan not in known.names:
            stranded.setdefault(record.tenant, set()).add(record.plan)
    if stranded:
        named = ", ".join(f"{t} ({', '.join(sorted(p))})" for t, p in sorted(stranded.items()))
        typer.echo(
            f"{len(stranded)} tenant(s) known only through API keys on a plan not in "
            f"{known.source}: {named}; move them (governor tenants set TENANT PLAN moves "
            "their keys too)",
            err=True,
        )
