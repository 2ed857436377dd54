"""`governor usage TENANT`: each limit in force for a tenant, what is used, what remains, and
when it is full again — read as the gateway reads it."""

from __future__ import annotations

import redis
import typer
from rich.table import Table
from rich.text import Text

from controller.cli._plans import known_plans
from controller.cli._redis import (
    JSON_OPTION,
    Stores,
    console,
    echo_json,
    number,
    shown,
    stores,
)
from controller.contract.catalog import PlanInfo
from controller.contract.enforcement import EnforcementKeys
from controller.errors import ConfigurationError, SinkError
from controller.gateway.credits import CreditLedger
from controller.gateway.keys import KeyStore
from controller.gateway.responses import openai_duration
from controller.gateway.usage import LimitUsage, TenantUsage, read_usage, usage_json, whole


def plan_of(s: Stores, tenant: str, plan: str | None) -> str:
    """The plan the gateway would apply: --plan, else the tenant registry's, else the one
    plan of the tenant's API keys; never a guess."""
    if plan is not None:
        return plan
    registered = s.control.tenant_plan(tenant)
    if registered is not None:
        return registered
    plans = sorted({record.plan for record in KeyStore(s.client, s.keys, None).list(tenant)})
    if len(plans) == 1:
        return plans[0]
    if plans:
        raise ConfigurationError(
            f"tenant {tenant!r} has API keys on several plans ({', '.join(plans)}); "
            "say which with --plan"
        )
    raise ConfigurationError(
        f"tenant {tenant!r} is not registered and has no API key; give its plan with --plan "
        "(a JWT's plan claim)"
    )


def _row(item: LimitUsage) -> tuple[str, ...]:
    used = "-" if item.used is None else number(whole(item.used))
    if item.held:
        used += f" (+{number(item.held)} held)"
    remaining = "-" if item.remaining is None else number(item.remaining)
    resets = "-" if item.resets_in is None else openai_duration(item.resets_in)
    return (item.address, item.window, number(item.limit), used, remaining, resets)


def _print(usage: TenantUsage, credits: dict[str, float] | None) -> None:
    who = usage.tenant + (f" (user {usage.user})" if usage.user else "")
    model = f", model {usage.model}" if usage.model else ""
    table = Table(title=f"usage of {who} on plan {usage.plan}{model}")
    for column in ("limit", "window", "allows", "used", "remaining", "full again in"):
        table.add_column(column, justify="left" if column in ("limit", "window") else "right")
    for item in usage.limits:
        table.add_row(*_row(item))
    out = console()
    out.print(table)
    if usage.shed:
        out.print(f"shed: {usage.shed} is 0, every request is refused 503")
    for problem in usage.damaged:  # the figures above read such a field as 0
        out.print(Text("damaged: ").append(shown(problem)))
    if credits is not None:
        out.print(
            f"credits: {credits['balance_usd']:,.6f} USD, {credits['reserved_usd']:,.6f} held, "
            f"{credits['available_usd']:,.6f} available"
        )


def usage(
    tenant: str = typer.Argument(..., help="Tenant id."),
    plan: str | None = typer.Option(
        None, "--plan", help="The tenant's plan; default: the registry's, or its API keys'."
    ),
    user: str | None = typer.Option(None, "--user", help="Show the user level of this user too."),
    model: str | None = typer.Option(None, "--model", help="Include the limits of this model."),
    as_json: bool = JSON_OPTION,
) -> None:
    """Each limit in force for TENANT (rates, budgets, concurrency, size), what is used, what
    remains and when it is full again, from the same lookup the gateway makes. Per-client-
    address (ip/...) limits are not shown: they depend on where a request comes from."""
    with stores() as s:
        chosen = known_plans(s).require(plan_of(s, tenant, plan))
        keys = EnforcementKeys(s.keys)
        found = read_usage(s.client, keys, tenant, chosen, user, model)
        if not found.version:
            raise ConfigurationError(
                "the controller has written no limits yet (gateways answer 503 not-configured); "
                "start it (governor run)"
            )
        credits = _credits(s, tenant, chosen)
        if as_json:
            echo_json({**usage_json(found), "credits": credits})
        else:
            _print(found, credits)


def _credits(s: Stores, tenant: str, plan: str) -> dict[str, float] | None:
    """The credit balance when the published plan charges credits (a limit too), else None."""
    key = s.keys.catalog
    try:
        text = s.client.hget(key, plan)
    except redis.RedisError as exc:
        raise SinkError(f"reading the plan catalog {key} failed: {exc}") from exc
    if text is None or PlanInfo.from_json(text).credits is None:
        return None
    state = CreditLedger(s.client, s.keys.prefix).state(tenant)
    return {"balance_usd": state.balance_usd, "reserved_usd": state.reserved_usd,
            "available_usd": state.available_usd}  # fmt: skip


def register(app: typer.Typer) -> None:
    app.command("usage")(usage)
