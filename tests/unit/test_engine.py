"""The policy engine, checked against POLICY_FORMAT.md on a virtual clock (times are floats)."""

from __future__ import annotations

import math
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from controller.model import Address, ScalarSample, Validity
from controller.policy.engine import EngineState, Evaluation, evaluate
from tests.unit.policy_builders import (
    GPU_QUERY,
    Driver,
    adaptive,
    berlin,
    cost_policy,
    events_of,
    policy_set,
    throttle,
    values_of,
    vector,
)

FREE_RPM = "plan/free/requests_per_minute"  # baseline 10
HALVE_FREE = {"target": FREE_RPM, "scale": 0.5}
HOT = "ThrottlePolicy/hot"


def hot(**spec: Any) -> Driver:
    """`hot`: halves the free tier while gpu_util > 0.90 (plus whatever `spec` adds)."""
    spec.setdefault("when", "gpu_util > 0.90")
    return Driver(policy_set(throttle("hot", [HALVE_FREE], **spec)))


REGISTRY = {"acme": "paid", "evil": "paid", "small": "tiny"}


def cost_anomaly(**spec: Any) -> Driver:
    """The per-tenant cost-anomaly policy of POLICY_FORMAT.md, engaging at once by default."""
    spec.setdefault("for_", "0s")
    return Driver(policy_set(cost_policy("cost", **spec)), registry=REGISTRY)


# --- for: -------------------------------------------------------------------------------------


def test_for_does_not_act_before_the_duration_has_passed() -> None:
    driver = hot(for_="2m")
    for now in (0.0, 30.0, 60.0, 90.0, 119.9):
        result = driver.gpu(now, 0.95)
        assert result.proposals == ()
        assert result.transitions == ()


def test_for_acts_exactly_when_the_duration_is_reached() -> None:
    driver = hot(for_="2m")
    driver.gpu(0.0, 0.95)
    result = driver.gpu(120.0, 0.96)
    assert values_of(result) == {FREE_RPM: 5.0}
    assert events_of(result) == [(HOT, "", "engaged")]
    [reading] = result.transitions[0].signals
    assert (reading.name, reading.value, reading.timestamp) == ("gpu_util", 0.96, 120.0)
    [made] = result.proposals
    assert made.policy == HOT
    assert "gpu_util=0.96" in made.reason
    assert "gpu_util > 0.90" in made.reason
    assert result.active == {HOT: ("",)}


def test_for_starts_again_when_the_condition_drops() -> None:
    driver = hot(for_="2m")
    driver.gpu(0.0, 0.95)
    driver.gpu(60.0, 0.95)
    driver.gpu(90.0, 0.5)  # the condition drops: the 2m start again at the next hot tick
    for now in (120.0, 180.0, 239.0):
        assert driver.gpu(now, 0.95).proposals == ()
    assert values_of(driver.gpu(240.0, 0.95)) == {FREE_RPM: 5.0}


# --- until: and release -----------------------------------------------------------------------


def test_until_keeps_the_policy_active_between_the_two_thresholds() -> None:
    driver = hot(until="gpu_util < 0.75")
    assert events_of(driver.gpu(0.0, 0.95)) == [(HOT, "", "engaged")]
    for now, value in ((30.0, 0.85), (60.0, 0.76), (90.0, 0.75)):
        result = driver.gpu(now, value)  # `when` no longer holds, `until` not yet
        assert values_of(result) == {FREE_RPM: 5.0}
        assert result.transitions == ()
    released = driver.gpu(120.0, 0.74)
    assert released.proposals == ()
    assert events_of(released) == [(HOT, "", "released")]
    assert released.transitions[0].signals[0].value == 0.74
    assert released.active == {}


def test_without_until_the_policy_releases_as_soon_as_when_stops_holding() -> None:
    driver = hot()
    assert values_of(driver.gpu(0.0, 0.95)) == {FREE_RPM: 5.0}
    assert values_of(driver.gpu(30.0, 0.91)) == {FREE_RPM: 5.0}
    result = driver.gpu(60.0, 0.90)
    assert result.proposals == ()
    assert events_of(result) == [(HOT, "", "released")]


def test_after_release_until_does_not_keep_or_re_engage_the_policy() -> None:
    driver = hot(until="gpu_util < 0.75")
    driver.gpu(0.0, 0.95)
    driver.gpu(30.0, 0.5)
    # Between the thresholds again, but released: only `when` can engage it.
    assert driver.gpu(60.0, 0.85).proposals == ()


# --- cooldown: --------------------------------------------------------------------------------


def test_cooldown_blocks_re_engaging_until_it_has_passed_since_the_release() -> None:
    driver = hot(cooldown="5m")
    driver.gpu(0.0, 0.95)
    assert events_of(driver.gpu(30.0, 0.5)) == [(HOT, "", "released")]
    for now in (60.0, 200.0, 329.0):
        result = driver.gpu(now, 0.99)
        assert result.proposals == ()
        assert result.transitions == ()
    result = driver.gpu(330.0, 0.99)
    assert values_of(result) == {FREE_RPM: 5.0}
    assert events_of(result) == [(HOT, "", "engaged")]


def test_cooldown_does_not_delay_the_first_activation() -> None:
    assert values_of(hot(cooldown="1h").gpu(0.0, 0.95)) == {FREE_RPM: 5.0}


