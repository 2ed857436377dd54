"""Every scorecard figure on a ten-tick run written by hand, checked against arithmetic done
here in the comments."""

from __future__ import annotations

import math

import numpy as np
import pytest

from controller.sim.record import TTFT_EDGES, RunRecord, Transition
from controller.sim.scenario import RequestSize
from controller.sim.scorecard import jain_index, score
from controller.sim.traffic import SimTenant


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
    record.tenant_requests[2:6, :] = 10  # 40 each in the window (≥ 30)
    record.tenant_good[2:6, 0] = 100  # share 1
    record.tenant_good[2:6, 1] = 50  # share 0.5
    record.flaps = 3
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
    assert card.settling_ticks == 2  # within target + 5% from the window's third tick on
    assert card.flaps_per_hour == pytest.approx(3 / (150 / 3600))  # 72
    assert card.jain == pytest.approx(1.5**2 / (2 * (1 + 0.25)))  # 0.9
    assert card.throttle_ticks == 3  # limit below baseline at tick 5, event at tick 2
    assert card.throttle_after_for_ticks == 1  # engaged at tick 4
    verdicts = card.verdicts()
    assert verdicts["utilization_within"] is False
    assert verdicts["settling_ticks"] is True
    assert verdicts["throttle_after_for_ticks"] is True
    assert verdicts["jain"] is False
    assert verdicts["budget_overrun"] is True
    assert verdicts["flaps_per_hour"] is False


def test_a_run_that_never_settles_or_throttles(run: RunRecord, baseline: RunRecord) -> None:
    run.utilization[5] = 0.99  # still too hot on the window's last tick
    run.limits.clear()
    card = score(run, baseline)
    assert card.settling_ticks is None
    assert card.throttle_ticks is None
    assert card.throttle_after_for_ticks is None
    assert card.verdicts()["settling_ticks"] is False


def test_jain_index() -> None:
    assert jain_index(np.array([1.0, 1.0, 1.0])) == pytest.approx(1.0)
    assert jain_index(np.array([1.0, 0.0, 0.0, 0.0])) == pytest.approx(0.25)
    assert jain_index(np.array([0.5])) is None
    assert jain_index(np.array([0.0, 0.0])) is None
    assert not math.isnan(jain_index(np.array([0.2, 0.4])) or math.nan)
