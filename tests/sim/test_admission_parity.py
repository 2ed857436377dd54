"""The simulator's admission model answers like the real Lua scripts: the same request
sequence, fed to admit.lua/settle.lua on a real redis-server and to the model at the same
(Redis server) time, gets the same outcome and the same `denied_by` every time."""

from __future__ import annotations

import random
import time
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
    lease_ms: int = LEASE_MS  # the model's own is its lease_ms: give both the same
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
            rid, tokens, (str(self.lease_ms), str(RECORD_MS), model), credits
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

    def shares(self) -> tuple[dict[str, float], dict[str, float]]:
        """The global level's shared concurrency as Redis and the model hold it: the slots
        taken, the active weight `a`, each owner's requests in flight and joined weight."""

        def kept(name: str) -> bool:
            return name in ("a", "c|concurrent_requests") or name[:2] in ("o|", "q|")

        real = self.db.hgetall(self.keys.global_level().state)
        mine = self.model.levels["g"].fields
        return (
            {k: float(v) for k, v in real.items() if kept(k)},
            {k: v for k, v in mine.items() if kept(k)},
        )

    def check_shares(self) -> None:
        real, mine = self.shares()
        assert real == mine, f"global level: real (Lua) {real} vs model {mine}"


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


# --- global/concurrent_requests shared by weight (global/concurrent_headroom) -----------------


def test_a_tenant_within_its_weighted_share_takes_the_headroom(both: Both) -> None:
    both.limits({"global/concurrent_requests": 4, "global/concurrent_headroom": 0.5})
    alone = [both.admit("a", "free", 10) for _ in range(5)]
    # Alone, its share is the whole limit: the headroom is never its to take.
    assert [o for o, _ in alone] == ["allow"] * 4 + ["rate_limited"]
    # b's share is 4 × 1/2 = 2: both within it, over the limit (6 = 4 × 1.5); its third is not.
    assert [both.admit("b", "free", 10)[0] for _ in range(3)] == ["allow"] * 2 + ["rate_limited"]
    assert both.admit("c", "free", 10)[0] == "rate_limited"  # within its share; 6 in flight
    both.check_shares()
    first = alone[0][1]
    assert first is not None
    both.settle(first, "a", 10)  # a slot frees: c, within its share, takes it
    assert both.admit("c", "free", 10)[0] == "allow"
    assert both.admit("a", "free", 10)[0] == "rate_limited"  # a is beyond its share (4 / 3)
    both.check_shares()
    both.check()


def test_the_shares_follow_plan_and_tenant_weights(both: Both) -> None:
    both.limits(
        {
            "global/concurrent_requests": 12,
            "global/concurrent_headroom": 0.5,
            "plan/paid/concurrent_weight": 3,
            "plan/gold/concurrent_weight": 2,
            "tenant/vip/concurrent_weight": 5,  # its own weight before its plan's (free: 1)
            "tenant/thin/concurrent_weight": 0.5,  # its own before gold's 2
        }
    )
    held = [both.admit("a", "free", 10) for _ in range(12)]
    assert all(o == "allow" for o, _ in held)
    # paid (weight 3) beside a (1): its share is 12 × 3/4 = 9; the headroom (6) runs out first.
    assert [both.admit("b", "paid", 10)[0] for _ in range(7)] == ["allow"] * 6 + ["rate_limited"]
    assert both.admit("vip", "free", 10)[0] == "rate_limited"  # the headroom is spent
    both.check_shares()
    for _, rid in held[:5]:  # a gives back five slots: 13 in flight, 18 at most
        assert rid is not None
        both.settle(rid, "a", 10)
    got = [both.admit(t, p, 10)[0] for t, p in [("thin", "gold"), ("g", "gold"), ("vip", "free")]]
    assert got == ["allow"] * 3
    # Weights in flight 1 + 3 + 0.5 + 2 + 5: thin's share 12 × 0.5/11.5 < 2: its second
    # meets the plain limit (16 in flight), as does a's; vip, within its (5.2), takes the rest.
    assert both.admit("thin", "gold", 10)[0] == "rate_limited"
    assert both.admit("a", "free", 10)[0] == "rate_limited"
    assert [both.admit("vip", "free", 10)[0] for _ in range(3)] == ["allow"] * 2 + ["rate_limited"]
    both.check_shares()
    both.check()


