"""The `governor` command line: one Typer app, one module per command group."""

from __future__ import annotations

import inspect
from typing import Any

import typer
import typer.core
import typer.rich_utils

from controller import __version__
from controller.cli import (
    audit,
    config,
    credits,
    explain,
    gateway,
    keys,
    limits,
    migrate,
    override,
    policy,
    run,
    tenants,
)
from controller.cli import backtest as backtest_cli
from controller.cli import signals as signals_cli
from controller.cli import simulate as simulate_cli
from controller.cli import usage as usage_cli
from controller.cli._redis import OUTPUT
from controller.extras import MissingExtraError

_option_type = typer.core.TyperOption.display_type_rich


def _flag_has_no_type(self: typer.core.TyperOption, ctx: Any) -> str | None:
    """Typer's help shows `<bool>` beside plain flags (--json, --help), as if they took a
    value; a flag takes none, so its type column stays empty."""
    return None if self.is_flag else _option_type(self, ctx)


typer.core.TyperOption.display_type_rich = _flag_has_no_type  # type: ignore[method-assign]


def _one_line_paragraphs(text: str) -> str:
    """Each paragraph of a help text on one line (a `\\b` paragraph keeps its breaks). Typer's
    rich mode keeps a docstring's own line breaks in the description and the command list, so
    at 80 columns each source line ended in a half-empty line; rich wraps the joined text."""
    paragraphs = inspect.cleandoc(text).split("\n\n")
    return "\n\n".join(p if p.startswith("\b") else " ".join(p.split()) for p in paragraphs)


_command_help = typer.rich_utils._make_command_help


def _command_help_joined(*, help_text: str, markup_mode: Any) -> Any:
    return _command_help(help_text=_one_line_paragraphs(help_text), markup_mode=markup_mode)


typer.rich_utils._make_command_help = _command_help_joined


def _paragraphs_joined(paragraphs: list[str], markup_mode: Any) -> str:
    return _one_line_paragraphs("\n\n".join(paragraphs))


typer.rich_utils._fix_linebreaks = _paragraphs_joined

app = typer.Typer(
    name="governor",
    help="Adaptive throttling for AI inference APIs: limits that follow what the GPUs can "
    "carry and what each tenant may spend, with every change explained.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
app.add_typer(config.app, name="config")
app.add_typer(policy.app, name="policy")
app.add_typer(limits.app, name="limits")
app.add_typer(audit.app, name="audit")
app.add_typer(tenants.app, name="tenants")
signals_cli.register(app)  # top-level `signals` (one command, no subcommands)
app.add_typer(credits.app, name="credits")
override.register(app)  # `override` group plus top-level `freeze` / `unfreeze`
explain.register(app)  # top-level `explain ADDRESS`
app.add_typer(keys.app, name="keys")
app.add_typer(migrate.app, name="redis")
gateway.register(app)  # top-level `gateway --upstream URL`
run.register(app)  # top-level `run` (the daemon)
simulate_cli.register(app)  # top-level `simulate` (the closed-loop simulator)
backtest_cli.register(app)  # top-level `backtest` (open-loop replay over Prometheus history)
usage_cli.register(app)  # top-level `usage TENANT` (limits, used, remaining, resets)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"governor {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version and exit."
    ),
    verbose: bool = typer.Option(
        False,
        "-v",
        "--verbose",
        help="Log at GOVERNOR_LOG_LEVEL on stderr, each journal event as a JSON line; "
        "default: warnings and errors only (`run` and `gateway` always log at "
        "GOVERNOR_LOG_LEVEL: their logs are their output).",
    ),
) -> None:
    """Governor keeps gateway limits in line with GPU load and tenant spend."""
    OUTPUT.verbose = verbose


def main() -> None:
    """Entry point of the `governor` console script."""
    try:
        app()
    except MissingExtraError as exc:  # wherever a command met it: one line, not a traceback
        typer.echo(f"error: {exc}", err=True)
        raise SystemExit(2) from None
