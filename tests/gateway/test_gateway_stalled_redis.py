"""A Redis that stalls (DEBUG SLEEP past the gateway's socket timeout) still runs the
admissions it had read once it wakes: what they reserved must come back when Redis answers,
not at the end of their lease ten minutes later (real redis-server, the real gateway app)."""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from controller.gateway.credits import CreditLedger
from tests.gateway.conftest import Gateway, start_gateway, write_limits
from tests.gateway.fake_upstream import FakeUpstream
from tests.support.prometheus import wait_for
from tests.support.redis import RedisServer

PLANS = """\
apiVersion: governor/v1
kind: Plan
metadata: {name: free}
spec:
  limits: {requests_per_minute: 600, tokens_per_day: 100000, concurrent_requests: 2}
---
apiVersion: governor/v1
kind: Plan
metadata: {name: enterprise}
spec:
  limits: {requests_per_minute: 600, tokens_per_day: 100000, concurrent_requests: 2}
  fail_mode: open
  credits: {min_balance_usd: 0}
---
apiVersion: governor/v1
kind: Limits
metadata: {name: global}
spec: {default_plan: free}
"""
BODY = {"model": "gpt-3.5-turbo", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]}
STALL_SECONDS = 2.5  # longer than the gateway's socket timeout (1 s in these tests)


@pytest.fixture
def stalling(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path / "redis", debug_command=True).start()
    (tmp_path / "policies").mkdir()
    (tmp_path / "policies" / "plans.yaml").write_text(PLANS)
    with server.client() as client:
        write_limits(client, "governor", tmp_path / "policies")
        CreditLedger(client, "governor").top_up("globex", 5.0, reason="test", actor="pytest")
    yield server
    server.stop()


def stall(server: RedisServer) -> threading.Thread:
    """DEBUG SLEEP from a thread: the server reads nothing meanwhile, then runs what came."""

    def sleep() -> None:
        with server.client() as client:
            client.execute_command("DEBUG", "SLEEP", str(STALL_SECONDS))

    thread = threading.Thread(target=sleep)
    thread.start()
    time.sleep(0.3)  # asleep by now
    return thread


def held_calls(gateway: Gateway) -> float:
    found = re.search(r"^gateway_held_store_calls (\S+)$", gateway.metrics(), re.M)
    assert found
    return float(found.group(1))


def holds(client: redis.Redis[str], tenant: str) -> dict[str, str]:
    """What the tenant's state holds for requests in flight: slots, tokens, settle records."""
    state = client.hgetall(f"governor:{{t:{tenant}}}:enforce")
    return {
        field: value
        for field, value in state.items()
        if field.startswith("x|") or (field.startswith(("c|", "v|")) and value != "0")
    }


@pytest.mark.parametrize(("tenant", "plan", "status"), [("acme", "free", 503),
                                                        ("globex", "enterprise", 200)])  # fmt: skip
def test_an_admission_redis_ran_after_the_timeout_gives_back_what_it_holds(
    stalling: RedisServer,
    upstream: tuple[FakeUpstream, str],
    tenant: str,
    plan: str,
    status: int,
) -> None:
    gateway = start_gateway(stalling.url, upstream[1], heartbeat_seconds=0.1)
    try:
        key = gateway.key(tenant, plan)
        assert gateway.chat(key).status_code == 200
        sleeper = stall(stalling)
        # Closed: 503; open: served by the local limiter. Either way the admit went out.
        answer = gateway.chat(key)
        assert answer.status_code == status, answer.text
        sleeper.join()
        with stalling.client() as client:
            wait_for(lambda: held_calls(gateway) == 0, "the held calls went through")
            assert holds(client, tenant) == {}
            assert client.zcard(f"governor:{{t:{tenant}}}:enforce:leases") == 0
            reserved = client.hget(f"governor:{{t:{tenant}}}:credits", "reserved")
            assert reserved in (None, "0")
        # Both slots free at once: two requests in flight are admitted.
        upstream[0].release.clear()
        try:
            with gateway.http.stream(
                "POST",
                f"{gateway.url}/v1/chat/completions",
                json={**BODY, "stream": True},
                headers={"authorization": f"Bearer {key}", "x-fake-hold": "1"},
            ) as first:
                assert first.status_code == 200
                assert gateway.chat(key).status_code == 200
                upstream[0].release.set()
        finally:
            upstream[0].release.set()
    finally:
        gateway.stop()
