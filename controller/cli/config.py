"""`governor config show`: the effective settings, secrets masked."""

from __future__ import annotations

import json
import os
from typing import Any

import typer
from pydantic import BaseModel, SecretStr, ValidationError

from controller.settings import Settings, unknown_variables
from controller.urls import mask_url

app = typer.Typer(
    help="Inspect Governor's settings (environment GOVERNOR_*).", no_args_is_help=True
)


def load_settings() -> Settings:
    """Settings from the environment, or exit 2 naming each bad or unknown variable."""
    unknown = unknown_variables(os.environ)
    for message in unknown:
        typer.echo(f"error: {message}", err=True)
    if unknown:
        raise typer.Exit(2)
    try:
        return Settings()
    except ValidationError as exc:
        for error in exc.errors():
            variable = "GOVERNOR_" + "__".join(str(p).upper() for p in error["loc"])
            typer.echo(f"error: {variable}: {error['msg']}", err=True)
        raise typer.Exit(2) from None


@app.command("show")
def show(
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of YAML-like text."),
) -> None:
    """Print the effective settings; secrets are shown as '**********', and in a URL only
    its password is."""
    data = shown_settings(load_settings())
    # Extra HTTP headers often carry credentials (Authorization): show only their names.
    headers = data.get("prometheus", {}).get("headers") or {}
    data["prometheus"]["headers"] = dict.fromkeys(headers, "**********")
    if as_json:
        typer.echo(json.dumps(data, indent=2, sort_keys=True))
        return
    for group, values in data.items():
        if isinstance(values, dict):
            typer.echo(f"{group}:")
            for key, value in values.items():
                typer.echo(f"  {key}: {json.dumps(value)}")
        else:
            typer.echo(f"{group}: {json.dumps(values)}")


def shown_settings(settings: Settings) -> dict[str, Any]:
    """The settings as JSON data, secrets masked: a secret URL (GOVERNOR_REDIS__URL) shows
    all but its password, and so does every URL among the plain values (a password in
    GOVERNOR_PROMETHEUS__URL or in a redis:// entry of GOVERNOR_CONTROLLER__SINKS)."""
    data: dict[str, Any] = _masked_urls(json.loads(settings.model_dump_json()))
    for group, values in settings:
        if not isinstance(values, BaseModel):
            continue
        for name, value in values:
            if isinstance(value, SecretStr) and name.endswith("url"):
                data[group][name] = mask_url(value.get_secret_value())
    return data


def _masked_urls(value: Any) -> Any:
    if isinstance(value, str):
        return mask_url(value) if "://" in value else value
    if isinstance(value, dict):
        return {k: _masked_urls(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_masked_urls(v) for v in value]
    return value
