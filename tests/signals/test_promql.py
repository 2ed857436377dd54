"""The selectors a PromQL expression reads (for asking their sample age), found by parsing it
with Prometheus' grammar and written back in one spelling."""

from __future__ import annotations

import promql_parser as pq
import pytest
from hypothesis import given
from hypothesis import strategies as st

from controller.signals.promql import QuerySyntaxError, freshness_query, selectors


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        (
            'sum by (tenant) (rate(cost_total{env="prod",x=~"a}b"}[5m] offset 1d))',
            ('cost_total{env="prod", x=~"a}b"}',),
        ),
        ("avg(DCGM_FI_DEV_GPU_UTIL) / 100", ("DCGM_FI_DEV_GPU_UTIL",)),
        ("max_over_time(sum by (tenant)(rate(c_total[1h]))[2h:10m] offset 23h)", ("c_total",)),
        ("sum without (pod) (a)", ("a",)),
        ("sum(a) by (b)", ("a",)),
        ("a * on (x) group_left (y) b", ("a", "b")),
        ("x and y unless z or x", ("x", "y", "z")),
        ("histogram_quantile(0.99, sum by (le) (rate(lat_bucket[5m])))", ("lat_bucket",)),
        ('{__name__=~"gpu_.*"} > bool 3', ('{__name__=~"gpu_.*"}',)),
        ("time() - max(timestamp(up @ start()))", ("up",)),
        ("vector(1) + scalar(vector(2)) * Inf", ()),
        ('label_replace(up, "to", "$1", "from", "(.*)") # up\n', ("up",)),
    ],
)
def test_selectors_are_found_without_range_offset_or_modifiers(
    query: str, expected: tuple[str, ...]
) -> None:
    assert selectors(query) == expected


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        # One series spelt three ways is one selector, asked about once (the lexer kept the
        # spelling: three age queries).
        ("a{b=\"c\"} + a{b='c'} + a{ b = `c` }", ('a{b="c"}',)),
        # A trailing comma is dropped (the lexer wrote `a{b="c", }`).
        ('a{b="c",}', ('a{b="c"}',)),
        # Escapes written back as escapes; a raw string's backslash becomes an escaped one
        # (promql-parser alone rejects `\d`: it reads escapes in raw strings).
        (r'a{b="x\"y\\z", c=~`\d+`}', (r'a{b="x\"y\\z", c=~"\\d+"}',)),
        (
            r'label_replace(a{b=~`"#\w`}, "d", "$1", "b", `(\w+)`) # `c`',
            (r'a{b=~"\"#\\w"}',),
        ),
        (r"a{b='`x\'`'} # `", ('a{b="`x\'`"}',)),
        # Commas, braces and brackets inside regex matchers are the value's, not the syntax's.
        ('a{b=~"x{1,2}[,}]", c!~"(d|e),"}', ('a{b=~"x{1,2}[,}]", c!~"(d|e),"}',)),
        # Offsets, `@` and negative offsets are modifiers of the selector, not part of it.
        (
            'a{b="1"} offset -5m + a{b="1"} @ 100 + max_over_time(a{b="1"}[5m:1m] offset 1h)',
            ('a{b="1"}',),
        ),
        # Functions nested in aggregations nested in functions.
        (
            'clamp_min(sum by (t) (rate(a{x="1"}[5m])) / on (t) max(b), 0) or vector(0)',
            ('a{x="1"}', "b"),
        ),
        # Matchers joined by `or` keep the `or` (the lexer wrote `{a="1"orb="2"}`).
        ('{a="1" or b="2"}', ('{a="1" or b="2"}',)),
        # UTF-8 names: a quoted metric name is a __name__ matcher; a label name stays quoted.
        ('{"my.metric", "la.bel"="v"}', ('{__name__="my.metric", "la.bel"="v"}',)),
    ],
)
def test_selectors_have_one_canonical_spelling(query: str, expected: tuple[str, ...]) -> None:
    assert selectors(query) == expected


@pytest.mark.parametrize(
    "query",
    ["sum(rate(a[5m])", "sum without (pod) (a) by (b)", "scalar(2)", 'a{b="c}', ""],
)
def test_a_query_that_does_not_parse_is_an_error_naming_the_fix(query: str) -> None:
    with pytest.raises(QuerySyntaxError, match="does not parse with Prometheus' grammar") as err:
        selectors(query)
    assert "fix the query" in str(err.value)


def _matchers(selector: str) -> list[tuple[str, str, str]]:
    expr = pq.parse(selector)
    assert isinstance(expr, pq.VectorSelector)
    return [(m.name, str(m.op), m.value) for m in expr.matchers.matchers]


@given(st.text(st.characters(blacklist_categories=["Cs"]), max_size=20))
def test_any_label_value_survives_being_written_back(value: str) -> None:
    written = '"' + value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'
    query = f"sum(rate(m{{a={written}, b!={written}}}[5m]))"
    (selector,) = selectors(query)
    assert _matchers(selector) == [
        ("a", str(pq.MatchOp.Equal), value),
        ("b", str(pq.MatchOp.NotEqual), value),
    ]


def test_the_age_query_asks_for_the_newest_raw_sample() -> None:
    assert freshness_query('up{job="x"}') == 'max(timestamp(up{job="x"}))'
