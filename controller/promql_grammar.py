"""PromQL read with Prometheus' grammar (promql-parser), for every room that reads a query:
the policy files' checks, the signals' freshness selectors and the simulator's evaluator."""

from __future__ import annotations

import json
import re

import promql_parser as pq

# String literals and comments, each whole, left to right (so a backtick inside a quoted
# string or a comment is not taken for the start of a raw string).
_LITERAL = re.compile(
    r'"(?:[^"\\\n]|\\.)*"'  # double-quoted: escapes, no raw newline
    r"|'(?:[^'\\\n]|\\.)*'"  # single-quoted: the same
    r"|`[^`]*`"  # raw: no escapes at all
    r"|#[^\n]*"  # a comment
)


def quoted(text: str) -> str:
    """`text` as a double-quoted PromQL string."""
    # JSON's escapes (\" \\ \n, and \u with four hex digits) are all valid in a
    # double-quoted PromQL string.
    return json.dumps(text, ensure_ascii=False)


def _raw_strings_quoted(query: str) -> str:
    """`query` with each raw string (backticks) written as the double-quoted string of the same
    value. promql-parser 0.12 reads escapes inside raw strings (`\\d` is an error to it), where
    Prometheus reads none: regexes such as `\\d+` are raw strings' common use."""
    return _LITERAL.sub(
        lambda m: quoted(m.group()[1:-1]) if m.group().startswith("`") else m.group(), query
    )


def parse(query: str) -> pq.Expr:
    """The query's expression tree; ValueError (the parser's message says where and what)
    when Prometheus' grammar does not accept it."""
    return pq.parse(_raw_strings_quoted(query))
