"""Policy unit tests (`*_test.yaml`): expanding notation, multi-tick runs of engine + resolver."""

from __future__ import annotations

import re
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from controller.policy.policyset import PolicySet
from controller.policy.testing import CaseResult, PolicyTestCase, expand_series, run_case
from tests.unit.policy_builders import adaptive, cost_policy, policy_set, throttle

# --- expanding notation (as promtool) ---------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("0.5x4 0.95x10", [0.5] * 5 + [0.95] * 11),  # the example of POLICY_FORMAT.md
        ("1", [1.0]),
        ("1 2 3", [1.0, 2.0, 3.0]),
        ("1+1x3", [1.0, 2.0, 3.0, 4.0]),
        ("-2+4x3", [-2.0, 2.0, 6.0, 10.0]),  # promtool's examples
        ("1-2x4", [1.0, -1.0, -3.0, -5.0, -7.0]),
        ("1x4", [1.0] * 5),
        ("1 _x3 2", [1.0, None, None, None, 2.0]),  # `_xN` is N missing samples
        ("_", [None]),
        ("_ 1", [None, 1.0]),
        ("1e3x1 .5", [1000.0, 1000.0, 0.5]),
        ("  7  ", [7.0]),
        ("", []),
        ("0x0", [0.0]),
    ],
)
def test_expand_series(text: str, expected: list[float | None]) -> None:
    assert expand_series(text) == expected


@pytest.mark.parametrize("text", ["abc", "1x", "x3", "1+x3", "_+1x2", "1,2", "1x-2", "nan"])
def test_expand_series_names_the_bad_term(text: str) -> None:
    with pytest.raises(ValueError, match=re.escape(repr(text))):
        expand_series(text)


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.integers(-1000, 1000), st.integers(-50, 50), st.integers(0, 20), st.booleans()
        ),
        max_size=6,
    )
)
def test_expand_series_length_and_steps(terms: list[tuple[int, int, int, bool]]) -> None:
    text = " ".join(
        f"_x{count}" if missing else f"{start}{step:+d}x{count}"
        for start, step, count, missing in terms
    )
    expected: list[float | None] = []
    for start, step, count, missing in terms:
        if missing:
            expected += [None] * max(count, 1)
        else:
            expected += [float(start + step * i) for i in range(count + 1)]
    assert expand_series(text) == expected


# --- run_case: the examples of POLICY_FORMAT.md and more ------------------------------------


def case(**raw: Any) -> PolicyTestCase:
    raw.setdefault("name", "case")
    return PolicyTestCase.model_validate(raw)


GPU = throttle(
    "gpu-saturation",
    [
        {"target": "plan/free/requests_per_minute", "scale": 0.5},
        {"target": "global/tokens_per_minute", "set": 3_000_000},
    ],
    when="gpu_util > 0.90",
    for_="2m",
    until="gpu_util < 0.75",
    cooldown="5m",
)
COST = cost_policy()


# Without the default 5m loosen stabilization, a release shows in the very next tick.
IMMEDIATE = {"tighten": {"stabilization": "0s"}, "loosen": {"stabilization": "0s"}}


def failures(policies: PolicySet, **raw: Any) -> list[str]:
    """Run one case every 30s; its failure lines."""
    result = run_case(policies, case(**raw), 30.0)
    assert isinstance(result, CaseResult)
    return result.failures


def test_the_free_tier_halves_when_the_gpus_stay_hot() -> None:
    expect = [
        {"at": "1m", "limits": {"plan/free/requests_per_minute": 10}},
        {"at": "4m", "limits": {"plan/free/requests_per_minute": 10}},  # hot for 1m30s
        {"at": "4m30s", "limits": {"plan/free/requests_per_minute": 5}},  # hot for 2m
        {
            "at": "5m",
            "limits": {"plan/free/requests_per_minute": 5, "global/tokens_per_minute": 3e6},
            "active": ["gpu-saturation"],
        },
    ]
    assert failures(policy_set(GPU), signals={"gpu_util": "0.5x4 0.95x10"}, expect=expect) == []


def test_a_runaway_tenant_is_cut_to_a_quarter_the_others_keep_their_plan() -> None:
    raw = {
        "tenants": {"acme": "paid", "evil": "paid"},
        "signals": {
            "spend": {"acme": "0.02x20", "evil": "0.02x4 1x16"},
            "usual": {"acme": "0.02x20", "evil": "0.02x20"},
        },
        "expect": [
            {"at": "7m", "limits": {"tenant/evil/tokens_per_minute": 20000}},
            {
                "at": "8m",
                "limits": {
                    "tenant/evil/tokens_per_minute": 5000,
                    "tenant/acme/tokens_per_minute": 20000,
                },
                "active": ["tenant-cost-anomaly/evil"],
            },
        ],
    }
    assert failures(policy_set(COST), **raw) == []


def test_a_failed_expectation_reads_as_a_diff() -> None:
    got = failures(
        policy_set(GPU),
        signals={"gpu_util": "0.95x20"},
        expect=[{"at": "3m", "limits": {"plan/free/requests_per_minute": 10}}],
    )
    assert len(got) == 1
    assert got[0].startswith("at 3m: plan/free/requests_per_minute: expected 10, got 5 (")
    assert "gpu_util" in got[0]


def test_active_policies_are_compared() -> None:
    got = failures(
        policy_set(GPU),
        signals={"gpu_util": "0.95x20"},
        expect=[{"at": "1m", "active": ["gpu-saturation"]}],
    )
    assert got == ["at 1m: active policies: expected ['gpu-saturation'], got []"]


