"""`governor policy`: check policy files before they reach the controller, the editor schema, and
the confirmation of a reload that removes many limits."""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import typer

from controller.cli._redis import (
    cli_errors,
    count,
    default_actor,
    parse_ttl,
    require_reason,
    stores,
    when,
)
from controller.cli.policy_tests import run_policy_tests
from controller.errors import ConfigurationError, PolicyError
from controller.journal.events import JournalEvent, Kind
from controller.policy.documents import KINDS, json_schema
from controller.policy.loader import check_files, policy_files

app = typer.Typer(
    help="Check policy files (lint), run their tests (test), print the editor schema, and "
    "confirm a reload that removes many limits (confirm-reload).",
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

    The set is checked as the controller runs it: it needs a Limits and a Plan document.
    """
    files = files_or_exit(directory)
    policies, errors = check_files(files, directory, complete=True)
    if as_json:
        typer.echo(json.dumps([error.to_dict() for error in errors], indent=2))
        raise typer.Exit(1 if errors else 0)
    if policies is None:
        for error in errors:
            typer.echo(str(error), err=True)
        broken = len({error.file for error in errors})
        typer.echo(f"{count(len(errors), 'error')} in {count(broken, 'file')}", err=True)
        raise typer.Exit(1)
    kinds: Counter[str] = Counter(document.kind for document in policies.documents)
    per_kind = ", ".join(f"{kind} {kinds[kind]}" for kind in KINDS if kinds[kind])
    typer.echo(
        f"ok: {count(len(policies.documents), 'document')} in {count(len(files), 'file')} "
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
    with cli_errors():
        try:
            output.write_text(text, encoding="utf-8")
        except OSError as exc:
            raise ConfigurationError(
                f"cannot write the schema to {output}: {exc.strerror}; pass a writable file "
                "path, or no -o to print it"
            ) from None
    typer.echo(f"wrote {output}", err=True)


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


_VERSION = re.compile(r"[0-9a-f]{12}")


@app.command("confirm-reload")
def confirm_reload(
    version: str = typer.Argument(
        ...,
        help="The policy version the refusal names (`governor policy lint DIR` prints it too).",
        show_default=False,
    ),
    reason: str = typer.Option(..., "--reason", help="Why these limits may go (journalled)."),
    actor: str | None = typer.Option(None, "--actor", help="Who confirms; default: the OS user."),
    ttl: str = typer.Option(
        "1h", "--ttl", help="How long the confirmation waits for the controller to take it."
    ),
) -> None:
    """Let the controller take policy set VERSION although it removes more limits than
    GOVERNOR_CONTROLLER__RELOAD_MAX_REMOVED_SHARE allows (the refusal's journal event and log
    line name VERSION). Only that exact set is let in; any other change is checked anew.

    Exit 0 when stored and journalled; 1 when Redis failed; 2 on a malformed VERSION.
    """
    if not _VERSION.fullmatch(version):
        typer.echo(
            f"error: {version!r} is not a policy version: give the 12 hex digits the refusal names",
            err=True,
        )
        raise typer.Exit(2)
    seconds, why, who = parse_ttl(ttl), require_reason(reason), actor or default_actor()
    with stores() as s:
        confirmation = s.control.confirm_reload(version, ttl_seconds=seconds, actor=who, reason=why)
        s.record(
            JournalEvent(
                kind=Kind.POLICY_CONFIRMED,
                actor=who,
                reason=why,
                policy_version=version,
                details={"expires_at": confirmation.expires_at, "ttl_seconds": seconds},
            )
        )
    typer.echo(
        f"policy set {version} confirmed until {when(confirmation.expires_at)}: the controller "
        "takes it on its next tick if the files still hold exactly that set"
    )
