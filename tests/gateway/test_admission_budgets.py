"""Token budgets: reserve → settle, no overrun under concurrency, leases that end, degrade."""

from __future__ import annotations

import asyncio
import random
import uuid
from collections.abc import Callable, Mapping

import redis

from controller.contract.catalog import Degrade as DegradeSpec
from controller.contract.catalog import PlanInfo
from controller.contract.enforcement import EnforcementKeys
from controller.gateway.admission import Admission, AdmissionRequest, AdmissionResult
from tests.gateway.conftest import Gate, server_ms

SetLimits = Callable[[Mapping[str, float]], None]
BUDGET = 20_000
KEYS = EnforcementKeys.for_prefix("governor")


def request(tokens: int, model: str | None = None, user: str | None = None) -> AdmissionRequest:
    return AdmissionRequest("acme", "free", user, None, model, tokens, uuid.uuid4().hex)


def tenant_state(db: redis.Redis[str]) -> dict[str, str]:
    return db.hgetall(KEYS.tenant_level("acme").state)


def test_64_concurrent_clients_never_overrun_a_budget(
    gate: Gate, db: redis.Redis[str], set_limits: SetLimits
) -> None:
    set_limits({"plan/free/tokens_per_day": BUDGET})

    async def client(admission: Admission, seed: int) -> tuple[list[int], list[int], int]:
        rng = random.Random(seed)
        held, used, refused = [], [], 0
        while refused < 3:
            tokens = rng.randint(1, 600)
            result = await admission.admit(request(tokens))
            if result.outcome != "allow":
                assert result.outcome == "budget_exhausted"
                refused += 1
                continue
            assert result.reservation is not None
            held.append(tokens)
            if rng.random() < 0.5:  # half settle at once (a refund), half stay held
                actual = rng.randint(0, tokens)
                await admission.settle(result.reservation, "acme", actual, None)
                used.append(actual)
            else:
                used.append(-tokens)  # still held: counts in full
        return held, used, refused

    async def body(admission: Admission) -> list[tuple[list[int], list[int], int]]:
        return await asyncio.gather(*(client(admission, seed) for seed in range(64)))

    results = gate.run(body)
    charged = sum(abs(n) for _, used, _ in results for n in used)
    assert charged <= BUDGET  # overrun = 0
    assert charged > BUDGET - 600  # and the budget was really contested to its end
    state = tenant_state(db)
    settled = sum(n for _, used, _ in results for n in used if n >= 0)
    held = sum(-n for _, used, _ in results for n in used if n < 0)
    assert int(state["u|tokens_per_day"]) == settled
    assert int(state["v|tokens_per_day"]) == held


def test_settle_refunds_unused_tokens_and_charges_extra_ones(
    gate: Gate, db: redis.Redis[str], set_limits: SetLimits
) -> None:
    set_limits({"plan/free/tokens_per_day": 1000, "plan/free/tokens_per_minute": 1000})

    async def body(admission: Admission) -> list[AdmissionResult]:
        first = await admission.admit(request(400))
        assert first.reservation is not None
        assert await admission.settle(first.reservation, "acme", 100, None)
        assert not await admission.settle(first.reservation, "acme", 100, None)  # once only
        second = await admission.admit(request(100))
        assert second.reservation is not None
        await admission.settle(second.reservation, "acme", 300, None)  # used more than held
        third = await admission.admit(request(1))
        return [first, second, third]

    first, second, third = gate.run(body)
    assert first.budget is not None
    assert first.budget.remaining == 600
    assert second.budget is not None
    assert second.budget.remaining == 800
    assert third.budget is not None
    assert third.budget.remaining == 1000 - 400 - 1
    assert third.tokens is not None
    assert 597 <= third.tokens.remaining <= 599
    state = tenant_state(db)
    assert (state["u|tokens_per_day"], state["v|tokens_per_day"]) == ("400", "1")
    for settled in (first, second):  # neither a hold nor a settle record is left behind
        assert settled.reservation is not None
        request_id = settled.reservation.split("/")[0]
        assert not [name for name in state if name.endswith("|" + request_id)]


