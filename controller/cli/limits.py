"""`governor limits get`: the limits gateways enforce, as stored in Redis."""

from __future__ import annotations

import json

import typer
from rich.table import Table

from controller.cli._redis import JSON_OPTION, console, parse_address_prefix, stores

app = typer.Typer(help="Read the limits that gateways enforce (from Redis).", no_args_is_help=True)


@app.command("get")
def get(
    prefix: str = typer.Argument(
        "",
        help="Only addresses starting with this: whole parts of an address, e.g. tenant/acme "
        "or plan/free/.",
    ),
    as_json: bool = JSON_OPTION,
) -> None:
    """Print the stored limits and the version: JSON is {"version": N, "limits": {...}}."""
    prefix = parse_address_prefix(prefix)
    with stores() as s:
        data = s.sink.read().as_json(prefix)
    if as_json:
        typer.echo(json.dumps(data, sort_keys=True))
        return
    limits = data["limits"]
    assert isinstance(limits, dict)
    table = Table(title=f"limits (version {data['version']})")
    table.add_column("address")
    table.add_column("value", justify="right")
    for address, value in limits.items():
        table.add_row(address, "not a number" if value is None else str(value))
    console().print(table)
    if not limits:
        typer.echo(f"no limits under {prefix!r}" if prefix else "no limits stored yet")
