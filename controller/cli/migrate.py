"""`governor redis migrate --to URL`: move Governor's keys from one Redis to a Redis Cluster."""

from __future__ import annotations

import json
from urllib.parse import urlsplit

import typer

from controller.cli._redis import JSON_OPTION, cli_errors
from controller.cli.config import load_settings
from controller.clients.redis import close, connect, masked_url, url_from_settings
from controller.control.migrate import migrate
from controller.errors import ConfigurationError
from controller.logging import configure_logging

app = typer.Typer(help="Governor's Redis: move it to a Redis Cluster.")


@app.command("migrate")
def migrate_command(
    to: str = typer.Option(
        ..., "--to", help="The Cluster: redis+cluster://host:port,host:port/0 (empty)."
    ),
    as_json: bool = JSON_OPTION,
) -> None:
    """Copy every key of GOVERNOR_REDIS__KEY_PREFIX from the Redis of GOVERNOR_REDIS__URL
    (key contract 1) to the Cluster of --to (contract 2, docs/redis-contract.md): limits,
    tenants, API keys, overrides and freeze (with their TTLs), credits, enforcement state,
    the journal, the catalog; the ledger and decision records regrouped per slot. Stop the
    controller and the gateways first; point them at --to afterwards. Exit 2 if the source
    is not contract 1 or the Cluster already holds keys of the prefix."""
    with cli_errors():
        settings = load_settings()
        configure_logging("warning", "stderr")
        if not urlsplit(to).scheme.endswith("+cluster"):
            raise ConfigurationError(f"--to {masked_url(to)!r} must be a redis+cluster:// URL")
        source = connect(url_from_settings(settings), settings.redis)
        target = connect(to, settings.redis)
        try:
            done = migrate(source, target, settings.redis.key_prefix)
        finally:
            close(source)
            close(target)
    if as_json:
        typer.echo(json.dumps({"copied": done.copied, "regrouped": done.regrouped,
                               "skipped": done.skipped, "unknown": done.unknown}))  # fmt: skip
        return
    typer.echo(
        f"copied {done.copied} keys to {masked_url(to)}; {done.regrouped} ledger and "
        f"decision entries regrouped per slot; {len(done.skipped)} left to be rewritten "
        f"there ({', '.join(sorted(done.skipped)) or 'none'})"
    )
    if done.unknown:
        typer.echo(f"not Governor's, not copied: {', '.join(sorted(done.unknown))}", err=True)
