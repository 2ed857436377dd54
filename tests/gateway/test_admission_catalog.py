"""The plan catalog: published by the daemon from the policy files, read by gateways."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import redis
import redis.asyncio
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from controller.contract.catalog import PlanInfo
from controller.control.catalog import publish_catalog
from controller.errors import SinkError
from controller.gateway.catalog import PlanCatalog
from controller.policy.loader import load_directory
from tests.gateway.conftest import MakeGateway
from tests.support.redis import RedisServer, free_port


def test_published_plans_reach_the_gateway(
    db: redis.Redis[str], redis_server: RedisServer, policy_dir: Path
) -> None:
    publish_catalog(db, load_directory(policy_dir), prefix="governor")

    async def read() -> tuple[PlanInfo | None, ...]:
        client = redis.asyncio.Redis.from_url(redis_server.url, decode_responses=True)
        try:
            catalog = PlanCatalog(client, "governor")
            free = await catalog.current("free")
            db.hdel("governor:plans", "free")  # cached: still there until a refresh
            cached = await catalog.current("free")
            catalog.invalidate()
            gone = await catalog.current("free")
            return free, cached, gone, await catalog.current("paid")
        finally:
            await client.aclose()  # type: ignore[attr-defined]  # types-redis predates aclose

    free, cached, gone, paid = asyncio.run(read())
    assert free == cached == PlanInfo(models=("gpt-3.5-turbo",), fail_mode="closed")
    assert gone is None  # a plan removed from the catalog is no plan, never a default
    assert free is not None
    assert paid is not None
    assert paid.degrade is not None
    assert paid.degrade.at_percent == 50
    assert paid.allows("gpt-4")
    assert not free.allows("gpt-4")
    assert free.allows(None)
    assert db.hget("governor:plans", "enterprise") == (
        '{"credits": {"min_balance_usd": 0.0}, "degrade": null, "fail_mode": "open", "models": [], '
        '"quota_exhausted": "payment_required"}'
    )


def test_an_unreachable_redis_keeps_the_last_catalog() -> None:
    async def run() -> PlanInfo | None:
        no_retry = Retry(NoBackoff(), 0)
        client = redis.asyncio.Redis(port=free_port(), decode_responses=True, retry=no_retry)
        try:
            catalog = PlanCatalog(client, "governor", refresh_seconds=0)
            catalog._plans = {"free": PlanInfo(fail_mode="open")}
            with pytest.raises(SinkError, match="governor:plans"):
                await catalog.refresh()
            return await catalog.current("free")
        finally:
            await client.aclose()  # type: ignore[attr-defined]  # types-redis predates aclose

    kept = asyncio.run(run())
    assert kept is not None
    assert kept.fail_mode == "open"


@pytest.mark.parametrize(
    "entry", ["{}", '{"fail_mode": "closed"}', '{"models": [], "degrade": null, "credits": null}']
)
def test_an_entry_that_leaves_models_or_fail_mode_out_is_no_plan(
    db: redis.Redis[str], redis_server: RedisServer, policy_dir: Path, entry: str
) -> None:
    """An empty models list means any model: an entry written by hand without one must not
    read as a plan that serves every model. It is left out (it names no plan: 403
    unknown-plan), as nginx leaves it out; the plans beside it are read as usual."""
    publish_catalog(db, load_directory(policy_dir), prefix="governor")
    db.hset("governor:plans", "hand-written", entry)

    async def read() -> tuple[PlanInfo | None, PlanInfo | None]:
        client = redis.asyncio.Redis.from_url(redis_server.url, decode_responses=True)
        try:
            catalog = PlanCatalog(client, "governor")
            await catalog.refresh()
            return catalog.get("hand-written"), catalog.get("free")
        finally:
            await client.aclose()  # type: ignore[attr-defined]  # types-redis predates aclose

    hand_written, free = asyncio.run(read())

    assert hand_written is None
    assert free is not None
    assert free.models == ("gpt-3.5-turbo",)


def test_a_gateway_started_beside_an_entry_that_is_no_plan_serves_the_other_plans(
    db: redis.Redis[str], make_gateway: MakeGateway
) -> None:
    # One hand-written entry made the whole catalog unreadable: a gateway started then had
    # none and refused every tenant 503 "the limit store is unreachable" (it was not), where
    # nginx served the other plans and refused that one alone.
    db.hset("governor:plans", "hand-written", "{}")
    gateway = make_gateway()

    served = gateway.chat(gateway.key("acme", "free"))
    refused = gateway.chat(gateway.key("initech", "hand-written"))

    assert served.status_code == 200, served.text
    assert refused.status_code == 403
    assert refused.json()["type"].endswith("#unknown-plan")
