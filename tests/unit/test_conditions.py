"""When a condition may be read and how it moves: signal validity, `for:`, `cooldown:`, on_stale."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from controller.model import ScalarSample, SignalKey, Snapshot, Validity, VectorSample
from controller.policy.conditions import ConditionState, Event, Rules, step
from controller.policy.documents import OnStale, SignalSpec
from controller.policy.inputs import label_universe, scalar_input, vector_input
from tests.unit.policy_builders import vector

SPEC = SignalSpec(query="q", stale_after=60.0)
KEY = SignalKey("q")


def read(sample: ScalarSample | VectorSample | None, now: float = 100.0) -> Validity:
    samples = {} if sample is None else {KEY: sample}
    return scalar_input("s", SPEC, Snapshot(now, samples), None, now).validity


@pytest.mark.parametrize(
    ("sample", "expected"),
    [
        (ScalarSample(0.5, 100.0), Validity.OK),
        (ScalarSample(0.5, 40.0), Validity.OK),  # exactly stale_after old
        (ScalarSample(0.5, 39.9), Validity.STALE),
        (ScalarSample(math.nan, 100.0), Validity.NOT_FINITE),
        (ScalarSample(-math.inf, 100.0), Validity.NOT_FINITE),
        (ScalarSample(0.0, 100.0, Validity.ERROR, "timeout"), Validity.ERROR),
        (ScalarSample(0.0, 100.0, Validity.EMPTY), Validity.EMPTY),
        (ScalarSample(0.5, 100.0, Validity.PARTIAL), Validity.PARTIAL),
        (None, Validity.MISSING),
    ],
)
def test_a_scalar_is_valid_only_when_fresh_finite_and_ok(
    sample: ScalarSample | None, expected: Validity
) -> None:
    assert read(sample) is expected


def test_a_vector_where_a_scalar_is_expected_is_not_valid() -> None:
    assert read(vector("tenant", {"acme": 0.5}, 100.0)) is not Validity.OK


def test_a_vector_is_aligned_to_the_label_values_with_a_validity_each() -> None:
    sample = VectorSample(
        "tenant",
        ("old", "nan", "ok"),
        np.array([1.0, math.nan, 3.0]),
        np.array([0.0, 100.0, 100.0]),
    )
    universe = ("ok", "absent", "old", "nan")
    signal = vector_input("spend", SPEC, sample, universe, 100.0)
    assert signal.valid.tolist() == [True, False, False, False]
    assert signal.values[0] == 3.0
    readings = [signal.reading(i) for i in range(len(universe))]
    assert [r.validity for r in readings] == [
        Validity.OK,
        Validity.MISSING,
        Validity.STALE,
        Validity.NOT_FINITE,
    ]
    assert all(r.name == "spend" for r in readings)


@pytest.mark.parametrize("whole", [Validity.ERROR, Validity.EMPTY, Validity.PARTIAL])
def test_a_failed_vector_query_invalidates_every_label_value(whole: Validity) -> None:
    sample = vector("tenant", {"acme": 1.0}, 100.0, whole)
    signal = vector_input("spend", SPEC, sample, ("acme", "evil"), 100.0)
    assert not signal.valid.any()
    assert signal.reading(0).validity is whole


def test_a_scalar_signal_in_a_per_label_policy_applies_to_every_label_value() -> None:
    signal = vector_input("price", SPEC, ScalarSample(2.5, 90.0), ("a", "b"), 100.0)
    assert signal.values.tolist() == [2.5, 2.5]
    assert signal.valid.tolist() == [True, True]


def test_the_label_values_are_those_of_every_vector_and_every_tracked_key() -> None:
    spend = vector("tenant", {"a": 1.0, "b": 1.0}, 0.0)
    usual = vector("tenant", {"b": 1.0, "c": 1.0}, 0.0)
    assert set(label_universe([spend, usual, None], ["d"])) == {"a", "b", "c", "d"}


# --- the state machine ------------------------------------------------------------------------


def rules(hold: float = 0.0, cooldown: float = 0.0, **on_stale: object) -> Rules:
    return Rules(hold=hold, cooldown=cooldown, on_stale=OnStale.model_validate(on_stale))


def run(
    ticks: list[tuple[float, bool]], rule: Rules, state: ConditionState | None = None
) -> list[tuple[bool, Event]]:
    """Step through (time, when) with trustworthy signals; (active after, event) per tick."""
    current = state or ConditionState()
    out = []
    for now, when in ticks:
        current, event = step(current, valid=True, when=when, until=None, now=now, rules=rule)
        out.append((current.active, event))
    return out


def test_engaged_exactly_when_for_has_elapsed() -> None:
    steps = run([(0.0, True), (59.0, True), (60.0, True)], rules(hold=60.0))
    assert steps == [(False, ""), (False, ""), (True, "engaged")]


def test_until_decides_the_release_of_an_active_condition() -> None:
    active, _ = step(ConditionState(), valid=True, when=True, until=None, now=0.0, rules=rules())
    kept, event = step(active, valid=True, when=False, until=False, now=10.0, rules=rules())
    assert kept.active
    assert event == ""
    released, event = step(kept, valid=True, when=True, until=True, now=20.0, rules=rules())
    assert not released.active
    assert event == "released"


def test_on_stale_hold_for_counts_from_the_first_untrustworthy_tick() -> None:
    rule = rules(hold_for=60.0, then="baseline")
    state, _ = step(ConditionState(), valid=True, when=True, until=None, now=0.0, rules=rule)
    for now in (10.0, 40.0, 69.0):
        state, event = step(state, valid=False, when=False, until=None, now=now, rules=rule)
        assert state.active
        assert event == "stale-hold"
    state, event = step(state, valid=False, when=False, until=None, now=70.0, rules=rule)
    assert not state.active
    assert event == "stale-released"


def test_a_trustworthy_tick_restarts_the_hold_for_clock() -> None:
    rule = rules(hold_for=60.0, then="baseline")
    state, _ = step(ConditionState(), valid=True, when=True, until=None, now=0.0, rules=rule)
    state, _ = step(state, valid=False, when=False, until=None, now=10.0, rules=rule)
    state, _ = step(state, valid=True, when=True, until=None, now=50.0, rules=rule)
    state, event = step(state, valid=False, when=False, until=None, now=100.0, rules=rule)
    assert state.active
    assert event == "stale-hold"


def test_a_released_condition_with_a_stale_signal_stays_released_with_then_hold() -> None:
    rule = rules(hold_for=0.0, then="hold")
    state, event = step(ConditionState(), valid=False, when=False, until=None, now=0.0, rules=rule)
    assert not state.active
    assert event == ""


# --- property: `for:` and `cooldown:` as POLICY_FORMAT.md words them ------------------------

gaps = st.lists(
    st.tuples(st.sampled_from([1.0, 10.0, 15.0, 30.0, 45.0, 60.0]), st.booleans()),
    min_size=1,
    max_size=40,
)


@settings(max_examples=300, deadline=None)
@given(
    gaps,
    st.sampled_from([0.0, 30.0, 60.0, 120.0]),
    st.sampled_from([0.0, 30.0, 300.0]),
)
def test_engages_iff_when_held_for_long_enough_and_the_cooldown_is_over(
    ticks: list[tuple[float, bool]], hold: float, cooldown: float
) -> None:
    times = np.cumsum([gap for gap, _ in ticks]).tolist()
    whens = [when for _, when in ticks]
    steps = run(list(zip(times, whens, strict=True)), rules(hold=hold, cooldown=cooldown))
    active, released_at, run_start = False, None, None
    for now, when, (now_active, event) in zip(times, whens, steps, strict=True):
        run_start = (now if run_start is None else run_start) if when else None
        if active:
            # Without `until:`, an active condition lasts exactly while `when` holds.
            assert now_active == when
            assert event == ("" if when else "released")
            released_at = None if when else now
        else:
            cooled = released_at is None or now - released_at >= cooldown
            held = run_start is not None and now - run_start >= hold
            assert now_active == (held and cooled)
            assert event == ("engaged" if now_active else "")
        active = now_active
