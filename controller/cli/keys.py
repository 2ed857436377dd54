"""`governor keys create|list|revoke`: API keys for the gateway, stored only as hashes."""

from __future__ import annotations

import typer
from rich.table import Table

from controller.cli._redis import JSON_OPTION, Stores, console, echo_json, stores, when
from controller.gateway.keys import KeyStore

app = typer.Typer(
    help="API keys for `governor gateway`: each stands for a tenant (and user) on a plan.",
    no_args_is_help=True,
)


def _store(s: Stores) -> KeyStore:
    secret = s.settings.gateway.api_key_secret
    return KeyStore(s.client, s.keys, secret.get_secret_value() if secret else None)


@app.command("create")
def create(
    tenant: str = typer.Option(..., "--tenant", help="Tenant id the key stands for."),
    plan: str = typer.Option(..., "--plan", help="Plan name, as in a `kind: Plan` document."),
    user: str | None = typer.Option(None, "--user", help="User id within the tenant."),
    name: str | None = typer.Option(None, "--name", help="A label to recognise the key by."),
    as_json: bool = JSON_OPTION,
) -> None:
    """Make a key and print it ONCE: only its hash is stored, it cannot be shown again."""
    with stores() as s:
        key, record = _store(s).create(tenant, plan, user, name)
    if as_json:
        echo_json({"key": key, **record.public()})
        return
    typer.echo(key)
    typer.echo(
        f"key id {record.key_id}: tenant {tenant}, plan {plan}"
        + (f", user {user}" if user else "")
        + ". Store the key now; Governor keeps only its hash.",
        err=True,
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
        table.add_row(r.key_id, r.tenant, r.plan, r.user or "-", r.name or "-", when(r.created_at))
    console().print(table)


@app.command("revoke")
def revoke(
    key_id: str = typer.Argument(..., help="The key id (as `keys list` shows it)."),
    as_json: bool = JSON_OPTION,
) -> None:
    """Delete a key; gateways refuse it within their key cache time. Exit 1 if unknown."""
    with stores() as s:
        removed = _store(s).revoke(key_id)
    if as_json:
        echo_json({"key_id": key_id, "revoked": removed})
    else:
        typer.echo(f"key {key_id} revoked" if removed else f"no key {key_id!r}", err=not removed)
    if not removed:
        raise typer.Exit(1)
