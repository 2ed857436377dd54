"""admit.lua against a real Redis: GCRA exactness, levels, per-model limits, shed, reloads."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Mapping

import redis

from controller.clients.scripts import ADMIT
from controller.contract.catalog import PlanInfo
from controller.contract.enforcement import EnforcementKeys
from controller.contract.keys import KeySchema
from controller.gateway.admission import Admission, AdmissionRequest, AdmissionResult
from controller.gateway.limits import resolve
from tests.gateway.conftest import Gate, server_ms

SetLimits = Callable[[Mapping[str, float]], None]
_ids = itertools.count()


def request(
    tokens: int = 10,
    *,
    tenant: str = "acme",
    user: str | None = None,
    ip: str | None = None,
    model: str | None = None,
) -> AdmissionRequest:
    return AdmissionRequest(tenant, "free", user, ip, model, tokens, f"req-{next(_ids)}")


def burst(gate: Gate, count: int, **kwargs: object) -> list[AdmissionResult]:
    async def body(admission: Admission) -> list[AdmissionResult]:
        return [await admission.admit(request(**kwargs)) for _ in range(count)]  # type: ignore[arg-type]

    return gate.run(body)


def outcomes(results: list[AdmissionResult]) -> list[str]:
    return [r.outcome for r in results]


def wait_for_server(db: redis.Redis[str], ready: Callable[[float], bool]) -> float:
    """Poll Redis server time until `ready(ms)`; return that time."""
    while True:
        now = server_ms(db)
        if ready(now):
            return now


def fixed_window(db: redis.Redis[str], limit: int) -> bool:
    """Kong's fixed window, for contrast: INCR the current second's counter."""
    second = int(server_ms(db) // 1000)
    key = f"kong:{second}"
    count = int(db.incr(key))
    db.expire(key, 2)
    return count <= limit


def test_gcra_admits_exactly_n_in_a_burst_across_a_window_boundary(
    gate: Gate, db: redis.Redis[str], set_limits: SetLimits
) -> None:
    set_limits({"plan/free/requests_per_second": 4})
    # The first burst lands in the last 150 ms of a second, the second one just after it.
    wait_for_server(db, lambda ms: ms % 1000 >= 850)
    first = burst(gate, 8)
    kong_first = [fixed_window(db, 4) for _ in range(8)]
    start = wait_for_server(db, lambda ms: ms % 1000 < 100)
    second = burst(gate, 8)
    kong_second = [fixed_window(db, 4) for _ in range(8)]
    elapsed = server_ms(db) - start
    assert elapsed < 250  # both bursts sit inside one emission interval (1 s / 4)
    assert outcomes(first) == ["allow"] * 4 + ["rate_limited"] * 4
    assert outcomes(second) == ["rate_limited"] * 8  # nothing refilled across the boundary
    assert sum(kong_first) + sum(kong_second) == 8  # a fixed window lets 2N through
    denied = second[0]
    assert denied.denied_by == "tenant/acme/requests_per_second"
    assert denied.retry_after is not None
    assert 0 < denied.retry_after <= 0.25
    assert denied.requests is not None
    assert denied.requests.remaining == 0


def test_a_burst_of_2n_admits_exactly_n_per_minute(gate: Gate, set_limits: SetLimits) -> None:
    set_limits({"plan/free/requests_per_minute": 10})
    results = burst(gate, 20)
    assert outcomes(results) == ["allow"] * 10 + ["rate_limited"] * 10
    quotas = [r.requests for r in results[:10]]
    assert [q.remaining for q in quotas if q] == list(range(9, -1, -1))
    last = results[-1]
    assert last.retry_after is not None
    assert 5.9 < last.retry_after <= 6.0
    assert last.requests is not None
    assert last.requests.window_seconds == 60


def test_every_level_applies_and_the_tightest_says_no(
    gate: Gate, db: redis.Redis[str], set_limits: SetLimits
) -> None:
    set_limits(
        {
            "global/requests_per_minute": 1000,
            "ip/requests_per_minute": 5,
            "plan/free/requests_per_minute": 100,
            "user/acme/alice/requests_per_minute": 3,
        }
    )
    alice = burst(gate, 4, user="alice", ip="10.0.0.1")
    assert outcomes(alice) == ["allow"] * 3 + ["rate_limited"]
    assert alice[-1].denied_by == "user/acme/alice/requests_per_minute"
    # Another user of the same tenant from the same ip: the ip level has 2 left.
    bob = burst(gate, 3, user="bob", ip="10.0.0.1")
    assert outcomes(bob) == ["allow"] * 2 + ["rate_limited"]
    assert bob[-1].denied_by == "ip/requests_per_minute"
    assert outcomes(burst(gate, 1, user="bob", ip="10.0.0.2")) == ["allow"]
    # IPv6 clients are counted by their /64: a host cannot rotate its way out.
    v6 = [burst(gate, 1, ip=f"2001:db8:0:1::{n:x}")[0] for n in range(6)]
    assert outcomes(v6) == ["allow"] * 5 + ["rate_limited"]


def test_a_tenant_limit_wins_over_its_plan(gate: Gate, set_limits: SetLimits) -> None:
    set_limits({"plan/free/requests_per_minute": 2, "tenant/acme/requests_per_minute": 4})
    assert outcomes(burst(gate, 5)) == ["allow"] * 4 + ["rate_limited"]
    assert outcomes(burst(gate, 3, tenant="other")) == ["allow"] * 2 + ["rate_limited"]


def test_per_model_limits_follow_the_lookup_rule(gate: Gate, set_limits: SetLimits) -> None:
    set_limits(
        {
            "plan/free/tokens_per_minute": 10_000,
            "plan/free/tokens_per_minute@gpt-4": 100,
            "tenant/acme/requests_per_minute@gpt-4o": 1,
        }
    )
    gpt4 = burst(gate, 3, tokens=40, model="gpt-4")
    assert outcomes(gpt4) == ["allow", "allow", "rate_limited"]
    assert gpt4[-1].denied_by == "tenant/acme/tokens_per_minute@gpt-4"
    assert gpt4[0].tokens is not None
    assert gpt4[0].tokens.remaining == 60
    # Larger than the model's whole per-minute allowance: it can never pass.
    assert burst(gate, 1, tokens=101, model="gpt-4")[0].outcome == "too_large"
    # Other models use the plain limit and their own counter.
    assert outcomes(burst(gate, 2, tokens=500, model="gpt-3.5-turbo")) == ["allow"] * 2
    assert outcomes(burst(gate, 2, model="gpt-4o")) == ["allow", "rate_limited"]


def test_a_model_is_limited_whatever_the_case_of_its_name(
    gate: Gate, db: redis.Redis[str], set_limits: SetLimits
) -> None:
    # Written as a policy names them (case and all); a request spelling the model otherwise
    # meets the same limit and the same counter instead of the plain limit.
    set_limits(
        {
            "plan/free/requests_per_minute": 1_000,
            "plan/free/requests_per_minute@GPT-4": 2,
            "tenant/acme/requests_per_minute@meta-llama/Llama-3.1-8B-Instruct": 1,
        }
    )
    spelled = [burst(gate, 1, model=m)[0] for m in ("gpt-4", "GPT-4", "Gpt-4")]
    assert outcomes(spelled) == ["allow", "allow", "rate_limited"]
    assert spelled[-1].denied_by == "tenant/acme/requests_per_minute@gpt-4"
    hf = [burst(gate, 1, model=m)[0] for m in ("meta-llama/Llama-3.1-8B-Instruct",
                                                "META-LLAMA/llama-3.1-8b-instruct")]  # fmt: skip
    assert outcomes(hf) == ["allow", "rate_limited"]
    assert hf[-1].denied_by == "tenant/acme/requests_per_minute@meta-llama/llama-3.1-8b-instruct"
    # One counter per model, kept under the lower-case name admit.lua was given.
    state = db.hgetall(EnforcementKeys(KeySchema("governor")).tenant_level("acme").state)
    assert "g|requests_per_minute@meta-llama/llama-3.1-8b-instruct" in state
    assert not [f for f in state if any(c.isupper() for c in f)]
    assert outcomes(burst(gate, 2, model="gpt-4o")) == ["allow"] * 2  # others: the plain limit


def test_a_limit_of_zero_anywhere_is_a_shed(gate: Gate, set_limits: SetLimits) -> None:
    set_limits({"plan/free/requests_per_minute": 0, "tenant/acme/requests_per_minute": 50})
    shed = burst(gate, 1)[0]
    assert shed.outcome == "shed"
    assert shed.denied_by == "plan/free/requests_per_minute"  # a tenant value does not escape
    assert shed.reservation is None
    assert shed.retry_after is None
    set_limits({"global/tokens_per_minute@gpt-4": 0})
    assert burst(gate, 1, model="gpt-4")[0].denied_by == "global/tokens_per_minute@gpt-4"
    assert burst(gate, 1, model="gpt-4o")[0].outcome == "allow"


def test_max_tokens_per_request_refuses_what_can_never_fit(
    gate: Gate, set_limits: SetLimits
) -> None:
    set_limits({"plan/free/max_tokens_per_request": 1000, "plan/free/requests_per_minute": 5})
    results = [burst(gate, 1, tokens=n)[0] for n in (1000, 1001, 999)]
    assert outcomes(results) == ["allow", "too_large", "allow"]
    assert results[1].denied_by == "tenant/acme/max_tokens_per_request"
    assert results[1].retry_after is None
    # A refused request consumed nothing: 2 of 5 requests are used.
    assert results[2].requests is not None
    assert results[2].requests.remaining == 3


def test_a_limit_changed_by_governor_takes_effect_on_the_next_request(
    gate: Gate, set_limits: SetLimits
) -> None:
    set_limits({"plan/free/requests_per_minute": 1})
    assert outcomes(burst(gate, 2)) == ["allow", "rate_limited"]
    set_limits({"plan/free/requests_per_minute": 1000})  # loosened: at once
    assert outcomes(burst(gate, 5)) == ["allow"] * 5
    set_limits({"plan/free/requests_per_minute": 6})  # tightened: 6 used of 6
    assert outcomes(burst(gate, 1)) == ["rate_limited"]
    set_limits({"plan/free/requests_per_minute": 6, "plan/free/max_tokens_per_request": 5})
    assert burst(gate, 1)[0].outcome == "too_large"


def test_concurrency_counts_open_reservations(gate: Gate, set_limits: SetLimits) -> None:
    set_limits({"tenant/acme/concurrent_requests": 2})

    async def body(admission: Admission) -> list[str]:
        first = await admission.admit(request())
        second = await admission.admit(request())
        third = await admission.admit(request())
        assert first.reservation is not None
        assert third.denied_by == "tenant/acme/concurrent_requests"
        await admission.settle(first.reservation, "acme", 5, None)
        fourth = await admission.admit(request())
        return [r.outcome for r in (first, second, third, fourth)]

    assert gate.run(body) == ["allow", "allow", "rate_limited", "allow"]


def test_the_edges_in_flight_limit_is_shared_by_every_tenant_and_given_back(
    gate: Gate, set_limits: SetLimits
) -> None:
    # The cascade's inner loop: `global/concurrent_requests` (set by the shipped AdaptiveLimit
    # once per sample) counts every tenant's open reservations; a settle or a release gives
    # a place back at once, between two of the controller's samples.
    set_limits({"global/concurrent_requests": 2})

    async def body(admission: Admission) -> list[str]:
        first = await admission.admit(request(tenant="acme"))
        second = await admission.admit(request(tenant="globex"))
        third = await admission.admit(request(tenant="initech"))
        assert first.reservation is not None
        assert second.reservation is not None
        assert third.denied_by == "global/concurrent_requests"
        await admission.settle(first.reservation, "acme", 5, None)
        fourth = await admission.admit(request(tenant="initech"))
        fifth = await admission.admit(request(tenant="acme"))
        assert fifth.denied_by == "global/concurrent_requests"
        await admission.release(second.reservation, "globex")
        sixth = await admission.admit(request(tenant="acme"))
        return [r.outcome for r in (first, second, third, fourth, fifth, sixth)]

    assert gate.run(body) == ["allow", "allow", "rate_limited", "allow", "rate_limited", "allow"]


def test_a_settle_that_keeps_the_slots_holds_every_level_until_its_release(
    gate: Gate, db: redis.Redis[str], set_limits: SetLimits
) -> None:
    # A background answer: its tokens settled, its generation going on. The slots at every
    # level (the edge's, shared by weight; the tenant's; the user's) stay held until its
    # release, which gives them back once; a repeat of the settle (its answer lost) keeps
    # them as they are.
    set_limits({"global/concurrent_requests": 1, "global/concurrent_headroom": 0.5,
                "tenant/acme/concurrent_requests": 2,
                "user/acme/alice/concurrent_requests": 1})  # fmt: skip
    keys = EnforcementKeys.for_prefix("governor")
    edge, tenant = keys.global_level(), keys.tenant_level("acme")
    user = keys.user_level("acme", "alice")

    async def body(admission: Admission) -> list[str]:
        first = await admission.admit(request(user="alice"))
        assert first.reservation is not None
        for _ in range(2):
            assert await admission.settle(first.reservation, "acme", 7, None, keep_slots=True)
        held = [db.hget(level.state, "c|concurrent_requests") for level in (edge, tenant, user)]
        assert held == ["1", "1", "1"]
        share = "o|tenant/acme/"  # its requests in flight at the edge (beyond its share now)
        assert db.hget(edge.state, share) == "1"
        second = await admission.admit(request(user="bob"))
        assert second.denied_by == "global/concurrent_requests"
        assert await admission.release(first.reservation, "acme")
        assert not await admission.release(first.reservation, "acme")  # once
        freed = [db.hget(level.state, "c|concurrent_requests") for level in (edge, tenant, user)]
        assert freed == ["0", "0", "0"]
        assert db.hget(edge.state, share) is None
        assert db.zcard(tenant.leases) == db.zcard(edge.leases) == db.zcard(user.leases) == 0
        third = await admission.admit(request(user="bob"))
        return [r.outcome for r in (first, second, third)]

    assert gate.run(body) == ["allow", "rate_limited", "allow"]


def test_scripts_are_reloaded_after_script_flush(
    gate: Gate, db: redis.Redis[str], set_limits: SetLimits
) -> None:
    set_limits({"plan/free/requests_per_minute": 3})

    async def body(admission: Admission) -> list[str]:
        await admission.load()
        first = await admission.admit(request())
        db.script_flush()
        assert db.execute_command("SCRIPT EXISTS", ADMIT.sha) == [0]
        second = await admission.admit(request())  # NOSCRIPT → SCRIPT LOAD → EVALSHA
        return [first.outcome, second.outcome]

    assert gate.run(body) == ["allow", "allow"]
    assert db.execute_command("SCRIPT EXISTS", ADMIT.sha) == [1]
    assert outcomes(burst(gate, 2)) == ["allow", "rate_limited"]  # state survived the flush


def test_nothing_written_yet_is_not_configured_and_reserves_nothing(
    gate: Gate, db: redis.Redis[str]
) -> None:
    # Before the controller's first write no limit is known: never "no limits, allow".
    result = burst(gate, 1, user="alice", ip="127.0.0.1")[0]
    assert (result.outcome, result.reservation) == ("not_configured", None)
    assert db.keys("governor:{t:acme}*") == []


def test_an_unknown_plan_is_refused_before_anything_is_reserved(
    gate: Gate, db: redis.Redis[str], set_limits: SetLimits
) -> None:
    set_limits({"plan/free/requests_per_minute": 5})
    gate.plans = {"paid": PlanInfo()}  # "free" is not in the catalog (removed, or a typo)
    result = burst(gate, 1)[0]
    assert (result.outcome, result.denied_by, result.reservation) == (
        "unknown_plan",
        "plan/free",
        None,
    )
    assert db.keys("governor:{t:acme}*") == []


def test_no_applicable_limits_admits_and_reports_no_quota(
    gate: Gate, set_limits: SetLimits
) -> None:
    set_limits({"tenant/someone-else/requests_per_minute": 5})  # written: a version exists
    result = burst(gate, 1, user="alice", ip="127.0.0.1")[0]
    assert result.outcome == "allow"
    assert (result.requests, result.tokens, result.budget) == (None, None, None)
    assert result.reservation is not None
    assert result.reservation.endswith("/alice/127.0.0.1")


def test_limits_are_kept_by_version_and_read_again_when_it_moves(
    gate: Gate, db: redis.Redis[str], set_limits: SetLimits
) -> None:
    set_limits({"plan/free/requests_per_minute": 1})

    async def body(admission: Admission) -> list[str]:
        first = await admission.admit(request())
        # Written by hand, no version bump: this gateway keeps what it resolved.
        db.hset("governor:limits:plan:free", "requests_per_minute", "100")
        kept = await admission.admit(request())
        db.incr("governor:version")  # what every apply of the controller does
        moved = await admission.admit(request())  # 'stale', read again, repeated
        # Without a bump, a resolution is read again once it is older than the maximum age.
        db.hset("governor:limits:plan:free", "requests_per_minute", "0")
        admission.limits.max_age_seconds = 0.0
        aged = await admission.admit(request())
        return [first.outcome, kept.outcome, moved.outcome, aged.outcome]

    assert gate.run(body) == ["allow", "rate_limited", "allow", "shed"]


def test_past_its_bound_the_cache_drops_its_oldest_resolution_only(
    gate: Gate, db: redis.Redis[str], set_limits: SetLimits
) -> None:
    set_limits({"plan/free/requests_per_minute": 100})

    def reads() -> int:
        # GETs of the version: admit.lua makes one per call, a resolution read one more.
        return int(db.info("commandstats").get("cmdstat_get", {}).get("calls", 0))

    async def body(admission: Admission) -> list[int]:
        admission.limits.max_entries = 2
        counted = []
        for tenant in ("a", "b", "c", "c", "b", "a"):
            before = reads()
            await admission.admit(request(tenant=tenant))
            counted.append(reads() - before - 1)
        return counted

    # a, b, c read; c and b kept; a (the oldest, dropped for c) read again.
    assert gate.run(body) == [1, 1, 1, 0, 0, 1]


def test_the_resolution_follows_the_order_admit_lua_read_in() -> None:
    tenant = {"requests_per_minute": "5"}
    plan = {"requests_per_minute": "0", "tokens_per_day": "100"}
    levels: list[tuple[str, list[dict[str, str] | None]]] = [
        ("global/", [{"max_tokens_per_request": "50"}]),
        ("", [None]),
        ("tenant/acme/", [tenant, plan]),
        ("", [None]),
    ]
    resolved = resolve("7", levels, "plan/free/", "")
    # A request too large for a value met before the 0 is too_large; else the 0 sheds.
    assert resolved.verdict(51) == ("too_large", "global/max_tokens_per_request")
    assert resolved.verdict(50) == ("shed", "plan/free/requests_per_minute")
    levels[2] = ("tenant/acme/", [tenant, {"tokens_per_day@gpt-4": "100", "tokens_per_day": "9"}])
    resolved = resolve("7", levels, "plan/free/", "gpt-4")
    assert resolved.verdict(50) is None
    assert resolved.letters == "//mD/"
    assert [c.address for c in resolved.checks] == [
        "tenant/acme/requests_per_minute",
        "tenant/acme/tokens_per_day@gpt-4",  # a plan's value is the tenant's default
    ]
