"""admit.lua's weighted share of the global in-flight limit (`global/concurrent_headroom`,
`…/concurrent_weight`) against a real Redis: who takes the headroom, what settles give back."""

from __future__ import annotations

import itertools
import json
import time
from collections.abc import Callable, Mapping

import redis
from typer.testing import CliRunner

from controller.cli import app
from controller.contract.enforcement import EnforcementKeys
from controller.gateway.admission import Admission, AdmissionRequest
from tests.gateway.conftest import Gate

SetLimits = Callable[[Mapping[str, float]], None]
_ids = itertools.count()


def ask(tenant: str, plan: str = "free") -> AdmissionRequest:
    return AdmissionRequest(tenant, plan, None, None, None, 10, f"fair-{next(_ids)}")


def admit_all(gate: Gate, tenants: list[tuple[str, str]]) -> list[tuple[str, str | None]]:
    """Admit one request per (tenant, plan), in order: (outcome, reservation) each."""

    async def body(admission: Admission) -> list[tuple[str, str | None]]:
        out: list[tuple[str, str | None]] = []
        for tenant, plan in tenants:
            result = await admission.admit(ask(tenant, plan))
            out.append((result.outcome, result.reservation))
        return out

    return gate.run(body)


def settle_all(gate: Gate, done: list[tuple[str, str]]) -> None:
    async def body(admission: Admission) -> None:
        for reservation, tenant in done:
            assert await admission.settle(reservation, tenant, 5, None)

    gate.run(body)


def global_state(db: redis.Redis[str]) -> dict[str, str]:
    return db.hgetall(EnforcementKeys.for_prefix("governor").global_level().state)


def test_a_tenant_within_its_share_takes_the_headroom_one_beyond_meets_the_limit(
    gate: Gate, db: redis.Redis[str], set_limits: SetLimits
) -> None:
    set_limits({"global/concurrent_requests": 10, "global/concurrent_headroom": 0.2})
    hog = admit_all(gate, [("hog", "free")] * 11)
    assert [o for o, _ in hog] == ["allow"] * 10 + ["rate_limited"]  # alone: all 10 are its share
    # A second tenant: the shares are 5 each; it is within its own, so it takes the headroom
    # (10 × 1.2 = 12 in flight) while the hog, beyond its share, stays refused.
    quiet = admit_all(gate, [("quiet", "free"), ("hog", "free"), ("quiet", "free"),
                             ("quiet", "free")])  # fmt: skip
    assert [o for o, _ in quiet] == ["allow", "rate_limited", "allow", "rate_limited"]
    state = global_state(db)
    assert state["c|concurrent_requests"] == "12"
    assert state["o|tenant/hog/"] == "10"
    assert state["o|tenant/quiet/"] == "2"
    assert float(state["a"]) == 2.0
    # Its requests settled, the quiet tenant's weight leaves the active weight: the hog is
    # alone again and its share is the whole limit.
    settle_all(gate, [(r, "quiet") for o, r in quiet if o == "allow" and r])
    state = global_state(db)
    assert "o|tenant/quiet/" not in state
    assert "q|tenant/quiet/" not in state
    assert float(state["a"]) == 1.0
    assert state["c|concurrent_requests"] == "10"


def test_the_shares_follow_the_plan_weights_and_a_tenant_of_its_own(
    gate: Gate, db: redis.Redis[str], set_limits: SetLimits
) -> None:
    set_limits({
        "global/concurrent_requests": 12, "global/concurrent_headroom": 0.5,
        "plan/paid/concurrent_weight": 3, "tenant/vip/concurrent_weight": 5,
    })  # fmt: skip
    admit_all(gate, [("a", "free")] * 12)  # the limit is full: a alone holds all 12
    # paid (weight 3) beside a (1): its share is 12 × 3/4 = 9, so it takes up to 6 of headroom.
    paid = admit_all(gate, [("b", "paid")] * 7)
    assert [o for o, _ in paid] == ["allow"] * 6 + ["rate_limited"]
    # vip's own weight (5) outweighs its plan's (free: 1): its share 12 × 5/9 > 6, but the
    # headroom is spent (18 in flight): it is refused like anyone else.
    assert admit_all(gate, [("vip", "free")]) == [("rate_limited", None)]
    assert float(global_state(db)["a"]) == 4.0  # the refused tenant never joined


def test_without_headroom_the_limit_is_shared_by_nobody(
    gate: Gate, db: redis.Redis[str], set_limits: SetLimits
) -> None:
    set_limits({"global/concurrent_requests": 3, "plan/paid/concurrent_weight": 3})
    got = admit_all(gate, [("a", "free")] * 3 + [("b", "paid")])
    assert [o for o, _ in got] == ["allow"] * 3 + ["rate_limited"]
    assert "a" not in global_state(db)  # no shares kept: the plain concurrency check


