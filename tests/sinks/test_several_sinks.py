"""`governor run` drives every sink named in GOVERNOR_CONTROLLER__SINKS, each with its own
drift report; a sink that fails does not stop the others."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import redis

from controller.changes import Change
from controller.contract.fence import FencedError
from controller.contract.keys import KeySchema
from controller.control.daemon import build
from controller.journal.events import JournalEvent, Kind
from controller.journal.reader import read_events
from controller.model import Address
from controller.settings import Settings
from tests.kong.conftest import add_consumer
from tests.kong.kong_admin import KongAdmin
from tests.support.redis import RedisServer

POLICIES = Path(__file__).parents[2] / "policies"


def _settings(server: RedisServer, sinks: list[str], **more: Any) -> Settings:
    return Settings.model_validate(
        {
            "redis": {"url": server.url},
            "prometheus": {"url": "http://127.0.0.1:9", "timeout_seconds": 0.2},
            "controller": {"policy_dir": str(POLICIES), "sinks": sinks},
            "leader": {"mode": "none"},
            "telemetry": {"port": 0},
            **more,
        }
    )


def _limits(client: redis.Redis[str]) -> dict[str, str]:
    return client.hgetall("governor:limits:global")


def test_one_tick_writes_every_sink_and_reports_drift_per_sink(
    redis_server: RedisServer, db: redis.Redis[str]
) -> None:
    second = redis_server.url.replace("/0", "/1")
    daemon = build(_settings(redis_server, ["redis", second]), once=True)
    try:
        daemon.controller.tick()
        with redis.Redis(port=redis_server.port, db=1, decode_responses=True) as other:
            assert _limits(db) == _limits(other) != {}
            other.hset("governor:limits:global", "requests_per_second", "999")  # a hand edit
            daemon.controller.tick()
            assert other.hget("governor:limits:global", "requests_per_second") == "1000"
        drift = [
            entry for _, entry in db.xrange("governor:journal") if entry["kind"] == "limit.drift"
        ]
        assert len(drift) == 1
        assert f'"sink": "{second}"' in drift[0]["data"]  # which sink drifted
    finally:
        daemon.close()


def test_a_failing_extra_sink_does_not_stop_the_primary(
    redis_server: RedisServer, db: redis.Redis[str]
) -> None:
    daemon = build(_settings(redis_server, ["redis", "redis://127.0.0.1:9/0"]), once=True)
    try:
        outcome = daemon.controller.tick()
        assert _limits(db) != {}
        assert not outcome.ready
        assert any("cannot write limits to redis://127.0.0.1:9/0" in r for r in outcome.reasons)
    finally:
        daemon.close()


def test_an_unknown_sink_is_a_settings_error() -> None:
    with pytest.raises(ValueError, match="not one of"):
        Settings.model_validate({"controller": {"sinks": ["carrier-pigeon"]}})


def test_the_leaders_fence_guards_every_sink_and_the_journal(
    redis_server: RedisServer, db: redis.Redis[str]
) -> None:
    """The composition root hands the elector's fence to each sink and to the journal: once
    the lock is taken behind this replica's back, none of them takes its late writes."""
    kong = KongAdmin().start()
    add_consumer(kong, custom_id="acme")
    configured = _settings(
        redis_server, ["redis", "kong"], leader={"mode": "redis"}, kong={"admin_url": kong.url}
    )
    daemon = build(configured)
    try:
        assert daemon.controller.tick().leader
        db.set(KeySchema().leader, "someone-else#99")  # a new leader, this one not told yet
        writes = daemon.controller.parts.writes
        sinks = [r.sink for r in (writes.reconciler, *writes.extra_reconcilers)]
        assert [type(s).__name__ for s in sinks] == ["RedisSink", "KongSink"]
        change = Change(Address.parse("tenant/acme/requests_per_minute"), None, 60.0)
        for sink in sinks:
            with pytest.raises(FencedError, match="no longer holds the leader lock"):
                sink.apply([change])
        journal = daemon.controller.events.journal
        journal.emit(JournalEvent(kind=Kind.POLICY_TRANSITION, actor="controller", reason="late"))
        assert journal.flush()
        latest = read_events(db, KeySchema(), count=1)
        assert [(e.event.reason, e.stale_leader) for e in latest] == [("late", True)]
    finally:
        daemon.close()
        kong.stop()


def test_a_further_redis_sink_is_written_by_the_leader_and_fenced_by_governors_redis(
    redis_server: RedisServer, db: redis.Redis[str]
) -> None:
    """The leader fence lives in Governor's own Redis: a further Redis sink (here database 1)
    checks it there, so the leader writes it, and a deposed leader does not."""
    second = redis_server.url.replace("/0", "/1")
    daemon = build(_settings(redis_server, ["redis", second], leader={"mode": "redis"}))
    try:
        outcome = daemon.controller.tick()
        assert outcome.leader
        assert not [r for r in outcome.reasons if "cannot write" in r]  # Prometheus is away
        with redis.Redis(port=redis_server.port, db=1, decode_responses=True) as other:
            assert _limits(other) == _limits(db) != {}
        db.set(KeySchema().leader, "someone-else#99")
        writes = daemon.controller.parts.writes
        (further,) = [r.sink for r in writes.extra_reconcilers]
        change = Change(Address.parse("tenant/acme/requests_per_minute"), None, 60.0)
        with pytest.raises(FencedError, match="no longer holds the leader lock"):
            further.apply([change])
    finally:
        daemon.close()
