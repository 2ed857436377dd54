"""A signal that turns to NaN in Prometheus (a gauge exported as NaN: a division by zero in
the exporter) is not a number the engine reads: the engaged policy holds, then falls back,
and the journal's stale-hold event says which signal was bad and why."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import redis

from tests.daemon.harness import (
    FREE_RPM,
    POLICY,
    DaemonFactory,
    Gpu,
    daemon_env,
    events,
    limit,
)
from tests.support.prometheus import PrometheusServer, wait_for
from tests.support.redis import RedisServer

pytestmark = pytest.mark.integration


def test_a_nan_signal_holds_then_falls_back_and_the_journal_says_why(
    db: redis.Redis[str],
    redis_server: RedisServer,
    prometheus: PrometheusServer,
    gpu: Gpu,
    policy_dir: Path,
    daemons: DaemonFactory,
) -> None:
    gpu.set(0.95)
    gpu.scraped(prometheus, 0.95)
    daemons("nan", daemon_env(redis_server.url, prometheus.url, policy_dir))
    wait_for(lambda: limit(db) == FREE_RPM * 0.5, "the hot GPU halves the free tier")

    gpu.set(math.nan)
    wait_for(
        lambda: (
            bool(events(db, "policy.transition", policy=POLICY)[-1:])
            and events(db, "policy.transition", policy=POLICY)[-1]["details"]["event"]
            == "stale-hold"
        ),
        "the NaN starts a stale hold",
    )
    [held] = [e for e in events(db, "policy.transition") if e["details"]["event"] == "stale-hold"]
    assert [(s["name"], s["value"], s["validity"]) for s in held["signals"]] == [
        ("gpu_util", None, "not_finite")
    ]
    # Was only the validity: which query failed, and how, was in the log line alone.
    assert held["details"]["invalid"] == {"gpu_util": "not_finite: value is nan"}
    wait_for(lambda: limit(db) == FREE_RPM, "the declared fallback (baseline) returns", 20)


def test_a_value_outside_the_signals_range_holds_then_falls_back_and_says_why(
    db: redis.Redis[str],
    redis_server: RedisServer,
    prometheus: PrometheusServer,
    gpu: Gpu,
    policy_dir: Path,
    daemons: DaemonFactory,
) -> None:
    """A utilisation of 95 (an exporter's percent where the policy reads a ratio) is finite,
    and above 0.9 it would have kept the cut for good: declared `range: {min: 0, max: 1}`,
    it is no reading, and the journal names the range and the likely mistake."""
    policy = policy_dir / "gpu-hot.yaml"
    text = policy.read_text()
    assert "stale_after: 30s}" in text
    policy.write_text(
        text.replace("stale_after: 30s}", "stale_after: 30s, range: {min: 0, max: 1}}")
    )
    gpu.set(0.95)
    gpu.scraped(prometheus, 0.95)
    daemons("range", daemon_env(redis_server.url, prometheus.url, policy_dir))
    wait_for(lambda: limit(db) == FREE_RPM * 0.5, "the hot GPU halves the free tier")

    gpu.set(95.0)
    wait_for(
        lambda: any(e["details"]["event"] == "stale-hold" for e in events(db, "policy.transition")),
        "the out-of-range value starts a stale hold",
    )
    [held] = [e for e in events(db, "policy.transition") if e["details"]["event"] == "stale-hold"]
    assert [(s["name"], s["validity"]) for s in held["signals"]] == [("gpu_util", "out_of_range")]
    reason = held["details"]["invalid"]["gpu_util"]
    assert reason.startswith("out_of_range: value 95 is outside the signal's range 0–1")
    wait_for(lambda: limit(db) == FREE_RPM, "the declared fallback (baseline) returns", 20)
