"""FairShare: weighted max-min water-filling of a shared limit, and the engine and resolver
splitting the level this tick applies (after an AdaptiveLimit, an override, pacing)."""

from __future__ import annotations

import math
import re
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from controller.model import ScalarSample, Validity
from controller.policy.fairshare import hysteresis, water_fill, whole_shares
from controller.policy.policyset import PolicySet
from tests.unit.policy_builders import (
    DEMAND_QUERY,
    GPU_QUERY,
    Driver,
    adaptive,
    addr,
    events_of,
    fair_share,
    limits,
    override,
    plan,
    policy_set,
    vector,
)

FAIR = "FairShare/fair"
LEVEL = "global/concurrent_requests"
REGISTRY = {"acme": "paid", "bob": "paid", "carl": "free", "evil": "paid", "ent": "big"}
# Why a tenant is held, as every reason of the default FairShare (swing 1) says it.
HELD = (
    "held: its demand exceeds share_of_level by more than its swing (1 × √share_of_level), "
    "or it is held already and still asks more than share_of_level"
)


def fill(demands: list[float], weights: list[float], level: float) -> list[float]:
    shares = water_fill(np.array(demands, dtype=float), np.array(weights, dtype=float), level)
    return [round(float(s), 9) for s in shares]


def cap(tenant: str) -> str:
    return f"tenant/{tenant}/concurrent_requests"


# --- water-filling --------------------------------------------------------------------------


def test_tenants_over_their_share_split_the_level_by_weight() -> None:
    assert fill([500, 500], [4, 1], 100) == [80, 20]
    assert fill([500, 500, 500], [2, 1, 1], 100) == [50, 25, 25]


def test_a_demand_below_its_share_is_met_and_the_rest_goes_to_the_others() -> None:
    # Equal weights: 50 each, but the first asks 5: the second gets the 95 left, capped at 60.
    assert fill([5, 100], [1, 1], 60) == [5, 55]
    # Two small demands met, the large ones split what is left by weight (4:2).
    assert fill([3, 30, 200, 200], [1, 4, 4, 2], 100) == [3, 30, 44.666666667, 22.333333333]


def test_a_single_tenant_gets_the_level_or_its_demand() -> None:
    assert fill([500], [3], 100) == [100]
    assert fill([50], [3], 100) == [50]


def test_zero_demand_gets_zero_and_takes_nothing_from_the_others() -> None:
    assert fill([0, 200], [1, 1], 100) == [0, 100]
    assert fill([0, 0], [1, 1], 100) == [0, 0]


def test_ties_get_equal_shares() -> None:
    assert fill([50, 50, 50], [1, 1, 1], 90) == [30, 30, 30]
    assert fill([60, 40, 60], [1, 1, 1], 120) == [40, 40, 40]


def test_without_contention_every_share_is_its_demand() -> None:
    assert fill([10, 20, 30], [1, 5, 1], 60) == [10, 20, 30]
    assert fill([], [], 60) == []


@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.floats(0, 1000, allow_nan=False),
            st.floats(0.1, 10, allow_nan=False),
        ),
        min_size=1,
        max_size=30,
    ),
    st.floats(1, 5000, allow_nan=False),
)
def test_the_shares_are_weighted_max_min_fair(
    pairs: list[tuple[float, float]], level: float
) -> None:
    demands = np.array([d for d, _ in pairs])
    weights = np.array([w for _, w in pairs])
    shares = water_fill(demands, weights, level)
    assert np.all(shares >= 0)
    assert np.all(shares <= demands + 1e-9)
    total = float(demands.sum())
    assert math.isclose(float(shares.sum()), min(total, level), rel_tol=1e-9, abs_tol=1e-6)
    held = shares < demands - 1e-9
    if held.any():
        # Every tenant held gets the same share per unit of weight (the water line), and
        # every tenant not held asks no more than that per unit of weight.
        line = shares[held] / weights[held]
        assert np.allclose(line, line[0], rtol=1e-9, atol=1e-9)
        assert np.all(demands[~held] / weights[~held] <= line[0] * (1 + 1e-9) + 1e-9)


def test_whole_shares_add_up_to_the_budget_largest_remainders_first() -> None:
    shares = np.array([33.4, 33.3, 33.3, 5.0])
    held = np.array([True, True, True, False])
    rounded = whole_shares(shares, held, 100.0)
    assert rounded.tolist() == [34.0, 33.0, 33.0, 5.0]
    uneven = whole_shares(np.array([10.2, 20.7, 4.1]), np.array([True, True, True]), 35.0)
    assert uneven.tolist() == [10.0, 21.0, 4.0]