# --- schedule: --------------------------------------------------------------------------------

BUSINESS_HOURS = {"timezone": "Europe/Berlin", "windows": ["Mon-Fri 08:00-20:00"]}


@pytest.mark.parametrize(
    ("local_time", "acts"),
    [
        ("2026-03-02 08:30", True),  # Monday, CET: 07:30 UTC, outside the window read in UTC
        ("2026-03-02 07:59", False),
        ("2026-03-02 20:30", False),  # 19:30 UTC, inside the window were it read in UTC
        ("2026-07-06 08:00", True),  # Monday, CEST (UTC+2)
        ("2026-07-06 19:59", True),
        ("2026-03-07 12:00", False),  # Saturday
    ],
)
def test_schedule_window_is_read_on_the_berlin_wall_clock(local_time: str, acts: bool) -> None:
    now = berlin(local_time)
    result = hot(schedule=BUSINESS_HOURS).gpu(now, 0.95)
    assert values_of(result) == ({FREE_RPM: 5.0} if acts else {})


def test_an_active_policy_is_released_when_its_window_closes() -> None:
    driver = hot(schedule=BUSINESS_HOURS)
    assert driver.gpu(berlin("2026-03-02 19:59"), 0.95).proposals
    closed = driver.gpu(berlin("2026-03-02 20:00"), 0.95)
    assert closed.proposals == ()
    assert events_of(closed) == [(HOT, "", "released")]


def test_a_per_tenant_policy_does_nothing_outside_its_window() -> None:
    driver = cost_anomaly(schedule=BUSINESS_HOURS)
    saturday = berlin("2026-03-07 12:00")
    assert driver.cost(saturday, {"evil": 1.0}, {"evil": 0.01}).proposals == ()
    monday = berlin("2026-03-02 12:00")
    assert values_of(driver.cost(monday, {"evil": 1.0}, {"evil": 0.01})) == {
        "tenant/evil/tokens_per_minute": 5000.0
    }


# --- per: tenant --------------------------------------------------------------------------------


def test_per_tenant_cuts_only_the_anomalous_tenant() -> None:
    driver = cost_anomaly()
    result = driver.cost(0.0, {"acme": 0.02, "evil": 1.0}, {"acme": 0.02, "evil": 0.02})
    assert values_of(result) == {"tenant/evil/tokens_per_minute": 5000.0}  # 20000 × 0.25
    assert events_of(result) == [("ThrottlePolicy/cost", "evil", "engaged")]
    assert result.active == {"ThrottlePolicy/cost": ("evil",)}
    [made] = result.proposals
    assert {(r.name, r.value) for r in made.signals} == {("spend", 1.0), ("usual", 0.02)}
    assert "spend=1" in made.reason
    assert "usual=0.02" in made.reason


def test_per_tenant_for_counts_per_tenant() -> None:
    driver = cost_anomaly(for_="5m")
    driver.cost(0.0, {"acme": 1.0, "evil": 0.02}, {"acme": 0.02, "evil": 0.02})
    driver.cost(150.0, {"acme": 1.0, "evil": 1.0}, {"acme": 0.02, "evil": 0.02})
    result = driver.cost(300.0, {"acme": 1.0, "evil": 1.0}, {"acme": 0.02, "evil": 0.02})
    assert values_of(result) == {"tenant/acme/tokens_per_minute": 5000.0}
    result = driver.cost(450.0, {"acme": 1.0, "evil": 1.0}, {"acme": 0.02, "evil": 0.02})
    assert set(values_of(result)) == {
        "tenant/acme/tokens_per_minute",
        "tenant/evil/tokens_per_minute",
    }


def test_a_tenant_missing_from_one_vector_is_never_flagged() -> None:
    driver = cost_anomaly()
    for now in (0.0, 30.0, 60.0, 600.0):
        # `newbie` spends a lot but has no history: `usual` has no value for it.
        result = driver.cost(now, {"newbie": 50.0, "evil": 1.0}, {"evil": 0.02})
        assert values_of(result) == {"tenant/evil/tokens_per_minute": 5000.0}
        assert all(t.key != "newbie" for t in result.transitions)


def test_the_release_of_one_tenant_leaves_the_others_active() -> None:
    driver = cost_anomaly()
    driver.cost(0.0, {"acme": 1.0, "evil": 1.0}, {"acme": 0.02, "evil": 0.02})
    result = driver.cost(30.0, {"acme": 0.02, "evil": 1.0}, {"acme": 0.02, "evil": 0.02})
    assert values_of(result) == {"tenant/evil/tokens_per_minute": 5000.0}
    assert events_of(result) == [("ThrottlePolicy/cost", "acme", "released")]


@pytest.mark.parametrize(
    "hostile",
    [
        "a/b",
        "x}{y",
        "a@gpt-4",
        "",
        "*",
        "$tenant",
        "..",
        "acme/requests_per_minute@y",
        "evil/tokens_per_day@x",
    ],
)
def test_a_hostile_label_value_gives_a_note_not_a_crash_or_a_wrong_address(hostile: str) -> None:
    driver = cost_anomaly()
    result = driver.cost(0.0, {hostile: 9.0, "evil": 1.0}, {hostile: 0.01, "evil": 0.02})
    assert values_of(result) == {"tenant/evil/tokens_per_minute": 5000.0}
    [note] = result.notes
    assert note.startswith("ThrottlePolicy/cost:")
    assert "address" in note


