"""`governor audit tail`: the decision journal, newest last, optionally followed live."""

from __future__ import annotations

import json
import time

import typer
from rich.table import Table

from controller.cli._redis import (
    JSON_OPTION,
    console,
    number,
    parse_address_prefix,
    parse_ttl,
    shown,
    stores,
    when,
)
from controller.cli._redis import (
    count as counted,
)
from controller.journal.events import STALE_LEADER, JournalEntry
from controller.journal.reader import follow_events, read_events

app = typer.Typer(
    help="Read the decision journal (every change and who made it).", no_args_is_help=True
)


def entry_json(entry: JournalEntry) -> str:
    """One journal entry as a JSON line (`id` is the stream id)."""
    data = {"id": entry.id, **entry.event.to_dict()}
    if entry.stale_leader:
        data[STALE_LEADER] = True
    return json.dumps(data, sort_keys=True)


def entries_table(entries: list[JournalEntry], title: str) -> Table:
    """Journal entries as a rich table, oldest first."""
    table = Table(title=title)
    for column in ("time", "event", "address", "old → new", "actor", "policy", "reason"):
        table.add_column(column)
    for entry in entries:
        e = entry.event
        kind = e.kind + (" (dry run)" if e.dry_run else "")
        kind += " (stale leader: not in force)" if entry.stale_leader else ""
        table.add_row(
            when(e.at),
            shown(kind),
            shown(e.address or "-"),
            f"{number(e.old)} → {number(e.new)}" if e.address else "-",
            shown(e.actor),
            shown(e.policy or "-"),
            shown(e.reason),
        )
    return table


@app.command("tail")
def tail(
    count: int = typer.Option(20, "-n", "--lines", min=1, help="How many events to show."),
    since: str | None = typer.Option(None, "--since", help="Only events newer than, e.g. 1h."),
    address: str | None = typer.Option(
        None,
        "--address",
        help="Only events whose address starts with this: whole parts of an address, e.g. "
        "tenant/acme, global/ or tenant/acme/tokens_per_minute.",
    ),
    follow: bool = typer.Option(False, "--follow", "-f", help="Keep printing new events."),
    as_json: bool = JSON_OPTION,
) -> None:
    """Print the newest journal events (JSON: one object per line)."""
    address = parse_address_prefix(address) if address else None
    start = time.time() - parse_ttl(since, "--since") if since else None
    with stores() as s:
        entries = read_events(s.client, s.keys, count=count, since=start, address=address)
        if as_json:
            for entry in entries:
                typer.echo(entry_json(entry))
        else:
            console().print(entries_table(entries, f"journal ({counted(len(entries), 'event')})"))
        if not follow:
            return
        after = entries[-1].id if entries else "$"
        try:
            for entry in follow_events(s.client, s.keys, after=after, address=address):
                if as_json:
                    typer.echo(entry_json(entry))
                else:
                    console().print(entries_table([entry], ""), end="")
        except KeyboardInterrupt:
            return
