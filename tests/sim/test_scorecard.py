"""Every scorecard figure on a ten-tick run written by hand, checked against arithmetic done
here in the comments."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from controller.sim.record import TTFT_EDGES, RunRecord, Transition
from controller.sim.scenario import RequestSize, load_scenario
from controller.sim.scorecard import headline, jain_index, score
from controller.sim.traffic import SimTenant, build_world


def _tenant(index: int, role: str = "tenant") -> SimTenant:
    return SimTenant(index, f"t{index}", "g", "paid", "gpt-4", 1.0, RequestSize(), 0, 1, 0,
                     0.0, role)  # type: ignore[arg-type]  # fmt: skip


def _record(variant: str) -> RunRecord:
    tenants = [_tenant(0), _tenant(1), _tenant(2), _tenant(3, "attacker")]
    record = RunRecord.empty(variant, 10, 15.0, tenants, 1000.0, 0.8, 2.0)
    record.events = [("runaway", 30.0, 90.0)]  # ticks 2..5 (30 s / 15 s = 2, 90 / 15 = 6)
    record.runaway = [2]
    return record


@pytest.fixture
def run() -> RunRecord:
    record = _record("policies")
    record.utilization[:] = [0.5, 0.5, 0.9, 0.9, 0.8, 0.7, 0.5, 0.5, 0.5, 0.5]
    record.goodput[2:6] = [10, 20, 30, 40]
    record.oracle[2:6] = 40
    record.ttft[2:6, 200] = 25  # 100 requests in bin 200
    record.tenant_offered[2:6, 0] = 100
    record.tenant_offered[2:6, 1] = 100
    record.tenant_offered[2:6, 3] = 100  # the attacker: never counted
    record.tenant_requests[2:6, :] = 10  # 40 each in the window
    record.tenant_good_requests[2:6, 0] = 10  # t0: all 40 within the SLO
    record.tenant_good_requests[2:6, 1] = 5  # t1: 20 of 40
    record.tenant_good[2:6, 0] = 100  # share 1
    record.tenant_good[2:6, 1] = 50  # share 0.5
    record.held_back[2:4] = 7  # requests refused while hot
    record.flaps = 3
    record.flap_times = [10.0, 40.0, 60.0, 75.0, 120.0]  # three inside the window [30, 90)
    record.budget_overrun = 0.0
    record.limits["tenant/t2/tokens_per_minute"] = np.array(
        [np.nan, np.nan, np.nan, 1e5, 1e5, 25e3, 25e3, 25e3, 25e3, 25e3]
    )
    record.baselines["tenant/t2/tokens_per_minute"] = 1e5
    record.transitions.append(Transition(4, "ThrottlePolicy/cost", "t2", "engaged"))
    return record


@pytest.fixture
def baseline() -> RunRecord:
    record = _record("baseline")
    record.ttft[2:6, 100] = 25
    return record


def test_every_figure(run: RunRecord, baseline: RunRecord) -> None:
    card = score(run, baseline)
    assert card.window == (30.0, 90.0)
    assert card.p99_ttft == pytest.approx(TTFT_EDGES[201])  # upper edge of bin 200
    assert card.baseline_p99_ttft == pytest.approx(TTFT_EDGES[101])
    assert card.p99_increase == pytest.approx(TTFT_EDGES[201] / TTFT_EDGES[101] - 1)
    assert card.utilization_mean == pytest.approx((0.9 + 0.9 + 0.8 + 0.7) / 4)
    assert card.utilization_within == pytest.approx(0.5)  # 0.8 and 0.7 of four ticks
    assert card.goodput_ratio == pytest.approx(100 / 160)
    # Requests, not tokens: t0 40 of 40, t1 20 of 40; t2 (the runaway) and t3 (the
    # attacker) are not well-behaved and not counted.
    assert card.attainment == pytest.approx(60 / 80)
    # Settling reads attainment, not utilization: 0.75 on every tick of the window (steady),
    # though utilization is out of the ±5% band on two of them.
    assert card.settling_ticks == 0
    # After the window nobody offers anything: nothing to recover.
    assert card.recovery_ticks == 0
    assert card.flaps_per_hour == pytest.approx(3 / (60 / 3600))  # turns in the window only
    # Every well-behaved tenant with demand: t0 share 1, t1 share 0.5.
    assert card.jain == pytest.approx(1.5**2 / (2 * (1 + 0.25)))  # 0.9
    assert card.worst_share == pytest.approx(0.5)
    assert card.throttle_ticks == 3  # limit below baseline at tick 5, event at tick 2
    # Others' attainment over one span for every variant: the runaway's start (tick 2) to
    # the goal's deadline (2 + 22, cut at the run's end), not until it was throttled (5):
    # t0 40 of 40, t1 20 of 40 (the 45 of 60 until tick 5 would flatter an early throttle).
    assert card.runaway_attainment == pytest.approx(60 / 80)
    verdicts = card.verdicts()
    assert "utilization_within" not in verdicts  # a diagnostic, not a goal
    assert verdicts["settling_ticks"] is True
    assert verdicts["recovery_ticks"] is True
    assert verdicts["throttle_ticks"] is True
    assert verdicts["jain"] is False
    assert verdicts["budget_overrun"] is True
    assert verdicts["flaps_per_hour"] is False


def test_a_run_that_never_settles_or_throttles(run: RunRecord, baseline: RunRecord) -> None:
    run.limits.clear()
    card = score(run, baseline)
    assert card.throttle_ticks is None
    # Never throttled: the same span, so the same figure as the run throttled at tick 5.
    assert card.runaway_attainment == pytest.approx(60 / 80)
    assert card.verdicts()["throttle_ticks"] is False


def test_attainment_that_keeps_swinging_never_settles(run: RunRecord, baseline: RunRecord) -> None:
    run.events = [("runaway", 30.0, 150.0)]  # ticks 2..9; its last quarter: ticks 8 and 9
    run.tenant_requests[2:, :2] = 10
    run.tenant_good_requests[2:, :2] = np.array([[10, 10], [0, 0]] * 4)  # 1, 0, 1, 0, ...
    card = score(run, baseline)
    assert card.settling_ticks is None  # every tick is 0.5 away from the steady 0.5
    assert card.verdicts()["settling_ticks"] is False


def test_settling_reads_attainment_in_both_directions(run: RunRecord, baseline: RunRecord) -> None:
    # In the window: t1 is served nothing on tick 2 (attainment 0.5), then 0.75 to the end.
    run.tenant_good_requests[2, 1] = 0
    assert score(run, baseline).settling_ticks == 1
    # After it: the no-overload run serves all of t0 and t1 (attainment 1); the controller
    # keeps them at 0.5 on ticks 6 and 7, a steady but throttled level that is no recovery.
    for record in (run, baseline):
        record.tenant_requests[6:, :2] = 10
        record.tenant_good_requests[6:, :2] = 10
    run.tenant_good_requests[6:8, 1] = 0
    assert score(run, baseline).recovery_ticks == 2
    run.tenant_good_requests[9, 1] = 0  # still throttled at the end: never
    assert score(run, baseline).recovery_ticks is None
    # Utilization has no say: in the band or not, the same figures.
    run.utilization[:] = 0.99
    assert score(run, baseline).settling_ticks == 1


def test_the_headline_goal_is_the_best_baselines_attainment() -> None:
    found = headline({"policies": 0.30, "static": 0.35, "plain-aimd": 0.31, "gradient": None,
                      "no-limit": 0.10})  # fmt: skip
    assert found == {"policies": False, "static": True, "plain-aimd": False, "gradient": None,
                     "no-limit": False}  # fmt: skip
    assert headline({"policies": 0.36, "static": 0.35})["policies"] is True
    assert headline({"policies": 0.36, "no-limit": 0.5}) == {"policies": None, "no-limit": None}


def test_a_small_tenant_counts_in_fairness(run: RunRecord, baseline: RunRecord) -> None:
    # A tenant with one request is a well-behaved tenant too: served none, its share is 0.
    run.tenants[2] = _tenant(2)  # no longer the runaway's index in this check
    run.runaway = []
    run.events = [("burst", 30.0, 90.0)]
    run.tenant_requests[2:6, 2] = 0
    run.tenant_requests[3, 2] = 1
    run.tenant_offered[2:6, 2] = 0
    run.tenant_offered[3, 2] = 500
    card = score(run, baseline)
    assert card.worst_share == 0.0
    assert card.jain == pytest.approx(1.5**2 / (3 * (1 + 0.25)))  # 0.6
    assert card.attainment == pytest.approx(60 / 81)


def test_goodput_above_the_oracle_counts_as_the_oracle(run: RunRecord, baseline: RunRecord) -> None:
    # ρ* is the highest constant load meeting the p99 SLO, not an upper bound: a run that
    # serves more good work than it (here 104%) scores 100%, not more.
    run.goodput[2:6] = 41.6
    assert score(run, baseline).goodput_ratio == 1.0
    run.goodput[2:6] = 20
    assert score(run, baseline).goodput_ratio == pytest.approx(0.5)


def test_the_tenants_that_did_not_burst_have_their_own_figure(
    run: RunRecord, baseline: RunRecord
) -> None:
    # t1 surged (an event of its own): the others' share is the quiet tenants' figure, t0's
    # 40 of 40, beside the 60 of 80 of every well-behaved tenant.
    run.bursting = [1]
    card = score(run, baseline)
    assert card.attainment == pytest.approx(60 / 80)
    assert card.quiet_attainment == pytest.approx(1.0)
    run.bursting = [0, 1]  # every well-behaved tenant surged: no such figure
    assert score(run, baseline).quiet_attainment is None


def test_a_burst_names_the_tenants_with_an_event_of_their_own(short_scenario: Path) -> None:
    scenario = load_scenario(str(short_scenario))  # a burst of the `ent` group only
    world = build_world(scenario, None, scenario.seed)
    own = {t.group for t in world.tenants if world.has_own_event(t)}
    assert own == {"ent"}


def test_jain_index() -> None:
    assert jain_index(np.array([1.0, 1.0, 1.0])) == pytest.approx(1.0)
    assert jain_index(np.array([1.0, 0.0, 0.0, 0.0])) == pytest.approx(0.25)
    assert jain_index(np.array([0.5])) is None
    assert jain_index(np.array([0.0, 0.0])) is None
    assert not math.isnan(jain_index(np.array([0.2, 0.4])) or math.nan)