# --- actions ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("action", "expected"),
    [
        ({"target": FREE_RPM, "scale": 0.5}, 5.0),
        ({"target": FREE_RPM, "set": 3}, 3.0),
        ({"target": FREE_RPM, "scale": 0.1, "min": 4}, 4.0),  # 1 raised to min 4
        ({"target": FREE_RPM, "scale": 3, "max": 25}, 25.0),  # 30 lowered to max 25
        ({"target": FREE_RPM, "scale": 0.5, "min": 2, "max": 8}, 5.0),  # within both
        ({"target": FREE_RPM, "set": 100, "max": 50}, 50.0),
        ({"target": "global/tokens_per_minute", "set": 3_000_000}, 3_000_000.0),
        ({"target": "plan/paid/tokens_per_minute@gpt-4", "scale": 0.5}, 10000.0),  # inherits
    ],
)
def test_action_value(action: dict[str, Any], expected: float) -> None:
    driver = Driver(policy_set(throttle("hot", [action], when="gpu_util > 0.90")))
    [made] = driver.gpu(0.0, 0.95).proposals
    assert made.value == expected
    assert made.address == Address.parse(action["target"])


def test_min_applies_per_tenant_after_scaling_its_plan_value() -> None:
    driver = cost_anomaly()
    result = driver.cost(0.0, {"small": 1.0, "evil": 1.0}, {"small": 0.02, "evil": 0.02})
    # small is on `tiny` (2000 × 0.25 = 500 → min 1000); evil on `paid` (20000 × 0.25).
    assert values_of(result) == {
        "tenant/small/tokens_per_minute": 1000.0,
        "tenant/evil/tokens_per_minute": 5000.0,
    }
    small = next(p for p in result.proposals if p.address.tenant == "small")
    assert "min 1000" in small.reason


def test_scaling_an_address_without_baseline_gives_a_note_and_no_proposal() -> None:
    actions = [
        {"target": "global/concurrent_requests", "scale": 0.5},  # no global baseline
        {"target": "plan/free/tokens_per_minute", "scale": 0.5},  # free has no such limit
        HALVE_FREE,
    ]
    driver = Driver(policy_set(throttle("hot", actions, when="gpu_util > 0.90")))
    result = driver.gpu(0.0, 0.95)
    assert values_of(result) == {FREE_RPM: 5.0}
    assert len(result.notes) == 2
    assert "global/concurrent_requests" in result.notes[0]
    assert "plan/free/tokens_per_minute" in result.notes[1]
    assert all(n.startswith(f"{HOT}:") and "no baseline" in n for n in result.notes)


def test_a_tenant_on_a_plan_without_the_limit_cannot_be_scaled() -> None:
    driver = cost_anomaly()
    # `nobody` is not in the registry: the default plan `free` has no tokens_per_minute.
    result = driver.cost(0.0, {"nobody": 1.0}, {"nobody": 0.02})
    assert result.proposals == ()
    assert events_of(result) == [("ThrottlePolicy/cost", "nobody", "engaged")]
    [note] = result.notes
    assert "tenant/nobody/tokens_per_minute" in note


def test_several_actions_each_give_a_proposal_with_the_same_reason() -> None:
    actions = [HALVE_FREE, {"target": "global/tokens_per_minute", "set": 3_000_000}]
    driver = Driver(policy_set(throttle("hot", actions, when="gpu_util > 0.90")))
    result = driver.gpu(0.0, 0.95)
    assert values_of(result) == {FREE_RPM: 5.0, "global/tokens_per_minute": 3_000_000.0}
    assert {p.policy for p in result.proposals} == {HOT}
    assert all("gpu_util=0.95" in p.reason for p in result.proposals)


def test_a_policy_without_when_acts_whenever_scheduled() -> None:
    policy = throttle("nightly", [HALVE_FREE], signals={})
    result = Driver(policy_set(policy)).tick(0.0)
    assert values_of(result) == {FREE_RPM: 5.0}


# --- staleness: a value that cannot be trusted is never read --------------------------------


@pytest.mark.parametrize(
    "sample",
    [
        ScalarSample(0.95, 100.0 - 61.0),  # older than stale_after (60s)
        ScalarSample(math.nan, 100.0),
        ScalarSample(math.inf, 100.0),
        ScalarSample(0.95, 100.0, Validity.ERROR, "connection refused"),
        ScalarSample(0.95, 100.0, Validity.PARTIAL),
        ScalarSample(0.95, 100.0, Validity.EMPTY),
    ],
    ids=["stale", "nan", "inf", "error", "partial", "empty"],
)
def test_an_untrustworthy_sample_does_not_fire_the_condition(sample: ScalarSample) -> None:
    assert hot().gpu(100.0, sample).proposals == ()


def test_a_sample_exactly_stale_after_old_is_still_fresh() -> None:
    assert values_of(hot().gpu(100.0, ScalarSample(0.95, 40.0))) == {FREE_RPM: 5.0}


def test_an_untrustworthy_value_is_not_read_as_zero() -> None:
    # A failed query's placeholder value of 0 would make `gpu_util < 0.1` true.
    driver = hot(when="gpu_util < 0.1")
    assert driver.gpu(0.0, ScalarSample(0.0, 0.0, Validity.ERROR)).proposals == ()
    assert driver.gpu(30.0, ScalarSample(math.nan, 30.0)).proposals == ()
    # A negated comparison is true for NaN in CEL: the engine must not evaluate it at all.
    assert hot(when="!(gpu_util <= 0.9)").gpu(0.0, math.nan).proposals == ()