def test_a_whole_share_is_at_least_one_request() -> None:
    shares = np.array([0.3, 0.3, 0.4])
    assert whole_shares(shares, np.ones(3, dtype=bool), 1.0).tolist() == [1.0, 1.0, 1.0]


def test_a_share_near_the_limit_in_force_keeps_it_within_the_budget() -> None:
    nan = math.nan
    values, kept = hysteresis(
        np.array([10.0, 10.0, 10.0]), np.array([11.0, 9.0, nan]), np.ones(3), 30.0
    )
    # 9 is kept below its share, which frees the one request 11 keeps above its own.
    assert values.tolist() == [11.0, 9.0, 10.0]
    assert kept.tolist() == [True, True, False]


def test_a_hold_above_the_share_never_takes_another_tenants_share() -> None:
    values, kept = hysteresis(np.array([10.0, 10.0]), np.array([11.0, 11.0]), np.ones(2), 20.0)
    assert values.tolist() == [10.0, 10.0]
    assert kept.tolist() == [False, False]
    # With one request free, the smallest excess is kept first.
    values, _ = hysteresis(np.array([10.0, 10.0]), np.array([12.0, 11.0]), np.full(2, 2.0), 21.0)
    assert values.tolist() == [10.0, 11.0]


def test_a_share_outside_its_band_moves() -> None:
    values, kept = hysteresis(np.array([10.0]), np.array([15.0]), np.ones(1), 100.0)
    assert values.tolist() == [10.0]
    assert kept.tolist() == [False]


# --- the engine and the resolver --------------------------------------------------------------


def driver(*policies: Any, level: float = 100, **limit_options: Any) -> Driver:
    documents = policies or (fair_share(),)
    options = {"global_": {"concurrent_requests": level}, **limit_options}
    return Driver(policy_set(*documents, **options), registry=REGISTRY)


def limits_of(resolution: Any) -> dict[str, float]:
    return {str(a): d.value for a, d in resolution.desired.items() if a.scope.value == "tenant"}


def test_the_runaway_is_held_to_what_is_left_on_the_first_sample() -> None:
    run = driver()
    evaluation, resolution = run.decide(0.0, tenants={DEMAND_QUERY: {"acme": 30, "evil": 20}})
    assert limits_of(resolution) == {}  # 50 < 90% of 100: no contention
    assert evaluation.active.get(FAIR, ()) == ()
    evaluation, resolution = run.decide(15.0, tenants={DEMAND_QUERY: {"acme": 30, "evil": 400}})
    assert limits_of(resolution) == {cap("evil"): 70}
    assert evaluation.active[FAIR] == ("evil",)
    assert events_of(evaluation) == [(FAIR, "", "engaged")]
    reason = resolution.desired[addr(cap("evil"))].reason
    assert reason == (
        "global/concurrent_requests = 100 under contention (demands 430): held to its weighted "
        "max-min share (demand=400, weight=2, share=70, share_of_level=70); share = 70 × weight "
        f"/ 2 after the 1 smaller demands (30) are met; {HELD}"
    )


def test_a_small_move_of_the_share_keeps_the_cap_in_force() -> None:
    run = driver(fair_share(behavior={"loosen": {"stabilization": "0s"}}))
    run.decide(0.0, tenants={DEMAND_QUERY: {"acme": 30, "evil": 400}})  # evil: 70
    _, resolution = run.decide(15.0, tenants={DEMAND_QUERY: {"acme": 27, "evil": 400}})
    decision = resolution.desired[addr(cap("evil"))]
    assert decision.value == 70  # its share is 73, within ±14 of 70
    assert decision.reason.endswith(
        "(demand=400, weight=2, share=73, share_of_level=73); share = 73 × weight / 2 after the "
        f"1 smaller demands (27) are met; {HELD}; within ±20% (at least 1 and 1 × √ the limit) "
        "of the limit in force: hold"
    )
    _, resolution = run.decide(30.0, tenants={DEMAND_QUERY: {"acme": 5, "evil": 400}})
    assert limits_of(resolution) == {cap("evil"): 95}  # 25 more: moves


def test_the_reserve_keeps_room_for_the_swings_of_the_tenants_not_held() -> None:
    run = driver(fair_share(reserve=2))
    _, resolution = run.decide(0.0, tenants={DEMAND_QUERY: {"acme": 36, "evil": 400}})
    # acme has 36 in flight on average, ± 6 (a Poisson count): 2 × 6 are kept free for it.
    assert limits_of(resolution) == {cap("evil"): 52}
    assert (
        "share = 52 × weight / 2 after the 1 smaller demands (36) are met and 12 kept free for "
        "their swings; held:" in resolution.desired[addr(cap("evil"))].reason
    )