def test_an_expired_lease_gives_its_share_back(
    gate: Gate, db: redis.Redis[str], set_limits: SetLimits
) -> None:
    set_limits({"global/concurrent_requests": 2, "global/concurrent_headroom": 0.5})
    gate.lease_seconds = 0.2
    assert [o for o, _ in admit_all(gate, [("crashed", "free")] * 2)] == ["allow"] * 2
    time.sleep(0.3)  # the gateway that held them is gone: the next call sweeps the leases
    assert admit_all(gate, [("next", "free")])[0][0] == "allow"
    state = global_state(db)
    assert "o|tenant/crashed/" not in state
    assert float(state["a"]) == 1.0
    assert state["c|concurrent_requests"] == "1"


def test_usage_shows_a_tenants_share_and_its_requests_in_flight(
    gate: Gate, db: redis.Redis[str], set_limits: SetLimits
) -> None:
    set_limits({"global/concurrent_requests": 12, "global/concurrent_headroom": 0.25,
                "plan/paid/concurrent_weight": 2})  # fmt: skip
    admit_all(gate, [("hog", "free")] * 12 + [("fair", "paid")] * 3)
    env = {"GOVERNOR_REDIS__URL": gate.url, "COLUMNS": "200"}

    found = CliRunner().invoke(app, ["usage", "fair", "--plan", "paid", "--json"], env=env)

    assert found.exit_code == 0, found.output
    rows = {row["address"]: row for row in json.loads(found.stdout)["limits"]}
    share = rows["global/concurrent_requests: its share (weight 2 of 3 in flight)"]
    assert (share["limit"], share["used"], share["remaining"]) == (8, 3, 5)  # 12 × 2/3
    assert rows["global/concurrent_requests"]["used"] == 15  # 3 of them on the headroom
    table = CliRunner().invoke(app, ["usage", "hog", "--plan", "free"], env=env)
    assert "its share (weight 1 of 3 in flight)" in table.stdout  # 4 of 12; it holds 12


def test_a_newcomer_gets_one_request_in_even_when_its_share_is_under_one(
    gate: Gate, db: redis.Redis[str], set_limits: SetLimits
) -> None:
    # 10 tenants hold one request each: a newcomer's share is 10/11 < 1, and 5% of 10 is
    # half a request. A tenant with nothing in flight is within its share, and the headroom
    # is at least one request: it gets in; its second does not.
    set_limits({"global/concurrent_requests": 10, "global/concurrent_headroom": 0.05})
    assert admit_all(gate, [(f"t{i}", "free") for i in range(10)])[-1][0] == "allow"
    got = admit_all(gate, [("new", "free"), ("new", "free"), ("other", "free")])
    assert [o for o, _ in got] == ["allow", "rate_limited", "rate_limited"]


def test_a_weight_raised_in_flight_counts_as_it_is_now(
    gate: Gate, db: redis.Redis[str], set_limits: SetLimits
) -> None:
    set_limits({"global/concurrent_requests": 20, "global/concurrent_headroom": 1})
    admit_all(gate, [("x", "free")] + [("y", "free")] * 20)  # x 1, y 20: the limit is full
    set_limits({"global/concurrent_requests": 20, "global/concurrent_headroom": 1,
                "tenant/x/concurrent_weight": 3})  # fmt: skip
    # x's share is 20 × 3/4 = 15 (not 20 × 3/max(2, 3), its old weight still in `a`).
    got = admit_all(gate, [("x", "free")] * 15)
    assert [o for o, _ in got] == ["allow"] * 14 + ["rate_limited"]
    state = global_state(db)
    assert (state["a"], state["q|tenant/x/"], state["o|tenant/x/"]) == ("4", "3", "15")


def test_values_not_ours_read_as_nothing_and_an_idle_pool_forgets_stale_shares(
    gate: Gate, db: redis.Redis[str], set_limits: SetLimits
) -> None:
    set_limits({"global/concurrent_requests": 4, "global/concurrent_headroom": 0.5})
    state = EnforcementKeys.for_prefix("governor").global_level().state
    # What a settle by a script that predates sharing leaves behind, and a hand edit.
    db.hset(state, mapping={"o|tenant/gone/": "3", "q|tenant/gone/": "2", "a": "2",
                            "q|tenant/odd/": "abc"})  # fmt: skip
    first = admit_all(gate, [("a", "free")])  # nobody holds a slot: the shares start again
    assert first[0][0] == "allow"
    shares = {k: v for k, v in global_state(db).items() if k[:2] in ("o|", "q|") or k == "a"}
    assert shares == {"o|tenant/a/": "1", "q|tenant/a/": "1", "a": "1"}
    db.hset(state, mapping={"a": "nan", "o|tenant/a/": "x"})
    assert admit_all(gate, [("b", "free")])[0][0] == "allow"  # garbage reads as nothing
    reservation = first[0][1]
    assert reservation is not None
    settle_all(gate, [(reservation, "a")])  # unshare reads 'x' as nothing: no error
    assert global_state(db)["c|concurrent_requests"] == "1"