def test_a_missing_signal_does_not_fire_the_condition() -> None:
    assert hot(when="!(gpu_util <= 0.9)").tick(0.0, {}).proposals == ()


def stale_driver(then: str) -> Driver:
    """`hot`, engaged at t=0; its signal goes stale from t=30 on (hold_for 2m)."""
    driver = hot(on_stale={"hold_for": "2m", "then": then})
    assert driver.gpu(0.0, 0.95).proposals
    return driver


STALE = ScalarSample(0.95, -1000.0)  # long older than stale_after (60s)
BROKEN = ScalarSample(0.0, 0.0, Validity.ERROR, "503")


def test_an_active_policy_holds_while_its_signal_is_stale() -> None:
    driver = stale_driver("baseline")
    for now in (30.0, 90.0, 149.0):
        result = driver.gpu(now, BROKEN)
        assert values_of(result) == {FREE_RPM: 5.0}
        assert "untrustworthy" in result.proposals[0].reason
    assert events_of(driver.gpu(30.0 + 119.9, BROKEN)) == [(HOT, "", "stale-hold")]


def test_on_stale_then_baseline_releases_after_hold_for() -> None:
    driver = stale_driver("baseline")
    driver.gpu(30.0, BROKEN)
    result = driver.gpu(150.0, BROKEN)  # untrustworthy for 2m
    assert result.proposals == ()
    assert events_of(result) == [(HOT, "", "stale-released")]
    assert driver.gpu(600.0, BROKEN).proposals == ()


def test_on_stale_then_hold_keeps_the_policy_active() -> None:
    driver = stale_driver("hold")
    driver.gpu(30.0, BROKEN)
    for now in (150.0, 3600.0):
        assert values_of(driver.gpu(now, STALE)) == {FREE_RPM: 5.0}
    # Trustworthy again (the hold's end, said first) and cool: released.
    ended = driver.gpu(3630.0, 0.2)
    assert events_of(ended) == [(HOT, "", "stale-recovered"), (HOT, "", "released")]
    assert ended.transitions[0].detail == (
        "gpu_util usable again after 1h unusable: the condition decides again"
    )


def test_a_throttle_hold_ending_inside_hold_for_is_a_recovered_transition() -> None:
    """A ThrottlePolicy's stale-hold that ended inside `hold_for` made no transition (an
    AdaptiveLimit's did): the journal said the hold began and never that it ended."""
    driver = stale_driver("baseline")
    assert events_of(driver.gpu(30.0, BROKEN)) == [(HOT, "", "stale-hold")]
    driver.gpu(60.0, STALE)
    ended = driver.gpu(90.0, 0.95)
    assert events_of(ended) == [(HOT, "", "stale-recovered")]
    [recovered] = ended.transitions
    assert recovered.detail == (
        "gpu_util usable again after 1m unusable: the condition decides again"
    )
    assert [(r.name, r.value) for r in recovered.signals] == [("gpu_util", 0.95)]
    assert values_of(ended) == {FREE_RPM: 5.0}  # still hot: still engaged
    assert driver.gpu(120.0, 0.95).transitions == ()


def test_on_stale_then_min_engages_an_idle_policy() -> None:
    driver = hot(on_stale={"hold_for": "2m", "then": "min"})
    assert driver.gpu(0.0, BROKEN).proposals == ()
    assert driver.gpu(119.0, BROKEN).proposals == ()
    result = driver.gpu(120.0, BROKEN)
    assert values_of(result) == {FREE_RPM: 5.0}
    assert events_of(result) == [(HOT, "", "stale-engaged")]


def test_on_stale_then_min_keeps_an_active_policy_active() -> None:
    driver = stale_driver("min")
    for now in (30.0, 150.0, 600.0):
        assert values_of(driver.gpu(now, BROKEN)) == {FREE_RPM: 5.0}


def test_for_starts_again_after_an_untrustworthy_tick() -> None:
    driver = hot(for_="1m")
    driver.gpu(0.0, 0.95)
    driver.gpu(30.0, BROKEN)  # not seen to hold: the minute starts again
    driver.gpu(60.0, 0.95)
    assert driver.gpu(90.0, 0.95).proposals == ()
    assert values_of(driver.gpu(120.0, 0.95)) == {FREE_RPM: 5.0}


def test_a_failed_vector_query_flags_no_tenant() -> None:
    driver = cost_anomaly()
    failed = vector("tenant", {}, 0.0, Validity.ERROR)
    assert driver.cost(0.0, {"evil": 1.0}, failed).proposals == ()


def test_a_stale_tenant_value_is_not_read() -> None:
    driver = cost_anomaly()
    usual = vector("tenant", {"evil": 0.02, "acme": 0.02}, 0.0)  # stale_after 120s
    result = driver.cost(121.0, {"evil": 1.0, "acme": 1.0}, usual)
    assert result.proposals == ()
    fresh = driver.cost(240.0, {"evil": 1.0}, {"evil": 0.02})
    assert values_of(fresh) == {"tenant/evil/tokens_per_minute": 5000.0}


