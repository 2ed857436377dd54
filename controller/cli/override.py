"""`governor override set|clear|list`, `governor freeze` and `unfreeze`: people pin limits."""

from __future__ import annotations

import time
from typing import Any

import typer
from rich.table import Table

from controller.cli._plans import known_plans, registered_plan
from controller.cli._redis import (
    JSON_OPTION,
    NUMBER_ARGUMENTS,
    Stores,
    console,
    default_actor,
    echo_json,
    number,
    parse_address,
    parse_ttl,
    plain,
    require_a_tick,
    require_reason,
    shown,
    stores,
    when,
)
from controller.control.overrides import Freeze
from controller.durations import format_duration
from controller.journal.events import JournalEvent, Kind
from controller.model import Address, Override

app = typer.Typer(
    help="Pin a limit to a value until it expires (manual override beats automation).",
    no_args_is_help=True,
)
# Said when an override names a tenant that is not registered.
_WRITTEN_ANYWAY = "The override is written anyway, for when it sends traffic"
ACTOR_OPTION = typer.Option(None, "--actor", help="Who does this; default: the OS user.")


def register(root: typer.Typer) -> None:
    """Add `override` and the top-level `freeze` / `unfreeze` commands to the root app."""
    root.add_typer(app, name="override")
    root.command("freeze")(freeze)
    root.command("unfreeze")(unfreeze)


def _override_json(override: Override) -> dict[str, Any]:
    return {
        "address": str(override.address),
        "value": override.value,
        "expires_at": override.expires_at,
        "actor": override.actor,
        "reason": override.reason,
    }


def _freeze_json(freeze: Freeze | None) -> dict[str, Any] | None:
    if freeze is None:
        return None
    return {
        "actor": freeze.actor,
        "reason": freeze.reason,
        "set_at": freeze.set_at,
        "expires_at": freeze.expires_at,
    }


@app.command("set", context_settings=NUMBER_ARGUMENTS)
def set_override(
    address: str = typer.Argument(..., help="Limit address, e.g. tenant/acme/tokens_per_minute."),
    value: float = typer.Argument(..., help="The value to enforce (>= 0)."),
    ttl: str = typer.Option(..., "--ttl", help="How long it holds, e.g. 30m, 1h, 2d."),
    reason: str = typer.Option(..., "--reason", help="Why (read by on-call later)."),
    actor: str | None = ACTOR_OPTION,
    as_json: bool = JSON_OPTION,
) -> None:
    """Pin ADDRESS to VALUE until the TTL ends (Redis expires it even if Governor is down)."""
    target, seconds, why = parse_address(address), parse_ttl(ttl), require_reason(reason)
    who = actor or default_actor()
    with stores() as s:
        require_a_tick(seconds, ttl, s.settings, "override")
        unknown_tenant = _require_target(s, target)
        override, previous = s.control.set_override(
            target, value, ttl_seconds=seconds, actor=who, reason=why
        )
        s.record(
            JournalEvent(
                kind=Kind.OVERRIDE_SET,
                actor=who,
                reason=why,
                address=str(target),
                old=previous.value if previous else None,
                new=value,
                details={"expires_at": override.expires_at, "ttl_seconds": seconds},
            )
        )
    if unknown_tenant is not None:
        typer.echo(unknown_tenant, err=True)
    if as_json:
        echo_json(_override_json(override))
        return
    typer.echo(
        f"override {target} = {number(value)} until {when(override.expires_at)} "
        f"({format_duration(seconds)}, by {plain(who)})"
    )


def _require_target(s: Stores, target: Address) -> str | None:
    """Refuse (exit 2) an override that would pin nothing: a plan/<p>/… one on no plan, a
    …@model one on a model no plan in scope may call. The scope of a tenant's (or its
    user's) override is the tenant's plan, when it is on a known one: another plan calling
    any model does not make the tenant's plan call it. Returns a warning to print once the
    override is written: its tenant is not known."""
    plan, warning = (None, None)
    if target.tenant is not None:
        plan, warning = registered_plan(s, target.tenant, _WRITTEN_ANYWAY)
    if target.plan is None and target.model is None:
        return warning
    plans = known_plans(s)
    if target.plan is not None:
        plans.require(target.plan)
    if target.model is not None and plan in plans.names:
        plans.require_model(target.model, plan, tenant=target.tenant)
    elif target.model is not None:
        plans.require_model(target.model, target.plan)
    return warning