def test_settles_give_the_shares_back(both: Both) -> None:
    both.limits(
        {
            "global/concurrent_requests": 6,
            "global/concurrent_headroom": 1,
            "plan/paid/concurrent_weight": 2,
            "tenant/acme/concurrent_requests": 5,  # a tenant level's own concurrency, unshared
        }
    )
    acme = [both.admit("acme", "paid", 10) for _ in range(6)]
    assert [o for o, _ in acme] == ["allow"] * 5 + ["rate_limited"]
    other = [both.admit("other", "free", 10) for _ in range(4)]
    assert [o for o, _ in other] == ["allow"] * 2 + ["rate_limited"] * 2  # share 6 × 1/3 = 2
    both.check_shares()
    for tenant, held in (("acme", acme), ("other", other)):  # all back: no weight active
        for _, rid in held:
            if rid is not None:
                both.settle(rid, tenant, 10)
    real, mine = both.shares()
    assert real == mine
    assert real["a"] == 0
    assert not any(k[:2] in ("o|", "q|") for k in real)
    for _, rid in acme:  # settled already: nothing more goes back
        if rid is not None:
            both.settle(rid, "acme", 10)
    assert [both.admit("other", "free", 10)[0] for _ in range(7)] == ["allow"] * 6 + [
        "rate_limited"
    ]
    both.check_shares()
    both.check()


def test_an_expired_lease_gives_the_share_back(db: redis.Redis[str]) -> None:
    lease_ms = 200
    both = Both(db, AdmissionModel(lease_ms=lease_ms), lease_ms=lease_ms)
    both.limits({"global/concurrent_requests": 2, "global/concurrent_headroom": 0.5})
    crashed = [both.admit("crashed", "free", 10) for _ in range(2)]
    assert [both.admit(t, "free", 10)[0] for t in ("quiet", "late")] == ["allow", "rate_limited"]
    both.check_shares()
    time.sleep((lease_ms + 150) / 1000)  # their gateway is gone: the next call sweeps the leases
    assert [both.admit("late", "free", 10)[0] for _ in range(3)] == ["allow"] * 2 + ["rate_limited"]
    real, mine = both.shares()
    assert real == mine
    assert "o|tenant/crashed/" not in real
    assert real["a"] == 1.0
    for _, rid in crashed:  # settled after the sweep: the record remains, the slot is not held
        assert rid is not None
        both.settle(rid, "crashed", 10)
    assert both.admit("late", "free", 10)[0] == "rate_limited"
    both.check_shares()
    both.check()


def test_a_share_needs_the_plain_global_limit_and_headroom(both: Both) -> None:
    both.limits(
        {
            "global/concurrent_requests@gpt-4": 2,  # the model's own: the plain one is not met
            "global/concurrent_requests": 2,
            "global/concurrent_headroom": 1,
            "plan/paid/concurrent_weight": 4,
        }
    )
    scoped = [both.admit(t, "paid", 10, model="gpt-4")[0] for t in ("a", "a", "b")]
    assert scoped == ["allow", "allow", "rate_limited"]  # no share: b meets the limit
    plain = [both.admit(t, "paid", 10)[0] for t in ("c", "c", "d", "d", "d")]
    assert plain == ["allow"] * 3 + ["rate_limited"] * 2  # d's share is 1: the headroom once
    both.limits({"global/concurrent_headroom": None})  # gone: the plain limit for everyone
    assert both.admit("e", "paid", 10)[0] == "rate_limited"
    both.check_shares()
    both.check()


