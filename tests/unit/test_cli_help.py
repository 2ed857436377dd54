"""Every `governor … --help`: flags show no `<bool>` type, and a command without
subcommands shows no `COMMAND [ARGS]...`."""

from __future__ import annotations

from collections.abc import Iterator
from itertools import pairwise
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


def _continuation(line: str, after: str) -> tuple[str, int]:
    """The first word of `after` when it continues `line`'s text (a description paragraph, or
    the same cell of a panel row), and the length the text may reach; ("", 0) otherwise."""
    words = after.strip(" │").split()
    if not words or not line.strip(" │") or words[0][0] in "[-*":  # `[default: …]`, options
        return "", 0
    if line.startswith("│") and after.startswith("│"):
        column = len(after) - len(after[1:].lstrip()) - 1
        return (words[0], 77) if column > 2 else ("", 0)  # > 2: the name column is blank
    if line.startswith(" ") and after.startswith(" ") and "Usage:" not in line:
        return words[0], 78
    return "", 0


def ragged_lines(text: str) -> list[str]:
    """Lines that end although the next line's first word would have fit on them."""
    lines = text.splitlines()
    ragged = []
    for line, after in pairwise(lines):
        word, room = _continuation(line, after)
        if word and len(line.rstrip(" │")) + 1 + len(word) < room:
            ragged.append(line.strip(" │"))
    return ragged


def test_a_ragged_line_is_found() -> None:
    text = " Per policy and signal: the top\n N label values, the sample age.\n"
    assert ragged_lines(text) == ["Per policy and signal: the top"]
    cell = "│ get   Print TENANT's plan; exit 1 │\n│       if the tenant is not registered. │"
    assert ragged_lines(cell) == ["get   Print TENANT's plan; exit 1"]


@pytest.mark.parametrize("path", _commands(), ids=lambda p: " ".join(p) or "governor")
def test_help_at_80_columns_wraps_only_where_the_next_word_does_not_fit(
    path: tuple[str, ...],
) -> None:
    # Docstrings break their lines at 100 columns; help joins each paragraph and rich wraps it.
    result = CliRunner().invoke(app, [*path, "--help"], env={"COLUMNS": "80"})
    assert result.exit_code == 0, result.output
    assert ragged_lines(result.stdout) == []
