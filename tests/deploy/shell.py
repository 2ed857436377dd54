"""Shell commands quoted in Markdown, and whether a `governor` command parses against the CLI."""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from typing import Any

import typer
from typer.core import TyperGroup
from typer.exceptions import TyperException

SHELL_FENCES = {"sh", "bash", "shell", "console"}
OPERATORS = {"|", "||", "&&", ";"}
_FENCE = re.compile(r"^(\s*)```(\w*)\s*$")


@dataclass(frozen=True)
class Command:
    """One simple command of a code block: its words and where it was written."""

    words: tuple[str, ...]
    line: int

    def governor_args(self) -> tuple[str, ...] | None:
        """The arguments after `governor` (run directly or through `kubectl exec ... --`)."""
        if self.words[:1] == ("governor",):
            return self.words[1:]
        if self.words[:1] == ("kubectl",) and "--" in self.words:
            after = self.words[self.words.index("--") + 1 :]
            if after[:1] == ("governor",):
                return after[1:]
        return None


def shell_blocks(markdown: str) -> list[tuple[int, str]]:
    """(first line number, text) of every sh/bash/shell/console fenced block."""
    blocks: list[tuple[int, str]] = []
    lines = markdown.splitlines()
    index = 0
    while index < len(lines):
        opening = _FENCE.match(lines[index])
        if not opening:
            index += 1
            continue
        indent, language = opening.groups()
        body: list[str] = []
        index += 1
        while index < len(lines) and not _FENCE.match(lines[index]):
            body.append(lines[index].removeprefix(indent))
            index += 1
        if language in SHELL_FENCES:
            blocks.append((index - len(body) + 1, "\n".join(body)))
        index += 1
    return blocks


def commands(block: str, first_line: int) -> list[Command]:
    """The simple commands of a block: continuation lines joined, prompts and comments dropped,
    pipelines and lists (`|`, `&&`, `||`, `;` written as separate words) split."""
    out: list[Command] = []
    pending = ""
    for offset, raw in enumerate(block.splitlines()):
        text = pending + raw.removeprefix("$ ")
        if text.endswith("\\"):
            pending = text[:-1] + " "
            continue
        pending = ""
        words: list[str] = []
        for word in shlex.split(text, comments=True):
            if word in OPERATORS:
                if words:
                    out.append(Command(tuple(words), first_line + offset))
                words = []
            else:
                words.append(word)
        if words:
            out.append(Command(tuple(words), first_line + offset))
    return out


def check_governor(root: Any, args: tuple[str, ...]) -> str | None:
    """None when `governor ARGS` names an existing command with valid options and arguments,
    else what is wrong. `root` is `typer.main.get_command(app)`: the click command tree
    (Typer's own copy of click), parsed with `make_context` (no command runs)."""
    command, path, rest = root, ["governor"], list(args)
    while isinstance(command, TyperGroup) and rest and not rest[0].startswith("-"):
        sub = command.commands.get(rest[0])
        if sub is None:
            return f"`{' '.join(path)}` has no command {rest[0]!r}"
        command, rest = sub, rest[1:]
        path.append(sub.name or "?")
    try:
        context = command.make_context(" ".join(path), rest)
    except typer.Exit:  # --help or --version: valid, and nothing more to check
        return None
    except TyperException as exc:  # click's usage errors, as Typer re-exports them
        return f"`{' '.join(path)}`: {exc.format_message()}"
    # click 8.2+ keeps a group's unparsed words in `_protected_args` until invoke.
    left = [*getattr(context, "_protected_args", ()), *context.args]
    if isinstance(command, TyperGroup) and left:
        return f"`{' '.join(path)}` has no command {left[0]!r}"
    return None