def test_a_newcomer_and_a_weight_raised_in_flight_alike(both: Both) -> None:
    both.limits({"global/concurrent_requests": 10, "global/concurrent_headroom": 0.05})
    for i in range(10):
        assert both.admit(f"t{i}", "free", 10)[0] == "allow"
    # Its share is 10/11 < 1 and 5% is half a request: nothing in flight, it gets one in.
    assert [both.admit("new", "free", 10)[0] for _ in range(2)] == ["allow", "rate_limited"]
    both.limits({"global/concurrent_requests": 10, "global/concurrent_headroom": 0.2,
                 "tenant/t0/concurrent_weight": 30})  # fmt: skip
    # t0 joined at 1: now 30 of 40 in flight, its share 7.5, within: the headroom's last one.
    assert [both.admit("t0", "free", 10)[0] for _ in range(2)] == ["allow", "rate_limited"]
    both.check_shares()
    assert both.shares()[0]["a"] == 40.0
    both.check()


def test_weights_inexact_in_binary_leave_an_exact_share_exact(both: Both) -> None:
    # Weights 0.7, 0.8, 0.1, 0.3 joining and leaving: the active weight comes back to exactly
    # 2, so a's share is exactly 10 × 1/2 = 5 and its 5th request takes the headroom. (When
    # unshare subtracted with HINCRBYFLOAT, a long double, `a` stayed 2.0000000000000004 and
    # the 5th was refused.)
    both.limits({
        "global/concurrent_requests": 10, "global/concurrent_headroom": 0.5,
        "tenant/b/concurrent_weight": 0.7, "tenant/c/concurrent_weight": 0.8,
        "tenant/d/concurrent_weight": 0.1, "tenant/e/concurrent_weight": 0.3,
    })  # fmt: skip
    first = {t: both.admit(t, "free", 10) for t in "abdec"}
    assert all(outcome == "allow" for outcome, _ in first.values())
    for tenant in "dc":
        rid = first[tenant][1]
        assert rid is not None
        both.settle(rid, tenant, 10)
    for tenant in "aaabbee":
        assert both.admit(tenant, "free", 10)[0] == "allow"
    real, mine = both.shares()
    assert real["a"] == mine["a"] == 2.0
    assert both.admit("a", "free", 10)[0] == "allow"  # its 5th, within 5: the headroom
    both.check_shares()
    both.check()


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_a_random_mix_of_shared_admits_and_settles(both: Both, seed: int) -> None:
    """Tenants of several plans and weights, some with limits of their own, admitted and
    settled at random; the headroom changed and removed midway (reservations admitted under
    a share still give it back)."""
    rng = random.Random(seed)
    limits: dict[str, float | None] = {
        "global/concurrent_requests": 8,
        "global/concurrent_headroom": 0.5,
        "plan/paid/concurrent_weight": 2,
        "plan/gold/concurrent_weight": 4,
        "tenant/t1/concurrent_weight": 0.5,
        "tenant/t4/concurrent_weight": 1.5,
        "tenant/t2/concurrent_requests": 3,
        "plan/gold/requests_per_minute": 400,
    }
    both.limits(limits)
    tenants = [("t0", "free"), ("t1", "paid"), ("t2", "paid"), ("t3", "gold"), ("t4", "gold")]
    open_: list[tuple[str, str]] = []
    peak = 0.0  # the most requests in flight at once
    for step in range(240):
        if step == 80:
            both.limits({"global/concurrent_headroom": 1})
        elif step == 160:
            both.limits({"global/concurrent_headroom": None})
        elif step == 200:
            both.limits({"global/concurrent_headroom": 0.25})
        if open_ and rng.random() < 0.4:
            done, owner = open_.pop(rng.randrange(len(open_)))
            both.settle(done, owner, rng.randint(1, 20))
        else:
            tenant, plan = rng.choice(tenants)
            outcome, rid = both.admit(tenant, plan, rng.randint(1, 20))
            if outcome == "allow" and rid is not None:
                open_.append((rid, tenant))
        real, mine = both.shares()
        assert real == mine, f"step {step}: real (Lua) {real} vs model {mine}"
        peak = max(peak, real.get("c|concurrent_requests", 0.0))
    assert peak > 8  # the headroom was taken
    outcomes = {m[0] for _, m in both.answers}
    assert {"allow", "rate_limited"} <= outcomes  # the sequence met the limit
    both.check()
