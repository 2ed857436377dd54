"""What a fail-open plan serves while Redis is away is charged once Redis is back: the daily
token budget and the credit ledger end exactly where they would have without the outage
(real redis-server stopped and started again on its data, the gateway running throughout)."""

from __future__ import annotations

import re
from pathlib import Path

import httpx
import pytest

from controller.contract.enforcement import EnforcementKeys
from controller.gateway.credits import CreditLedger
from controller.gateway.prices import PriceTable
from controller.settings import PricesSettings
from tests.gateway.conftest import start_gateway, write_limits
from tests.gateway.fake_upstream import FakeUpstream
from tests.support.prometheus import wait_for
from tests.support.redis import RedisServer

PLANS = """\
apiVersion: governor/v1
kind: Plan
metadata: {name: enterprise}
spec:
  limits: {requests_per_minute: 60, tokens_per_day: 100000}
  fail_mode: open
  credits: {min_balance_usd: 0}
---
apiVersion: governor/v1
kind: Limits
metadata: {name: global}
spec: {default_plan: enterprise}
"""
MODEL = "gpt-3.5-turbo"


@pytest.fixture
def policies(tmp_path: Path) -> Path:
    (tmp_path / "policies").mkdir()
    (tmp_path / "policies" / "plans.yaml").write_text(PLANS)
    return tmp_path / "policies"


def used(answer: httpx.Response) -> tuple[int, int]:
    usage = answer.json()["usage"]
    return int(usage["prompt_tokens"]), int(usage["completion_tokens"])


def test_usage_served_fail_open_is_charged_when_redis_returns(
    tmp_path: Path, upstream: tuple[FakeUpstream, str], policies: Path
) -> None:
    server = RedisServer(tmp_path / "redis", persistent=True).start()
    gateway = None
    try:
        with server.client() as client:
            write_limits(client, "governor", policies)
            CreditLedger(client, "governor").top_up("globex", 5.0, reason="test", actor="pytest")
        gateway = start_gateway(server.url, upstream[1], heartbeat_seconds=0.1)
        key = gateway.key("globex", "enterprise")
        before = gateway.chat(key, model=MODEL, max_tokens=20)  # admitted and settled by Redis
        assert before.status_code == 200

        server.stop()
        served = [gateway.chat(key, model=MODEL, max_tokens=20) for _ in range(2)]
        assert [a.headers.get("x-governor-fail-open") is not None for a in served] == [True] * 2
        assert re.search(r"^gateway_held_store_calls 2\.0$", gateway.metrics(), re.M)

        server.start()  # same port, same data
        wait_for(
            lambda: (
                re.search(r"^gateway_held_store_calls 0\.0$", gateway.metrics(), re.M) is not None
            ),
            "the held charges went through",
        )
    finally:
        if gateway is not None:
            gateway.stop()

    try:
        usages = [used(a) for a in (before, *served)]
        prices = PriceTable.from_settings(PricesSettings())
        cost = sum(prices.cost(MODEL, p, c) for p, c in usages)
        with server.client() as client:
            state = EnforcementKeys.for_prefix("governor").tenant_level("globex").state
            assert int(client.hget(state, "u|tokens_per_day") or 0) == sum(p + c for p, c in usages)
            ledger = CreditLedger(client, "governor")
            assert ledger.state("globex").balance_usd == pytest.approx(5.0 - cost, abs=1e-5)
            charges = [e for e in ledger.history("globex") if e.kind == "charge"]
        assert len(charges) == 3
        assert sum("fail-open" in e.reason for e in charges) == 2
    finally:
        server.stop()
