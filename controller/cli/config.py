"""`governor config show`: the effective settings, secrets masked."""

from __future__ import annotations

import json
import os

import typer
from pydantic import ValidationError

from controller.settings import Settings, unknown_variables

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
    """Print the effective settings; secrets are shown as '**********'."""
    data = json.loads(load_settings().model_dump_json())
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