def test_an_active_tenant_holds_while_its_signal_is_untrustworthy_then_releases() -> None:
    driver = cost_anomaly(on_stale={"hold_for": "1m", "then": "baseline"})
    driver.cost(0.0, {"evil": 1.0}, {"evil": 0.02})
    failed = vector("tenant", {}, 30.0, Validity.ERROR)
    held = driver.cost(30.0, {"evil": 1.0}, failed)
    assert values_of(held) == {"tenant/evil/tokens_per_minute": 5000.0}
    released = driver.cost(90.0, {"evil": 1.0}, failed)
    assert released.proposals == ()
    assert events_of(released) == [("ThrottlePolicy/cost", "evil", "stale-released")]


def test_a_tenant_hold_ending_inside_hold_for_is_a_recovered_transition() -> None:
    driver = cost_anomaly(on_stale={"hold_for": "1m", "then": "baseline"})
    driver.cost(0.0, {"evil": 1.0, "acme": 0.001}, {"evil": 0.02, "acme": 0.02})
    failed = vector("tenant", {}, 30.0, Validity.ERROR)
    assert events_of(driver.cost(30.0, {"evil": 1.0}, failed)) == [
        ("ThrottlePolicy/cost", "evil", "stale-hold")
    ]
    ended = driver.cost(45.0, {"evil": 1.0, "acme": 0.001}, {"evil": 0.02, "acme": 0.02})
    # Only the tenant whose hold ended: acme was idle (nothing held, nothing journalled).
    assert events_of(ended) == [("ThrottlePolicy/cost", "evil", "stale-recovered")]
    assert ended.transitions[0].detail == (
        "spend, usual usable again after 15s unusable: the condition decides again"
    )
    assert values_of(ended) == {"tenant/evil/tokens_per_minute": 5000.0}


# --- AdaptiveLimit ----------------------------------------------------------------------------

RPS = Address.parse("global/requests_per_second")  # baseline 2000


def control(value: float, current: float | None, **spec: Any) -> float | None:
    """One AdaptiveLimit step from `current` with the signal at `value`; the proposed value."""
    driver = Driver(policy_set(adaptive(**spec)))
    result = driver.tick(
        0.0, {GPU_QUERY: value}, current=None if current is None else {RPS: current}
    )
    [made] = result.proposals or [None]
    return None if made is None else made.value


@pytest.mark.parametrize(
    ("signal", "expected"),
    [
        (0.86, 800.0),  # above setpoint + tolerance: × decrease_factor 0.8
        (0.99, 800.0),
        (0.74, 1050.0),  # below setpoint - tolerance: + increase 50
        (0.0, 1050.0),
        (0.80, 1000.0),  # inside the dead band: hold
        (0.845, 1000.0),
        (0.755, 1000.0),
    ],
)
def test_aimd_step_from_the_value_in_force(signal: float, expected: float) -> None:
    assert control(signal, 1000.0) == expected


def test_aimd_reason_names_the_signal_and_setpoint() -> None:
    driver = Driver(policy_set(adaptive()))
    [made] = driver.tick(0.0, {GPU_QUERY: 0.9}, current={RPS: 1000.0}).proposals
    assert made.policy == "AdaptiveLimit/rps-by-gpu"
    assert "gpu_util=0.9" in made.reason
    assert "setpoint 0.8" in made.reason
    assert [(r.name, r.value) for r in made.signals] == [("gpu_util", 0.9)]


@pytest.mark.parametrize(
    ("signal", "current", "expected"),
    [(0.99, 210.0, 200.0), (0.1, 4990.0, 5000.0), (0.8, 9000.0, 5000.0), (0.8, 10.0, 200.0)],
)
def test_aimd_respects_its_bounds(signal: float, current: float, expected: float) -> None:
    assert control(signal, current) == expected


def test_aimd_starts_from_the_baseline_then_from_its_own_last_value() -> None:
    driver = Driver(policy_set(adaptive()))
    assert values_of(driver.tick(0.0, {GPU_QUERY: 0.9})) == {str(RPS): 1600.0}
    # The sample of 30s covers 0s–30s, when the cut was not yet in force everywhere: hold.
    assert values_of(driver.tick(30.0, {GPU_QUERY: 0.9})) == {str(RPS): 1600.0}
    assert values_of(driver.tick(60.0, {GPU_QUERY: 0.9})) == {str(RPS): 1280.0}
    assert values_of(driver.tick(90.0, {GPU_QUERY: 0.5})) == {str(RPS): 1280.0}
    assert values_of(driver.tick(120.0, {GPU_QUERY: 0.5})) == {str(RPS): 1330.0}


def test_aimd_decreases_from_the_value_in_force_when_it_is_lower_than_its_memory() -> None:
    driver = Driver(policy_set(adaptive()))
    driver.tick(0.0, {GPU_QUERY: 0.9})  # remembers 1600
    # Someone holds the limit at 500: the controller cuts from there (anti-windup).
    result = driver.tick(30.0, {GPU_QUERY: 0.9}, current={RPS: 500.0})
    assert values_of(result) == {str(RPS): 500.0}  # the cut's dead time: hold what is in force
    result = driver.tick(60.0, {GPU_QUERY: 0.9}, current={RPS: 500.0})
    assert values_of(result) == {str(RPS): 400.0}


GRADIENT = {"algorithm": "gradient", "aimd": None}


