"""Fail closed at the gateway: a plan the catalog does not hold is refused (403 unknown-plan),
and a gateway with no catalog or no limits in Redis serves nobody unrestricted (503
not-configured) unless the plan declares fail_mode: open."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import jwt
import pytest
import redis
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from controller.contract.enforcement import EnforcementKeys
from controller.control.catalog import publish_catalog
from controller.gateway.credits import CreditLedger
from controller.policy.loader import load_directory
from tests.gateway.conftest import PLANS_YAML, PROBLEM, Gateway, MakeGateway, start_gateway
from tests.gateway.fake_upstream import FakeUpstream
from tests.gateway.test_auth_jwt import AUDIENCE, ISSUER
from tests.support.redis import RedisServer

UNKNOWN_PLAN = "/docs/gateway.md#unknown-plan"  # after the configured problem base URL
NOT_CONFIGURED = "/docs/gateway.md#not-configured"


def requests_counted(gateway: Gateway, outcome: str, plan: str) -> float:
    """gateway_requests_total for one outcome and plan, summed over tenants and models."""
    total = 0.0
    for line in gateway.metrics().splitlines():
        wanted = f'outcome="{outcome}"' in line and f'plan="{plan}"' in line
        if line.startswith("gateway_requests_total{") and wanted:
            total += float(line.rsplit(" ", 1)[1])
    return total


@pytest.mark.parametrize("plan", ["platinum", "fre"])
def test_a_key_on_an_unknown_plan_is_refused_for_every_model(
    gateway: Gateway, upstream: tuple[FakeUpstream, str], plan: str
) -> None:
    key = gateway.key("acme", plan)
    fake = upstream[0]
    seen = len(fake.seen)
    answers = [gateway.chat(key, model) for model in ("gpt-4", "gpt-9", "gpt-3.5-turbo")]

    assert [a.status_code for a in answers] == [403, 403, 403]
    for answer in answers:
        assert answer.headers["content-type"] == PROBLEM
        assert answer.json()["type"].endswith(UNKNOWN_PLAN)
        assert answer.json()["plan"] == plan
        assert "ratelimit" not in answer.headers
    assert len(fake.seen) == seen  # nothing reached the model server
    # Not-a-model-call pass-through is refused too: the plan decides nothing there, but a
    # credential on no plan is no customer.
    listed = gateway.http.get(
        f"{gateway.url}/v1/models", headers={"authorization": f"Bearer {key}"}
    )
    assert listed.status_code == 403
    assert requests_counted(gateway, "unknown_plan", plan) == 4


def test_a_plan_removed_from_the_policies_refuses_its_tenants(
    gateway: Gateway, db: redis.Redis[str], tmp_path: Path
) -> None:
    key = gateway.key("acme", "paid")
    assert gateway.chat(key).status_code == 200
    (tmp_path / "plans.yaml").write_text(PLANS_YAML.replace("name: paid", "name: paid-v2"))
    publish_catalog(db, load_directory(tmp_path), prefix="governor")
    deadline = time.monotonic() + 30.0  # the catalog is reread every 5 s
    while (answer := gateway.chat(key)).status_code == 200:
        assert time.monotonic() < deadline, "the removed plan is still served"
        time.sleep(0.2)
    assert answer.status_code == 403
    assert answer.json()["type"].endswith(UNKNOWN_PLAN)


@pytest.fixture(scope="module")
def signing_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def signed(key: rsa.RSAPrivateKey, **claims: Any) -> str:
    now = int(time.time())
    body = {"iss": ISSUER, "aud": AUDIENCE, "sub": "acme", "iat": now, "exp": now + 600}
    return jwt.encode({**body, **claims}, key, "RS256")


def test_a_validly_signed_token_on_an_unknown_plan_is_refused(
    make_gateway: MakeGateway, signing_key: rsa.RSAPrivateKey
) -> None:
    pem = signing_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    gateway = make_gateway(jwt_public_key=pem.decode(), jwt_issuer=ISSUER, jwt_audience=AUDIENCE)
    platinum = gateway.chat(signed(signing_key, plan="platinum"), "gpt-4")
    assert platinum.status_code == 403
    assert platinum.json()["type"].endswith(UNKNOWN_PLAN)
    # The plan is the token's claim: no `governor tenants set` moves it (the key's wording
    # sent the caller to the operator for what only the issuer can change).
    assert platinum.json()["detail"] == (
        "plan 'platinum' (the token's plan claim) is not in the plan catalog; the token's "
        "issuer must name a known plan"
    )
    assert gateway.chat(signed(signing_key, plan="free"), "gpt-4").status_code == 403  # a model
    assert gateway.chat(signed(signing_key, plan="free")).status_code == 200


@pytest.fixture
def empty_redis(
    db: redis.Redis[str], redis_server: RedisServer, upstream: tuple[FakeUpstream, str]
) -> tuple[str, str]:
    """A flushed Redis: no controller has ticked (the README tour's order)."""
    return redis_server.url, upstream[1]


def test_before_the_first_tick_every_request_is_refused_not_configured(
    empty_redis: tuple[str, str], upstream: tuple[FakeUpstream, str]
) -> None:
    gateway = start_gateway(*empty_redis)
    try:
        key = gateway.key("acme", "free")
        seen = len(upstream[0].seen)
        answers = [gateway.chat(key, model) for model in ("gpt-4", "gpt-9")]
        assert [a.status_code for a in answers] == [503, 503]
        for answer in answers:
            assert answer.headers["content-type"] == PROBLEM
            assert answer.json()["type"].endswith(NOT_CONFIGURED)
            assert int(answer.headers["retry-after"]) >= 1
        assert len(upstream[0].seen) == seen
        assert requests_counted(gateway, "not_configured", "free") == 2
    finally:
        gateway.stop()


def test_with_plans_but_no_limits_only_a_fail_open_plan_is_served(
    empty_redis: tuple[str, str], policy_dir: Path
) -> None:
    # --policies: the plans (and their fail modes) are known, the controller wrote no limit.
    gateway = start_gateway(*empty_redis, policies=policy_dir)
    try:
        closed = gateway.chat(gateway.key("acme", "free"))
        assert closed.status_code == 503
        assert closed.json()["type"].endswith(NOT_CONFIGURED)
        # enterprise declares fail_mode: open: served under the local limiter, from the
        # plan's own rates (6 requests a minute), never unlimited.
        key = gateway.key("umbrella", "enterprise")
        codes = [gateway.chat(key).status_code for _ in range(7)]
        assert codes == [200] * 6 + [429]
        unknown = gateway.chat(gateway.key("acme", "platinum"))
        assert unknown.status_code == 403
    finally:
        gateway.stop()


def test_a_damaged_counter_refuses_even_a_fail_open_plan_naming_its_repair(
    gateway: Gateway, db: redis.Redis[str], upstream: tuple[FakeUpstream, str]
) -> None:
    CreditLedger(db, "governor").top_up("globex", 1.0, reason="test", actor="pytest")
    key = gateway.key("globex", "enterprise")  # fail_mode: open
    assert gateway.chat(key).status_code == 200
    state = EnforcementKeys.for_prefix("governor").tenant_level("globex").state
    db.hset(state, "g|requests_per_minute", "nan")  # Lua 5.1 reads it as a number
    seen = len(upstream[0].seen)

    answer = gateway.chat(key)

    # Redis answered: not an outage for the local limiter to serve, a count to repair.
    assert answer.status_code == 503
    problem = answer.json()
    assert problem["type"].endswith("/docs/gateway.md#corrupt-state")
    assert f"{state} field g|requests_per_minute holds 'nan'" in problem["detail"]
    repair = f"redis-cli HDEL {state} g|requests_per_minute l|requests_per_minute"
    assert repair in problem["detail"]
    assert "x-governor-fail-open" not in answer.headers
    assert len(upstream[0].seen) == seen
    assert requests_counted(gateway, "corrupt_state", "enterprise") == 1
