"""The simulator's PromQL evaluator answers like a real Prometheus: the same series,
backfilled into Prometheus with promtool and loaded into a SeriesStore, give the same values
for the shipped policies' queries and the other constructs the evaluator supports."""

from __future__ import annotations

import math
import time
import urllib.error
from collections.abc import Iterator

import pytest

from controller.sim.promql import Evaluator, Point, SimQueryError
from controller.sim.series import SeriesStore
from tests.support.prometheus import PrometheusServer, Series, backfill, openmetrics

STEP = 60.0
QUERIES = (
    'avg(DCGM_FI_DEV_GPU_UTIL{pool="inference"}) / 100',
    "avg(DCGM_FI_DEV_GPU_UTIL) / 100",
    "sum by (tenant) (rate(gateway_cost_usd_total[5m]))",
    "max_over_time(sum by (tenant) (rate(gateway_cost_usd_total[1h]))[2h:10m] offset 23h)",
    "sum by (tenant) (rate(gateway_cost_usd_total[1h] offset 1d))",
    "sum without (plan) (increase(gateway_cost_usd_total[10m]))",
    "avg_over_time(DCGM_FI_DEV_GPU_UTIL[15m])",
    "max by (pool) (DCGM_FI_DEV_GPU_UTIL) > bool 60",
    "sum by (tenant) (rate(gateway_cost_usd_total[5m])) > 0.03",
    'sum by (tenant) (rate(gateway_cost_usd_total{tenant="a"}[5m])) '
    "or sum by (tenant) (rate(gateway_cost_usd_total[5m])) * 0",
    "clamp_max(sum(rate(gateway_cost_usd_total[5m])) * 100, 5)",
    'label_replace(DCGM_FI_DEV_GPU_UTIL, "device", "gpu-$1/${gpu}$$", "gpu", "(.*)")',
    'label_replace(DCGM_FI_DEV_GPU_UTIL, "pool", "", "gpu", "1")',
    'label_replace(avg by (pool) (DCGM_FI_DEV_GPU_UTIL), "kind", "$1", "pool", "(ba)t.*")',
    # The shipped cost-anomaly baseline: the larger of yesterday's and last week's.
    # A TTFT objective read from a histogram's buckets (the shipped in-flight policy's).
    "histogram_quantile(0.99, sum by (le) (rate(ttft_seconds_bucket[5m])))",
    "histogram_quantile(0.5, sum by (pool, le) (rate(ttft_seconds_bucket[5m])))",
    "histogram_quantile(0.05, rate(ttft_seconds_bucket[5m]))",
    "histogram_quantile(0.999, sum by (le) (increase(ttft_seconds_bucket[10m])))",
    "max by (tenant) ("
    "max_over_time(sum by (tenant) (rate(gateway_cost_usd_total[1h]))[2h:10m] offset 23h) "
    "or label_replace(max_over_time(sum by (tenant) (rate(gateway_cost_usd_total[1h]))"
    '[2h:10m] offset 6d23h), "baseline", "7d", "", ""))',
)
DAYS = 8  # enough history for `offset 6d23h` over 1h windows


def _history(now: float) -> list[Series]:
    """Eight days of per-tenant cost (daily and weekly patterns, a step change, a counter
    reset and a gap) and GPU gauges, one sample a minute."""
    start = now - DAYS * 86400
    times = [start + i * STEP for i in range(int(DAYS * 86400 / STEP))]
    out = []
    for phase, (tenant, rate) in enumerate((("a", 0.02), ("b", 0.05), ("c", 0.01))):
        total, samples = 0.0, []
        for t in times:
            day_fraction = ((t % 86400) / 86400) * 2 * math.pi
            week_fraction = ((t % (7 * 86400)) / (7 * 86400)) * 2 * math.pi
            weekly = 1 + 0.4 * math.sin(week_fraction + 2 * phase)  # peaks on other days
            total += rate * (1 + 0.5 * math.sin(day_fraction)) * weekly * STEP
            if tenant == "b" and t > now - 3600:
                total += 0.2 * STEP  # b runs away in the last hour
            if tenant == "c" and abs(t - (now - 30 * 60)) < STEP / 2:
                total = 0.0  # a restart: the counter resets
            if tenant == "c" and now - 20 * 3600 < t < now - 18 * 3600:
                continue  # a gap
            samples.append((t, round(total, 6)))
        labels = {"tenant": tenant, "plan": "paid", "model": "gpt-4"}
        out.append(Series("gateway_cost_usd", labels, samples, kind="counter"))
    for pool, gpus, level in (("inference", 2, 70.0), ("batch", 1, 40.0)):
        for gpu in range(gpus):
            samples = [(t, level + 10 * math.sin(t / 900) + gpu) for t in times]
            out.append(Series("DCGM_FI_DEV_GPU_UTIL", {"pool": pool, "gpu": str(gpu)}, samples))
    return out + _ttft_buckets(times)