@app.command("clear")
def clear(
    address: str = typer.Argument(..., help="Limit address whose override to remove."),
    reason: str = typer.Option("cleared by hand", "--reason", help="Why, for the journal."),
    actor: str | None = ACTOR_OPTION,
) -> None:
    """Remove the override on ADDRESS; automation takes over again on the next tick."""
    target, why = parse_address(address), require_reason(reason)
    who = actor or default_actor()
    with stores() as s:
        previous = s.control.clear_override(target)
        if previous is not None:
            s.record(
                JournalEvent(
                    kind=Kind.OVERRIDE_CLEARED,
                    actor=who,
                    reason=why,
                    address=str(target),
                    old=previous.value,
                    details={"override_actor": previous.actor, "override_reason": previous.reason},
                )
            )
    if previous is None:
        typer.echo(f"no override on {target} (nothing to clear)")
    else:
        typer.echo(f"override on {target} cleared (was {number(previous.value)})")


@app.command("list")
def list_overrides(as_json: bool = JSON_OPTION) -> None:
    """Print every override in force, and the freeze if automation is frozen."""
    with stores() as s:
        state = s.control.read()
    overrides = sorted(state.overrides.values(), key=lambda o: str(o.address))
    if as_json:
        echo_json(
            {
                "overrides": [_override_json(o) for o in overrides],
                "freeze": _freeze_json(state.freeze),
            }
        )
        return
    if state.freeze is not None:
        typer.echo(
            f"automation FROZEN until {when(state.freeze.expires_at)} by "
            f"{plain(state.freeze.actor)}: {plain(state.freeze.reason)}"
        )
    table = Table(title=f"overrides ({len(overrides)})")
    for column in ("address", "value", "expires", "left", "actor", "reason"):
        table.add_column(column, justify="right" if column == "value" else "left")
    now = time.time()
    for o in overrides:
        left = format_duration(max(0, round(o.expires_at - now)))
        table.add_row(
            str(o.address),
            number(o.value),
            when(o.expires_at),
            left,
            shown(o.actor),
            shown(o.reason),
        )
    console().print(table)


def freeze(
    ttl: str = typer.Option(..., "--ttl", help="How long automation stays frozen, e.g. 30m."),
    reason: str = typer.Option(..., "--reason", help="Why (read by on-call later)."),
    actor: str | None = ACTOR_OPTION,
    as_json: bool = JSON_OPTION,
) -> None:
    """Stop automatic changes until the TTL ends; overrides still apply."""
    seconds, why = parse_ttl(ttl), require_reason(reason)
    who = actor or default_actor()
    with stores() as s:
        require_a_tick(seconds, ttl, s.settings, "freeze")
        state = s.control.freeze(ttl_seconds=seconds, actor=who, reason=why)
        s.record(
            JournalEvent(
                kind=Kind.FREEZE_SET,
                actor=who,
                reason=why,
                details={"expires_at": state.expires_at, "ttl_seconds": seconds},
            )
        )
    if as_json:
        echo_json(_freeze_json(state))
        return
    typer.echo(f"automation frozen until {when(state.expires_at)} ({format_duration(seconds)})")


def unfreeze(
    reason: str = typer.Option("unfrozen by hand", "--reason", help="Why, for the journal."),
    actor: str | None = ACTOR_OPTION,
) -> None:
    """Let automatic changes resume now."""
    who, why = actor or default_actor(), require_reason(reason)
    with stores() as s:
        previous = s.control.unfreeze()
        if previous is not None:
            s.record(JournalEvent(kind=Kind.FREEZE_CLEARED, actor=who, reason=why))
    typer.echo("automation unfrozen" if previous else "automation was not frozen")
