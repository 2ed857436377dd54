"""`governor explain ADDRESS`: why a limit has its value (proposals, override, winner, history)."""

from __future__ import annotations

import json
from typing import Any

import typer
from rich.table import Table

from controller.cli._plans import known_plans
from controller.cli._redis import (
    JSON_OPTION,
    Stores,
    console,
    count,
    echo_json,
    number,
    parse_address,
    plain,
    shown,
    stores,
)
from controller.cli._redis import when as at
from controller.cli.audit import entries_table
from controller.cli.usage import plan_of
from controller.errors import ConfigurationError
from controller.journal.reader import read_events
from controller.model import Address, Scope

_EVENTS = 10


def register(root: typer.Typer) -> None:
    """Add the top-level `explain` command to the root app."""
    root.command("explain")(explain)


def _signals(signals: list[dict[str, Any]]) -> str:
    return (
        ", ".join(f"{s['name']}={number(s['value'])} @{at(s['timestamp'])}" for s in signals) or "-"
    )


def explain(
    address: str = typer.Argument(..., help="Limit address, e.g. plan/free/requests_per_minute."),
    as_json: bool = JSON_OPTION,
) -> None:
    """Why ADDRESS has its value: proposals, override, winner and its last journal events."""
    target = parse_address(address)
    with stores() as s:
        record = s.sink.read_decision(target)
        stored = s.sink.stored(target)
        override = s.control.override(target)
        freeze = s.control.frozen()
        events = read_events(s.client, s.keys, count=_EVENTS, address=str(target), exact=True)
        if stored is None and record is None and override is None and not events:
            _require_known_plan(s, target)
        follows = _follows(s, target) if stored is None and override is None else None
    decision = json.loads(record) if record else None
    if as_json:
        echo_json(
            {
                "address": str(target),
                "stored": stored,
                "decision": decision,
                "override": None
                if override is None
                else {
                    "value": override.value,
                    "expires_at": override.expires_at,
                    "actor": override.actor,
                    "reason": override.reason,
                },
                "frozen": freeze is not None,
                "follows": None if follows is None else str(follows),
                "events": [{"id": e.id, **e.event.to_dict()} for e in events],
            }
        )
        return
    out = console()
    out.print(f"[bold]{target}[/bold]  stored value: {number(stored)}")
    if freeze is not None:
        out.print(
            f"automation FROZEN until {at(freeze.expires_at)} ({plain(freeze.reason)})",
            markup=False,
        )
    if override is not None:
        out.print(
            f"override: {number(override.value)} until {at(override.expires_at)} "
            f"by {plain(override.actor)}: {plain(override.reason)}",
            markup=False,
        )
    if follows is not None:
        out.print(
            f"no value of its own: tenant {target.tenant} is on plan {follows.plan}, whose value "
            f"the gateway applies: governor explain {follows} (governor usage {target.tenant} "
            "shows every limit in force)",
            markup=False,
        )
    if decision is None:
        out.print("no decision recorded: the controller has not decided this address explicitly")
    else:
        out.print(_decision_table(decision))
        out.print(
            f"winner: {number(decision['value'])} from {decision['source']}"
            + (f" ({decision['policy']})" if decision["policy"] else "")
            + f": {plain(decision['reason'])}",
            markup=False,
        )
        # The reason already quotes the adjustments that changed the value (the resolver
        # says what was enforced instead); the others are listed once here.
        extra = [a for a in decision["adjustments"] if a not in decision["reason"]]
        if extra:
            out.print("adjustments: " + plain("; ".join(extra)), markup=False)
    out.print(entries_table(events, f"last {count(len(events), 'journal event')}"))


def _follows(s: Stores, target: Address) -> Address | None:
    """The plan address a tenant's limit without a value of its own stands for: a refusal
    names `tenant/acme/…` while the gateway applies acme's plan's value there. None for other
    scopes and for a tenant whose plan cannot be told (unregistered, keys on several plans)."""
    if target.scope is not Scope.TENANT or target.tenant is None:
        return None
    try:
        plan = plan_of(s, target.tenant, None)
    except ConfigurationError:
        return None
    return Address(Scope.PLAN, target.limit, plan=plan, model=target.model)


def _require_known_plan(s: Stores, target: Address) -> None:
    """Refuse (exit 2) an address nothing is known about on a plan that does not exist, as
    `override set` refuses it: a typo (plan/fre/…) read as a limit nobody ever set. A plan
    since removed keeps its history; with no plans to judge by (no catalog, no policy
    directory) nothing is refused."""
    if target.plan is None:
        return
    try:
        plans = known_plans(s)
    except ConfigurationError:
        return
    plans.require(target.plan)


def _decision_table(decision: dict[str, Any]) -> Table:
    table = Table(title=f"decision of tick {decision['tick']} at {at(decision['decided_at'])}")
    for column in ("", "source", "value", "reason", "signals"):
        table.add_column(column)
    table.add_row("", "baseline", number(decision["baseline"]), "plan / Limits value", "-")
    for proposal in decision["proposals"]:
        wins = decision["source"] == "policy" and proposal["policy"] == decision["policy"]
        table.add_row(
            "★" if wins else "",
            shown(proposal["policy"]),
            number(proposal["value"]),
            shown(proposal["reason"]),
            shown(_signals(proposal["signals"])),
        )
    return table
