"""Fetch + decode of a 100k-series query through PrometheusSource vs the raw HTTP floor.

Run from the repository root: `.venv/bin/python -m benchmarks.signals_scale [--tenants N]`.
Starts its own Prometheus on a free loopback port with N backfilled tenant series, then
times, in the same run and interleaved, the median of several rounds of:

- raw:      httpx GET /api/v1/query + .json() of the query (the floor);
- same:     our path for the same single query (prometheus-api-client + decode to numpy);
- fetch:    `PrometheusSource.fetch` with the sample-age reused (the steady tick);
- fetch+age: `fetch` asking the sample age too (one more query over the same series).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import httpx

from controller.model import SignalKey, VectorSample
from controller.signals import PrometheusSource
from controller.signals.decode import decode_vector
from tests.support.prometheus import PrometheusServer, backfill, openmetrics, tenant_counters

QUERY = "sum by (tenant) (rate(tenant_cost_usd_total[5m]))"


def _timed(action: Callable[[], object], rounds: list[float]) -> None:
    started = time.perf_counter()
    action()
    rounds.append(time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tenants", type=int, default=100_000)
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    now = float(int(time.time()))
    with tempfile.TemporaryDirectory() as directory:
        server = PrometheusServer(Path(directory))
        started = time.perf_counter()
        backfill(server.data_dir, openmetrics(tenant_counters(now, args.tenants)))
        server.start()
        print(f"backfilled {args.tenants} series in {time.perf_counter() - started:.1f}s")
        try:
            _compare(server, now, args.tenants, args.rounds)
        finally:
            server.stop()


def _compare(server: PrometheusServer, now: float, tenants: int, rounds: int) -> None:
    key = SignalKey(QUERY, "tenant")
    params = {"query": QUERY, "time": f"{now:.3f}"}
    with (
        httpx.Client(base_url=server.url, timeout=60) as raw_client,
        PrometheusSource.from_url(server.url, timeout_seconds=60) as steady,
        PrometheusSource.from_url(
            server.url, timeout_seconds=60, sample_age_refresh_seconds=0
        ) as asking,
    ):

        def raw() -> object:
            return raw_client.get("/api/v1/query", params=params).json()

        def same() -> object:
            answer = steady.run([QUERY], now)[QUERY]
            sample = decode_vector(answer.result, "tenant", now)
            assert isinstance(sample, VectorSample), answer.error
            assert len(sample.keys) == tenants
            return sample

        def fetch(source: PrometheusSource) -> Callable[[], object]:
            return lambda: source.fetch([key], now)

        cases = {"raw": raw, "same": same, "fetch": fetch(steady), "fetch+age": fetch(asking)}
        for action in cases.values():  # warm-up: page cache, connections, the age cache
            action()
        times: dict[str, list[float]] = {name: [] for name in cases}
        for _ in range(rounds):
            for name, action in cases.items():
                _timed(action, times[name])
    floor = statistics.median(times["raw"])
    print(f"query: {QUERY}  ({tenants} series, median of {rounds} rounds)")
    for name, values in times.items():
        median = statistics.median(values)
        print(f"  {name:<10} {median * 1000:8.1f} ms   {median / floor:5.2f}x raw")


if __name__ == "__main__":
    main()