def test_tenants_over_their_share_by_less_than_their_swing_are_not_held() -> None:
    run = driver()
    # 108 asked of 100: 33.3 each, and each asks 36 — within its swing (√33.3 = 5.8): a cap
    # of 33 would refuse each one's upward swings while the others' downward ones leave room.
    alike = {"acme": 36, "bob": 36, "evil": 36}
    evaluation, resolution = run.decide(0.0, tenants={DEMAND_QUERY: alike})
    assert limits_of(resolution) == {}
    assert evaluation.active[FAIR] == ()  # contention, but nobody beyond its swing
    # A runaway beside them is held to its share; the two within their swing are not, and
    # their shares are not handed to it.
    _, resolution = run.decide(15.0, tenants={DEMAND_QUERY: {**alike, "evil": 60}})
    assert limits_of(resolution) == {cap("evil"): 33}
    assert "; 2 over their share by no more than their swing (72) are not held;" in (
        resolution.desired[addr(cap("evil"))].reason
    )


def test_a_tenant_held_stays_held_while_it_asks_more_than_its_share() -> None:
    run = driver(fair_share(behavior={"loosen": {"stabilization": "0s"}}))
    run.decide(0.0, tenants={DEMAND_QUERY: {"acme": 30, "evil": 400}})  # evil: 70
    # 74 is within evil's swing of its share (70 ± 8.4): not held anew, but held already.
    evaluation, resolution = run.decide(15.0, tenants={DEMAND_QUERY: {"acme": 30, "evil": 74}})
    assert limits_of(resolution) == {cap("evil"): 70}
    assert evaluation.active[FAIR] == ("evil",)
    _, resolution = driver().decide(0.0, tenants={DEMAND_QUERY: {"acme": 30, "evil": 74}})
    assert limits_of(resolution) == {}  # the same demands, nobody held before: nobody held
    # At its share or below it, the hold ends.
    evaluation, resolution = run.decide(30.0, tenants={DEMAND_QUERY: {"acme": 30, "evil": 65}})
    assert limits_of(resolution) == {}
    assert evaluation.active[FAIR] == ()


def test_a_hold_ends_when_the_tenant_asks_no_more_than_its_share_of_the_level() -> None:
    run = driver(fair_share(reserve=2, behavior={"loosen": {"stabilization": "0s"}}))
    run.decide(0.0, tenants={DEMAND_QUERY: {"acme": 36, "evil": 400}})  # evil: 100 - 36 - 12
    # 60 is above evil's share after the reserve (52) but within its share of the level (64):
    # it would fit beside acme's average, so it is no longer held.
    evaluation, resolution = run.decide(15.0, tenants={DEMAND_QUERY: {"acme": 36, "evil": 60}})
    assert limits_of(resolution) == {}
    assert evaluation.active[FAIR] == ()


@pytest.mark.parametrize(("swing", "cap_after"), [(1, 12), (0, 15)])
def test_a_share_within_the_caps_swing_keeps_it(swing: float, cap_after: float) -> None:
    run = driver(fair_share(swing=swing, behavior={"loosen": {"stabilization": "0s"}}), level=24)
    _, resolution = run.decide(0.0, tenants={DEMAND_QUERY: {"acme": 12, "evil": 400}})
    assert limits_of(resolution) == {cap("evil"): 12}
    # The share becomes 15: 3 above the cap of 12, within its swing (√12 = 3.5) though 20%
    # of 12 is 2.4; without a swing it moves.
    _, resolution = run.decide(15.0, tenants={DEMAND_QUERY: {"acme": 9, "evil": 400}})
    assert limits_of(resolution) == {cap("evil"): cap_after}


def test_the_split_uses_the_level_the_adaptive_limit_applies_on_the_same_tick() -> None:
    limit = adaptive(
        target=LEVEL,
        bounds={"min": 10, "max": 1000},
        aimd={"increase": 5, "decrease_factor": 0.5, "tolerance": 0.05},
    )
    run = driver(limit, fair_share())
    demand = {"acme": 500, "bob": 500, "carl": 10}
    _, resolution = run.decide(0.0, {GPU_QUERY: 0.99}, {DEMAND_QUERY: demand})
    # The adaptive limit halves 100 to 50 on this tick: 50 - 10 split 2:2, not 100 - 10.
    assert resolution.desired[addr(LEVEL)].value == 50
    assert limits_of(resolution) == {cap("acme"): 20, cap("bob"): 20}


