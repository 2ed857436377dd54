"""`governor gateway --upstream URL`: the reference OpenAI-compatible gateway;
`governor gateway export-lua DIR`: its scripts and settings for nginx/OpenResty and Kong."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import typer
from rich.console import Console
from rich.table import Column, Table

from controller.cli._redis import JSON_OPTION, cli_errors
from controller.cli.config import load_settings
from controller.errors import ConfigurationError, PolicyError
from controller.logging import configure_logging

if TYPE_CHECKING:
    from controller.gateway.app import FixedPlans


def register(root: typer.Typer) -> None:
    """Add `gateway` (serves when called without a subcommand) to the root app."""
    group = typer.Typer(help="The reference gateway, and its enforcement for other gateways.")
    group.callback(invoke_without_command=True)(gateway)
    group.command("export-lua")(export_lua)
    root.add_typer(group, name="gateway")


def gateway(
    ctx: typer.Context,
    upstream: str | None = typer.Option(
        None,
        "--upstream",
        help="Root URL of the OpenAI-compatible model server (no /v1); required to serve.",
    ),
    host: str | None = typer.Option(
        None, "--host", help="Listen address; default GOVERNOR_GATEWAY__HOST (127.0.0.1)."
    ),
    port: int | None = typer.Option(
        None,
        "--port",
        min=1,
        max=65535,  # else the socket's OverflowError came out as a traceback
        help="Listen port; default GOVERNOR_GATEWAY__PORT (8080).",
    ),
    policies: Path | None = typer.Option(
        None,
        "--policies",
        help="Read plans (models, fail mode, degrade) from this policy directory instead of "
        "the catalog the controller publishes in Redis.",
        exists=True,
        file_okay=False,
    ),
) -> None:
    """Serve /v1/chat/completions, /v1/completions and /v1/embeddings (others pass through)
    with API-key/JWT auth, Governor's limits from Redis, and /metrics for Prometheus. Logs one
    line at start (listen address, upstream, plan catalog) and at stop; SIGTERM drains
    in-flight requests (GOVERNOR_GATEWAY__DRAIN_SECONDS) and exits 0."""
    if ctx.invoked_subcommand is not None:
        return
    if upstream is None:
        raise typer.BadParameter("give the model server's root URL", param_hint="--upstream")
    # Imported here: the web stack loads only for the command that serves.
    from controller.gateway.app import create_app, require_upstream, serve

    with cli_errors():
        settings = load_settings()
        configure_logging(settings.log_level, "stderr")
        listen_host, listen_port = host or settings.gateway.host, port or settings.gateway.port
        try:
            plans = None if policies is None else fixed_plans(policies)
            app = create_app(
                settings, require_upstream(upstream), plans, f"{listen_host}:{listen_port}"
            )
        except PolicyError as exc:  # file:line:col: message per error, not a traceback
            raise ConfigurationError(str(exc)) from None
    if not serve(app, listen_host, listen_port, settings.gateway.drain_seconds):
        raise typer.Exit(1)  # it could not listen; uvicorn said why


def export_lua(
    directory: Path = typer.Argument(
        ..., help="Where to write admit.lua, settle.lua and governor.json (created if missing)."
    ),
    as_json: bool = JSON_OPTION,
) -> None:
    """Write the admission and settle scripts exactly as Python loads them (same SHA1) and the
    settings nginx/Kong need (governor.json, from GOVERNOR_*; secrets are never written)."""
    from controller.gateway.export import export_lua as write

    with cli_errors():
        settings = load_settings()
        files = write(directory, settings.gateway, settings.prices, settings.redis.key_prefix)
    if as_json:
        rows = [{"path": str(f.path), "sha1": f.sha} for f in files]
        typer.echo(json.dumps(rows, indent=2))
        return
    # Cut to fit 80 columns, a SHA1 or a path ending in "…" was of no use: the SHA1 keeps its
    # 40 characters, a long path folds onto the next lines.
    table = Table(
        Column("file", overflow="fold"), Column("SHA1 (EVALSHA)", no_wrap=True, min_width=40)
    )
    for exported in files:
        table.add_row(str(exported.path), exported.sha or "-")
    Console().print(table)


def fixed_plans(directory: Path) -> FixedPlans:
    """The plans of a policy directory, as `governor gateway --policies` serves them."""
    from controller.contract.catalog import PlanInfo
    from controller.gateway.app import FixedPlans
    from controller.policy.loader import load_directory

    loaded = load_directory(directory)
    return FixedPlans(
        f"{loaded.version} (--policies)",
        {name: PlanInfo.from_spec(plan.spec) for name, plan in loaded.plans.items()},
        {
            name: {k.value: v for k, v in plan.spec.limits.items()}
            for name, plan in loaded.plans.items()
        },
    )
