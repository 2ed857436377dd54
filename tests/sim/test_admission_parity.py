"""The simulator's admission model answers like the real Lua scripts: the same request
sequence, fed to admit.lua/settle.lua on a real redis-server and to the model at the same
(Redis server) time, gets the same outcome and the same `denied_by` every time."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
import redis

from controller.changes import Change
from controller.clients.scripts import ADMIT, SETTLE
from controller.contract.enforcement import EnforcementKeys
from controller.contract.keys import KeySchema
from controller.gateway.limits import read_limits
from controller.model import Address
from controller.sim.admission import AdmissionModel
from controller.sinks.redis import RedisSink

PREFIX = "governor"
LEASE_MS, RECORD_MS = 600_000, 3_600_000


@dataclass
class Both:
    """Sends each call to the real scripts and to the model; keeps both answers."""

    db: redis.Redis[str]
    model: AdmissionModel = field(default_factory=AdmissionModel)
    keys: EnforcementKeys = field(default_factory=lambda: EnforcementKeys.for_prefix(PREFIX))
    answers: list[tuple[tuple[str, str], tuple[str, str]]] = field(default_factory=list)
    _rid: int = 0

    def limits(self, values: dict[str, float | None]) -> None:
        """Write limits as the controller does (RedisSink), give the model what Redis holds."""
        sink = RedisSink(self.db, KeySchema(PREFIX))
        state = sink.read()
        changes = [
            Change(
                Address.parse(a),
                state.actual.get(Address.parse(a)),
                None if v is None else float(v),
            )
            for a, v in values.items()
        ]
        sink.apply(changes)
        self.model.load(sink.read().actual)

    def now_ms(self) -> float:
        seconds, micros = self.db.time()
        return float(seconds) * 1000 + float(micros) / 1000

    def admit(
        self,
        tenant: str,
        plan: str,
        tokens: int,
        *,
        model: str = "",
        user: str = "",
        ip: str = "",
        credit: int | None = None,
        floor: int = 0,
    ) -> tuple[str, str | None]:
        self._rid += 1
        rid = f"r{self._rid}"
        # The limits as a gateway resolves them (read now: the model has just been given them).
        limits = read_limits(self.db, self.keys, tenant, plan, user, bool(ip), model)
        credits = () if credit is None else (str(credit), str(floor))
        args, fixed, tail = limits.argv(
            rid, tokens, (str(LEASE_MS), str(RECORD_MS), model), credits
        )
        now = self.now_ms()
        reply = ADMIT.run_sync(
            self.db, self.keys.admit_keys(tenant, user, ip), (*args, *fixed, *tail)
        )
        verdict = limits.verdict(tokens)
        denied_by = verdict[1] if verdict else limits.address(int(reply[1]), tenant) or ""
        mine = self.model.admit(
            rid=rid,
            tokens=tokens,
            tenant=tenant,
            plan=plan,
            now=now,
            model=model,
            user=user,
            ip=ip,
            credit_cost=None if credit is None else float(credit),
            credit_floor=float(floor),
        )
        real = (reply[0], denied_by)
        self.answers.append((real, (mine.outcome, mine.denied_by or "")))
        return mine.outcome, mine.reservation

    def settle(self, rid: str, tenant: str, actual: int, cost: int = 0, *, ip: str = "") -> None:
        now = self.now_ms()
        keys = self.keys.settle_keys(tenant, None, ip)
        real = SETTLE.run_sync(self.db, keys, (rid, actual, cost, "", 100, "", ""))
        mine = self.model.settle(rid, tenant, float(actual), float(cost), now)
        self.answers.append(((f"settled={real}", ""), (f"settled={int(mine)}", "")))

    def check(self) -> None:
        mismatches = [(i, r, m) for i, (r, m) in enumerate(self.answers) if r != m]
        assert not mismatches, f"real (Lua) vs model differ: {mismatches}"


@pytest.fixture
def both(db: redis.Redis[str]) -> Both:
    return Both(db)


def test_request_and_token_rates_with_refunds(both: Both) -> None:
    both.limits(
        {
            "global/requests_per_second": 1000,
            "plan/paid/requests_per_minute": 5,
            "plan/paid/tokens_per_minute": 3000,
            "plan/paid/max_tokens_per_request": 2500,
        }
    )
    outcomes = [both.admit("acme", "paid", 100)[0] for _ in range(7)]
    assert outcomes == ["allow"] * 5 + ["rate_limited"] * 2
    assert both.admit("big", "paid", 2600)[0] == "too_large"
    first = both.admit("big", "paid", 2000)
    assert first[0] == "allow"
    assert first[1] is not None
    assert both.admit("big", "paid", 2000)[0] == "rate_limited"  # tokens_per_minute
    both.settle(first[1], "big", 500)  # 1,500 unused tokens flow back
    assert both.admit("big", "paid", 2000)[0] == "allow"
    both.check()


def test_daily_budget_reserve_and_settle(both: Both) -> None:
    both.limits({"plan/free/tokens_per_day": 1000, "plan/free/requests_per_minute": 100})
    first = both.admit("kid", "free", 400)
    assert both.admit("kid", "free", 400)[0] == "allow"
    assert both.admit("kid", "free", 400)[0] == "budget_exhausted"
    assert first[1] is not None
    both.settle(first[1], "kid", 100)  # used 100, 400 still held: 500 left
    assert both.admit("kid", "free", 400)[0] == "allow"
    assert both.admit("kid", "free", 200)[0] == "budget_exhausted"
    both.check()


def test_concurrency_tenant_over_plan_and_shed(both: Both) -> None:
    both.limits(
        {
            "plan/enterprise/concurrent_requests": 200,
            "tenant/ent1/concurrent_requests": 2,
            "plan/shedme/requests_per_minute": 0,
            "tenant/ent2/requests_per_minute": 0,
        }
    )
    first = both.admit("ent1", "enterprise", 10)
    assert both.admit("ent1", "enterprise", 10)[0] == "allow"
    assert both.admit("ent1", "enterprise", 10)[0] == "rate_limited"
    assert first[1] is not None
    both.settle(first[1], "ent1", 10)
    assert both.admit("ent1", "enterprise", 10)[0] == "allow"
    assert both.admit("other", "shedme", 10)[0] == "shed"
    assert both.admit("ent2", "enterprise", 10)[0] == "shed"  # a 0 anywhere sheds
    both.settle("never-issued", "ent1", 10)
    both.check()


def test_credits_model_ip_and_user_levels(both: Both) -> None:
    both.db.hset(both.keys.credits("rich"), "balance", 1000)
    both.model.set_balance("rich", 1000.0)
    both.limits(
        {
            "ip/requests_per_minute": 3,
            "plan/pro/requests_per_minute": 100,
            "tenant/acme/requests_per_minute@gpt-4": 1,
            "user/acme/u1/requests_per_minute": 2,
        }
    )
    first = both.admit("rich", "pro", 10, credit=400)
    assert both.admit("rich", "pro", 10, credit=400)[0] == "allow"
    assert both.admit("rich", "pro", 10, credit=400)[0] == "budget_exhausted"
    assert first[1] is not None
    both.settle(first[1], "rich", 10, cost=100)  # balance 900, 400 held: 500 available
    assert both.admit("rich", "pro", 10, credit=400)[0] == "allow"
    assert both.admit("acme", "pro", 10, model="gpt-4")[0] == "allow"
    assert both.admit("acme", "pro", 10, model="gpt-4")[0] == "rate_limited"
    assert both.admit("acme", "pro", 10, model="gpt-3.5-turbo")[0] == "allow"
    users = [both.admit("acme", "pro", 10, user="u1")[0] for _ in range(3)]
    assert users == ["allow", "allow", "rate_limited"]
    ips = [both.admit(f"t{i}", "pro", 10, ip="10.0.0.1")[0] for i in range(4)]
    assert ips == ["allow"] * 3 + ["rate_limited"]
    both.check()


def test_a_changed_limit_rescales_the_backlog(both: Both) -> None:
    both.limits({"plan/pro/requests_per_minute": 10})
    assert [both.admit("acme", "pro", 1)[0] for _ in range(8)] == ["allow"] * 8
    both.limits({"plan/pro/requests_per_minute": 4})  # 8 of 10 used: full at 4
    assert both.admit("acme", "pro", 1)[0] == "rate_limited"
    both.limits({"plan/pro/requests_per_minute": 20})  # the backlog keeps its 8 requests
    assert [both.admit("acme", "pro", 1)[0] for _ in range(13)] == ["allow"] * 12 + ["rate_limited"]
    both.check()
