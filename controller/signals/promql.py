"""Find the series selectors of a PromQL expression, so their newest sample time can be asked.

Prometheus stamps instant-query results with the evaluation time, not the time of the data
they were computed from, so an answer never shows its own age. The selectors an expression
reads (`metric{label="x"}`) are what tell: `timestamp(selector)` is the time of the newest
raw sample. This is a lexer, not a parser: it only has to tell selectors from function names,
keywords and label lists, which PromQL's grammar makes possible token by token.
"""

from __future__ import annotations

import re

_TOKEN = re.compile(
    r"""
    (?P<space>\s+|\#[^\n]*)
    | (?P<string>"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*'|`[^`]*`)
    | (?P<number>\.?[0-9][0-9a-zA-Z_.]*)
    | (?P<ident>[a-zA-Z_:][a-zA-Z0-9_:]*)
    | (?P<other>.)
    """,
    re.VERBOSE | re.DOTALL,
)

# Identifiers that are never metric names where they stand.
_KEYWORDS = frozenset(
    {"and", "or", "unless", "by", "without", "on", "ignoring", "group_left", "group_right"}
    | {"bool", "offset", "atan2", "inf", "nan"}
)
# An identifier followed by one of these is an aggregation: `sum by (tenant) (...)`.
_GROUPING = frozenset({"by", "without"})
# These are followed by a parenthesised list of label names, not by an expression.
_LABEL_LISTS = frozenset({"by", "without", "on", "ignoring", "group_left", "group_right"})


def _tokens(query: str) -> list[tuple[str, str]]:
    tokens = []
    for match in _TOKEN.finditer(query):
        kind = match.lastgroup or "other"
        if kind != "space":
            tokens.append((kind, match.group()))
    return tokens


def _closing(tokens: list[tuple[str, str]], start: int, opening: str, closing: str) -> int:
    """Index of the token closing the bracket at `start` (or the last token if unbalanced)."""
    depth = 0
    for index in range(start, len(tokens)):
        kind, text = tokens[index]
        if kind == "other" and text == opening:
            depth += 1
        elif kind == "other" and text == closing:
            depth -= 1
            if depth == 0:
                return index
    return len(tokens) - 1


def _text(tokens: list[tuple[str, str]], start: int, end: int) -> str:
    """Tokens start..end joined back; strings keep their quoting, so matchers stay exact."""
    out = []
    for kind, text in tokens[start : end + 1]:
        out.append(text)
        if kind == "other" and text == ",":
            out.append(" ")
    return "".join(out)


def selectors(query: str) -> tuple[str, ...]:
    """Every distinct instant selector the query reads, without range, offset or `@`.

    `sum by (tenant) (rate(cost_total{env="prod"}[5m] offset 1d))` → `cost_total{env="prod"}`.
    """
    tokens = _tokens(query)
    found: dict[str, None] = {}
    index = 0
    while index < len(tokens):
        kind, text = tokens[index]
        following = tokens[index + 1][1] if index + 1 < len(tokens) else ""
        if kind == "ident" and text.lower() in _LABEL_LISTS and following == "(":
            index = _closing(tokens, index + 1, "(", ")") + 1
        elif kind == "other" and text == "[":  # a range or subquery step, `[5m:1m]`
            index = _closing(tokens, index, "[", "]") + 1
        elif kind == "ident" and (
            following == "(" or following.lower() in _GROUPING or text.lower() in _KEYWORDS
        ):
            index += 1
        elif kind == "ident" and following == "{":
            end = _closing(tokens, index + 1, "{", "}")
            found[_text(tokens, index, end)] = None
            index = end + 1
        elif kind == "ident":
            found[text] = None
            index += 1
        elif kind == "other" and text == "{":
            end = _closing(tokens, index, "{", "}")
            found[_text(tokens, index, end)] = None
            index = end + 1
        else:
            index += 1
    return tuple(found)


def freshness_query(selector: str) -> str:
    """The query answering the time of the newest sample of `selector`."""
    return f"max(timestamp({selector}))"


def history_query(selector: str, at: float) -> str:
    """The query answering whether `selector` had a sample in the hour before `at` (unix
    seconds): its newest time then, or no series. One hour, so a short gap in the scrapes
    at exactly that time does not read as missing history."""
    return f"max(timestamp(last_over_time({selector}[1h] @ {at:.0f})))"