@pytest.mark.parametrize(
    ("signal", "expected"),
    [
        (1.0, 900.0),  # ratio 0.8, clamped to 1 - max_step 0.1
        (0.85, 1000.0 * 0.8 / 0.85),  # within max_step: the ratio itself
        (0.8, 1000.0),
        (0.75, 1000.0 * 0.8 / 0.75),
        (0.4, 1100.0),  # ratio 2, clamped to 1 + max_step
        (0.0, 1100.0),  # no load: the largest step up
    ],
)
def test_gradient_without_smoothing_multiplies_by_the_clamped_ratio(
    signal: float, expected: float
) -> None:
    gradient = {"max_step": 0.1, "smoothing": 1.0}
    assert control(signal, 1000.0, **GRADIENT, gradient=gradient) == pytest.approx(expected)


@pytest.mark.parametrize("signal", [0.0, 0.3, 0.79, 0.81, 1.0, 5.0, 100.0])
def test_gradient_moves_toward_the_setpoint_by_at_most_max_step(signal: float) -> None:
    value = control(signal, 1000.0, **GRADIENT, gradient={"max_step": 0.25})  # smoothing 0.5
    assert value is not None
    if signal > 0.8:
        assert 750.0 <= value < 1000.0
    else:
        assert 1000.0 < value <= 1250.0


def test_gradient_respects_bounds_and_tolerance() -> None:
    gradient = {"max_step": 0.5, "smoothing": 1.0, "tolerance": 0.05}
    assert control(0.84, 1000.0, **GRADIENT, gradient=gradient) == 1000.0
    assert control(2.0, 300.0, **GRADIENT, gradient=gradient) == 200.0
    assert control(0.1, 4000.0, **GRADIENT, gradient=gradient) == 5000.0


def adaptive_stale(then: str) -> Driver:
    """The AIMD controller at 800 after one hot tick at t=0; its signal fails from t=30."""
    driver = Driver(policy_set(adaptive(on_stale={"hold_for": "2m", "then": then})))
    assert values_of(driver.tick(0.0, {GPU_QUERY: 0.9}, current={RPS: 1000.0})) == {str(RPS): 800.0}
    return driver


@pytest.mark.parametrize("then", ["baseline", "min", "hold"])
def test_adaptive_holds_its_value_while_the_signal_is_stale(then: str) -> None:
    driver = adaptive_stale(then)
    for now in (30.0, 90.0, 149.0):
        result = driver.tick(now, {GPU_QUERY: STALE}, current={RPS: 800.0})
        assert values_of(result) == {str(RPS): 800.0}
        assert "gpu_util is stale" in result.proposals[0].reason


@pytest.mark.parametrize(("then", "expected"), [("baseline", {}), ("min", {str(RPS): 200.0})])
def test_adaptive_falls_back_after_hold_for(then: str, expected: dict[str, float]) -> None:
    driver = adaptive_stale(then)
    driver.tick(30.0, {GPU_QUERY: BROKEN})
    for now in (150.0, 600.0):
        assert values_of(driver.tick(now, {GPU_QUERY: BROKEN})) == expected


@pytest.mark.parametrize(
    ("then", "applied"),
    [("min", "falling back to bounds.min 200"), ("baseline", "falling back to the baseline")],
)
def test_adaptive_falling_back_after_hold_for_is_a_transition_naming_why(
    then: str, applied: str
) -> None:
    """When `hold_for` ran out the fallback made no transition of its own: the limit's
    change was journalled with the resolver's generic reason, naming no signal."""
    driver = adaptive_stale(then)
    assert events_of(driver.tick(30.0, {GPU_QUERY: BROKEN})) == [(ADAPTIVE, "", "stale-hold")]
    assert driver.tick(90.0, {GPU_QUERY: BROKEN}).transitions == ()
    fell = driver.tick(150.0, {GPU_QUERY: BROKEN})
    assert events_of(fell) == [(ADAPTIVE, "", "stale-fallback")]
    [fallback] = fell.transitions
    assert fallback.detail == (
        f"gpu_util is error for 2m: {applied} (on_stale: hold_for 2m, then {then})"
    )
    assert [(r.name, r.validity) for r in fallback.signals] == [("gpu_util", Validity.ERROR)]
    for now in (155.0, 600.0):  # said once, not on every tick of the fallback
        assert driver.tick(now, {GPU_QUERY: BROKEN}).transitions == ()
    ended = driver.tick(605.0, {GPU_QUERY: 0.5}, current={RPS: 2000.0})
    assert events_of(ended) == [(ADAPTIVE, "", "stale-recovered")]
    assert ended.transitions[0].detail.startswith("gpu_util usable again after 9m35s")


def test_adaptive_with_hold_for_0_journals_its_fallback_on_the_first_bad_tick() -> None:
    driver = Driver(policy_set(adaptive(on_stale={"hold_for": "0s", "then": "min"})))
    driver.tick(0.0, {GPU_QUERY: 0.9}, current={RPS: 1000.0})
    fell = driver.tick(30.0, {GPU_QUERY: STALE}, current={RPS: 800.0})
    assert events_of(fell) == [(ADAPTIVE, "", "stale-fallback")]
    assert fell.transitions[0].detail == (
        "gpu_util is stale for 0s: falling back to bounds.min 200 (on_stale: hold_for 0s, then min)"
    )
    assert values_of(fell) == {str(RPS): 200.0}
    assert driver.tick(35.0, {GPU_QUERY: STALE}).transitions == ()