TTFT_BOUNDS = ("0.1", "0.5", "1", "2.5", "5", "+Inf")


def _ttft_buckets(times: list[float]) -> list[Series]:
    """A TTFT histogram's cumulative buckets on two pools, its latencies drifting with time
    (a quantile moves between buckets) and the last observations beyond every finite bound."""
    out = []
    for pool, slow in (("inference", 1.0), ("batch", 3.0)):
        totals = [0.0] * len(TTFT_BOUNDS)
        samples: list[list[tuple[float, float]]] = [[] for _ in TTFT_BOUNDS]
        for t in times:
            drift = slow * (1 + 0.8 * math.sin(t / 7200))  # seconds, 0.2 to 7.2 on batch
            for k, bound in enumerate(TTFT_BOUNDS):
                # The share of this minute's 30 requests with a TTFT under the bound.
                share = 1.0 if bound == "+Inf" else 1 - math.exp(-float(bound) / drift)
                totals[k] += round(30 * share)
                samples[k].append((t, totals[k]))
        out += [
            Series("ttft_seconds_bucket", {"pool": pool, "le": bound}, samples[k])
            for k, bound in enumerate(TTFT_BOUNDS)
        ]
    return out


@pytest.fixture(scope="module")
def now() -> float:
    return float(int(time.time() // 60 * 60) - 3600)


@pytest.fixture(scope="module")
def both(
    tmp_path_factory: pytest.TempPathFactory, now: float
) -> Iterator[tuple[PrometheusServer, Evaluator]]:
    history = _history(now)
    server = PrometheusServer(tmp_path_factory.mktemp("prometheus-promql"))
    backfill(server.data_dir, openmetrics(history))
    server.start()
    store = SeriesStore()
    for series in history:
        name = series.name + ("_total" if series.kind == "counter" else "")
        for t, value in series.samples:
            store.record(name, series.labels, t, value)
    yield server, Evaluator(store)
    server.stop()


@pytest.mark.parametrize("query", QUERIES)
def test_same_answer_as_prometheus(
    query: str, both: tuple[PrometheusServer, Evaluator], now: float
) -> None:
    server, evaluator = both
    at = now - 7.0  # off the minute grid of the samples (subquery steps still land on it)
    expected = {
        tuple(sorted((k, v) for k, v in r["metric"].items() if k != "__name__")): float(
            r["value"][1]
        )
        for r in server.query(query, at)
    }
    value, _fresh = evaluator.instant(query, at)
    assert isinstance(value, list)
    got = {
        tuple(sorted((k, v) for k, v in p.labels if k != "__name__")): p.value
        for p in value
        if isinstance(p, Point)
    }
    assert expected, f"Prometheus returned nothing for {query}"
    assert got.keys() == expected.keys()
    for labels, number in expected.items():
        assert got[labels] == pytest.approx(number, rel=1e-9, abs=1e-12), labels


@pytest.mark.parametrize(
    "query",
    [
        # Removing the label that told the two inference GPUs apart: two equal label sets.
        'label_replace(max by (pool, gpu) (DCGM_FI_DEV_GPU_UTIL), "gpu", "", "", "")',
        'label_replace(DCGM_FI_DEV_GPU_UTIL, "0bad", "x", "gpu", "(.*)")',
        'label_replace(DCGM_FI_DEV_GPU_UTIL, "x", "y", "gpu", "(")',
    ],
)
def test_label_replace_refuses_what_prometheus_refuses(
    query: str, both: tuple[PrometheusServer, Evaluator], now: float
) -> None:
    server, evaluator = both
    with pytest.raises(urllib.error.HTTPError) as refused:
        server.query(query, now)
    refused.value.close()  # the error holds the answer's socket
    assert refused.value.code in (400, 422)
    with pytest.raises(SimQueryError, match="label_replace"):
        evaluator.instant(query, now)
