"""Hostile tenant label values scraped by a real Prometheus (a newline, ESC sequences, 10,000
characters) are dropped where readings are decoded, counted, and noted once each, escaped."""

from __future__ import annotations

import time

import pytest
from structlog.testing import capture_logs

from controller.model import SignalKey, VectorSample
from controller.signals import PrometheusSource
from tests.signals.conftest import source_for
from tests.support.prometheus import Exporter, PrometheusServer, wait_for

pytestmark = pytest.mark.integration

HOSTILE = [
    'evil\n{"event":"limit.changed","address":"global/requests_per_second"}',
    "\x1b[2J\x1b[31mowned[/red][bold]",
    "x" * 10_000,
]
QUERY = "sum by (tenant) (hostile_spend)"


def test_hostile_label_values_are_dropped_counted_and_noted_once(
    exporters: tuple[Exporter, Exporter], live_prometheus: PrometheusServer
) -> None:
    steady, _ = exporters
    for tenant in ["acme", *HOSTILE]:
        steady.set("hostile_spend", 1.0, {"tenant": tenant})
    wait_for(
        lambda: len(live_prometheus.query(QUERY, time.time())) == 4,
        "Prometheus holds the four tenants' series",
    )
    counted: list[int] = []
    key = SignalKey(QUERY, "tenant")
    with source_for(live_prometheus) as source:
        source.on_labels_dropped = counted.append
        with capture_logs() as logs:
            first = _read(source, key)
            second = _read(source, key)

    for sample in (first, second):
        assert sample.keys == ("acme",)
        assert "3 series with an invalid 'tenant' label value dropped" in sample.detail
    assert counted == [3, 3]  # every dropped series is counted, on every tick
    notes = [line for line in logs if line["event"] == "signal.label_dropped"]
    assert len(notes) == 3  # each value noted once, not again on the second tick
    for line in notes:
        assert line["value"].isprintable()  # no newline, no ESC: escaped
        assert len(line["value"]) <= 64 * 10 + 2  # a prefix, escaped and quoted
    values = {line["value"] for line in notes}
    assert "'\\x1b[2J\\x1b[31mowned[/red][bold]'" in values
    assert any(v.startswith("'evil\\n{") for v in values)
    assert sorted(line["length"] for line in notes) == sorted(len(v) for v in HOSTILE)


def _read(source: PrometheusSource, key: SignalKey) -> VectorSample:
    sample = source.fetch([key], time.time()).samples[key]
    assert isinstance(sample, VectorSample)
    return sample