def test_adaptive_then_hold_keeps_its_value_indefinitely() -> None:
    driver = adaptive_stale("hold")
    driver.tick(30.0, {GPU_QUERY: BROKEN})
    assert values_of(driver.tick(3600.0, {GPU_QUERY: BROKEN})) == {str(RPS): 800.0}


def test_adaptive_resumes_from_the_value_in_force_once_fresh() -> None:
    driver = adaptive_stale("baseline")
    driver.tick(30.0, {GPU_QUERY: BROKEN})
    driver.tick(150.0, {GPU_QUERY: BROKEN})
    result = driver.tick(180.0, {GPU_QUERY: 0.5}, current={RPS: 2000.0})
    assert values_of(result) == {str(RPS): 2050.0}


def test_adaptive_with_nothing_to_hold_proposes_nothing_and_says_why_once() -> None:
    driver = Driver(policy_set(adaptive()))
    result = driver.tick(0.0, {GPU_QUERY: BROKEN})
    assert result.proposals == ()
    assert any(n.startswith("AdaptiveLimit/rps-by-gpu:") for n in result.notes)
    # Said when the hold begins, not on every tick of it (a warning per tick was a flood).
    assert driver.tick(5.0, {GPU_QUERY: BROKEN}).notes == ()


ADAPTIVE = "AdaptiveLimit/rps-by-gpu"
OUT_OF_RANGE = ScalarSample(95.0, 0.0)  # a percent where the policy reads a ratio


@pytest.mark.parametrize(
    ("reading", "why"),
    [
        (STALE, "stale"),
        (BROKEN, "error"),
        (ScalarSample(math.nan, 30.0), "not_finite"),
        (OUT_OF_RANGE, "out_of_range"),
    ],
    ids=["stale", "error", "nan", "out-of-range"],
)
def test_an_adaptive_hold_on_a_bad_signal_is_a_transition_when_it_begins_and_ends(
    reading: ScalarSample, why: str
) -> None:
    """An AdaptiveLimit holding its value on a bad signal made no transition: nothing was
    journalled, so on-call saw the limit stand still and no line saying why. Now one event
    when the hold begins, naming the signal and why, none while it lasts, one when it ends."""
    gpu = {"query": GPU_QUERY, "stale_after": "60s", "name": "gpu_util", "range": {"max": 1}}
    driver = Driver(policy_set(adaptive(signal=gpu, on_stale={"hold_for": "2m", "then": "hold"})))
    driver.tick(0.0, {GPU_QUERY: 0.9}, current={RPS: 1000.0})
    began = driver.tick(30.0, {GPU_QUERY: reading}, current={RPS: 800.0})
    assert events_of(began) == [(ADAPTIVE, "", "stale-hold")]
    [hold] = began.transitions
    assert hold.detail.startswith(f"gpu_util is {why}")
    assert "holding 800" in hold.detail
    assert [(r.name, r.validity) for r in hold.signals] == [("gpu_util", Validity(why))]
    for now in (35.0, 90.0, 400.0):  # past hold_for too: `then: hold` keeps holding
        assert driver.tick(now, {GPU_QUERY: reading}, current={RPS: 800.0}).transitions == ()
    ended = driver.tick(405.0, {GPU_QUERY: 0.5}, current={RPS: 800.0})
    assert events_of(ended) == [(ADAPTIVE, "", "stale-recovered")]
    assert ended.transitions[0].detail.startswith("gpu_util usable again after 6m15s")
    assert values_of(ended) == {str(RPS): 800.0}
    again = driver.tick(410.0, {GPU_QUERY: 0.5}, current={RPS: 800.0})
    assert again.transitions == ()
    assert values_of(again) == {str(RPS): 850.0}  # the control law acts again


def test_adaptive_outside_its_schedule_proposes_nothing() -> None:
    driver = Driver(policy_set(adaptive(schedule=BUSINESS_HOURS)))
    assert driver.tick(berlin("2026-03-07 12:00"), {GPU_QUERY: 0.9}).proposals == ()
    assert driver.tick(berlin("2026-03-02 12:00"), {GPU_QUERY: 0.9}).proposals


def test_adaptive_whose_schedule_closes_mid_hold_journals_the_end_of_the_hold() -> None:
    """The schedule closing during a hold forgot it silently: the journal's last word on the
    limit was its stale-hold, and no stale-recovered ever came."""
    driver = Driver(policy_set(adaptive(schedule=BUSINESS_HOURS)))
    closing = berlin("2026-03-02 20:00")
    driver.tick(closing - 600.0, {GPU_QUERY: 0.9}, current={RPS: 1000.0})
    began = driver.tick(closing - 180.0, {GPU_QUERY: BROKEN})
    assert events_of(began) == [(ADAPTIVE, "", "stale-hold")]
    closed = driver.tick(closing, {GPU_QUERY: BROKEN})
    assert closed.proposals == ()
    assert events_of(closed) == [(ADAPTIVE, "", "stale-ended")]
    assert closed.transitions[0].detail == (
        "the schedule closed while gpu_util was unusable for 3m: the hold ends, "
        "the limit returns to its baseline"
    )
    assert driver.tick(closing + 60.0, {GPU_QUERY: BROKEN}).transitions == ()


