"""`governor gateway --upstream URL`: the reference OpenAI-compatible gateway."""

from __future__ import annotations

from pathlib import Path

import typer

from controller.cli._redis import cli_errors
from controller.cli.config import load_settings
from controller.logging import configure_logging


def register(root: typer.Typer) -> None:
    """Add the top-level `gateway` command to the root app."""
    root.command("gateway")(gateway)


def gateway(
    upstream: str = typer.Option(
        ..., "--upstream", help="Root URL of the OpenAI-compatible model server (no /v1)."
    ),
    host: str | None = typer.Option(
        None, "--host", help="Listen address; default GOVERNOR_GATEWAY__HOST (127.0.0.1)."
    ),
    port: int | None = typer.Option(
        None, "--port", help="Listen port; default GOVERNOR_GATEWAY__PORT (8080)."
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
    with API-key/JWT auth, Governor's limits from Redis, and /metrics for Prometheus."""
    # Imported here: the web stack loads only for the command that serves.
    import uvicorn

    from controller.gateway.app import create_app, require_upstream

    with cli_errors():
        settings = load_settings()
        configure_logging(settings.log_level, "stderr")
        app = create_app(settings, require_upstream(upstream), policies)
    uvicorn.run(
        app,
        host=host or settings.gateway.host,
        port=port or settings.gateway.port,
        log_level="warning",  # our own structlog lines say what matters
        ws="none",
        proxy_headers=False,  # the client IP comes from GOVERNOR_GATEWAY__TRUST_FORWARDED_FOR
        server_header=False,
        lifespan="on",
    )
