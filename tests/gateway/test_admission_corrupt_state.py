"""Counters edited by hand: a state field no script writes is refused by name, never served.

Redis 7's Lua 5.1 reads 'nan', 'inf' and '1e400' as numbers (C's strtod) and they compare
false both ways, so before this every check passed; 'abc' stopped the script, which the
gateway took for a store outage (a fail-open plan was served). A DECR below 0 handed out
tokens or slots.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Mapping

import pytest
import redis

from controller.clients.scripts import EnforcementError
from controller.contract.catalog import Credits, PlanInfo
from controller.contract.enforcement import EnforcementKeys
from controller.gateway.admission import Admission, AdmissionRequest, AdmissionResult
from controller.gateway.credits import CreditLedger
from tests.gateway.conftest import Gate

SetLimits = Callable[[Mapping[str, float]], None]
KEYS = EnforcementKeys.for_prefix("governor")
STATE = KEYS.tenant_level("acme").state


def request(tokens: int = 10, plan: str = "free") -> AdmissionRequest:
    return AdmissionRequest("acme", plan, None, None, None, tokens, uuid.uuid4().hex)


def admit(gate: Gate, *requests: AdmissionRequest) -> list[AdmissionResult]:
    async def body(admission: Admission) -> list[AdmissionResult]:
        return [await admission.admit(r) for r in requests]

    return gate.run(body)


# (the limit written, the state field broken, what it is set to)
BROKEN = [
    ("tokens_per_day", "u|tokens_per_day", "nan"),
    ("tokens_per_day", "u|tokens_per_day", "-inf"),
    ("tokens_per_day", "u|tokens_per_day", "-5"),  # a DECR: settled usage is never below 0
    ("tokens_per_day", "u|tokens_per_day", "abc"),
    ("tokens_per_day", "v|tokens_per_day", "nan"),
    ("tokens_per_day", "d|tokens_per_day", "inf"),
    ("requests_per_minute", "g|requests_per_minute", "nan"),
    ("requests_per_minute", "g|requests_per_minute", "abc"),
    ("requests_per_minute", "l|requests_per_minute", "nan"),
    ("requests_per_minute", "l|requests_per_minute", "0"),
    ("concurrent_requests", "c|concurrent_requests", "-inf"),
    ("concurrent_requests", "c|concurrent_requests", "1e400"),
]


@pytest.mark.parametrize(("limit", "field", "value"), BROKEN)
def test_a_counter_no_script_writes_is_refused_naming_its_key_field_and_repair(
    gate: Gate, db: redis.Redis[str], set_limits: SetLimits, limit: str, field: str, value: str
) -> None:
    set_limits({f"plan/free/{limit}": 1000})
    assert admit(gate, request())[0].outcome == "allow"
    db.hset(STATE, field, value)
    before = db.hgetall(STATE)

    refused = admit(gate, request())[0]

    assert refused.outcome == "corrupt_state"
    assert refused.reservation is None
    assert refused.damage is not None
    assert f"{STATE} field {field} holds {value!r}" in refused.damage
    assert "redis-cli H" in refused.damage  # the repair, as a command to run
    assert db.hgetall(STATE) == before  # nothing reserved, nothing rewritten over it


def test_the_repair_it_names_lets_traffic_through_again(
    gate: Gate, db: redis.Redis[str], set_limits: SetLimits
) -> None:
    set_limits({"plan/free/tokens_per_day": 1000})
    admit(gate, request())
    db.hset(STATE, "u|tokens_per_day", "nan")
    damage = admit(gate, request())[0].damage or ""
    command = damage.split("(redis-cli HDEL ", 1)[1].split(")", 1)[0].split()
    assert command == [STATE, "d|tokens_per_day", "u|tokens_per_day"]
    db.hdel(command[0], *command[1:])
    assert admit(gate, request())[0].outcome == "allow"


def test_hold_counters_below_zero_never_give_headroom(
    gate: Gate, db: redis.Redis[str], set_limits: SetLimits
) -> None:
    set_limits({"plan/free/concurrent_requests": 2, "plan/free/tokens_per_day": 100})
    db.hset(STATE, mapping={"c|concurrent_requests": "-5", "v|tokens_per_day": "-1000"})
    # Below 0 reads as 0 (releases can outrun a count deleted by its repair): 2 slots, not 7;
    # 100 tokens, not 1100.
    slots = admit(gate, *[request(1) for _ in range(3)])
    assert [r.outcome for r in slots] == ["allow", "allow", "rate_limited"]
    db.hset(STATE, "c|concurrent_requests", "0")
    budget = admit(gate, request(60), request(60))
    assert [r.outcome for r in budget] == ["allow", "budget_exhausted"]


def test_settle_leaves_a_broken_count_alone_and_releases_the_rest(
    gate: Gate, db: redis.Redis[str], set_limits: SetLimits
) -> None:
    set_limits({"plan/free/tokens_per_day": 1000, "plan/free/concurrent_requests": 5})
    held = admit(gate, request(100))[0]
    assert held.reservation is not None
    db.hset(STATE, "u|tokens_per_day", "abc")

    async def body(admission: Admission) -> bool:
        assert held.reservation is not None
        return await admission.settle(held.reservation, "acme", 40, None)

    assert gate.run(body)  # no script error halfway (its earlier writes would be kept)
    state = db.hgetall(STATE)
    assert state["u|tokens_per_day"] == "abc"  # not overwritten: not a repair by accident
    assert (state["v|tokens_per_day"], state["c|concurrent_requests"]) == ("0", "0")
    assert admit(gate, request())[0].outcome == "corrupt_state"


@pytest.fixture
def paid(gate: Gate, set_limits: SetLimits) -> Gate:
    gate.plans = {"paid": PlanInfo(credits=Credits(min_balance_usd=0.10))}
    set_limits({"tenant/someone-else/requests_per_minute": 5})
    return gate


@pytest.mark.parametrize(("field", "value"), [("balance", "nan"), ("balance", "inf")])
def test_a_credit_balance_no_script_writes_is_refused(
    paid: Gate, db: redis.Redis[str], field: str, value: str
) -> None:
    CreditLedger(db, "governor").top_up("acme", 1.0, "trial", "test")
    db.hset(KEYS.credits("acme"), field, value)
    refused = admit(paid, request(plan="paid"))[0]
    assert refused.outcome == "corrupt_state"
    assert f"{KEYS.credits('acme')} field {field}" in (refused.damage or "")
    assert "XREVRANGE" in (refused.damage or "")


def test_a_settle_on_a_broken_balance_fails_whole_and_is_repeatable(
    paid: Gate, db: redis.Redis[str]
) -> None:
    CreditLedger(db, "governor").top_up("acme", 1.0, "trial", "test")
    held = admit(paid, request(100, plan="paid"))[0]
    assert held.reservation is not None
    db.hset(KEYS.credits("acme"), "balance", "1.5")  # HINCRBY refuses a non-integer
    before = (db.hgetall(STATE), db.hgetall(KEYS.credits("acme")))

    async def settle(admission: Admission) -> bool:
        assert held.reservation is not None
        return await admission.settle(held.reservation, "acme", 50, "gpt-4")

    with pytest.raises(EnforcementError, match="field balance holds"):
        paid.run(settle)
    assert (db.hgetall(STATE), db.hgetall(KEYS.credits("acme"))) == before  # nothing written
    db.hset(KEYS.credits("acme"), "balance", "1000000")
    assert paid.run(settle)  # repaired: the held settle goes through


@pytest.mark.parametrize("broken", ["leases", "history"])
def test_a_settle_redis_refuses_halfway_charges_the_credits_once(
    paid: Gate, db: redis.Redis[str], broken: str
) -> None:
    """A key of the wrong type (a hand edit) the settle writes after the balance: the
    gateway repeats a refused settle on every heartbeat, so one written before the refusal
    is charged again each time."""
    CreditLedger(db, "governor").top_up("acme", 1.0, "trial", "test")
    held = admit(paid, request(100, plan="paid"))[0]
    assert held.reservation is not None
    key = KEYS.tenant_level("acme").leases if broken == "leases" else KEYS.credit_history("acme")
    saved = db.dump(key)
    db.delete(key)
    db.set(key, "a hand edit")
    balance = db.hget(KEYS.credits("acme"), "balance")

    async def settle(admission: Admission) -> bool:
        assert held.reservation is not None
        return await admission.settle(held.reservation, "acme", 50, "gpt-4")

    for _ in range(3):  # the gateway's retries while the key stays broken
        with pytest.raises(EnforcementError):
            paid.run(settle)
    assert db.hget(KEYS.credits("acme"), "balance") == balance  # nothing charged yet
    db.delete(key)
    assert saved is not None
    db.restore(key, 0, saved)
    assert paid.run(settle)  # repaired: charged once
    history = db.xrange(KEYS.credit_history("acme"))
    assert [entry["kind"] for _id, entry in history] == ["top-up", "charge"]
    charged = -int(history[-1][1]["amount_micro_usd"])
    assert int(db.hget(KEYS.credits("acme"), "balance") or 0) == int(balance or 0) - charged
