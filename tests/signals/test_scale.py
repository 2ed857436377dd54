"""100k tenants: one query, one answer of 100k series, one vector in the snapshot."""

from __future__ import annotations

import pytest

from controller.model import SignalKey, Validity, VectorSample
from tests.signals.conftest import SCALE_TENANTS, source_for
from tests.support.prometheus import PrometheusServer

pytestmark = pytest.mark.integration

QUERY = "sum by (tenant) (rate(tenant_cost_usd_total[5m]))"


def test_a_query_of_100k_series_becomes_one_vector(
    scale_prometheus: PrometheusServer, now: float
) -> None:
    with source_for(scale_prometheus, timeout_seconds=30) as source:
        snapshot = source.fetch([SignalKey(QUERY, "tenant"), SignalKey(QUERY)], now)
    sample = snapshot.samples[SignalKey(QUERY, "tenant")]
    assert isinstance(sample, VectorSample)
    assert (sample.validity, len(sample.keys), len(set(sample.keys))) == (
        Validity.OK,
        SCALE_TENANTS,
        SCALE_TENANTS,
    )
    index = sample.index()
    for i in (0, 1, 4_242, SCALE_TENANTS - 1):
        assert sample.values[index[f"t{i}"]] == pytest.approx((i + 1) / 60)
    assert (sample.timestamps == now - 60).all()
    # The same answer read as one number is an error that says how to aggregate.
    scalar = snapshot.samples[SignalKey(QUERY)]
    assert scalar.validity is Validity.ERROR
    assert f"returns {SCALE_TENANTS} series where one number is needed" in scalar.detail