def test_release_refunds_everything(gate: Gate, set_limits: SetLimits) -> None:
    set_limits({"plan/free/tokens_per_day": 500})

    async def body(admission: Admission) -> list[str]:
        held = await admission.admit(request(500))
        refused = await admission.admit(request(1))
        assert held.reservation is not None
        await admission.release(held.reservation, "acme")
        again = await admission.admit(request(500))
        return [held.outcome, refused.outcome, again.outcome]

    assert gate.run(body) == ["allow", "budget_exhausted", "allow"]


def test_crashed_reservations_are_released_after_their_lease(
    gate: Gate, db: redis.Redis[str], set_limits: SetLimits
) -> None:
    set_limits({"plan/free/tokens_per_day": 1000, "plan/free/concurrent_requests": 1})
    gate.lease_seconds = 0.5

    async def crash(admission: Admission) -> list[AdmissionResult]:
        # A gateway admits and dies before settling.
        return [await admission.admit(request(n)) for n in (1000, 1)]

    held, refused = gate.run(crash)
    assert (held.outcome, refused.outcome) == ("allow", "budget_exhausted")
    assert refused.denied_by == "tenant/acme/tokens_per_day"
    assert refused.retry_after is not None
    assert refused.retry_after > 0
    admitted_at = server_ms(db)
    while server_ms(db) < admitted_at + 500:  # let the lease run out (server clock)
        pass

    async def later(admission: Admission) -> list[AdmissionResult]:
        after = await admission.admit(request(1000))
        assert after.reservation is not None
        assert held.reservation is not None
        # The dead gateway's settle, arriving late, still charges what was used.
        late = await admission.settle(held.reservation, "acme", 10, None)
        assert late
        return [after, await admission.admit(request(1))]

    after, over = gate.run(later)
    assert after.outcome == "allow"  # both the budget and the concurrency slot came back
    assert over.outcome == "budget_exhausted"  # 10 late + 1000 held
    state = tenant_state(db)
    assert (state["u|tokens_per_day"], state["v|tokens_per_day"]) == ("10", "1000")
    assert state["c|concurrent_requests"] == "1"


def test_per_model_budgets_and_the_402_answer(gate: Gate, set_limits: SetLimits) -> None:
    set_limits({"tenant/acme/tokens_per_day@gpt-4": 100, "plan/free/tokens_per_day": 10_000})

    async def body(admission: Admission) -> list[AdmissionResult]:
        return [
            await admission.admit(request(80, "gpt-4")),
            await admission.admit(request(30, "gpt-4")),
            await admission.admit(request(5000, "gpt-4o")),
        ]

    gpt4, refused, other = gate.run(body)
    assert gpt4.budget is not None
    assert gpt4.budget.address == "tenant/acme/tokens_per_day@gpt-4"
    assert refused.outcome == "budget_exhausted"
    assert refused.budget is not None
    assert refused.budget.remaining == 20
    assert refused.budget.limit == 100
    assert refused.budget.kind == "tokens"
    assert refused.budget.resets_at is not None
    assert refused.budget.resets_at % 86400 == 0
    assert other.outcome == "allow"
    assert other.budget is not None
    assert other.budget.address == "tenant/acme/tokens_per_day"


def test_degrade_once_a_budget_passes_the_plans_threshold(
    gate: Gate, set_limits: SetLimits
) -> None:
    set_limits({"plan/free/tokens_per_day": 1000})
    spec = DegradeSpec(at_percent=50, max_tokens=16, model="gpt-3.5-turbo")
    gate.plans = {"free": PlanInfo(degrade=spec)}

    async def body(admission: Admission) -> list[AdmissionResult]:
        return [await admission.admit(request(300, "gpt-4")) for _ in range(3)]

    first, second, third = gate.run(body)
    assert first.degrade is None  # 30 % spent
    assert second.degrade is not None  # 60 % spent
    assert (second.degrade.max_tokens, second.degrade.model) == (16, "gpt-3.5-turbo")
    assert "tenant/acme/tokens_per_day is 60% spent" in second.degrade.reason
    assert third.degrade is not None
    assert third.outcome == "allow"
