"""Shared plumbing of the Redis-backed commands: connect from settings, errors, output helpers."""

from __future__ import annotations

import datetime as dt
import getpass
import json
import logging
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import redis
import typer
from rich.console import Console, Group
from rich.measure import Measurement
from rich.rule import Rule
from rich.table import Table
from rich.text import Text

from controller.cli.config import load_settings
from controller.clients.redis import (
    close,
    connect,
    hint_for,
    key_schema,
    refuse_cluster_node,
    refuse_other_contract,
    url_from_settings,
)
from controller.contract.keys import KeySchema
from controller.control.compose import build_journal
from controller.control.overrides import ControlStore
from controller.durations import format_duration, parse_duration
from controller.errors import ConfigurationError, SinkError
from controller.journal.events import JournalEvent
from controller.journal.writer import Journal
from controller.logging import configure_logging, mask_text
from controller.model import Address, AddressError
from controller.settings import Settings
from controller.sinks.redis import RedisSink

JSON_OPTION = typer.Option(False, "--json", help="Print JSON for scripts instead of a table.")
# Commands taking a number argument: click would read `-50` as the short options -5 -0 and
# answer "No such option: -5"; unknown dashes are left as arguments instead, so the value is
# judged (and refused with its own message) and a misspelt option is still an extra argument.
NUMBER_ARGUMENTS = {"ignore_unknown_options": True}


@dataclass
class Output:
    """What `governor -v` asked for; set by the root command before any subcommand runs."""

    verbose: bool = False


OUTPUT = Output()


def log_level(settings: Settings) -> str:
    """The CLI's log level: warnings and errors only, so a write command says one line and
    not its journal event as JSON (the stream in Redis holds every event; `governor audit`
    shows them); `governor -v` logs at GOVERNOR_LOG_LEVEL, journal lines included."""
    if OUTPUT.verbose:
        return settings.log_level
    quiet = logging.getLevelName(settings.log_level.upper())
    return settings.log_level if isinstance(quiet, int) and quiet > logging.WARNING else "warning"


@dataclass
class Stores:
    """Everything a command may read or write, on one Redis."""

    settings: Settings
    keys: KeySchema
    client: redis.Redis[str]
    sink: RedisSink
    control: ControlStore
    journal: Journal

    def record(self, event: JournalEvent) -> None:
        """Journal a person's action; fail loudly if the stream did not take it."""
        self.journal.emit(event)
        if not self.journal.flush():
            raise SinkError("the action was done, but its journal event could not be stored")


@contextmanager
def stores() -> Iterator[Stores]:
    """Open Redis from GOVERNOR_REDIS__*; turn Governor errors into exit codes and messages."""
    with cli_errors():
        settings = load_settings()
        configure_logging(log_level(settings), "stderr")
        url = url_from_settings(settings)
        client = connect(url, settings.redis)
        keys = key_schema(client, settings.redis.key_prefix)
        journal_client = connect(url, settings.redis, retries=0)
        try:
            refuse_cluster_node(journal_client)  # no retries: a Redis down fails below
            # Every command reads or writes Governor's keys (API keys, credits, the journal):
            # a Redis laid out by another key contract is refused before any of them.
            refuse_other_contract(client, keys, "read the key contract")
            yield Stores(
                settings,
                keys,
                client,
                RedisSink(client, keys),
                ControlStore(client, keys),
                build_journal(journal_client, keys, settings.journal),
            )
        finally:
            close(client)
            close(journal_client)


@contextmanager
def cli_errors() -> Iterator[None]:
    """Exit 1 on a Redis failure, 2 on bad configuration or input, with the message on stderr."""
    try:
        yield
    except SinkError as exc:
        text = mask_text(str(exc))
        hint = hint_for(exc)
        typer.echo(f"error: {text}{'' if hint in text else hint}", err=True)
        raise typer.Exit(1) from None
    except (ConfigurationError, ValueError) as exc:
        typer.echo(f"error: {mask_text(str(exc))}", err=True)
        raise typer.Exit(2) from None


def parse_address(text: str) -> Address:
    """An address argument, or a usage error saying what is wrong with it."""
    try:
        return Address.parse(text)
    except AddressError as exc:
        raise typer.BadParameter(str(exc)) from None


def parse_address_prefix(text: str) -> str:
    """An address filter (`tenant/acme`, `global/`, a whole address; "" for none), or the
    usage error `parse_address` gives for the same mistake."""
    if not text:
        return text
    try:
        return Address.check_prefix(text)
    except AddressError as exc:
        raise typer.BadParameter(str(exc)) from None


