"""Fixtures: real Prometheus servers on backfilled history or scraping a test exporter, and a
signal source on each. Every server runs on a free loopback port with data under tmp."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from controller.signals import PrometheusSource
from tests.signals import history
from tests.support.prometheus import (
    Exporter,
    PrometheusServer,
    backfill,
    openmetrics,
    prometheus_config,
    tenant_counters,
    wait_for,
)
from tests.support.redis import free_port

SCALE_TENANTS = 100_000


@pytest.fixture(scope="session")
def now() -> float:
    """The evaluation time of the backfilled history (whole seconds)."""
    return float(int(time.time()))


def history_server(directory: Path, now: float, config: str | None = None) -> PrometheusServer:
    server = PrometheusServer(directory, config=config or prometheus_config())
    backfill(server.data_dir, openmetrics([*history.gauges(now), *history.spend(now)]))
    return server.start()


@pytest.fixture(scope="session")
def history_prometheus(
    tmp_path_factory: pytest.TempPathFactory, now: float
) -> Iterator[PrometheusServer]:
    """Prometheus on two days of backfilled gauges and spend (shared, never stopped by tests)."""
    server = history_server(tmp_path_factory.mktemp("prometheus-history"), now)
    yield server
    server.stop()


@pytest.fixture
def own_prometheus(tmp_path: Path, now: float) -> Iterator[PrometheusServer]:
    """A Prometheus on the same history that the test may kill and restart."""
    server = history_server(tmp_path / "prometheus", now)
    yield server
    server.kill()


@pytest.fixture
def warning_prometheus(tmp_path: Path, now: float) -> Iterator[PrometheusServer]:
    """A Prometheus whose remote-read endpoint is down: answers come with warnings."""
    nobody = free_port()  # nothing listens there
    config = prometheus_config(remote_read=f"http://127.0.0.1:{nobody}/api/v1/read")
    server = history_server(tmp_path / "prometheus", now, config)
    yield server
    server.kill()


def source_for(server: PrometheusServer, **settings: Any) -> PrometheusSource:
    """A source reading `server`; ages are asked every fetch unless a test says otherwise."""
    return PrometheusSource.from_url(server.url, **{"sample_age_refresh_seconds": 0.0, **settings})


@pytest.fixture
def source(history_prometheus: PrometheusServer) -> Iterator[PrometheusSource]:
    with source_for(history_prometheus) as src:
        yield src


@pytest.fixture(scope="module")
def exporters() -> Iterator[tuple[Exporter, Exporter]]:
    """Two exporters: `steady` stays up, `doomed` is stopped by a test."""
    steady, doomed = Exporter().start(), Exporter().start()
    yield steady, doomed
    steady.stop()
    doomed.stop()


@pytest.fixture(scope="module")
def live_prometheus(
    tmp_path_factory: pytest.TempPathFactory, exporters: tuple[Exporter, Exporter]
) -> Iterator[PrometheusServer]:
    """Prometheus scraping both exporters every second; ready once both are scraped."""
    steady, doomed = exporters
    steady.set("live_load", 0.42)
    doomed.set("doomed_load", 1.0)
    config = prometheus_config([steady.target, doomed.target], interval="1s")
    server = PrometheusServer(tmp_path_factory.mktemp("prometheus-live"), config=config).start()
    wait_for(
        lambda: (
            bool(server.query("live_load", time.time()))
            and bool(server.query("doomed_load", time.time()))
        ),
        "the first scraped samples are queryable",
    )
    yield server
    server.stop()


@pytest.fixture(scope="session")
def scale_prometheus(
    tmp_path_factory: pytest.TempPathFactory, now: float
) -> Iterator[PrometheusServer]:
    """Prometheus holding one metric with 100k tenant series (4 samples each)."""
    server = PrometheusServer(tmp_path_factory.mktemp("prometheus-scale"))
    backfill(server.data_dir, openmetrics(tenant_counters(now, SCALE_TENANTS)))
    server.start()
    yield server
    server.stop()
