"""`governor run` drives every sink named in GOVERNOR_CONTROLLER__SINKS, each with its own
drift report; a sink that fails does not stop the others."""

from __future__ import annotations

from pathlib import Path

import pytest
import redis

from controller.control.daemon import build
from controller.settings import Settings
from tests.support.redis import RedisServer

POLICIES = Path(__file__).parents[2] / "policies"


def _settings(server: RedisServer, sinks: list[str]) -> Settings:
    return Settings.model_validate(
        {
            "redis": {"url": server.url},
            "prometheus": {"url": "http://127.0.0.1:9", "timeout_seconds": 0.2},
            "controller": {"policy_dir": str(POLICIES), "sinks": sinks},
            "leader": {"mode": "none"},
            "telemetry": {"port": 0},
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
            assert other.hget("governor:limits:global", "requests_per_second") == "60"
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
