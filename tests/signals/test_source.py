"""The Prometheus source against a real Prometheus on backfilled history: values, validity
for every whole-query problem, one run per distinct query, and no exception ever escaping."""

from __future__ import annotations

import math
import re
import socket
import urllib.request
from collections.abc import Iterator

import numpy as np
import pytest

from controller.errors import SignalError
from controller.model import ScalarSample, SignalKey, Validity, VectorSample
from controller.signals import PrometheusSource, signal_errors
from tests.signals import history
from tests.signals.conftest import source_for
from tests.support.prometheus import PrometheusServer
from tests.support.redis import free_port

pytestmark = pytest.mark.integration


def scalar(source: PrometheusSource, query: str, now: float) -> ScalarSample:
    sample = source.fetch([SignalKey(query)], now).samples[SignalKey(query)]
    assert isinstance(sample, ScalarSample)
    return sample


def vector(source: PrometheusSource, query: str, now: float, by: str = "tenant") -> VectorSample:
    sample = source.fetch([SignalKey(query, by)], now).samples[SignalKey(query, by)]
    assert isinstance(sample, VectorSample)
    return sample


def test_a_scalar_carries_the_time_of_its_newest_sample_not_the_query_time(
    source: PrometheusSource, now: float
) -> None:
    sample = scalar(source, "avg(gpu_util)", now)
    assert sample.validity is Validity.OK
    assert sample.value == pytest.approx(np.mean(list(history.GPU_UTIL.values())))
    assert sample.timestamp == history.last_sample(now)


def test_a_vector_is_keyed_by_the_policy_label_and_keeps_nan(
    source: PrometheusSource, now: float
) -> None:
    sample = vector(source, "sum by (tenant) (queue_depth)", now)
    assert sample.validity is Validity.OK
    got = dict(zip(sample.keys, sample.values.tolist(), strict=True))
    assert got.keys() == history.QUEUE_DEPTH.keys()
    assert got["acme"] == 3.0
    assert got["globex"] == 5.0
    assert math.isnan(got["initech"])
    assert (sample.timestamps == history.last_sample(now)).all()


def test_no_series_is_empty_never_zero(source: PrometheusSource, now: float) -> None:
    query = 'sum(queue_depth{tenant="nobody"})'
    assert scalar(source, query, now).validity is Validity.EMPTY
    assert math.isnan(scalar(source, query, now).value)
    empty = vector(source, 'queue_depth{tenant="nobody"}', now)
    assert (empty.validity, empty.keys) == (Validity.EMPTY, ())


def test_a_scalar_that_is_nan_or_infinite_is_not_finite(
    source: PrometheusSource, now: float
) -> None:
    assert scalar(source, "max(not_a_number)", now).validity is Validity.NOT_FINITE
    infinite = scalar(source, "sum(gpu_util) / 0", now)
    assert (infinite.validity, infinite.value) == (Validity.NOT_FINITE, math.inf)


def test_several_series_per_label_value_is_an_error_naming_the_fix(
    source: PrometheusSource, now: float
) -> None:
    sample = vector(source, "replica_load", now)
    assert sample.validity is Validity.ERROR
    assert sample.detail.endswith(
        "query returns several series per tenant; aggregate with sum by (tenant)"
    )
    assert "'replica_load'" in sample.detail


def test_series_without_the_label_are_dropped_and_counted(
    source: PrometheusSource, now: float
) -> None:
    sample = vector(source, "pool_load", now)
    assert (sample.validity, sample.keys, sample.values.tolist()) == (
        Validity.OK,
        ("acme",),
        [1.0],
    )
    assert "1 series without label 'tenant' dropped" in sample.detail


def test_a_single_global_series_serves_every_label_value(
    source: PrometheusSource, now: float
) -> None:
    sample = source.fetch([SignalKey("avg(gpu_util)", "tenant")], now).samples
    only = sample[SignalKey("avg(gpu_util)", "tenant")]
    assert isinstance(only, ScalarSample)
    assert only.value == pytest.approx(0.65)


