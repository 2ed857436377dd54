"""Every `governor … --help`: flags show no `<bool>` type, and a command without
subcommands shows no `COMMAND [ARGS]...`."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import typer
from typer.testing import CliRunner

from controller.cli import app


def _paths(command: Any, path: tuple[str, ...] = ()) -> Iterator[tuple[str, ...]]:
    yield path
    for name, sub in getattr(command, "commands", {}).items():  # a group's subcommands
        yield from _paths(sub, (*path, name))


def _commands() -> list[tuple[str, ...]]:
    return list(_paths(typer.main.get_command(app)))


def test_every_command_is_listed() -> None:
    found = _commands()
    assert ("signals",) in found
    assert ("override", "set") in found
    assert len(found) > 30


@pytest.mark.parametrize("path", _commands(), ids=lambda p: " ".join(p) or "governor")
def test_help_shows_no_bool_type_on_flags(path: tuple[str, ...]) -> None:
    result = CliRunner().invoke(app, [*path, "--help"], env={"COLUMNS": "120"})
    assert result.exit_code == 0, result.output
    assert "--help" in result.stdout
    assert "<bool>" not in result.stdout


def test_options_with_values_keep_their_type() -> None:
    result = CliRunner().invoke(app, ["override", "set", "--help"], env={"COLUMNS": "120"})
    ttl = next(line for line in result.stdout.splitlines() if "--ttl" in line)
    assert "<str>" in ttl
    json_flag = next(line for line in result.stdout.splitlines() if "--json" in line)
    assert "<" not in json_flag


def test_signals_is_a_command_without_subcommands() -> None:
    result = CliRunner().invoke(app, ["signals", "--help"], env={"COLUMNS": "120"})
    assert result.exit_code == 0
    assert "Usage: governor signals [OPTIONS]" in result.stdout
    assert "COMMAND" not in result.stdout
    assert "--label" in result.stdout