def test_hysteresis_and_cooldown_over_a_series() -> None:
    # Hot 0-2m (engaged at 2m), warm 2m30s-4m (held by `until`), cool at 4m30s (released),
    # hot again from 5m: `for` is met at 7m but the cooldown runs until 9m30s.
    series = "0.95x4 0.8x3 0.5 0.95x20"
    expect = [
        {"at": "2m", "limits": {"plan/free/requests_per_minute": 5}},
        {"at": "4m", "limits": {"plan/free/requests_per_minute": 5}},
        {"at": "4m30s", "limits": {"plan/free/requests_per_minute": 10}},
        {"at": "9m", "limits": {"plan/free/requests_per_minute": 10}},
        {"at": "9m30s", "limits": {"plan/free/requests_per_minute": 5}},
    ]
    policies = policy_set(GPU, behavior=IMMEDIATE)
    assert failures(policies, signals={"gpu_util": series}, expect=expect) == []


def test_a_missing_sample_holds_then_releases_on_stale() -> None:
    policy = throttle(
        "hot",
        [{"target": "plan/free/requests_per_minute", "set": 2}],
        when="gpu_util > 0.9",
        on_stale={"hold_for": "1m", "then": "baseline"},
    )
    expect = [
        {"at": "30s", "limits": {"plan/free/requests_per_minute": 2}},
        {"at": "1m30s", "limits": {"plan/free/requests_per_minute": 2}},  # missing 1m
        {"at": "2m", "limits": {"plan/free/requests_per_minute": 10}},  # missing 1m30s
    ]
    policies = policy_set(policy, behavior=IMMEDIATE)
    assert failures(policies, signals={"gpu_util": "0.95 0.95 _x10"}, expect=expect) == []


def test_an_aimd_limit_over_a_series() -> None:
    # Behaviour: immediate both ways, so the limit in force is the controller's output.
    policies = policy_set(adaptive(behavior=IMMEDIATE))
    expect = [
        {"at": "0s", "limits": {"global/requests_per_second": 1600}},  # 2000 × 0.8
        {"at": "30s", "limits": {"global/requests_per_second": 1600}},  # cannot show the cut
        {"at": "1m", "limits": {"global/requests_per_second": 1280}},
        {"at": "1m30s", "limits": {"global/requests_per_second": 1280}},  # cannot show it
        {"at": "2m", "limits": {"global/requests_per_second": 1280}},  # in the dead band
        {"at": "2m30s", "limits": {"global/requests_per_second": 1330}},  # + 50
    ]
    series = "0.9 0.9 0.9 0.9 0.8 0.5"
    assert failures(policies, signals={"gpu_util": series}, expect=expect) == []


def test_an_override_wins_during_the_test() -> None:
    raw = {
        "signals": {"gpu_util": "0.95x20"},
        "overrides": [{"address": "plan/free/requests_per_minute", "value": 50, "at": "3m"}],
        "expect": [
            {"at": "2m30s", "limits": {"plan/free/requests_per_minute": 5}},
            {"at": "3m", "limits": {"plan/free/requests_per_minute": 50}},
        ],
    }
    assert failures(policy_set(GPU), **raw) == []


BUSINESS_HOURS = {"timezone": "Europe/Berlin", "windows": ["Mon-Fri 08:00-20:00"]}


@pytest.mark.parametrize(
    ("start", "expected"),
    [
        ("2026-03-02T09:00:00+01:00", 5),  # Monday morning in Berlin
        ("2026-03-02T07:30:00Z", 5),  # 08:30 in Berlin
        ("2026-03-02T19:30:00Z", 10),  # 20:30 in Berlin
        ("2026-03-07T12:00:00+01:00", 10),  # Saturday
        (None, 10),  # 1970-01-01T00:00Z, a Thursday, 01:00 in Berlin
    ],
)
def test_start_sets_the_clock_for_schedules(start: str | None, expected: float) -> None:
    policy = throttle(
        "office",
        [{"target": "plan/free/requests_per_minute", "scale": 0.5}],
        when="gpu_util > 0.9",
        schedule=BUSINESS_HOURS,
    )
    raw: dict[str, Any] = {
        "signals": {"gpu_util": "0.95x4"},
        "expect": [{"at": "1m", "limits": {"plan/free/requests_per_minute": expected}}],
    }
    if start is not None:
        raw["start"] = start
    assert failures(policy_set(policy), **raw) == []


def test_a_start_without_time_zone_is_rejected() -> None:
    with pytest.raises(ValueError, match="time zone"):
        case(start="2026-03-02T09:00:00", expect=[{"at": "0s"}])


@pytest.mark.parametrize("start", ["9999-12-31T23:00:00Z", "0001-01-01T00:00:00+05:00"])
def test_a_start_no_clock_can_show_is_rejected(start: str) -> None:
    # It was taken, and a schedule's local date at it ended `policy test` in a traceback
    # (OverflowError: date value out of range; ValueError: year 0 is out of range).
    with pytest.raises(ValueError, match="outside the years 1970 to 9000 a test may start in"):
        case(start=start, expect=[{"at": "0s"}])


def test_an_unknown_signal_is_reported() -> None:
    got = failures(policy_set(GPU), signals={"gpu": "1"}, expect=[{"at": "0s"}])
    assert got == ["signal 'gpu' is not used by any policy in policy_files (signals: gpu_util)"]


def test_an_expectation_between_ticks_is_reported() -> None:
    got = failures(policy_set(GPU), signals={"gpu_util": "1"}, expect=[{"at": "45s"}])
    assert len(got) == 1
    assert "45s" in got[0]
    assert "multiple of the interval 30s" in got[0]