# --- determinism ------------------------------------------------------------------------------

TENANTS = ("acme", "evil", "small", "a/b")
tenant_values = st.dictionaries(
    st.sampled_from(TENANTS),
    st.one_of(st.floats(0, 5), st.just(math.nan)),
    max_size=len(TENANTS),
)
tick_inputs = st.tuples(
    st.one_of(st.floats(0, 1.5), st.just(math.nan)), tenant_values, tenant_values
)


def _run(ticks: list[tuple[float, dict[str, float], dict[str, float]]]) -> list[Evaluation]:
    policies = policy_set(
        throttle("hot", [HALVE_FREE], when="gpu_util > 0.9", until="gpu_util < 0.75", for_="1m"),
        cost_policy("cost", for_="30s", cooldown="1m"),
        adaptive(),
    )
    driver = Driver(policies, registry=REGISTRY)
    out = []
    for number, (gpu, spend, usual) in enumerate(ticks):
        out.append(driver.cost(30.0 * number, spend, usual))
        out.append(driver.tick(30.0 * number + 1, {GPU_QUERY: gpu}))
    return out


@settings(max_examples=200, deadline=None)
@given(st.lists(tick_inputs, min_size=1, max_size=8))
def test_the_engine_is_deterministic(
    ticks: list[tuple[float, dict[str, float], dict[str, float]]],
) -> None:
    # repr compares NaN readings as equal, and also the order of proposals and notes.
    assert repr(_run(ticks)) == repr(_run(ticks))


def test_evaluate_does_not_change_its_input_state() -> None:
    driver = hot(for_="1m")
    driver.gpu(0.0, 0.95)
    before = repr(driver.engine)
    snapshot = driver.snapshot(60.0, {GPU_QUERY: 0.95}, {})
    first = evaluate(driver.policies, snapshot, driver.engine, 60.0, driver.baselines)
    second = evaluate(driver.policies, snapshot, driver.engine, 60.0, driver.baselines)
    assert repr(driver.engine) == before
    assert repr(first) == repr(second)
    assert values_of(first) == {FREE_RPM: 5.0}


def test_idle_conditions_leave_no_state() -> None:
    driver = cost_anomaly()
    driver.cost(0.0, {"acme": 0.02, "evil": 0.02}, {"acme": 0.02, "evil": 0.02})
    assert driver.engine == EngineState(adaptives={})
    driver.cost(30.0, {"evil": 1.0}, {"evil": 0.02})
    assert set(driver.engine.conditions["ThrottlePolicy/cost"]) == {"evil"}


@pytest.mark.parametrize("for_", ["0s", "5m"])
def test_a_tenant_that_disappears_leaves_no_state_behind(for_: str) -> None:
    # Pending (5m) or active (0s), then gone from both vectors: after on_stale's hold_for
    # (1m, then baseline) nothing about it is worth remembering.
    driver = cost_anomaly(for_=for_, on_stale={"hold_for": "1m", "then": "baseline"})
    driver.cost(0.0, {"gone": 1.0, "evil": 0.02}, {"gone": 0.02, "evil": 0.02})
    for now in (30.0, 90.0, 120.0):
        driver.cost(now, {"evil": 0.02}, {"evil": 0.02})
    assert driver.engine.conditions == {}


def test_fail_closed_per_tenant_engages_only_tenants_it_was_watching() -> None:
    # `then: min` fails closed for a tenant that was pending when its data vanished, but a
    # tenant never seen with valid data (a new one) is never flagged.
    driver = Driver(
        policy_set(cost_policy("cost", on_stale={"hold_for": "1m", "then": "min"})),
        registry={"evil": "paid", "newbie": "paid"},
    )
    driver.cost(0.0, {"evil": 1.0, "newbie": 5.0}, {"evil": 0.02})
    for now in (30.0, 60.0, 90.0, 120.0):
        result = driver.cost(now, {"newbie": 5.0}, {})  # evil's data is gone
    assert values_of(result) == {"tenant/evil/tokens_per_minute": 5000.0}


def test_engaging_needs_only_the_when_signals_and_releasing_only_the_until_signals() -> None:
    # `refused` is read by `until` alone: its absence must not stop an engagement, and once
    # active, a missing `refused` is untrustworthy data for the release (on_stale holds).
    from tests.unit.policy_builders import COST_SIGNALS

    signals = {**COST_SIGNALS, "refused": {"query": "refused_query"}}
    driver = Driver(
        policy_set(
            cost_policy(
                "cost",
                signals=signals,
                for_="0s",
                until="spend < 1.5 * usual && refused < 0.01",
                on_stale={"hold_for": "1m", "then": "baseline"},
            )
        ),
        registry={"evil": "paid"},
    )
    result = driver.cost(0.0, {"evil": 1.0}, {"evil": 0.02})
    assert values_of(result) == {"tenant/evil/tokens_per_minute": 5000.0}
    # Spend is back to normal but `refused` is still missing: hold, do not release.
    result = driver.cost(30.0, {"evil": 0.02}, {"evil": 0.02})
    assert values_of(result) == {"tenant/evil/tokens_per_minute": 5000.0}
    # After on_stale.hold_for of untrustworthy release data: back to the baseline.
    result = driver.cost(90.0, {"evil": 0.02}, {"evil": 0.02})
    assert values_of(result) == {}