def test_the_split_uses_a_persons_pin_of_the_level() -> None:
    run = driver()
    pinned = dict([override(LEVEL, 40, 1e9)])
    _, resolution = run.decide(0.0, tenants={DEMAND_QUERY: {"evil": 500}}, overrides=pinned)
    assert limits_of(resolution) == {cap("evil"): 40}


def test_the_caps_are_released_with_the_limits_pacing() -> None:
    run = driver()  # the Limits' default behaviour: loosening waits 5 minutes
    run.decide(0.0, tenants={DEMAND_QUERY: {"acme": 30, "evil": 400}})
    evaluation, resolution = run.decide(15.0, tenants={DEMAND_QUERY: {"acme": 30, "evil": 20}})
    assert events_of(evaluation) == [(FAIR, "", "released")]
    assert limits_of(resolution) == {cap("evil"): 70}  # held by the stabilization window
    _, resolution = run.decide(299.0, tenants={DEMAND_QUERY: {"acme": 30, "evil": 20}})
    assert limits_of(resolution) == {cap("evil"): 70}
    _, resolution = run.decide(301.0, tenants={DEMAND_QUERY: {"acme": 30, "evil": 20}})
    assert limits_of(resolution) == {}


def with_paid_concurrency(value: float, *policies: Any, level: float) -> Driver:
    """The plans free (no concurrency limit) and paid (`value` in flight per tenant)."""
    documents = [
        plan("free", ["gpt-3.5-turbo"], requests_per_minute=10),
        plan("paid", ["gpt-4"], concurrent_requests=value),
        plan("big"),
        limits(global_={"concurrent_requests": level}),
        *policies,
    ]
    return Driver(PolicySet.from_documents(documents, "v1"), registry=REGISTRY)


def test_a_plan_level_is_split_among_that_plans_tenants_only() -> None:
    policy = fair_share(level="plan/paid/concurrent_requests")
    run = with_paid_concurrency(60, policy, level=1000)
    demand = {"acme": 100, "bob": 100, "carl": 500}  # carl is free: not in paid's level
    _, resolution = run.decide(0.0, tenants={DEMAND_QUERY: demand})
    assert limits_of(resolution) == {cap("acme"): 30, cap("bob"): 30}


def test_a_tenants_own_limit_caps_its_demand_and_is_never_loosened() -> None:
    run = with_paid_concurrency(40, fair_share(), level=100)
    demand = {"acme": 500, "carl": 500}  # acme (paid) can use 40 at most: carl gets 60
    _, resolution = run.decide(0.0, tenants={DEMAND_QUERY: demand})
    assert limits_of(resolution) == {cap("carl"): 60}
    assert run.baselines.value(addr(cap("acme"))) == 40


def test_a_tenant_without_a_valid_demand_is_left_out_and_a_failed_query_splits_nothing() -> None:
    run = driver()
    demand = {"acme": math.nan, "evil": 500, "bob": 20}
    _, resolution = run.decide(0.0, tenants={DEMAND_QUERY: demand})
    assert limits_of(resolution) == {cap("evil"): 80}
    failed = vector("tenant", {"evil": 500}, 30.0, Validity.ERROR)
    evaluation, _ = run.decide(30.0, tenants={DEMAND_QUERY: failed})
    assert not any(p.policy == FAIR for p in evaluation.proposals)
    stale = ScalarSample(500.0, -1000.0)  # one value for every tenant, far too old
    evaluation, _ = run.decide(45.0, tenants={DEMAND_QUERY: stale})
    assert not any(p.policy == FAIR for p in evaluation.proposals)


def test_a_label_value_that_would_name_another_tenants_limit_gets_no_share() -> None:
    run = driver()
    # Filled into tenant/$tenant/concurrent_requests it once parsed as acme's
    # `concurrent_requests@x/concurrent_requests`: a share of the level written for acme.
    demand = {"acme/concurrent_requests@x": 500, "evil": 500, "bob": 20}
    _, resolution = run.decide(0.0, tenants={DEMAND_QUERY: demand})
    assert limits_of(resolution) == {cap("evil"): 80}


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({"target": "tenant/$tenant/requests_per_minute"}, "must be the same limit"),
        ({"level": "tenant/acme/concurrent_requests"}, "not shared by tenants"),
        ({"target": "user/$tenant/$user/concurrent_requests"}, re.escape("tenant/$tenant/<limit>")),
        ({"engage_at": 0}, "greater than 0"),
        ({"weights": {"paid": 0}}, "greater than 0"),
    ],
)
def test_a_fair_share_that_cannot_split_is_refused_with_the_fix(
    spec: dict[str, Any], message: str
) -> None:
    with pytest.raises(ValidationError, match=message):
        fair_share(**spec)
