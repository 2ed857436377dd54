"""End to end: the daemon outlives its dependencies. Prometheus killed → limits hold for
`on_stale.hold_for`, then fall back, and /readyz and /metrics say so; Redis restarted empty →
the full desired state is back within one tick, and no journal event is lost."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from tests.daemon.harness import (
    ADDRESS,
    FIELD,
    FREE_RPM,
    HOLD_FOR_SECONDS,
    LIMITS_KEY,
    POLICY,
    STABILIZATION_SECONDS,
    STAMPING_SECONDS,
    TICK_SECONDS,
    Daemon,
    DaemonFactory,
    Gpu,
    daemon_env,
    events,
    limit,
    scraping,
    stream,
    write_throttle,
)
from tests.support.prometheus import Exporter, PrometheusServer, wait_for
from tests.support.redis import RedisServer

pytestmark = pytest.mark.integration

TIGHT = FREE_RPM * 0.5
REDIS_FAILURES = {"leader.redis_unavailable", "control.unavailable", "sink.apply_failed"}


@pytest.fixture
def doomed_prometheus(tmp_path: Path, exporter: Exporter) -> Iterator[PrometheusServer]:
    """A Prometheus of this test's own, which it kills."""
    server = scraping(tmp_path / "prometheus", exporter)
    yield server
    server.kill()


def test_prometheus_killed_limits_hold_then_fall_back(
    db: redis.Redis[str],
    redis_server: RedisServer,
    doomed_prometheus: PrometheusServer,
    gpu: Gpu,
    policy_dir: Path,
    daemons: DaemonFactory,
) -> None:
    gpu.set(0.95)
    gpu.scraped(doomed_prometheus, 0.95)
    daemon = daemons("a", daemon_env(redis_server.url, doomed_prometheus.url, policy_dir))
    wait_for(lambda: limit(db) == TIGHT, "the hot GPU halves the free tier")
    daemon.wait_for_metric("governor_ready", 1.0)
    assert daemon.metric("governor_policy_in_fallback", policy=POLICY) == 0

    killed_at = time.time()
    doomed_prometheus.kill()
    wait_for(lambda: daemon.http("/readyz")[0] == 503, "/readyz turns 503")
    status, reason = daemon.http("/readyz")
    assert status == 503
    assert "every signal query failed (Prometheus unreachable?)" in reason
    assert "Connection refused" in reason
    daemon.wait_for_metric("governor_policy_in_fallback", 1.0, policy=POLICY)
    assert daemon.metric("governor_signals_invalid", policy=POLICY) == 1
    daemon.wait_for_metric("governor_ready", 0.0)
    assert daemon.http("/healthz")[0] == 200  # alive: ticks keep coming

    wait_for(lambda: limit(db) == FREE_RPM, "the declared fallback (baseline) returns", 20)
    # A tick's journal events reach the stream when it ends, just after its writes.
    wait_for(
        lambda: any(e["kind"] == "limit.changed" and e["at"] > killed_at for e in stream(db)),
        "it is journalled",
    )
    transitions = [
        e for e in stream(db) if e["kind"] == "policy.transition" and e["at"] > killed_at
    ]
    # One event when the hold starts (not one per tick of it), one when it ends.
    assert [e["details"]["event"] for e in transitions] == ["stale-hold", "stale-released"]
    for event in transitions:  # NaN in the model, null in JSON, and why
        assert [(s["value"], s["validity"]) for s in event["signals"]] == [(None, "error")]
    released = transitions[-1]
    # Held for hold_for from the first tick without Prometheus, which came after the kill.
    assert released["at"] >= killed_at + HOLD_FOR_SECONDS
    [restored] = [e for e in stream(db) if e["kind"] == "limit.changed" and e["at"] > killed_at]
    assert (restored["address"], restored["old"], restored["new"]) == (ADDRESS, TIGHT, FREE_RPM)
    window = STABILIZATION_SECONDS - TICK_SECONDS
    assert restored["at"] - released["at"] >= window - STAMPING_SECONDS
    seconds = daemon.metric("governor_fallback_seconds_total", policy=POLICY)
    assert seconds is not None
    assert seconds > 0
    # The fallback (baseline) is applied and Prometheus is still down: the policy still acts
    # on its fallback, so the gauge stays 1 and the time in fallback keeps growing.
    fallback_ticks = daemon.metric("governor_ticks_total", outcome="degraded") or 0
    wait_for(
        lambda: (
            (daemon.metric("governor_ticks_total", outcome="degraded") or 0) >= fallback_ticks + 3
        ),
        "three more ticks on the fallback",
    )
    assert daemon.metric("governor_policy_in_fallback", policy=POLICY) == 1
    later = daemon.metric("governor_fallback_seconds_total", policy=POLICY)
    assert later is not None
    assert later >= seconds + 2 * TICK_SECONDS
    assert daemon.running()


