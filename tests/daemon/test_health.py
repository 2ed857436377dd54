"""Health that tells the truth: /readyz is computed when asked, so a tick stuck on a stalled
Redis turns it 503 (with the last successful tick's age), and so does a policy without any
usable signal for its stale_after (the shipped policies against an empty Prometheus)."""

from __future__ import annotations

import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from controller.control.daemon import build
from controller.control.telemetry import TelemetryServer
from controller.settings import Settings
from tests.daemon.harness import REPO, TICK_SECONDS, DaemonFactory, limit
from tests.support.prometheus import PrometheusServer, prometheus_config, wait_for
from tests.support.redis import RedisServer

pytestmark = pytest.mark.integration

PAUSE_SECONDS = 6.0
SHIPPED_WITH_SIGNALS = {  # policy: stale_after of its most lenient signal, seconds
    "AdaptiveLimit/global-inflight-by-gpu": 60.0,
    "ThrottlePolicy/gpu-saturation": 60.0,
    "ThrottlePolicy/tenant-cost-anomaly": 120.0,
}


def test_readyz_turns_503_while_a_tick_is_stuck_on_a_stalled_redis(
    db: redis.Redis[str], ready_env: dict[str, str], daemons: DaemonFactory
) -> None:
    # A socket timeout longer than the stall: the tick waits on Redis, it does not fail.
    env = {**ready_env, "GOVERNOR_REDIS__SOCKET_TIMEOUT_SECONDS": "30"}
    daemon = daemons("a", env)
    wait_for(lambda: limit(db) == 10.0, "the baseline is written")
    daemon.wait_for_metric("governor_ready", 1.0)
    assert daemon.http("/readyz") == (200, "ok\n")

    paused_at = time.time()
    db.client_pause(int(PAUSE_SECONDS * 1000), all=True)  # every command waits, none fails
    wait_for(lambda: daemon.http("/readyz")[0] == 503, "/readyz turns 503 during the stall")
    status, body = daemon.http("/readyz")
    assert status == 503
    assert "last successful tick" in body
    assert f"> 3 × {TICK_SECONDS:g} s" in body
    stalled_at = time.time()
    assert stalled_at < paused_at + PAUSE_SECONDS  # seen while the tick was still stuck
    assert daemon.metric("governor_ready") == 0
    last = daemon.metric("governor_last_successful_tick_timestamp_seconds")
    assert last is not None
    assert last <= paused_at + TICK_SECONDS  # it has not moved since the stall began
    assert not daemon.logged("tick.failed")  # nothing failed: the tick was just stuck

    wait_for(lambda: daemon.http("/readyz")[0] == 200, "ready again once Redis answers", 20)
    later = daemon.metric("governor_last_successful_tick_timestamp_seconds")
    assert later is not None
    assert later > paused_at + PAUSE_SECONDS - 1


@pytest.fixture
def empty_prometheus(tmp_path: Path) -> Iterator[PrometheusServer]:
    """A Prometheus that scrapes nothing: every query returns no series."""
    server = PrometheusServer(tmp_path / "empty", config=prometheus_config()).start()
    yield server
    server.stop()


def test_readyz_turns_503_when_a_policy_has_no_usable_signal_for_its_stale_after(
    redis_server: RedisServer, empty_prometheus: PrometheusServer
) -> None:
    settings = Settings(
        redis={"url": redis_server.url},
        prometheus={"url": empty_prometheus.url, "sample_age_refresh_seconds": 0},
        controller={"policy_dir": REPO / "policies", "tick_seconds": 5},
        telemetry={"port": 0},
        leader={"mode": "none"},
    )
    started = time.time()
    offset = [0.0]

    def clock() -> float:  # the controller's time: real time moved forward by the test
        return started + offset[0]

    daemon = build(settings, once=True)
    telemetry = TelemetryServer(
        "127.0.0.1", 0, daemon.controller.metrics, daemon.controller.health, clock
    )
    telemetry.start()
    try:
        daemon.controller.clock = clock
        first = daemon.controller.tick()
        assert first.ready, first.reasons  # no series is no reason yet: stale_after has not run
        assert _get(telemetry, "/readyz") == (200, "ok\n")

        offset[0] = 61.0  # past the GPU signals' 60s, within the spend signals' 120s
        assert daemon.controller.tick().ready
        status, body = _get(telemetry, "/readyz")
        assert status == 503
        lines = body.splitlines()
        assert lines == [
            f"no usable signal for policy {policy} for 61 s (stale_after {stale:g} s)"
            for policy, stale in sorted(SHIPPED_WITH_SIGNALS.items())
            if stale < 61
        ]
        assert daemon.controller.metrics.registry.get_sample_value("governor_ready") == 0

        offset[0] = 121.0
        daemon.controller.tick()
        status, body = _get(telemetry, "/readyz")
        assert status == 503
        named = {line.split(" for ")[1].removeprefix("policy ") for line in body.splitlines()}
        # Every policy with signals, by name, but the cost policy: on an empty Prometheus
        # its spend and refused are absent, read as 0 (`absent: zero`), and its baseline
        # waits for history (`no_history`): a fresh install, usable, not a reason.
        assert named == set(SHIPPED_WITH_SIGNALS) - {"ThrottlePolicy/tenant-cost-anomaly"}
    finally:
        telemetry.stop()
        daemon.close()


def _get(server: TelemetryServer, path: str) -> tuple[int, str]:
    url = f"http://127.0.0.1:{server.port}{path}"
    try:
        with urllib.request.urlopen(url, timeout=5) as answer:
            return int(answer.status), answer.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()
