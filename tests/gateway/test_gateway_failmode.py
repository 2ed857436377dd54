"""Redis killed under a running gateway: the free plan fails closed (503), the enterprise
plan fails open through a local limiter of its limit divided by the live gateway count."""

from __future__ import annotations

import asyncio
import re
import time
from pathlib import Path

import redis.asyncio

from controller.contract.keys import KeySchema
from controller.gateway.failmode import Presence
from controller.gateway.keys import KeyStore
from tests.gateway.conftest import Gateway, gateway_on_own_redis
from tests.gateway.fake_upstream import FakeUpstream


def announce_other_gateway(url: str) -> int:
    """A second gateway's heartbeat, made the way every gateway makes it."""

    async def beat() -> int:
        client = redis.asyncio.Redis.from_url(url, decode_responses=True)
        try:
            return await Presence(client, KeySchema("governor"), "other-gateway", 60.0).heartbeat()
        finally:
            await client.aclose()  # type: ignore[attr-defined]

    return asyncio.run(beat())


def wait_for_live_gateways(gateway: Gateway, count: int) -> None:
    deadline = time.monotonic() + 15.0
    while f"gateway_live_gateways {count:.1f}" not in gateway.metrics():
        assert time.monotonic() < deadline, "the gateway's heartbeat never counted the others"
        time.sleep(0.02)


def test_free_fails_closed_and_enterprise_fails_open_to_its_share(
    tmp_path: Path, upstream: tuple[FakeUpstream, str], policy_dir: Path
) -> None:
    with gateway_on_own_redis(tmp_path / "redis", upstream[1], policy_dir, globex_usd=1.0,
                              heartbeat_seconds=0.1) as (server, gateway):  # fmt: skip
        free_key = gateway.key("acme", "free")
        enterprise_key = gateway.key("globex", "enterprise")  # 6 requests/minute, fails open
        unseen_key = gateway.key("hooli", "enterprise")  # never used before the outage
        assert announce_other_gateway(server.url) >= 1
        wait_for_live_gateways(gateway, 2)
        # While Redis is up both are admitted by Redis (and their keys are verified).
        assert gateway.chat(free_key).status_code == 200
        assert gateway.chat(enterprise_key).status_code == 200

        server.stop()
        closed = gateway.chat(free_key)
        opened = [gateway.chat(enterprise_key) for _ in range(4)]
        unseen = gateway.chat(unseen_key)

    assert closed.status_code == 503
    assert closed.json()["type"].endswith("#enforcement-unavailable")
    assert "fails closed" in closed.json()["detail"]
    # 6 per minute over 2 live gateways: this one may admit 3, never "unlimited".
    assert [a.status_code for a in opened] == [200, 200, 200, 429]
    assert opened[0].headers["x-governor-fail-open"] == "local limiter, 1/2 of each limit"
    assert int(opened[3].headers["retry-after"]) >= 1
    assert re.search(r"requests_per_minute", opened[3].json()["violated-policies"][0])
    # A key Redis never vouched for cannot be checked now: refused, whatever its plan.
    assert unseen.status_code == 503
    assert "not seen before" in unseen.json()["detail"]


def test_a_key_seen_revoked_is_not_served_from_the_cache_during_an_outage(
    tmp_path: Path, upstream: tuple[FakeUpstream, str], policy_dir: Path
) -> None:
    # The cache that keeps verified keys working through an outage (fail-open plans) once
    # kept a key Redis had since said was revoked: the outage brought it back, unmetered.
    with gateway_on_own_redis(tmp_path / "redis", upstream[1], policy_dir, globex_usd=1.0,
                              key_cache_seconds=0.0) as (server, gateway):  # fmt: skip
        key = gateway.key("globex", "enterprise")  # fails open
        used = gateway.chat(key)
        with server.client() as client:
            (key_id,) = client.hkeys("governor:apikeys")
            assert KeyStore(client, KeySchema("governor"), "test-secret").revoke(key_id)
        revoked = gateway.chat(key)
        server.stop()
        during_outage = gateway.chat(key)

    assert (used.status_code, revoked.status_code) == (200, 401)
    assert during_outage.status_code == 401, during_outage.text
    assert during_outage.json()["detail"] == "unknown or revoked API key"
