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
