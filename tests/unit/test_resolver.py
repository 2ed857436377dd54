"""The resolver: override > most restrictive proposal > baseline, then floors, ceilings, pacing."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from controller.model import Proposal, Source
from controller.policy.resolver import Resolution
from tests.unit.policy_builders import Driver, addr, override, policy_set, proposal, throttle

RPS = "global/requests_per_second"  # baseline 2000, floor 200 in `guarded`
TPM = "global/tokens_per_minute"  # baseline 5,000,000, ceiling 6,000,000 in `guarded`
ACME = "tenant/acme/tokens_per_minute"  # acme is on `paid`: baseline 20000
IMMEDIATE = {"tighten": {"stabilization": "0s"}, "loosen": {"stabilization": "0s"}}


def guarded(**options: Any) -> Driver:
    """Floors and ceilings of POLICY_FORMAT.md, and the default behaviour unless given."""
    options.setdefault("floors", {RPS: 200})
    options.setdefault("ceilings", {TPM: 6_000_000})
    return Driver(policy_set(**options), registry={"acme": "paid"})


def value(resolution: Resolution, address: str) -> float | None:
    decision = resolution.desired.get(addr(address))
    return None if decision is None else decision.value


def series(driver: Driver, address: str, ticks: Sequence[tuple[float, float | None]]) -> list[Any]:
    """Resolve at each (time, proposed value or None); the resolved value of `address` each."""
    out = []
    for now, wanted in ticks:
        made = [] if wanted is None else [proposal(address, wanted)]
        out.append(value(driver.resolve(now, made), address))
    return out


# --- precedence -------------------------------------------------------------------------------


def test_baselines_when_no_policy_proposes_anything() -> None:
    result = guarded().resolve(0.0)
    assert {str(a): d.value for a, d in result.desired.items()} == {
        RPS: 2000.0,
        TPM: 5_000_000.0,
        "ip/requests_per_minute": 1000.0,
        "plan/free/requests_per_minute": 10.0,
        "plan/free/tokens_per_day": 1000.0,
        "plan/paid/requests_per_minute": 600.0,
        "plan/paid/tokens_per_minute": 20000.0,
        "plan/paid/tokens_per_day": 100000.0,
        "plan/tiny/tokens_per_minute": 2000.0,
    }
    decision = result.desired[addr(RPS)]
    assert decision.source is Source.BASELINE
    assert decision.baseline == 2000.0


def test_the_most_restrictive_proposal_wins() -> None:
    proposals = [
        proposal(RPS, 1500, "ThrottlePolicy/a"),
        proposal(RPS, 900, "ThrottlePolicy/b"),
        proposal(RPS, 1200, "AdaptiveLimit/c"),
    ]
    decision = guarded().resolve(0.0, proposals).desired[addr(RPS)]
    assert (decision.value, decision.source, decision.policy) == (
        900.0,
        Source.POLICY,
        "ThrottlePolicy/b",
    )
    assert decision.reason == "ThrottlePolicy/b wants 900"
    assert [p.value for p in decision.proposals] == [900.0, 1200.0, 1500.0]


def test_a_proposal_above_the_baseline_is_used() -> None:
    # An AdaptiveLimit may open a limit beyond its baseline (up to its bounds).
    assert value(guarded().resolve(0.0, [proposal(RPS, 3000, "AdaptiveLimit/c")]), RPS) == 3000.0


def test_an_override_beats_a_more_restrictive_proposal() -> None:
    overrides = dict([override(RPS, 3000, expires_at=100.0)])
    result = guarded().resolve(0.0, [proposal(RPS, 900)], overrides)
    decision = result.desired[addr(RPS)]
    assert (decision.value, decision.source) == (3000.0, Source.OVERRIDE)
    assert "alice" in decision.reason
    assert "incident 42" in decision.reason


def test_an_override_is_not_clamped_by_a_floor() -> None:
    # Floors bound automatic changes ("no policy may go below"); a person may go lower.
    overrides = dict([override(RPS, 50, expires_at=100.0)])
    assert value(guarded().resolve(0.0, [], overrides), RPS) == 50.0


def test_an_expired_override_is_ignored() -> None:
    driver = guarded()
    overrides = dict([override(RPS, 3000, expires_at=60.0)])
    assert value(driver.resolve(30.0, [proposal(RPS, 900)], overrides), RPS) == 3000.0
    expired = driver.resolve(60.0, [proposal(RPS, 900)], overrides)  # expires_at <= now
    assert (value(expired, RPS), expired.desired[addr(RPS)].source) == (900.0, Source.POLICY)


def test_an_override_on_a_tenant_is_written_even_at_its_plan_value() -> None:
    overrides = dict([override(ACME, 20000, expires_at=100.0)])
    assert value(guarded().resolve(0.0, [], overrides), ACME) == 20000.0


# --- floors and ceilings ----------------------------------------------------------------------


def test_a_floor_raises_an_automatic_value() -> None:
    decision = guarded().resolve(0.0, [proposal(RPS, 50)]).desired[addr(RPS)]
    assert decision.value == 200.0
    assert any("floor 200" in note for note in decision.adjustments)


def test_a_ceiling_lowers_an_automatic_value() -> None:
    decision = guarded().resolve(0.0, [proposal(TPM, 9_000_000)]).desired[addr(TPM)]
    assert decision.value == 6_000_000.0
    assert any("ceiling 6e+06" in note for note in decision.adjustments)


@pytest.mark.parametrize(
    ("address", "wanted", "held"),
    [
        ("plan/paid/concurrent_weight", 0.0, 0.001),
        ("global/concurrent_headroom", 40.0, 1.0),
        ("tenant/acme/concurrent_weight", 5e6, 1e6),
    ],
)
def test_a_policy_cannot_move_a_sharing_term_out_of_its_range(
    address: str, wanted: float, held: float
) -> None:
    # Out of range, the gateways would shed it (a value Governor never writes): a policy's
    # weight of 0 would refuse the whole plan.
    decision = guarded().resolve(0.0, [proposal(address, wanted)]).desired[addr(address)]
    assert decision.value == held
    assert any("range" in note for note in decision.adjustments)


# --- pacing (the Kubernetes HPA `behavior`) ---------------------------------------------------


def test_tightening_is_immediate_by_default() -> None:
    assert series(guarded(), RPS, [(0.0, None), (30.0, 500.0)]) == [2000.0, 500.0]


def test_loosening_waits_for_the_default_5m_stabilization_then_returns_to_baseline() -> None:
    driver = guarded()
    ticks: list[tuple[float, float | None]] = [(0.0, 500.0)]
    ticks += [(float(t), None) for t in range(30, 300, 30)] + [(299.0, None), (301.0, None)]
    assert series(driver, RPS, ticks) == [500.0] * 11 + [2000.0]
    back = driver.resolve(330.0).desired[addr(RPS)]
    assert back.source is Source.BASELINE


def test_while_loosening_is_held_the_decision_says_why() -> None:
    driver = guarded()
    driver.resolve(0.0, [proposal(RPS, 500)])
    decision = driver.resolve(30.0).desired[addr(RPS)]
    assert decision.value == 500.0
    assert any("stabilization" in note for note in decision.adjustments)


def test_loosening_follows_the_most_restrictive_recommendation_in_the_window() -> None:
    # Proposals 500, then 800, then none: the limit loosens to 800 only when the 500 has
    # left the 5m window, and to the baseline once the 800 has.
    got = series(guarded(), RPS, [(0.0, 500.0), (120.0, 800.0), (301.0, None), (421.0, None)])
    assert got == [500.0, 500.0, 800.0, 2000.0]


def test_a_policy_behavior_replaces_the_default() -> None:
    hot = throttle("hot", [{"target": RPS, "set": 500}], when="gpu_util > 0.9", behavior=IMMEDIATE)
    driver = Driver(policy_set(hot))
    driver.resolve(0.0, [proposal(RPS, 500, "ThrottlePolicy/hot")])
    assert value(driver.resolve(30.0), RPS) == 2000.0


STEPPED = {
    "tighten": {"stabilization": "0s", "max_change_percent": 50, "period": "60s"},
    "loosen": {"stabilization": "0s", "max_change_percent": 10, "period": "60s"},
}


def test_max_change_percent_limits_each_step_in_each_direction() -> None:
    driver = guarded(behavior=STEPPED)
    down = [(0.0, None)] + [(60.0 * i, 100.0) for i in range(1, 6)]
    # −50% per minute, to the floor of 200 (a proposal of 100 is raised to it first).
    assert series(driver, RPS, down) == [2000.0, 1000.0, 500.0, 250.0, 200.0, 200.0]
    up = [(60.0 * i, None) for i in range(6, 10)]
    # +10% per minute on the way back.
    assert series(driver, RPS, up) == pytest.approx([220.0, 242.0, 266.2, 292.82])


def test_a_rate_limited_step_says_so() -> None:
    driver = guarded(behavior=STEPPED)
    driver.resolve(0.0)
    decision = driver.resolve(60.0, [proposal(RPS, 500)]).desired[addr(RPS)]
    assert decision.value == 1000.0
    assert any("50%" in note for note in decision.adjustments)


def test_loosening_without_stabilization_or_limits_is_immediate() -> None:
    driver = guarded(behavior=IMMEDIATE)
    assert series(driver, RPS, [(0.0, 500.0), (30.0, 1500.0), (60.0, None)]) == [
        500.0,
        1500.0,
        2000.0,
    ]


def test_a_limit_on_an_unlimited_address_is_not_held_back_by_max_change_percent() -> None:
    user = "user/acme/bob/requests_per_minute"  # no baseline: unlimited
    driver = guarded(behavior=STEPPED)
    got = series(driver, user, [(0.0, 5.0), (60.0, None), (120.0, 5.0), (180.0, 5.0)])
    assert got == [5.0, None, 5.0, 5.0]


# --- freeze -----------------------------------------------------------------------------------


def test_freeze_keeps_the_values_in_force_but_overrides_still_apply() -> None:
    driver = guarded(behavior=IMMEDIATE)
    driver.resolve(0.0, [proposal(RPS, 500)])
    frozen = driver.resolve(30.0, [proposal(RPS, 300)], frozen=True)
    assert (value(frozen, RPS), frozen.desired[addr(RPS)].source) == (500.0, Source.FROZEN)
    assert value(driver.resolve(60.0, [], frozen=True), RPS) == 500.0
    overrides = dict([override(RPS, 1234, expires_at=1000.0)])
    assert value(driver.resolve(90.0, [], overrides, frozen=True), RPS) == 1234.0
    # Thawed: automation resumes.
    assert value(driver.resolve(120.0, [proposal(RPS, 300)]), RPS) == 300.0


# --- inheriting addresses -----------------------------------------------------------------------


def test_a_tenant_is_written_only_while_it_differs_from_its_plan() -> None:
    driver = guarded()
    assert value(driver.resolve(0.0, [proposal(ACME, 5000)]), ACME) == 5000.0
    # Held by the loosen stabilization window, then back at its plan value: omitted.
    assert value(driver.resolve(150.0), ACME) == 5000.0
    back = driver.resolve(301.0)
    assert addr(ACME) not in back.desired
    assert value(back, "plan/paid/tokens_per_minute") == 20000.0
    driver.resolve(602.0)
    assert addr(ACME) not in driver.resolver.memory


def test_a_user_without_a_baseline_is_unlimited_once_released() -> None:
    user = "user/acme/bob/requests_per_minute"
    driver = guarded(behavior=IMMEDIATE)
    assert value(driver.resolve(0.0, [proposal(user, 5)]), user) == 5.0
    assert value(driver.resolve(30.0), user) is None
    assert addr(user) not in driver.resolve(120.0).desired
    assert addr(user) not in driver.resolver.memory


# --- properties -------------------------------------------------------------------------------

values = st.floats(0, 10_000_000, allow_nan=False)
proposal_sets = st.lists(values, max_size=4)
tick_sets = st.lists(proposal_sets, min_size=1, max_size=12)
FLOOR, CEILING = 300.0, 8000.0


def proposals_for(address: str, wanted: list[float]) -> list[Proposal]:
    return [proposal(address, v, f"ThrottlePolicy/p{i}") for i, v in enumerate(wanted)]


@settings(max_examples=300, deadline=None)
@given(tick_sets, st.sampled_from([None, STEPPED]))
def test_automatic_values_stay_between_floor_and_ceiling(
    ticks: list[list[float]], behavior: dict[str, Any] | None
) -> None:
    options: dict[str, Any] = {"floors": {RPS: FLOOR}, "ceilings": {RPS: CEILING}}
    if behavior is not None:
        options["behavior"] = behavior
    driver = guarded(**options)
    for number, wanted in enumerate(ticks):
        resolved = value(driver.resolve(30.0 * number, proposals_for(RPS, wanted)), RPS)
        assert resolved is not None
        assert FLOOR <= resolved <= CEILING


@settings(max_examples=300, deadline=None)
@given(tick_sets)
def test_without_behaviour_limits_the_value_is_the_smallest_proposal(
    ticks: list[list[float]],
) -> None:
    driver = guarded(behavior=IMMEDIATE, floors={}, ceilings={})
    for number, wanted in enumerate(ticks):
        result = driver.resolve(30.0 * number, proposals_for(RPS, wanted))
        assert value(result, RPS) == (min(wanted) if wanted else 2000.0)


@settings(max_examples=300, deadline=None)
@given(tick_sets, st.lists(st.one_of(st.none(), values), min_size=12, max_size=12))
def test_a_live_override_always_wins(ticks: list[list[float]], pins: list[float | None]) -> None:
    driver = guarded()
    for number, wanted in enumerate(ticks):
        now = 30.0 * number
        pin = pins[number]
        overrides = {} if pin is None else dict([override(RPS, pin, expires_at=now + 1.0)])
        frozen = number % 3 == 2
        resolved = value(driver.resolve(now, proposals_for(RPS, wanted), overrides, frozen), RPS)
        if pin is not None:
            assert resolved == pin


@settings(max_examples=200, deadline=None)
@given(tick_sets)
def test_each_period_moves_at_most_max_change_percent(ticks: list[list[float]]) -> None:
    driver = guarded(behavior=STEPPED, floors={}, ceilings={})
    previous = value(driver.resolve(0.0), RPS)
    for number, wanted in enumerate(ticks, start=1):
        resolved = value(driver.resolve(60.0 * number, proposals_for(RPS, wanted)), RPS)
        assert previous is not None
        assert resolved is not None
        # Loosening from under one unit starts from one unit (a limit at 0 must not stick).
        assert previous * 0.5 * (1 - 1e-9) <= resolved <= max(previous, 1.0) * 1.1 * (1 + 1e-9)
        previous = resolved


def test_a_limit_set_to_zero_loosens_again_at_the_paced_rate() -> None:
    # A percentage of 0 is 0: pacing must start from one unit, or `set: 0` would stick forever.
    driver = guarded(behavior=STEPPED, floors={})
    got = series(driver, RPS, [(0.0, 0.0), (60.0, None), (120.0, None), (180.0, None)])
    assert got == pytest.approx([0.0, 1.1, 1.21, 1.331])


def test_a_seeded_resolver_paces_from_the_values_in_force() -> None:
    # A new leader finds a limit held at 500 by its predecessor: loosening back to the
    # baseline still waits for the stabilization window instead of jumping at once.
    from controller.policy.resolver import ResolverState

    driver = guarded()
    driver.resolver = ResolverState.seeded({addr(RPS): 500.0}, 0.0)
    assert value(driver.resolve(30.0), RPS) == 500.0
    assert value(driver.resolve(301.0), RPS) == 2000.0


def test_memory_does_not_grow_with_the_number_of_ticks() -> None:
    # A limit held for an hour of 1 s ticks keeps one point per run of equal values, not one
    # per tick (100k tenants × a 5m window would otherwise hold 30M points).
    driver = guarded()
    for second in range(3600):
        driver.resolve(float(second), [proposal(ACME, 5000.0)])
    memory = driver.resolver.memory[addr(ACME)]
    assert len(memory.recommendations) == 1
    assert len(memory.values) == 1
    assert value(driver.resolve(3600.0), ACME) == 5000.0  # loosening still waits 5m
    assert value(driver.resolve(3600.0 + 299), ACME) == 5000.0
    assert value(driver.resolve(3600.0 + 301), ACME) is None  # back to its plan: not written


def test_addresses_with_the_same_history_share_one_memory() -> None:
    # 100k tenants mostly hold the same few values: one memory object each would be rebuilt
    # every tick (see resolver._Shared); equal histories give equal pacing either way.
    driver = guarded(behavior=IMMEDIATE)
    tenants = [f"tenant/t{i}/tokens_per_minute" for i in range(3)]
    for now in (0.0, 15.0):
        driver.resolve(now, [proposal(a, 500.0) for a in tenants])
    first, *others = (driver.resolver.memory[addr(a)] for a in tenants)
    assert all(memory is first for memory in others)
    assert first.last == 500.0