@pytest.mark.parametrize(
    ("query", "by", "cause"),
    [
        ("sum(rate(gpu_util[5m])", None, "HTTP 400 bad_data: invalid parameter"),
        ("gpu_util[5m]", None, "range vector"),
        ("gpu_util", None, "4 series where one number is needed"),
        ('label_replace(vector(1), "x", "y", "", "")', None, None),
        ("gpu_util", "tenant", "none of the 4 series has the label 'tenant'"),
    ],
)
def test_unusable_queries_are_errors_naming_the_query(
    source: PrometheusSource, now: float, query: str, by: str | None, cause: str | None
) -> None:
    sample = source.fetch([SignalKey(query, by)], now).samples[SignalKey(query, by)]
    if cause is None:  # the control: a valid query of the same kind
        assert sample.validity is Validity.OK
        return
    assert sample.validity is Validity.ERROR
    assert repr(query) in sample.detail
    assert cause in sample.detail


def test_a_raw_string_regex_selector_has_its_age_told(source: PrometheusSource, now: float) -> None:
    # promql-parser alone rejects `\d` in a raw string; Prometheus reads it as a regex.
    sample = scalar(source, r"avg(gpu_util{gpu=~`[0-9]\d*`})", now)
    assert (sample.validity, sample.timestamp) == (Validity.OK, history.last_sample(now))
    assert sample.value == pytest.approx(np.mean(list(history.GPU_UTIL.values())))


def test_an_answer_whose_age_cannot_be_told_is_an_error_naming_the_query(
    source: PrometheusSource, now: float
) -> None:
    query = "avg(holt_winters(gpu_util[10m], 0.5, 0.5))"
    assert source.run([query], now)[query].error is None  # Prometheus 2 knows the function
    sample = source.fetch([SignalKey(query)], now).samples[SignalKey(query)]
    assert sample.validity is Validity.ERROR
    assert repr(query) in sample.detail
    assert "does not parse with Prometheus' grammar" in sample.detail
    assert "fix the query" in sample.detail


def test_a_query_over_its_time_budget_is_a_timeout_error(
    history_prometheus: PrometheusServer, now: float
) -> None:
    heavy = "sum(rate(gateway_cost_usd_total[2d:1s]))"
    with source_for(history_prometheus, timeout_seconds=0.001) as slow:
        sample = scalar(slow, heavy, now)
    assert sample.validity is Validity.ERROR
    # Prometheus answers 503 `timeout` when the deadline passes while evaluating, and 422
    # `execution` (context deadline exceeded) when it passes while expanding the series,
    # which a loaded machine reaches first: either is the query's own time budget.
    assert "HTTP 503 timeout" in sample.detail or (
        "HTTP 422 execution" in sample.detail and "context deadline exceeded" in sample.detail
    ), sample.detail


def test_a_server_that_never_answers_is_a_timeout_error(now: float) -> None:
    with socket.socket() as listener:  # accepts connections (backlog) and never replies
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        url = f"http://127.0.0.1:{listener.getsockname()[1]}"
        with PrometheusSource.from_url(url, timeout_seconds=0.2) as silent:
            sample = scalar(silent, "up", now)
    assert sample.validity is Validity.ERROR
    assert "no answer within 1.2s (timeout)" in sample.detail


