"""Shared plumbing of the Redis-backed commands: connect from settings, errors, output helpers."""

from __future__ import annotations

import datetime as dt
import getpass
import json
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import redis
import typer
from rich.console import Console

from controller.audit import Journal, JournalEvent
from controller.cli.config import load_settings
from controller.errors import ConfigurationError, SinkError
from controller.logging import configure_logging, mask_text
from controller.model import Address, AddressError
from controller.policy.documents import parse_duration
from controller.settings import Settings
from controller.sinks.connection import close, connect, url_from_settings
from controller.sinks.control import ControlStore
from controller.sinks.keys import KeySchema
from controller.sinks.redis import RedisSink

JSON_OPTION = typer.Option(False, "--json", help="Print JSON for scripts instead of a table.")


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
        configure_logging(settings.log_level, "stderr")
        url = url_from_settings(settings)
        keys = KeySchema(settings.redis.key_prefix)
        client = connect(url, settings.redis)
        journal_client = connect(url, settings.redis, retries=0)
        try:
            yield Stores(
                settings,
                keys,
                client,
                RedisSink(client, keys),
                ControlStore(client, keys),
                Journal(journal_client, keys, settings.journal),
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
        typer.echo(f"error: {mask_text(str(exc))}", err=True)
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


def parse_ttl(text: str) -> float:
    """A TTL like 30m or 1h; must be positive."""
    try:
        seconds = parse_duration(text)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None
    if seconds <= 0:
        raise typer.BadParameter(f"TTL {text!r} must be longer than 0s")
    return seconds


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


def echo_json(data: Any) -> None:
    typer.echo(json.dumps(data, indent=2, sort_keys=True))


def console() -> Console:
    """A rich console on the current stdout (so test runners capture it)."""
    return Console(highlight=False, width=None if sys.stdout.isatty() else 160)
