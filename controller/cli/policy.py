"""`governor policy`: check policy files before they reach the controller, and the editor schema."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import typer

from controller.cli.policy_test import run_policy_tests
from controller.errors import PolicyError
from controller.policy.documents import KINDS, json_schema
from controller.policy.loader import check_files, policy_files

app = typer.Typer(
    help="Check policy files (lint), run their tests (test) and print the editor schema.",
    no_args_is_help=True,
)

DIRECTORY = typer.Argument(
    ...,
    metavar="DIR",
    help="Directory of policy files (*.yaml, *.yml; *_test.yaml files are policy tests).",
    show_default=False,
)

OUTPUT = typer.Option(
    None, "--output", "-o", help="Write the schema to this file instead of stdout."
)


def files_or_exit(directory: Path) -> list[Path]:
    """The policy files of `directory`, or exit 2 when there is nothing to check."""
    try:
        files = policy_files(directory)
    except PolicyError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    if not files:
        typer.echo(
            f"error: {str(directory)!r} holds no policy files (*.yaml or *.yml, "
            "not counting *_test.yaml)",
            err=True,
        )
        raise typer.Exit(2)
    return files


@app.command("lint")
def lint(
    directory: Path = DIRECTORY,
    as_json: bool = typer.Option(
        False, "--json", help="Print the errors as a JSON list (empty when valid)."
    ),
) -> None:
    """Validate every policy file of DIR as one set, as the controller would load it.

    Exit 0 when valid (prints a summary).

    Exit 1 with one `file:line:column: message` line per error (on stderr).

    Exit 2 when DIR is missing or holds no policy files.
    """
    files = files_or_exit(directory)
    policies, errors = check_files(files, directory)
    if as_json:
        typer.echo(json.dumps([error.to_dict() for error in errors], indent=2))
        raise typer.Exit(1 if errors else 0)
    if policies is None:
        for error in errors:
            typer.echo(str(error), err=True)
        broken = len({error.file for error in errors})
        typer.echo(f"{_count(len(errors), 'error')} in {_count(broken, 'file')}", err=True)
        raise typer.Exit(1)
    kinds: Counter[str] = Counter(document.kind for document in policies.documents)
    per_kind = ", ".join(f"{kind} {kinds[kind]}" for kind in KINDS if kinds[kind])
    typer.echo(
        f"ok: {_count(len(policies.documents), 'document')} in {_count(len(files), 'file')} "
        f"({per_kind or 'none'}), version {policies.version}"
    )


@app.command("schema")
def schema(
    output: Path | None = OUTPUT,
) -> None:
    """Print the JSON Schema of one policy document.

    Editors use it through a first line `# yaml-language-server: $schema=<file or URL>`.
    """
    text = json.dumps(json_schema(), indent=2) + "\n"
    if output is None:
        typer.echo(text, nl=False)
        return
    output.write_text(text, encoding="utf-8")
    typer.echo(f"wrote {output}", err=True)


def _count(number: int, noun: str) -> str:
    return f"{number} {noun}" if number == 1 else f"{number} {noun}s"


@app.command("test")
def run_tests(
    directory: Path = DIRECTORY,
    as_json: bool = typer.Option(False, "--json", help="Print the results as JSON."),
) -> None:
    """Run every policy test (*_test.yaml) of DIR against the policy files it names.

    Each test drives the real engine and resolver over signal series written in expanding
    notation ('0.5x4 0.95x10') on a virtual clock, and compares the limits in force.

    Exit 0 when every test passes; exit 1 with what was expected and what came out, or with
    file:line:col for a broken test file; exit 2 when DIR holds no tests.
    """
    run_policy_tests(directory, as_json)
