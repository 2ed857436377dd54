"""Find the series selectors of a PromQL expression, so their newest sample time can be asked.

Prometheus stamps instant-query results with the evaluation time, not the time of the data
they were computed from, so an answer never shows its own age. The selectors an expression
reads (`metric{label="x"}`) are what tell: `timestamp(selector)` is the time of the newest
raw sample. The expression is parsed with Prometheus' grammar (promql-parser, as the simulator
does) and each selector written back in one canonical spelling, so `a{b='c'}` and
`a{b = "c"}` are one selector, asked about once.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable

import promql_parser as pq

from controller.errors import GovernorError
from controller.promql_grammar import parse, quoted

# Keyed by name: the parser's MatchOp values are not hashable.
_OPERATORS = {
    str(pq.MatchOp.Equal): "=",
    str(pq.MatchOp.NotEqual): "!=",
    str(pq.MatchOp.Re): "=~",
    str(pq.MatchOp.NotRe): "!~",
}
_PLAIN_LABEL = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")


class QuerySyntaxError(GovernorError):
    """A query Prometheus' grammar does not accept: the series it reads cannot be told."""


def _matchers(group: Iterable[pq.Matcher]) -> str:
    return ", ".join(
        f"{m.name if _PLAIN_LABEL.fullmatch(m.name) else quoted(m.name)}"
        f"{_OPERATORS[str(m.op)]}{quoted(m.value)}"
        for m in group
    )


def _selector_text(selector: pq.VectorSelector) -> str:
    """The selector without range, offset or `@`: `name{label="value", ...}`."""
    # The parser keeps `{a="1" or b="2"}` as groups of matchers, and plain ones as one group.
    groups = selector.matchers.or_matchers or [selector.matchers.matchers]
    body = " or ".join(filter(None, (_matchers(group) for group in groups)))
    name = selector.name or ""
    return f"{name}{{{body}}}" if body else name


@functools.lru_cache(maxsize=4096)  # the same policy queries are asked every tick
def selectors(query: str) -> tuple[str, ...]:
    """Every distinct instant selector the query reads, without range, offset or `@`.

    `sum by (tenant) (rate(cost_total{env="prod"}[5m] offset 1d))` → `cost_total{env="prod"}`.
    Raises QuerySyntaxError for a query that does not parse.
    """
    try:
        expr = parse(query)
    except ValueError as exc:  # the parser's message says where and what
        raise QuerySyntaxError(
            f"does not parse with Prometheus' grammar ({exc}), so the age of its data "
            "cannot be told: fix the query, or move what the grammar does not know (a "
            "function of another Prometheus version) into a recording rule"
        ) from None
    found: dict[str, None] = {}

    def visit(node: pq.Expr) -> bool:
        if isinstance(node, pq.VectorSelector):
            found[_selector_text(node)] = None
        return True

    pq.walk(expr, visit)
    return tuple(found)


def freshness_query(selector: str) -> str:
    """The query answering the time of the newest sample of `selector`."""
    return f"max(timestamp({selector}))"


def history_query(selector: str, at: float) -> str:
    """The query answering whether `selector` had a sample in the hour before `at` (unix
    seconds): its newest time then, or no series. One hour, so a short gap in the scrapes
    at exactly that time does not read as missing history."""
    return f"max(timestamp(last_over_time({selector}[1h] @ {at:.0f})))"