def parse_ttl(text: str, option: str = "--ttl") -> float:
    """A positive duration like 30m or 1h given to `option`, or the usage error naming it."""
    try:
        seconds = parse_duration(text)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint=option) from None
    if seconds <= 0:
        raise typer.BadParameter(
            f"{text!r} is no time at all: give a duration longer than 0s, e.g. 30m or 1h",
            param_hint=option,
        )
    return seconds


def require_a_tick(seconds: float, text: str, settings: Settings, what: str) -> None:
    """Refuse (usage error) a --ttl shorter than a controller tick: the controller applies
    overrides and the freeze at its ticks, so one that ends sooner may never be in force
    while the command said it was set."""
    tick = settings.controller.tick_seconds
    if seconds < tick:
        shortest = format_duration(tick)
        raise typer.BadParameter(
            f"{text!r} is shorter than a controller tick ({shortest}, "
            f"GOVERNOR_CONTROLLER__TICK_SECONDS): the {what} could end before the controller "
            f"applies it; give at least {shortest}, e.g. 30m or 1h",
            param_hint="--ttl",
        )


def default_actor() -> str:
    """The person at the keyboard (the OS user)."""
    return getpass.getuser()


def require_reason(reason: str) -> str:
    if not reason.strip():
        raise typer.BadParameter("say why (on-call must read it later)", param_hint="--reason")
    return reason.strip()


def when(timestamp: float | None) -> str:
    """A unix time as UTC ISO 8601 (seconds)."""
    if timestamp is None:
        return "-"
    return dt.datetime.fromtimestamp(timestamp, dt.UTC).isoformat(timespec="seconds")


def number(value: float | None) -> str:
    """A limit for a table: integers without '.0', absent as '-'."""
    if value is None:
        return "-"
    return str(int(value)) if float(value).is_integer() else f"{value:g}"


def count(number: int, noun: str) -> str:
    """`1 event`, `2 events`: a table title or summary never says "1 events"."""
    return f"{number} {noun}" if number == 1 else f"{number} {noun}s"


def plain(value: str) -> str:
    """Text stored by anyone (a reason, an actor, a key's name) as one printable line: every
    control or other unprintable character escaped (`\\x1b`, `\\n`), so it can neither
    drive the terminal nor pass for another line. Print it with rich's markup off, or as
    `shown()`: `[red]` in a reason is text, not a style."""
    if value.isprintable():
        return value
    return "".join(c if c.isprintable() else ascii(c)[1:-1] for c in value)


def shown(value: str) -> Text:
    """`plain(value)` as a table cell: plain text, no rich markup."""
    return Text(plain(value))


def echo_json(data: Any) -> None:
    typer.echo(json.dumps(data, indent=2, sort_keys=True))


_UNBOUNDED = 100_000


class _Console(Console):
    """A console whose tables that do not fit its width are stacked, one `column  value`
    line per cell and a rule between rows: squeezed into 80 columns, rich would wrap every
    column down to a word per line."""

    def print(self, *objects: Any, **kwargs: Any) -> None:
        super().print(*(self._fitted(o) for o in objects), **kwargs)

    def _fitted(self, renderable: Any) -> Any:
        if not isinstance(renderable, Table) or not renderable.columns:
            return renderable
        unbounded = self.options.update(width=_UNBOUNDED)  # the width it wants, not clamped
        if Measurement.get(self, unbounded, renderable).maximum <= self.width:
            return renderable
        return _stacked(renderable)


def _stacked(table: Table) -> Group:
    """The rows of `table` as name/value grids under its title."""
    parts: list[Any] = [Text(str(table.title), style="bold")] if table.title else []
    columns = [(str(c.header), list(c.cells)) for c in table.columns]
    for row in range(table.row_count):
        grid = Table.grid(padding=(0, 2))
        grid.add_column(style="bold", no_wrap=True)
        grid.add_column(overflow="fold")
        for header, cells in columns:
            grid.add_row(header, cells[row] if row < len(cells) else "")
        parts.extend([Rule(style="dim"), grid])
    return Group(*parts)


def console() -> Console:
    """A rich console on the current stdout (so test runners capture it): the terminal's
    width, else $COLUMNS, else 160 columns for a pipe."""
    wide = sys.stdout.isatty() or "COLUMNS" in os.environ
    return _Console(highlight=False, width=None if wide else 160)
