"""The AdaptiveLimit's control law over time: once per sample, the scrape's dead time, no
wind-up, reasons that say what was enforced, and a filter against a noisy signal."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest

from controller.model import Address, Decision, ScalarSample
from controller.policy.documents import DocumentFile
from tests.unit.policy_builders import GPU_QUERY, Driver, adaptive, policy_set

RPS = Address.parse("global/requests_per_second")  # baseline 2000 in the standard set
FAST = {"tighten": {"stabilization": "0s"}, "loosen": {"stabilization": "0s"}}


@dataclass
class Loop:
    """The engine and the resolver in closed loop on a virtual clock: each tick reads the
    last sample scraped at or before it and steps from the value the resolver holds."""

    driver: Driver
    scrape: float
    decisions: list[Decision] = field(default_factory=list)

    def tick(self, now: float, signal: float, **others: float) -> Decision:
        """One tick; `others` are further scalar signals by query, scraped with the first."""
        taken = self.scrape * (now // self.scrape)  # the newest scrape at or before now
        in_force = self.driver.resolver.in_force()
        scalars = {GPU_QUERY: signal, **others}
        evaluation = self.driver.tick(
            now, {q: ScalarSample(v, taken) for q, v in scalars.items()}, current=in_force
        )
        decision = self.driver.resolve(now, evaluation.proposals).desired[RPS]
        self.decisions.append(decision)
        return decision


def loop(scrape: float, **spec: Any) -> Loop:
    spec.setdefault("behavior", FAST)
    return Loop(Driver(policy_set(adaptive(**spec))), scrape)


def test_a_second_tick_on_the_same_sample_does_nothing() -> None:
    control = loop(15.0)
    first = control.tick(0.0, 0.5)  # below: + 50 from the baseline 2000
    assert first.value == 2050.0
    for now in (5.0, 10.0):  # the same sample (scraped at 0s), read twice more
        again = control.tick(now, 0.5)
        assert again.value == 2050.0
        assert "no new gpu_util sample since" in again.reason
    assert control.tick(15.0, 0.5).value == 2100.0  # a new sample: one more step


def test_ticking_faster_than_the_scrape_does_not_multiply_the_cut() -> None:
    # A 60 s scrape read by a 5 s tick: one hot sample is one cut (60 → 48), not 60 → 24.6.
    control = loop(60.0, bounds={"min": 10, "max": 60})
    values = [control.tick(now, 1.0).value for now in np.arange(0.0, 60.0, 5.0)]
    assert values == [48.0] * 12


def test_a_cut_is_not_repeated_before_a_sample_can_show_it() -> None:
    control = loop(15.0, bounds={"min": 10, "max": 60})
    assert control.tick(0.0, 1.0).value == 48.0  # the cut, at 0s
    held = control.tick(15.0, 1.0)  # scraped at 15s: 0s–15s, not yet all under the cut
    assert held.value == 48.0
    assert "cannot show the cut" in held.reason
    assert control.tick(30.0, 1.0).value == pytest.approx(38.4)  # 15s–30s: it can


def test_the_signal_window_sets_how_long_a_cut_takes_to_show() -> None:
    signal = {"query": GPU_QUERY, "stale_after": "5m", "name": "gpu_util", "window": "1m"}
    control = loop(15.0, signal=signal, bounds={"min": 10, "max": 60})
    values = [control.tick(now, 1.0).value for now in (0.0, 15.0, 30.0, 45.0, 60.0, 75.0)]
    assert values == [48.0, 48.0, 48.0, 48.0, 48.0, pytest.approx(38.4)]


def test_each_step_starts_from_the_value_in_force_not_the_controllers_own() -> None:
    # Loosening waits 3 minutes: the controller proposes in force + 50 every sample and
    # never runs ahead of what is enforced (the old law climbed to 2000 + 50 × 12 inside).
    behavior = {"tighten": {"stabilization": "0s"}, "loosen": {"stabilization": "3m"}}
    control = loop(15.0, behavior=behavior)
    for now in (0.0, 15.0, 30.0, 45.0):  # 2000 → 1600, hold (dead time), → 1280, hold
        control.tick(now, 0.95)
    for now in np.arange(60.0, 225.0, 15.0):
        decision = control.tick(now, 0.5)
        [proposal] = decision.proposals
        assert proposal.value == 1280.0 + 50.0  # in force + increase, each sample
        assert decision.value == 1280.0  # held by the window


def test_hold_never_raises_the_limit() -> None:
    behavior = {"tighten": {"stabilization": "0s"}, "loosen": {"stabilization": "3m"}}
    control = loop(15.0, behavior=behavior)
    control.tick(0.0, 0.95)  # 1600
    control.tick(15.0, 0.95)  # the cut's dead time
    assert control.tick(30.0, 0.5).proposals[0].value == 1650.0  # held at 1600
    for now in np.arange(45.0, 600.0, 15.0):
        decision = control.tick(now, 0.8)  # on the setpoint: hold
        assert decision.value == 1600.0
        assert decision.proposals[0].value == 1600.0


def test_the_journalled_reason_names_the_value_enforced_when_pacing_holds_it() -> None:
    behavior = {"tighten": {"stabilization": "0s"}, "loosen": {"stabilization": "3m"}}
    control = loop(15.0, behavior=behavior)
    control.tick(0.0, 0.95)
    control.tick(15.0, 0.95)
    held = control.tick(30.0, 0.5)
    assert held.value == 1600.0
    assert "below: + 50 from 1600 in force → 1650" in held.reason
    assert "1600 enforced instead: loosening held by the 3m stabilization window" in held.reason
    # Unpaced, the reason's arrow points at the value enforced.
    free = loop(15.0)
    decision = free.tick(0.0, 0.95)
    assert decision.value == 1600.0
    assert decision.reason.endswith("→ 1600 (bounds 200–5000)")


def test_a_paced_cut_is_never_reported_as_a_raise() -> None:
    # Tightening at most 10% per minute: the controller's next step starts from the paced
    # value, so a "below: +" proposal never lowers the limit.
    behavior = {
        "tighten": {"stabilization": "0s", "max_change_percent": 10, "period": "1m"},
        "loosen": {"stabilization": "0s"},
    }
    control = loop(15.0, behavior=behavior)
    assert control.tick(0.0, 0.8).value == 2000.0
    cut = control.tick(15.0, 0.95)  # proposes 1600
    assert cut.value == 1800.0
    assert "1800 enforced instead: tightening limited to 10% per 1m" in cut.reason
    control.tick(30.0, 0.95)  # the cut's dead time
    raised = control.tick(45.0, 0.5)
    assert raised.proposals[0].value == 1850.0  # from 1800 in force (the old law: 1650)
    assert raised.value == 1850.0


def test_the_filter_is_strict_and_documented() -> None:
    spec = adaptive(filter={"smoothing": 0.5}).spec
    assert spec.filter is not None
    assert spec.filter.noise_band == 2.0
    for bad in ({"smoothing": 0}, {"smoothing": 1.5}, {"noise_band": -1}, {"alpha": 0.3}):
        with pytest.raises(ValueError, match="filter"):
            adaptive(filter=bad)
    schema = DocumentFile.model_json_schema(by_alias=True)["$defs"]["FilterSpec"]
    assert all(p.get("description") for p in schema["properties"].values())


def noisy_plant(seed: int, **spec: Any) -> tuple[float, int]:
    """AIMD (+1, × 0.8, setpoint 0.70 ± 0.05, bounds 10–200) on a pool of 100 requests/s
    offered 100: utilization = admitted / 100 + Gaussian noise (σ 0.05), one 15 s sample per
    tick showing the limit in force over the last scrape. The mean utilization and the
    number of cuts over the last 300 of 400 samples."""
    control = loop(
        15.0,
        setpoint=0.7,
        aimd={"increase": 1, "decrease_factor": 0.8, "tolerance": 0.05},
        bounds={"min": 10, "max": 200},
        **spec,
    )
    noise = np.random.default_rng(seed).normal(0.0, 0.05, 400)
    limit, utilization, cuts = 70.0, [], 0
    for number in range(400):
        value = min(100.0, limit) / 100.0
        decision = control.tick(15.0 * number, value + float(noise[number]))
        if number >= 100:
            utilization.append(value)
            cuts += decision.value < limit
        limit = decision.value
    return float(np.mean(utilization)), cuts


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_a_filter_stops_noise_from_driving_a_limit_cycle(seed: int) -> None:
    raw_mean, raw_cuts = noisy_plant(seed)
    filtered_mean, filtered_cuts = noisy_plant(seed, filter={"smoothing": 0.3})
    assert filtered_cuts * 3 <= raw_cuts
    assert abs(filtered_mean - 0.7) < abs(raw_mean - 0.7)
    assert abs(filtered_mean - 0.7) <= 0.05


def test_a_filtered_signal_still_cuts_at_once_on_a_jump() -> None:
    # Noise of ±0.02 around 0.5, then the burst: 0.5 → 1.0 is 25 standard deviations, not
    # noise; the filter restarts from it and the first hot sample cuts.
    control = loop(15.0, filter={"smoothing": 0.3})
    for number, value in enumerate([0.5, 0.52, 0.48, 0.51, 0.49, 0.5, 0.52, 0.48]):
        control.tick(15.0 * number, value)
    before = control.decisions[-1].value
    hot = control.tick(120.0, 1.0)
    assert hot.value == pytest.approx(before * 0.8)
    assert "(filtered 1)" in hot.reason


def test_without_jumps_the_filter_averages_out_single_noisy_samples() -> None:
    control = loop(15.0, filter={"smoothing": 0.3, "jump_band": 0})
    for number in range(8):
        control.tick(15.0 * number, 0.8)
    spike = control.tick(120.0, 1.0)  # one sample: filtered 0.86, inside the widened band?
    assert "filtered 0.86" in spike.reason
    assert spike.value == control.decisions[-2].value * 0.8  # 0.86 > 0.85: still a cut
    calm = loop(15.0, filter={"smoothing": 0.3, "jump_band": 0})
    for number in range(8):
        calm.tick(15.0 * number, 0.8)
    assert calm.tick(120.0, 0.9).value == calm.decisions[-2].value  # filtered 0.83: hold


ADMITTED = 'sum(irate(gateway_requests_total{outcome="allow"}[5m]))'
SEEK = {"throughput": {"name": "admitted", "query": ADMITTED, "stale_after": "60s"}}
RAILS = {"min": 1, "max": 100000}


def pool(capacity: float, demands: list[float], **spec: Any) -> list[Decision]:
    """A capacity-seeking limit (setpoint 0.8) on a pool serving `capacity` requests/s,
    offered each of `demands` in turn: each 15 s sample shows the admitted rate and the
    utilization it caused under the limit in force over the last scrape."""
    spec.setdefault("capacity", SEEK)
    control = loop(15.0, bounds=RAILS, **spec)
    limit = 2000.0  # the standard set's baseline
    for number, demand in enumerate(demands):
        admitted = min(demand, limit)
        utilization = min(1.0, admitted / capacity)
        limit = control.tick(15.0 * number, utilization, **{ADMITTED: admitted}).value
    return control.decisions


@pytest.mark.parametrize("capacity", [20.0, 60.0, 180.0])
def test_the_same_policy_finds_the_capacity_of_any_pool(capacity: float) -> None:
    # Half loaded, then offered 5× its capacity: the limit is the capacity × 0.8 before the
    # burst, so the burst is held from its first second, whatever the pool's size (the
    # bounds are only rails).
    decisions = pool(capacity, [0.5 * capacity] * 4 + [5 * capacity] * 8)
    assert "capacity ≈" in decisions[3].reason
    assert [d.value for d in decisions] == pytest.approx([0.8 * capacity] * 12)


def test_a_saturated_sample_cuts_and_does_not_update_the_estimate() -> None:
    control = loop(15.0, bounds=RAILS, capacity=SEEK)
    assert control.tick(0.0, 0.5, **{ADMITTED: 30.0}).value == 48.0  # capacity 60
    # The pool lost capacity: the same throughput saturates it. Cut from 48, keep 60.
    cut = control.tick(15.0, 1.0, **{ADMITTED: 48.0})
    assert cut.value == pytest.approx(48.0 * 0.8)
    assert "saturated" in cut.reason
    assert "capacity not updated" in cut.reason
    held = control.tick(30.0, 1.0, **{ADMITTED: 38.4})  # cannot show the cut yet
    assert held.value == pytest.approx(38.4)
    # Below saturation again: the estimate follows the pool's new capacity (30 / 0.9).
    found = control.tick(45.0, 0.9, **{ADMITTED: 30.0})
    assert found.value == pytest.approx(0.8 * (60 + 0.3 * (30 / 0.9 - 60)))


def test_a_noisy_estimate_inside_the_band_does_not_move_the_limit() -> None:
    control = loop(15.0, bounds=RAILS, capacity=SEEK)
    assert control.tick(0.0, 0.5, **{ADMITTED: 30.0}).value == 48.0
    for number, admitted in enumerate([31.0, 29.0, 30.5, 29.5, 31.5], start=1):
        assert control.tick(15.0 * number, 0.5, **{ADMITTED: admitted}).value == 48.0


def test_without_an_estimate_the_algorithm_acts() -> None:
    control = loop(15.0, bounds=RAILS, capacity=SEEK)
    first = control.tick(0.0, 0.9)  # no throughput sample: AIMD from the baseline 2000
    assert first.value == 1600.0
    assert "admitted is missing: capacity not updated" in first.reason


def test_capacity_settings_are_checked() -> None:
    with pytest.raises(ValueError, match="setpoint is a utilization"):
        adaptive(capacity=SEEK, setpoint=0.97)
    with pytest.raises(ValueError, match="min_signal"):
        adaptive(capacity={**SEEK, "min_signal": 0.9, "saturated": 0.9})
    policies = policy_set(adaptive(capacity=SEEK))
    assert {u.key.query for u in policies.signal_uses()} == {GPU_QUERY, ADMITTED}


def turns(values: list[float]) -> int:
    """Direction changes (tighten ↔ loosen) of a series of limits."""
    moves = [b - a for a, b in itertools.pairwise(values) if b != a]
    return sum(1 for a, b in itertools.pairwise(moves) if (a > 0) != (b > 0))


def test_the_estimates_own_noise_widens_the_band() -> None:
    # The admitted rate is noisy from sample to sample at the same utilization (bursty
    # requests: ±20%), around a capacity of 60. The band of the tolerance alone (6%) moves the
    # limit again and again; widened to the estimate's own noise it rarely does.
    noise = np.random.default_rng(4).normal(1.0, 0.2, 120)

    def run(**spec: Any) -> list[float]:
        control = loop(15.0, bounds=RAILS, capacity=SEEK, **spec)
        admitted = [30.0 * float(x) for x in noise]
        return [control.tick(15.0 * n, 0.5, **{ADMITTED: x}).value for n, x in enumerate(admitted)]

    plain, filtered = run(), run(filter={"smoothing": 0.3})
    assert turns(filtered[20:]) * 2 <= turns(plain[20:])
    assert np.mean(filtered[20:]) == pytest.approx(48.0, rel=0.1)  # still the capacity × 0.8


OCCUPANCY = {**SEEK, "saturated": 1.6}  # an occupancy: 1.0 a full cache, above it a queue


def test_an_occupancy_setpoint_above_one_allows_a_short_queue() -> None:
    # A pool that holds 300 requests (150 in flight fill its cache halfway): the limit is
    # 300 × 1.1 = 330; a sample of 1.1 (a queue of a tenth) holds it, a queue of 60% cuts.
    control = loop(15.0, bounds=RAILS, capacity=OCCUPANCY, setpoint=1.1)
    assert control.tick(0.0, 0.5, **{ADMITTED: 150.0}).value == pytest.approx(330.0)
    # With a queue the same ratio is the running batch: 330 / 1.1 = 300, the estimate stays.
    held = control.tick(15.0, 1.1, **{ADMITTED: 330.0})
    assert held.value == pytest.approx(330.0)
    cut = control.tick(30.0, 1.7, **{ADMITTED: 330.0})
    assert cut.value == pytest.approx(330.0 * 0.8)
    assert "saturated" in cut.reason
    with pytest.raises(ValueError, match="less than or equal to 4"):
        adaptive(capacity={**SEEK, "saturated": 4.5}, setpoint=1.1)


@pytest.mark.parametrize(("occupancy", "moved"), [(1.3, True), (0.9, False)])
def test_a_queue_cuts_however_small_the_step(occupancy: float, moved: bool) -> None:
    # A pool estimated at light load to hold 300 (90 in flight at 0.3). The load jumps and
    # the pool shows a queue (1.3: above the setpoint beyond its band) with a capacity sample
    # 10% under the estimate: the estimate moves by 3%, inside the dead band (the 5%
    # tolerance), and is applied all the same (held, the pool stayed over its capacity at a
    # limit estimated at light load). The same step without a queue (0.9, below the
    # setpoint) holds: there the limit binds nothing.
    control = loop(15.0, bounds=RAILS, capacity=OCCUPANCY, filter={"smoothing": 0.3}, setpoint=1.0)
    for n in range(6):
        assert control.tick(15.0 * n, 0.3, **{ADMITTED: 90.0}).value == pytest.approx(300.0)
    sample = control.tick(90.0, occupancy, **{ADMITTED: 0.9 * 300.0 * occupancy})
    assert "within ±15" in sample.reason  # a step inside the dead band
    if moved:
        assert sample.value == pytest.approx(300.0 + 0.3 * (270.0 - 300.0))
        assert "but gpu_util above 1.05: applied" in sample.reason
    else:
        assert sample.value == pytest.approx(300.0)
        assert ": hold" in sample.reason


@pytest.mark.parametrize("hold_below", [0.5, 0.0])
def test_a_limit_that_binds_nothing_is_not_moved_by_a_noisy_estimate(hold_below: float) -> None:
    # A pool at light load: 90 in flight at 0.3 says it holds 300, then a noisy sample says
    # 360 (90 at 0.25), beyond the band. With hold_below 0.5 the limit (300) binds nothing:
    # 90 in flight is under half of it, so it holds and the estimate learns; at 0 it moves.
    capacity = {**OCCUPANCY, "hold_below": hold_below}
    control = loop(15.0, bounds=RAILS, capacity=capacity, setpoint=1.0)
    assert control.tick(0.0, 0.3, **{ADMITTED: 90.0}).value == pytest.approx(300.0)  # first
    noisy = control.tick(15.0, 0.25, **{ADMITTED: 90.0})
    if hold_below:
        assert noisy.value == pytest.approx(300.0)
        assert "admitted below 0.5 of 300 (binds nothing): hold" in noisy.reason
    else:
        assert noisy.value == pytest.approx(300.0 + 0.3 * 60.0)
    # The load comes (200 in flight at 0.6: a capacity sample of 333): the limit may bind,
    # and the estimate kept every sample (300 → 318 → 322.6): held at 300, the limit moves
    # to it; moved to 318 on the noise, it is within the band and stays.
    loaded = control.tick(30.0, 0.6, **{ADMITTED: 200.0})
    estimate = 318.0 + 0.3 * (200.0 / 0.6 - 318.0)
    assert loaded.value == pytest.approx(estimate if hold_below else 318.0)


PACED = {
    "tighten": {"stabilization": "0s"},
    "loosen": {"stabilization": "0s", "max_change_percent": 5, "period": "30s"},
}


@pytest.mark.parametrize(("occupancy", "reached"), [(0.3, 330.0), (0.5, 315.0)])
def test_a_hold_finishes_the_paced_move_its_estimate_still_supports(
    occupancy: float, reached: float
) -> None:
    # The estimate rises 300 → 330 under load; loosening is paced (5% per 30 s), so 315 is
    # enforced. Then the load leaves (100 in flight: the limit binds nothing, so it holds).
    # At 0.3 the next samples still say ~331 (within the band of the aim 330): the hold
    # keeps proposing 330 and the climb finishes (held at 315, the ddos scenario's climb
    # stopped wherever the load left it). At 0.5 they say ~291: the aim is dropped, 315 kept.
    capacity = {**OCCUPANCY, "hold_below": 0.5}
    control = loop(15.0, bounds=RAILS, capacity=capacity, setpoint=1.0, behavior=PACED)
    assert control.tick(0.0, 0.3, **{ADMITTED: 90.0}).value == pytest.approx(300.0)
    assert control.tick(15.0, 0.6, **{ADMITTED: 240.0}).value == pytest.approx(315.0)
    idle = [control.tick(15.0 * n, occupancy, **{ADMITTED: 100.0}) for n in range(2, 8)]
    assert idle[-1].value == pytest.approx(reached)
    assert all("(binds nothing): hold" in d.reason for d in idle)
    kept = "hold the last aim 330 (315 in force)"
    assert (kept in idle[0].reason) is (reached == 330.0)


def test_a_hold_never_keeps_loosening_an_overloaded_pool() -> None:
    # The same paced climb, then a queue (1.1, just above the setpoint's band) whose
    # estimate is within the band of the aim: the climb is not continued, 315 is kept.
    capacity = {**OCCUPANCY, "hold_below": 0.5}
    control = loop(15.0, bounds=RAILS, capacity=capacity, setpoint=1.0, behavior=PACED)
    control.tick(0.0, 0.3, **{ADMITTED: 90.0})
    assert control.tick(15.0, 0.6, **{ADMITTED: 240.0}).value == pytest.approx(315.0)
    for n in range(2, 6):
        queued = control.tick(15.0 * n, 1.1, **{ADMITTED: 1.1 * 330.0})
        assert queued.value == pytest.approx(315.0)
        assert "last aim" not in queued.reason


def test_a_queue_moves_a_limit_whatever_the_share_in_flight() -> None:
    # Few in flight against the limit but a queue (occupancy 1.3: capacity was lost): the
    # pool is overloaded, so the limit is cut although it seemed to bind nothing.
    capacity = {**OCCUPANCY, "hold_below": 0.5}
    control = loop(15.0, bounds=RAILS, capacity=capacity, setpoint=1.0)
    assert control.tick(0.0, 0.3, **{ADMITTED: 90.0}).value == pytest.approx(300.0)
    queued = control.tick(15.0, 1.3, **{ADMITTED: 130.0})  # the pool holds 100 now
    assert queued.value == pytest.approx(300.0 + 0.3 * (100.0 - 300.0))
    assert "binds nothing" not in queued.reason


def test_nothing_in_flight_under_load_does_not_estimate_a_pool_of_nothing() -> None:
    control = loop(15.0, bounds=RAILS, capacity=SEEK)
    assert control.tick(0.0, 0.5, **{ADMITTED: 30.0}).value == 48.0  # capacity 60
    # The throughput series says 0 while the pool is half busy (it lags): the estimate
    # stays 60 instead of collapsing to 0 / 0.5.
    lagging = control.tick(15.0, 0.5, **{ADMITTED: 0.0})
    assert lagging.value == 48.0
    assert "under load: capacity not updated" in lagging.reason


ARRIVALS = 'sum(rate(gateway_requests_total{outcome="allow"}[1m]))'
QUEUED = {
    **OCCUPANCY,
    "queue": {"wait": "500ms", "arrivals": {"name": "arrivals", "query": ARRIVALS}},
}


def test_the_ttft_slo_sets_the_queue_allowed_beyond_a_full_pool() -> None:
    # The pool holds 300 (150 in flight at 0.5) and 60 requests/s are admitted: half a second
    # of queueing is 30 more in flight (Little's law): 300 × 1.0 + 30.
    control = loop(15.0, bounds=RAILS, capacity=QUEUED, setpoint=1.0)
    first = control.tick(0.0, 0.5, **{ADMITTED: 150.0, ARRIVALS: 60.0})
    assert first.value == pytest.approx(330.0)
    assert "a queue of 30 (arrivals=60/s × 0.5s)" in first.reason
    # Twice the arrivals (shorter requests on the same pool): twice the queue, same wait.
    faster = control.tick(15.0, 0.5, **{ADMITTED: 150.0, ARRIVALS: 120.0})
    assert faster.value == pytest.approx(360.0)
    # The arrival rate unknown: no queue at all (the safe side), the pool's own size.
    unknown = control.tick(30.0, 0.5, **{ADMITTED: 150.0})
    assert unknown.value == pytest.approx(300.0)
    assert "no queue (arrivals is missing)" in unknown.reason
    policies = policy_set(adaptive(capacity=QUEUED, setpoint=1.0))
    assert ARRIVALS in {u.key.query for u in policies.signal_uses()}


TTFT = "histogram_quantile(0.99, sum by (le) (rate(ttft_bucket[1m])))"
LATENCY: dict[str, Any] = {"signal": {"name": "ttft_p99", "query": TTFT}, "objective": "2s"}
FOLLOWING: dict[str, Any] = {
    "wait": "500ms",
    "arrivals": {"name": "arrivals", "query": ARRIVALS},
    "latency": LATENCY,
}
FOLLOWED = {**OCCUPANCY, "queue": FOLLOWING}


def test_the_queues_wait_follows_the_ttft_against_its_objective() -> None:
    # A pool of 300 with 200 requests/s admitted: 0.5 s of queueing is 100 more in flight.
    control = loop(15.0, bounds=RAILS, capacity=FOLLOWED, setpoint=1.0)
    seen = {ARRIVALS: 200.0}
    # Nothing waits (occupancy 0.5): a TTFT far below the objective says nothing about a
    # queue, so the wait does not grow (it would let the next burst queue too long).
    quiet = control.tick(0.0, 0.5, **{ADMITTED: 150.0, TTFT: 0.5, **seen})
    assert quiet.value == pytest.approx(400.0)
    assert "wait 0.5s kept (ttft_p99=0.5s vs 2s)" in quiet.reason
    # A queue formed (occupancy 1.2, the running batch still 300) and its TTFT is half the
    # objective: the wait grows, by a quarter at most per sample.
    grown = control.tick(15.0, 1.2, **{ADMITTED: 360.0, TTFT: 1.0, **seen})
    assert grown.value == pytest.approx(300.0 + 200.0 * 0.625)
    assert "wait 0.5 → 0.625s (ttft_p99=1s vs 2s)" in grown.reason
    # Twice the objective: the wait halves at once.
    over = control.tick(30.0, 1.2, **{ADMITTED: 360.0, TTFT: 4.0, **seen})
    assert over.value == pytest.approx(300.0 + 200.0 * 0.3125)
    # No TTFT (no first token in the window: NaN): the wait in use is kept.
    unknown = control.tick(45.0, 1.2, **{ADMITTED: 360.0, TTFT: float("nan"), **seen})
    assert "wait 0.3125s kept (ttft_p99 is not_finite)" in unknown.reason
    policies = policy_set(adaptive(capacity=FOLLOWED, setpoint=1.0))
    assert TTFT in {u.key.query for u in policies.signal_uses()}


@pytest.mark.parametrize(("ttft", "rail", "fill"), [(0.2, 2.0, 1.0), (20.0, 0.1, 0.25)])
def test_the_queues_wait_stays_within_its_rails(ttft: float, rail: float, fill: float) -> None:
    # Defaults: from the objective ÷ 20 to the objective itself; a TTFT far above the
    # objective at the shortest wait holds the pool down to its least fill (default 0.25).
    control = loop(15.0, bounds=RAILS, capacity=FOLLOWED, setpoint=1.0)
    for number in range(30):
        last = control.tick(15.0 * number, 1.2, **{ADMITTED: 360.0, ARRIVALS: 1000.0, TTFT: ttft})
    assert f"wait {rail:g}s kept" in last.reason
    # Within the hold band (5% of the value in force) of the queue at the rail.
    assert last.value == pytest.approx(300.0 * fill + 1000.0 * rail, rel=0.05)


def test_a_latency_over_its_objective_at_the_shortest_wait_holds_the_pool_below_full() -> None:
    """Long prompts on a full cache miss the TTFT objective far (2× by default) with no
    queue to shorten: the pool is filled less, a quarter at most per sample, and fills again
    (a tenth at most per sample) once the latency is below the objective, before any queue
    grows again."""
    shortest = {**FOLLOWING, "wait": "100ms"}
    control = loop(15.0, bounds=RAILS, capacity={**FOLLOWED, "queue": shortest}, setpoint=1.0)
    seen = {ADMITTED: 150.0, ARRIVALS: 100.0}  # a pool of 300; 0.1 s of queue is 10 more
    near = control.tick(0.0, 0.5, **{TTFT: 3.8, **seen})  # above, but within 2×: full
    assert near.value == pytest.approx(310.0)
    assert "filled" not in near.reason
    cut = control.tick(15.0, 0.5, **{TTFT: 8.0, **seen})  # twice 2×: a quarter less
    assert cut.value == pytest.approx(300.0 * 0.75 + 10.0)
    assert "× 0.75 filled" in cut.reason
    assert "pool filled to 1 → 0.75 of capacity (ttft_p99=8s vs 2s)" in cut.reason
    again = control.tick(30.0, 0.5, **{TTFT: 5.0, **seen})  # 1.25 × 2×: √0.8 ≈ 0.894
    assert again.value == pytest.approx(300.0 * 0.75 * 0.8**0.5 + 10.0)
    held = control.tick(45.0, 0.5, **{TTFT: 3.5, **seen})  # between the objective and 2×
    assert held.value == again.value
    assert "wait 0.1s kept, pool filled to 0.67082 of capacity" in held.reason
    fills = [control.tick(60.0 + 15.0 * n, 0.5, **{TTFT: 0.5, **seen}) for n in range(6)]
    # Far below the objective: a tenth more per sample, up to a full pool, the wait kept.
    assert fills[0].value == pytest.approx(300.0 * 0.67082 * 1.1 + 10.0, rel=1e-4)
    assert "pool filled to 0.98" in fills[4].reason
    assert "→ 1 of capacity" in fills[4].reason
    # Full again (within the hold band of a full pool): the wait, not the fill, moves next.
    assert fills[-1].value == pytest.approx(300.0 + 10.0, rel=0.05)
    assert "wait 0.1s kept (ttft_p99=0.5s vs 2s)" in fills[-1].reason


def test_the_fill_steps_once_per_latency_window() -> None:
    """A p99 over 1m cannot show a fill's step before a minute has passed: read every 15 s,
    it moves the fill once per minute, never again on the latency of the old fill."""
    windowed = {**LATENCY, "signal": {**LATENCY["signal"], "window": "1m"}}
    queue = {**FOLLOWING, "wait": "100ms", "latency": windowed}
    control = loop(15.0, bounds=RAILS, capacity={**FOLLOWED, "queue": queue}, setpoint=1.0)
    seen = {ADMITTED: 150.0, ARRIVALS: 100.0, TTFT: 8.0}  # always twice 2× the objective
    values = [control.tick(15.0 * n, 0.5, **seen).value for n in range(11)]
    fills = [round((v - 10.0) / 300.0, 4) for v in values]
    assert fills == [0.75] * 5 + [0.5625] * 5 + [0.4219]  # moved on 0 s, 75 s, 150 s
    held = control.decisions[1].reason
    assert "the fill's last step shows after 1m" in held
    assert "pool filled to 0.75 of capacity" in held


def test_a_least_fill_of_one_never_holds_the_pool_below_full() -> None:
    latency = {**LATENCY, "min_fill": 1}
    queue = {**FOLLOWING, "wait": "100ms", "latency": latency}
    control = loop(15.0, bounds=RAILS, capacity={**FOLLOWED, "queue": queue}, setpoint=1.0)
    for number in range(5):
        last = control.tick(15.0 * number, 0.5, **{ADMITTED: 150.0, ARRIVALS: 100.0, TTFT: 9.0})
    assert last.value == pytest.approx(310.0)
    assert "filled" not in last.reason
    with pytest.raises(ValueError, match="min_fill"):
        adaptive(capacity={**OCCUPANCY, "queue": {**queue, "latency": {**latency, "min_fill": 0}}})


def test_the_queues_wait_range_is_checked() -> None:
    latency = {"signal": {"query": TTFT}, "objective": "2s"}
    queue = {"wait": "3s", "arrivals": {"query": ARRIVALS}, "latency": latency}
    with pytest.raises(ValueError, match=r"queue.wait \(3.0s\) must lie within .* 0.1s–2.0s"):
        adaptive(capacity={**OCCUPANCY, "queue": queue}, setpoint=1.0)
    reversed_range = {**latency, "min_wait": "1s", "max_wait": "500ms"}
    with pytest.raises(ValueError, match=r"min_wait \(1.0s\) must not be above max_wait"):
        adaptive(capacity={**OCCUPANCY, "queue": {**queue, "latency": reversed_range}})


@pytest.mark.parametrize(("ttft", "applied"), [(8.0, True), (0.5, False)])
def test_a_latency_far_above_its_objective_cuts_through_a_noisy_estimate(
    ttft: float, applied: bool
) -> None:
    """Spiky traffic: the capacity samples swing (100 and 400, one spike in every other
    scrape), so the estimate's noise band is wider than any fill step. A TTFT four times its
    objective at the shortest wait fills the pool less, and that cut is applied although it
    lies within the band (held, a spike every other minute met a pool filled as for light
    load: the journal said "within ±…: hold" for twenty samples at a p99 of 7 s). The same
    swings with the TTFT within its objective hold."""
    shortest = {**FOLLOWING, "wait": "100ms"}
    noisy = {"smoothing": 0.3, "noise_band": 2}
    capacity = {**FOLLOWED, "queue": shortest}
    control = loop(15.0, bounds=RAILS, capacity=capacity, setpoint=1.0, filter=noisy)
    calm = {ARRIVALS: 0.0, TTFT: 0.5}
    for n in range(8):  # capacity samples 100 and 400 in turn: the noise band grows
        occupancy, in_flight = (0.2, 20.0) if n % 2 else (0.8, 320.0)
        last = control.tick(15.0 * n, occupancy, **{ADMITTED: in_flight, **calm})
    spike = control.tick(120.0, 0.8, **{ADMITTED: 320.0, ARRIVALS: 0.0, TTFT: ttft})
    assert "within ±" in spike.reason  # the step lies inside the estimate's noise band
    if applied:
        assert spike.value < 0.8 * last.value
        assert "pool filled to 1 → 0.75 of capacity" in spike.reason
        assert "but ttft_p99 above 2.22222s: applied" in spike.reason
    else:
        assert spike.value == last.value
        assert ": hold" in spike.reason


@pytest.mark.parametrize(("ttft", "loosened"), [(3.0, False), (1.5, True)])
def test_no_loosening_while_the_latency_is_above_its_objective(ttft: float, loosened: bool) -> None:
    """Requests already wait too long: a higher capacity estimate (a light-load sample reads
    high) does not raise the limit until the latency is back within its objective (raised,
    the limit turned up between the cuts the latency asked for, twice as often)."""
    shortest = {**FOLLOWING, "wait": "100ms"}
    control = loop(15.0, bounds=RAILS, capacity={**FOLLOWED, "queue": shortest}, setpoint=1.0)
    seen = {ARRIVALS: 0.0}
    assert control.tick(0.0, 0.5, **{ADMITTED: 150.0, TTFT: 1.5, **seen}).value == 300.0
    higher = control.tick(15.0, 0.5, **{ADMITTED: 250.0, TTFT: ttft, **seen})  # reads 500
    if loosened:
        assert higher.value == pytest.approx(300.0 + 0.3 * 200.0)
    else:
        assert higher.value == 300.0
        assert "but ttft_p99 above 2.22222s: no loosening" in higher.reason
