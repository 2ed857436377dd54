"""A per-tenant signal whose data stopped arriving is stale for the alert and readiness, as it
is for the engine. A real Prometheus on backfilled per-tenant series whose last samples are
90 s old keeps answering them (its 5-minute lookback); the age query tells they are old."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.daemon.harness import DaemonFactory, daemon_env
from tests.support.prometheus import PrometheusServer, Series, backfill, openmetrics, wait_for
from tests.support.redis import RedisServer

pytestmark = pytest.mark.integration

POLICY = "ThrottlePolicy/tenant-hot"
STOPPED_AGO = 90.0  # the pipeline stopped this long before the test starts


@pytest.fixture
def stopped_prometheus(tmp_path: Path) -> Iterator[PrometheusServer]:
    """Three tenants' `tenant_load`, scraped every 15 s until STOPPED_AGO seconds ago."""
    now = time.time()
    times = [now - STOPPED_AGO - 15.0 * k for k in range(20)]
    series = [
        Series("tenant_load", {"tenant": f"t{i}"}, [(t, 0.1) for t in times]) for i in range(3)
    ]
    server = PrometheusServer(tmp_path / "prometheus")
    backfill(server.data_dir, openmetrics(series))
    server.start()
    yield server
    server.stop()


def _policies(directory: Path) -> Path:
    directory.mkdir(parents=True)
    (directory / "plans.yaml").write_text(
        "apiVersion: governor/v1\nkind: Plan\nmetadata: {name: free}\n"
        "spec: {limits: {requests_per_minute: 10}}\n"
    )
    (directory / "limits.yaml").write_text(
        "apiVersion: governor/v1\nkind: Limits\nmetadata: {name: global}\n"
        "spec:\n  default_plan: free\n  global: {requests_per_second: 100}\n"
    )
    (directory / "tenant-hot.yaml").write_text(
        "apiVersion: governor/v1\nkind: ThrottlePolicy\nmetadata: {name: tenant-hot}\n"
        "spec:\n  per: tenant\n  signals:\n"
        "    load: {query: 'max by (tenant) (tenant_load)', stale_after: 5s}\n"
        "  when: load > 0.5\n"
        "  actions:\n    - {target: tenant/$tenant/requests_per_minute, scale: 0.5}\n"
        "  on_stale: {hold_for: 3s, then: baseline}\n"
    )
    return directory


def test_a_stale_per_tenant_signal_is_counted_logged_and_against_readiness(
    tmp_path: Path,
    redis_server: RedisServer,
    stopped_prometheus: PrometheusServer,
    daemons: DaemonFactory,
) -> None:
    """Only a scalar signal was checked against stale_after outside the engine: a per-tenant
    one whose every value was 90 s old (stale_after 5 s) counted 0 in
    governor_signals_invalid (GovernorSignalsStale never fired), logged nothing, and /readyz
    stayed 200 while the engine ignored every value."""
    assert stopped_prometheus.query("max by (tenant) (tenant_load)", time.time())  # answered
    policies = _policies(tmp_path / "policies")
    daemon = daemons("stale", daemon_env(redis_server.url, stopped_prometheus.url, policies))
    daemon.wait_for_metric("governor_signals_invalid", 1.0, policy=POLICY)  # was 0
    line = daemon.wait_for_log("signal.invalid")
    assert (line["policy"], line["signal"], line["validity"]) == (POLICY, "load", "stale")
    assert "older than stale_after 5s" in line["detail"]

    # The gauge and the log line come mid-tick: /readyz says "no tick has run yet" (also
    # 503) until that first tick ends, so wait for the reason, not for the status alone.
    def unready_for_the_signal() -> bool:
        status, body = daemon.http("/readyz")
        return status == 503 and f"no usable signal for policy {POLICY}" in body

    wait_for(unready_for_the_signal, "/readyz turns 503 for the stale signal", timeout=20.0)
