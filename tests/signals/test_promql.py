"""The selector lexer: which series a PromQL expression reads (for asking their sample age)."""

from __future__ import annotations

import pytest

from controller.signals.promql import freshness_query, selectors


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        (
            'sum by (tenant) (rate(cost_total{env="prod",x=~"a}b"}[5m] offset 1d))',
            ('cost_total{env="prod", x=~"a}b"}',),
        ),
        ("avg(DCGM_FI_DEV_GPU_UTIL) / 100", ("DCGM_FI_DEV_GPU_UTIL",)),
        ("max_over_time(sum by (tenant)(rate(c_total[1h]))[2h:10m] offset 23h)", ("c_total",)),
        ("sum without (pod) (a) by (b)", ("a",)),
        ("a * on (x) group_left (y) b", ("a", "b")),
        ("x and y unless z or x", ("x", "y", "z")),
        ("histogram_quantile(0.99, sum by (le) (rate(lat_bucket[5m])))", ("lat_bucket",)),
        ('{__name__=~"gpu_.*"} > bool 3', ('{__name__=~"gpu_.*"}',)),
        ("time() - max(timestamp(up @ start()))", ("up",)),
        ("vector(1) + scalar(2) * Inf", ()),
        ('label_replace(up, "to", "$1", "from", "(.*)") # up\n', ("up",)),
    ],
)
def test_selectors_are_found_without_range_offset_or_modifiers(
    query: str, expected: tuple[str, ...]
) -> None:
    assert selectors(query) == expected


def test_the_age_query_asks_for_the_newest_raw_sample() -> None:
    assert freshness_query('up{job="x"}') == 'max(timestamp(up{job="x"}))'
