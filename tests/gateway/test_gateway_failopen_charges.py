"""What a fail-open plan serves while Redis is away is charged once Redis is back: the daily
token budget and the credit ledger end exactly where they would have without the outage
(real redis-server stopped and started again on its data, the gateway running throughout)."""

from __future__ import annotations

import asyncio
import re
import threading
from dataclasses import replace
from pathlib import Path

import httpx
import pytest
from pydantic import SecretStr

from controller.clients.redis import aclose, connect_async, refused_this_call
from controller.contract.enforcement import EnforcementKeys
from controller.gateway.admission import Admission, AdmissionRequest, EnforcementError, TokensUsed
from controller.gateway.catalog import PlanCatalog
from controller.gateway.credits import CreditLedger
from controller.gateway.prices import PriceTable
from controller.settings import PricesSettings, RedisSettings
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
        # The two settles are held; an admission sent on a pooled connection the stopped Redis
        # closed went out unanswered, and its release is held too (it may have reserved).
        held = re.search(r"^gateway_held_store_calls (\d+)\.0$", gateway.metrics(), re.M)
        assert held is not None
        assert int(held.group(1)) in (2, 3, 4)

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


def test_a_charge_repeated_after_its_answer_was_lost_charges_once(
    tmp_path: Path, policies: Path
) -> None:
    """Redis stalled past the socket timeout (DEBUG SLEEP) runs the charge it had read once it
    wakes; the gateway, which saw a timeout, holds it and repeats it: the budget and the
    credits are charged once, not once per try."""
    server = RedisServer(tmp_path / "redis", debug_command=True).start()
    try:
        with server.client() as client:
            write_limits(client, "governor", policies)
            CreditLedger(client, "governor").top_up("globex", 5.0, reason="test", actor="pytest")
        served = AdmissionRequest("globex", "enterprise", None, None, MODEL, 40, "served-open")
        usage = TokensUsed(10, 20)

        async def charge_twice() -> list[str]:
            settings = RedisSettings(url=SecretStr(server.url), socket_timeout_seconds=0.5)
            client = connect_async(server.url, settings)
            prices = PriceTable.from_settings(PricesSettings())
            admission = Admission(client, "governor", prices, PlanCatalog(client, "governor"))
            tries = []
            sleeper = threading.Thread(target=stall, args=(server,))
            try:
                # Another request first: loads the script, reads the limits.
                await admission.charge(replace(served, request_id="served-before"), usage)
                sleeper.start()
                await asyncio.sleep(0.3)  # asleep by now
                for _ in range(2):  # the first times out (and runs later), the retry answers
                    try:
                        await admission.charge(served, usage)
                        tries.append("answered")
                    except EnforcementError:
                        tries.append("timed out")
                        await asyncio.to_thread(sleeper.join)
            finally:
                await aclose(client)
            return tries

        assert asyncio.run(charge_twice()) == ["timed out", "answered"]
        prices = PriceTable.from_settings(PricesSettings())
        with server.client() as client:
            state = EnforcementKeys.for_prefix("governor").tenant_level("globex").state
            # Two requests' worth: the one before, and the repeated one once.
            assert int(client.hget(state, "u|tokens_per_day") or 0) == 2 * usage.total
            ledger = CreditLedger(client, "governor")
            cost = prices.cost(MODEL, usage.prompt, usage.completion)
            assert ledger.state("globex").balance_usd == pytest.approx(5.0 - 2 * cost, abs=1e-5)
    finally:
        server.stop()


def stall(server: RedisServer) -> None:
    with server.client() as client:
        client.execute_command("DEBUG", "SLEEP", "1.5")


def test_a_charge_refused_by_a_full_redis_says_so_not_a_damaged_balance(
    tmp_path: Path, policies: Path
) -> None:
    """Redis at maxmemory (noeviction) refuses the charge's first write: the error is the
    server's OOM, a whole-server refusal that ends the held calls' pass, never 'balance holds
    what no script writes' with a repair command for a balance that is fine."""
    server = RedisServer(tmp_path / "redis").start()
    try:
        with server.client() as client:
            write_limits(client, "governor", policies)
            CreditLedger(client, "governor").top_up("globex", 5.0, reason="test", actor="pytest")
        served = AdmissionRequest("globex", "enterprise", None, None, MODEL, 40, "served-open")

        async def charge() -> BaseException | None:
            settings = RedisSettings(url=SecretStr(server.url))
            client = connect_async(server.url, settings)
            prices = PriceTable.from_settings(PricesSettings())
            admission = Admission(client, "governor", prices, PlanCatalog(client, "governor"))
            try:
                # Another request first, while Redis has room: the limits are read and kept.
                await admission.charge(replace(served, request_id="before"), TokensUsed(1, 1))
                with server.client() as full:
                    full.config_set("maxmemory-policy", "noeviction")
                    full.config_set("maxmemory", 1)
                await admission.charge(served, TokensUsed(10, 20))
            except EnforcementError as exc:
                return exc
            finally:
                await aclose(client)
            return None

        refused = asyncio.run(charge())
        prices = PriceTable.from_settings(PricesSettings())
        assert refused is not None
        assert "maxmemory" in str(refused)
        assert "holds what no script writes" not in str(refused)
        assert not refused_this_call(refused)  # the whole server: the pass stops
        with server.client() as client:
            client.config_set("maxmemory", 0)
            before = prices.cost(MODEL, 1, 1)
            balance = CreditLedger(client, "governor").state("globex").balance_usd
            assert balance == pytest.approx(5.0 - before, abs=1e-5)  # nothing half-applied
    finally:
        server.stop()