def test_redis_restarted_gets_the_full_state_back_and_no_journal_event_is_lost(
    db: redis.Redis[str], redis_server: RedisServer, gpu: Gpu, policy_dir: Path, daemon: Daemon
) -> None:
    before = {e["event_id"] for e in stream(db)}
    # Freeze writers, then stop: no event can reach the old stream unseen by `before`.
    db.client_pause(60_000, all=False)
    assert {e["event_id"] for e in stream(db)} == before
    redis_server.stop()
    down_at = time.time()

    # While Redis is away: a hot GPU engages the policy (journalled into the buffer) and a
    # policy change is reloaded (journalled too); the loop goes on, not ready.
    gpu.set(0.95)
    write_throttle(policy_dir, gpu.case, scale=0.4)
    wait_for(
        lambda: any(e["at"] > down_at for e in daemon.logged("policy.transition")),
        "the daemon sees the policy engage while Redis is away",
    )
    assert daemon.logged("policy.reloaded")
    # Both are held for Redis (the gauge is set when that tick ends).
    wait_for(
        lambda: (daemon.metric("governor_journal_buffer_events") or 0) >= 2,
        "the journal buffers both events",
    )
    status, reason = daemon.http("/readyz")
    assert status == 503
    assert f"127.0.0.1:{redis_server.port}" in reason
    assert daemon.metric("governor_leader") == 0

    redis_server.start()
    desired = {"global/requests_per_second": 100.0, ADDRESS: FREE_RPM * 0.4}
    wait_for(lambda: _ledger(db) == desired, "the full desired state is back in Redis")
    assert limit(db) == FREE_RPM * 0.4
    assert db.hget("governor:limits:global", "requests_per_second") == "100"
    # The tick's events reach the stream when the tick ends, after its writes.
    wait_for(
        lambda: {e["address"] for e in stream(db) if e["kind"] == "limit.changed"} >= set(desired),
        "the re-applied limits are journalled",
    )
    reapplied = [e for e in stream(db) if e["kind"] == "limit.changed"]
    assert {e["address"]: e["new"] for e in reapplied} == desired
    assert all(e["old"] is None for e in reapplied)  # Redis came back empty
    # All in one tick, and the tick before it could not reach Redis: within one tick.
    [tick] = {e["tick"] for e in reapplied}
    failed = {line["tick"] for line in daemon.logs() if line.get("event") in REDIS_FAILURES}
    assert tick - 1 in failed
    assert tick not in failed

    assert daemon.terminate() == 0
    emitted = [e["event_id"] for e in daemon.journalled() if e["event_id"] not in before]
    stored = [e["event_id"] for e in stream(db)]
    assert stored == emitted  # every event since the outage, once each, in emission order
    kinds = [e["kind"] for e in stream(db)]
    assert {"policy.transition", "policy.reloaded", "limit.changed"} <= set(kinds)
    assert "journal.gap" not in kinds


def test_redis_emptied_gets_the_plan_catalog_back_without_a_policy_change(
    db: redis.Redis[str], daemon: Daemon
) -> None:
    """The catalog was published once per policy version: after Redis lost it (restarted
    empty, the policies unchanged) the limits came back but the catalog never did, and
    every gateway answered 503 not-configured until the next policy change."""
    wait_for(lambda: db.exists("governor:plans") == 1, "the catalog is published")
    catalog, version = db.hgetall("governor:plans"), db.get("governor:plans:version")

    db.flushdb()

    wait_for(lambda: limit(db) == FREE_RPM, "the limits are back")
    wait_for(lambda: db.hgetall("governor:plans") == catalog, "the catalog is back", timeout=10)
    assert db.get("governor:plans:version") == version


def test_redis_emptied_is_said_with_what_is_lost_and_the_repair(
    db: redis.Redis[str], daemon: Daemon
) -> None:
    """The limits and the catalog come back by themselves; API keys, credits, tenants and
    overrides do not, and nothing said so: gateways just refused every key 401."""
    wait_for(lambda: db.get("governor:version") is not None, "a version is written")
    daemon.wait_for_metric("governor_ready", 1.0)
    assert not daemon.logged("redis.emptied")  # a fresh Redis at start is no loss

    db.flushdb()

    line = daemon.wait_for_log("redis.emptied")
    assert line["level"] == "error"
    assert "API keys" in line["detail"]
    assert "credit balances" in line["detail"]
    assert "appendonly yes" in line["detail"]
    wait_for(lambda: limit(db) == FREE_RPM, "the limits are back")
    time.sleep(1.0)  # more ticks on the refilled Redis: said once, not every tick
    assert len(daemon.logged("redis.emptied")) == 1


def _ledger(db: redis.Redis[str]) -> dict[str, float]:
    return {address: float(value) for address, value in db.hgetall("governor:written").items()}


def test_a_limit_edited_into_a_non_number_is_reconciled_and_the_journal_keeps_working(
    db: redis.Redis[str], gpu: Gpu, daemon: Daemon
) -> None:
    db.hset(LIMITS_KEY, FIELD, "lots")  # a hand edit no gateway can read

    wait_for(lambda: bool(events(db, "limit.drift")), "the edit is seen as drift")
    wait_for(lambda: limit(db) == FREE_RPM, "the limit is reconciled")
    assert [(e["address"], e["new"], e["details"]) for e in events(db, "limit.drift")] == [
        (ADDRESS, None, {"not_a_number": True})
    ]
    [repaired] = [e for e in stream(db) if e["kind"] == "limit.changed" and e["tick"] > 1]
    assert (repaired["old"], repaired["new"]) == (None, FREE_RPM)
    gpu.set(0.95)  # the journal still works: the next change reaches the stream
    wait_for(lambda: limit(db) == TIGHT, "the hot GPU halves the free tier")
    # A tick's journal events reach the stream when it ends, just after its writes.
    wait_for(
        lambda: any(e["kind"] == "limit.changed" and e["new"] == TIGHT for e in stream(db)),
        "the change is journalled",
    )
    assert daemon.http("/readyz")[0] == 200
    assert daemon.metric("governor_ticks_total", outcome="degraded") == 0.0  # exported at 0