def test_nothing_listening_is_an_error_for_every_signal_and_check_raises(now: float) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    keys = [SignalKey("avg(gpu_util)"), SignalKey("sum by (tenant) (queue_depth)", "tenant")]
    with PrometheusSource.from_url(url) as nowhere:
        snapshot = nowhere.fetch(keys, now)
        with pytest.raises(SignalError, match=re.escape(url)):
            nowhere.check()
    assert {s.validity for s in snapshot.samples.values()} == {Validity.ERROR}
    refused = f"cannot reach Prometheus at {url}: Connection refused"
    assert all(refused in s.detail for s in snapshot.samples.values())
    users = {keys[0]: ["AdaptiveLimit/gpu"], keys[1]: ["ThrottlePolicy/queues"]}
    messages = sorted(str(e) for e in signal_errors(snapshot, users))
    assert "'avg(gpu_util)' failed" in messages[0]
    assert messages[0].endswith("(used by AdaptiveLimit/gpu)")
    assert messages[1].endswith("(used by ThrottlePolicy/queues)")


def test_warnings_mark_the_result_partial(warning_prometheus: PrometheusServer, now: float) -> None:
    with source_for(warning_prometheus) as src:
        sample = scalar(src, "avg(gpu_util)", now)
    assert sample.validity is Validity.PARTIAL
    assert "remote_read" in sample.detail
    assert sample.value == pytest.approx(0.65)  # kept for display; the engine will not use it


def _query_requests(server: PrometheusServer) -> float:
    with urllib.request.urlopen(f"{server.url}/metrics", timeout=5) as answer:
        text = answer.read().decode()
    pattern = r'prometheus_http_requests_total\{code="\d+",handler="/api/v1/query"\} (\S+)'
    return sum(float(v) for v in re.findall(pattern, text))


def test_each_distinct_query_runs_once_per_fetch(
    history_prometheus: PrometheusServer, source: PrometheusSource, now: float
) -> None:
    keys = [
        SignalKey(history.SPEND, "tenant"),
        SignalKey(history.SPEND, "tenant"),
        SignalKey(history.USUAL_NAIVE, "tenant"),
        SignalKey("sum(rate(gateway_cost_usd_total[5m]))"),
    ]
    before = _query_requests(history_prometheus)
    snapshot = source.fetch(keys, now)
    # 3 distinct queries + 1 age query for the one selector they all read.
    assert _query_requests(history_prometheus) - before == 4
    assert len(snapshot.samples) == 3
    assert {s.validity for s in snapshot.samples.values()} == {Validity.OK}


def test_sample_ages_are_reused_within_the_refresh_interval(
    history_prometheus: PrometheusServer, now: float
) -> None:
    with source_for(history_prometheus, sample_age_refresh_seconds=30) as src:
        first = _query_requests(history_prometheus)
        src.fetch([SignalKey("avg(gpu_util)")], now)
        second = _query_requests(history_prometheus)
        reused = scalar(src, "avg(gpu_util)", now + 10)
        third = _query_requests(history_prometheus)
    assert (second - first, third - second) == (2, 1)
    assert reused.timestamp == history.last_sample(now)  # a lower bound: never younger


@pytest.fixture
def crash_source(own_prometheus: PrometheusServer) -> Iterator[PrometheusSource]:
    with source_for(own_prometheus, timeout_seconds=2) as src:
        yield src


def test_prometheus_killed_mid_test_makes_every_signal_an_error_until_it_restarts(
    own_prometheus: PrometheusServer, crash_source: PrometheusSource, now: float
) -> None:
    keys = [SignalKey("avg(gpu_util)"), SignalKey(history.SPEND, "tenant")]
    assert {s.validity for s in crash_source.fetch(keys, now).samples.values()} == {Validity.OK}

    own_prometheus.kill()
    down = crash_source.fetch(keys, now)
    assert {s.validity for s in down.samples.values()} == {Validity.ERROR}
    assert all("cannot reach Prometheus" in s.detail for s in down.samples.values())

    own_prometheus.start()  # same port, same data directory
    again = crash_source.fetch(keys, now)
    assert {s.validity for s in again.samples.values()} == {Validity.OK}
    spend = again.samples[keys[1]]
    assert isinstance(spend, VectorSample)
    assert set(spend.keys) == {series.labels["tenant"] for series in history.spend(now)}
