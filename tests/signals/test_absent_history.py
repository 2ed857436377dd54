"""`absent: zero` and `history:` against a real Prometheus: a series that does not exist yet
is read as 0 when the signal says so (absent is not stale, and stale stays stale), and a query
reaching further back than Prometheus' data is "not enough history yet", not empty."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from controller.model import ScalarSample, SignalKey, Validity, VectorSample
from controller.policy.documents import SignalSpec
from controller.policy.inputs import scalar_input, vector_input
from controller.signals import PrometheusSource
from tests.signals import history
from tests.signals.conftest import history_server, source_for

pytestmark = pytest.mark.integration

NEVER = 'sum by (tenant) (rate(gateway_requests_total{outcome="rate_limited"}[5m]))'
# The shipped `refused` before `absent: zero`: every spending tenant got a value, but the
# never-written selector made the whole answer look as old as Prometheus' lookback.
OR_ZERO = f"{NEVER} or sum by (tenant) (rate(gateway_cost_usd_total[5m])) * 0"
DAY = 86400.0


def fetch(source: PrometheusSource, key: SignalKey, now: float) -> ScalarSample | VectorSample:
    return source.fetch([key], now).samples[key]


def test_a_never_written_series_is_zero_with_absent_zero_and_empty_without(
    source: PrometheusSource, now: float
) -> None:
    zero = fetch(source, SignalKey(NEVER, "tenant", absent_zero=True), now)
    assert isinstance(zero, VectorSample)
    assert zero.validity is Validity.OK
    assert zero.keys == ()
    assert "absent: zero" in zero.detail
    plain = fetch(source, SignalKey(NEVER, "tenant"), now)
    assert plain.validity is Validity.EMPTY
    # Aligned to the tenants the policy's other signals see, each absent value is 0, fresh.
    spec = SignalSpec(query=NEVER, absent="zero")
    seen = vector_input("refused", spec, zero, ("acme", "evil"), now)
    assert seen.valid.tolist() == [True, True]
    assert seen.values.tolist() == [0.0, 0.0]
    missing = vector_input("refused", SignalSpec(query=NEVER), plain, ("acme", "evil"), now)
    assert missing.valid.tolist() == [False, False]


def test_a_scalar_of_a_never_written_series_is_zero(source: PrometheusSource, now: float) -> None:
    query = 'sum(rate(gateway_requests_total{outcome="rate_limited"}[5m]))'
    sample = fetch(source, SignalKey(query, absent_zero=True), now)
    assert isinstance(sample, ScalarSample)
    assert (sample.validity, sample.value) == (Validity.OK, 0.0)
    empty = fetch(source, SignalKey(query), now)
    assert empty.validity is Validity.EMPTY
    # An empty scalar answer in a `per:` policy is 0 for every label value, with absent: zero.
    spec = SignalSpec(query=query, absent="zero")
    seen = vector_input("refused", spec, empty, ("acme", "evil"), now)
    assert (seen.values.tolist(), seen.valid.tolist()) == ([0.0, 0.0], [True, True])
    strict = vector_input("refused", SignalSpec(query=query), empty, ("acme", "evil"), now)
    assert not strict.valid.any()


def test_an_absent_selector_beside_a_fresh_one_is_not_stale(
    source: PrometheusSource, now: float
) -> None:
    """The old `or ... * 0` form: without `absent: zero` the never-written selector makes
    every value as old as the lookback window (stale); with it the age is the fresh one's."""
    spec = SignalSpec(query=OR_ZERO, absent="zero")
    fresh = fetch(source, spec.key("tenant"), now)
    assert isinstance(fresh, VectorSample)
    assert fresh.validity is Validity.OK
    assert set(fresh.keys) >= {"jumper", "steady"}
    assert (fresh.timestamps == history.last_sample(now)).all()
    assert vector_input("refused", spec, fresh, fresh.keys, now).valid.all()
    old = fetch(source, SignalKey(OR_ZERO, "tenant"), now)
    assert isinstance(old, VectorSample)
    stale = vector_input("refused", SignalSpec(query=OR_ZERO), old, old.keys, now)
    assert not stale.valid.any()


def test_a_series_that_stopped_is_stale_even_with_absent_zero(
    source: PrometheusSource, now: float
) -> None:
    """Absent means no series at all; a series whose samples are old is stale, not 0."""
    later = now + 150  # the gauges' last sample is 210 s old then, inside the lookback
    spec = SignalSpec(query="avg(gpu_util)", absent="zero", stale_after=120)
    sample = fetch(source, spec.key(), later)
    assert isinstance(sample, ScalarSample)
    assert sample.timestamp == history.last_sample(now)
    assert sample.value == pytest.approx(np.mean(list(history.GPU_UTIL.values())))
    snapshot = source.fetch([spec.key()], later)
    assert scalar_input("gpu", spec, snapshot, None, later).validity is Validity.STALE


def test_a_look_back_beyond_the_data_is_not_enough_history(
    source: PrometheusSource, now: float
) -> None:
    """Spend is held for two days (`weekly` eight): a query reaching 9 days back is waiting
    for history, one reaching 23 h back answers."""
    far = "sum by (tenant) (rate(gateway_cost_usd_total[1h] offset 9d))"
    waiting = fetch(source, SignalKey(far, "tenant", history=9 * DAY), now)
    assert waiting.validity is Validity.NO_HISTORY
    assert "not enough history yet" in waiting.detail
    assert "gateway_cost_usd_total" in waiting.detail
    # Without `history:` the same answer is plainly empty (what made the policy look stale).
    assert fetch(source, SignalKey(far, "tenant"), now).validity is Validity.EMPTY
    usual = fetch(source, SignalKey(history.USUAL, "tenant", history=23.25 * 3600), now)
    assert isinstance(usual, VectorSample)
    assert usual.validity is Validity.OK
    assert "steady" in usual.keys


def test_a_gauge_younger_than_the_look_back_is_waiting_for_history(
    source: PrometheusSource, now: float
) -> None:
    """`queue_depth` exists for 30 minutes: an hour back there is nothing yet."""
    query = "sum by (tenant) (queue_depth offset 1h)"
    sample = fetch(source, SignalKey(query, "tenant", history=3600.0), now)
    assert sample.validity is Validity.NO_HISTORY
    answered = fetch(source, SignalKey("sum by (tenant) (queue_depth)", "tenant", history=600), now)
    assert answered.validity is Validity.OK


def test_a_prometheus_that_lost_its_data_is_waiting_for_history_again(
    tmp_path: Path, now: float
) -> None:
    """Restarted without its volume, Prometheus answers the day-ago query empty: that is the
    history gone (a fresh install again), not a fault. The first empty answer asks again; from
    the next fetch the signal is `no_history` (no alert, no readiness hit), as on day one."""
    server = history_server(tmp_path / "prometheus", now)
    key = SignalKey(history.USUAL, "tenant", history=23.25 * 3600)
    try:
        with source_for(server) as source:
            assert fetch(source, key, now).validity is Validity.OK
            server.stop()
            shutil.rmtree(server.data_dir)  # the volume is gone
            server.start()
            first = fetch(source, key, now)
            assert first.validity is Validity.EMPTY
            assert "asked again" in first.detail
            again = fetch(source, key, now)
            assert again.validity is Validity.NO_HISTORY
            assert "not enough history yet" in again.detail
    finally:
        server.stop()
