"""`governor keys create|list|revoke`: API keys for the gateway, stored only as hashes."""

from __future__ import annotations

import typer
from rich.table import Table

from controller.cli._plans import known_plans
from controller.cli._redis import (
    JSON_OPTION,
    Stores,
    console,
    default_actor,
    echo_json,
    shown,
    stores,
    when,
)
from controller.errors import ConfigurationError
from controller.gateway.keys import KeyStore
from controller.journal.events import JournalEvent, Kind

app = typer.Typer(
    help="API keys for `governor gateway`: each stands for a tenant (and user) on a plan.",
    no_args_is_help=True,
)


ACTOR_OPTION = typer.Option(None, "--actor", help="Who does this; default: the OS user.")


def _store(s: Stores) -> KeyStore:
    secret = s.settings.gateway.api_key_secret
    return KeyStore(s.client, s.keys, secret.get_secret_value() if secret else None)


@app.command("create")
def create(
    tenant: str = typer.Option(..., "--tenant", help="Tenant id the key stands for."),
    plan: str = typer.Option(..., "--plan", help="Plan name, as in a `kind: Plan` document."),
    user: str | None = typer.Option(None, "--user", help="User id within the tenant."),
    name: str | None = typer.Option(None, "--name", help="A label to recognise the key by."),
    actor: str | None = ACTOR_OPTION,
    reason: str = typer.Option("created by hand", "--reason", help="Why, for the journal."),
    as_json: bool = JSON_OPTION,
) -> None:
    """Make a key and print it ONCE: only its hash is stored, it cannot be shown again.
    Journalled as `key.created` with the key id, tenant, plan and user (never the key).
    Exit 2 if no `kind: Plan` document defines PLAN."""
    with stores() as s:
        known_plans(s).require(plan)
        _require_tenants_plan(s, tenant, plan)
        key, record = _store(s).create(tenant, plan, user, name)
        # The key first: it exists now, and a journal failure must not lose it.
        if as_json:
            echo_json({"key": key, **record.public()})
        else:
            typer.echo(key)
            typer.echo(
                f"key id {record.key_id}: tenant {tenant}, plan {plan}"
                + (f", user {user}" if user else "")
                + ". Store the key now; Governor keeps only its hash.",
                err=True,
            )
        s.record(_event(Kind.KEY_CREATED, actor, reason, record.public()))


def _require_tenants_plan(s: Stores, tenant: str, plan: str) -> None:
    """Refuse (exit 2) a key on another plan than its tenant's: the gateways enforce the key's
    plan while the controller reads the registry's (else the keys'), and an unregistered
    tenant whose keys disagree has no plan at all. `tenants set` moves a tenant with its keys."""
    current, source = s.control.tenant_plan(tenant), "the tenant registry"
    if current is None:
        current, source = s.control.plans().get(tenant), "its API keys"
    if current and current != plan:
        raise ConfigurationError(
            f"tenant {tenant!r} is on plan {current!r} ({source}) and a key carries its "
            f"tenant's plan: gateways would enforce {plan!r} on this key while the controller "
            f"reads {current!r}. Create it with --plan {current}, or move the tenant and its "
            f"keys first: governor tenants set {tenant} {plan}"
        )


@app.command("list")
def list_keys(
    tenant: str | None = typer.Option(None, "--tenant", help="Only this tenant's keys."),
    as_json: bool = JSON_OPTION,
) -> None:
    """Print every key's id, tenant, plan, user and creation time (never the key)."""
    with stores() as s:
        records = _store(s).list(tenant)
    if as_json:
        echo_json([r.public() for r in records])
        return
    table = Table(title=f"API keys ({len(records)})")
    for column in ("key id", "tenant", "plan", "user", "name", "created"):
        table.add_column(column)
    for r in records:
        table.add_row(
            shown(r.key_id),
            shown(r.tenant),
            shown(r.plan),
            shown(r.user or "-"),
            shown(r.name or "-"),
            when(r.created_at),
        )
    console().print(table)


@app.command("revoke")
def revoke(
    key_id: str = typer.Argument(..., help="The key id (as `keys list` shows it)."),
    actor: str | None = ACTOR_OPTION,
    reason: str = typer.Option("revoked by hand", "--reason", help="Why, for the journal."),
    as_json: bool = JSON_OPTION,
) -> None:
    """Delete a key; gateways refuse it within their key cache time. Exit 1 if unknown.
    Journalled as `key.revoked` with what the key stood for."""
    with stores() as s:
        removed = _store(s).revoke(key_id)
        if removed is not None:
            s.record(_event(Kind.KEY_REVOKED, actor, reason, removed))
    if as_json:
        echo_json({"key_id": key_id, "revoked": removed is not None})
    elif removed is not None:
        typer.echo(f"key {key_id} revoked")
    else:
        typer.echo(f"no key {key_id!r} (`governor keys list` shows the ids)", err=True)
    if removed is None:
        raise typer.Exit(1)


def _event(kind: str, actor: str | None, reason: str, key: dict[str, object]) -> JournalEvent:
    details = {k: v for k, v in key.items() if k != "created_at"}
    return JournalEvent(kind=kind, actor=actor or default_actor(), reason=reason, details=details)
