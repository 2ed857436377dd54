"""A live scrape: sample times advance while a target is scraped, and stop advancing when it
is not, even while Prometheus' 5-minute lookback keeps answering with the old value."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from controller.model import ScalarSample, SignalKey, Snapshot, Validity
from controller.policy.documents import SignalSpec
from controller.policy.inputs import scalar_input
from controller.signals import PrometheusSource
from controller.signals.freshness import UNKNOWN_SAMPLE_TIME
from tests.signals.conftest import source_for
from tests.support.prometheus import Exporter, PrometheusServer, wait_for

pytestmark = pytest.mark.integration

STALE_AFTER = 3.0


def read(source: PrometheusSource, query: str, at: float) -> ScalarSample:
    sample = source.fetch([SignalKey(query)], at).samples[SignalKey(query)]
    assert isinstance(sample, ScalarSample)
    return sample


def engine_view(sample: ScalarSample, query: str, at: float) -> Validity:
    """What the policy engine makes of the sample with `stale_after: 3s`."""
    spec = SignalSpec(query=query, stale_after=STALE_AFTER)
    snapshot = Snapshot(at, {SignalKey(query): sample})
    return scalar_input("x", spec, snapshot, None, at).validity


@pytest.fixture
def live_source(live_prometheus: PrometheusServer) -> Iterator[PrometheusSource]:
    with source_for(live_prometheus) as src:
        yield src


def test_a_scraped_gauge_is_read_with_a_sample_time_that_advances(
    live_source: PrometheusSource,
) -> None:
    first = read(live_source, "max(live_load)", time.time())
    assert (first.validity, first.value) == (Validity.OK, 0.42)
    wait_for(
        lambda: read(live_source, "max(live_load)", time.time()).timestamp > first.timestamp,
        "a newer scrape is visible",
    )
    at = time.time()
    assert engine_view(read(live_source, "max(live_load)", at), "max(live_load)", at) is (
        Validity.OK
    )


def test_a_sample_that_stops_advancing_goes_stale_while_prometheus_still_answers(
    exporters: tuple[Exporter, Exporter],
    live_prometheus: PrometheusServer,
    live_source: PrometheusSource,
) -> None:
    steady, _ = exporters
    frozen_at = float(int(time.time()) - 1)
    steady.set("frozen_load", 0.7, timestamp=frozen_at)  # an exporter stuck on one sample
    wait_for(lambda: bool(live_prometheus.query("frozen_load", time.time())), "it is scraped")

    wait_for(lambda: time.time() - frozen_at > STALE_AFTER + 1, "stale_after has passed")
    at = time.time()
    raw = live_prometheus.query("frozen_load", at)
    # Prometheus still answers with the old value, stamped with the evaluation time...
    assert [float(raw[0]["value"][1]), raw[0]["value"][0]] == [0.7, pytest.approx(at)]
    sample = read(live_source, "max(frozen_load)", at)
    # ...but our sample carries the time the value was really written.
    assert (sample.validity, sample.value, sample.timestamp) == (Validity.OK, 0.7, frozen_at)
    assert engine_view(sample, "max(frozen_load)", at) is Validity.STALE
    live = read(live_source, "max(live_load)", at)
    assert engine_view(live, "max(live_load)", at) is Validity.OK


def test_a_target_that_goes_down_is_empty_or_stale_never_a_number_read_as_fresh(
    exporters: tuple[Exporter, Exporter],
    live_prometheus: PrometheusServer,
    live_source: PrometheusSource,
) -> None:
    _, doomed = exporters
    windowed = "max(max_over_time(doomed_load[1m]))"
    assert read(live_source, windowed, time.time()).validity is Validity.OK
    doomed.stop()
    wait_for(
        lambda: read(live_source, "max(doomed_load)", time.time()).validity is Validity.EMPTY,
        "the failed scrape's staleness markers hide the gauge",
    )
    at = time.time()
    sample = read(live_source, windowed, at)
    # The 1-minute window still holds the old samples, so Prometheus computes a value...
    assert (sample.validity, sample.value) == (Validity.OK, 1.0)
    # ...from a series with no sample within the lookback: the age says so.
    assert sample.timestamp == UNKNOWN_SAMPLE_TIME
    assert "no sample of doomed_load within Prometheus' lookback window" in sample.detail
    assert engine_view(sample, windowed, at) is Validity.STALE
