"""The simulator's signal source reads an answer without series as the Prometheus source
does: 0 for a signal with `absent: zero` (events not seen yet), EMPTY for any other, so a
simulated run's policies see, and log, what they would see in production."""

from __future__ import annotations

from controller.model import ScalarSample, SignalKey, Validity, VectorSample
from controller.sim.series import SeriesStore
from controller.sim.signals import SimSignalSource

REFUSED = 'sum(rate(gateway_requests_total{outcome="rate_limited"}[5m]))'


def test_no_series_of_an_absent_zero_signal_reads_as_zero() -> None:
    store = SeriesStore()
    store.record("gateway_requests_total", {"outcome": "allow", "tenant": "a"}, 100.0, 5.0)
    source = SimSignalSource(store)
    zero, empty = SignalKey(REFUSED, absent_zero=True), SignalKey(REFUSED)
    per_tenant = SignalKey(f"sum by (tenant) ({REFUSED})", by="tenant", absent_zero=True)
    samples = source.fetch([zero, empty, per_tenant], 130.0).samples
    read = samples[zero]
    assert isinstance(read, ScalarSample)
    assert (read.value, read.validity) == (0.0, Validity.OK)
    assert "absent: zero" in read.detail
    assert samples[empty].validity is Validity.EMPTY
    vector = samples[per_tenant]
    assert isinstance(vector, VectorSample)
    assert vector.validity is Validity.OK
    assert len(vector.keys) == 0  # no tenant has a value: each reads 0 where it is looked up
