"""The static search warm-started from another seed's value: on a unimodal merit it finds the
value the full search finds, in fewer runs, and widens its bracket while the best lies on its
edge (so a start far from the best does not stop it short)."""

from __future__ import annotations

from collections.abc import Sequence

import pytest

from controller.sim.record import RunRecord
from controller.sim.reference import StaticSearch, merit
from controller.sim.scenario import load_scenario
from controller.sim.traffic import build_world

GRID = [6.0, 28.0, 50.0, 72.0, 94.0, 116.0]  # burst-5x's coarse grid, 1 req/s resolution
OFFERED = 1000.0


def synthetic(peak: float, plateau: bool = False) -> tuple[StaticSearch, list[float]]:
    """A search whose runs are real records with an attainment that falls off linearly on
    each side of `peak` (unimodal; `plateau`: flat above it), and goodput in step with it;
    and the values it ran."""
    tenants = build_world(load_scenario("burst-5x"), None, 7).tenants
    ran: list[float] = []

    def evaluate(values: Sequence[float]) -> list[RunRecord]:
        records = []
        for value in values:
            ran.append(value)
            record = RunRecord.empty("static", 4, 15.0, tenants, 1.0, 0.8, 2.0)
            gap = max(0.0, peak - value) if plateau else abs(value - peak)
            share = max(0.0, 1.0 - gap / 1000.0)
            record.tenant_requests[:, :] = OFFERED
            record.tenant_good_requests[:, :] = round(OFFERED * share)
            record.goodput[:] = share
            record.knob_value = value
            records.append(record)
        return records

    return StaticSearch(evaluate, 1.0), ran


@pytest.mark.parametrize("peak", [7.0, 37.0, 54.0, 61.0, 99.0, 115.0])
@pytest.mark.parametrize("offset", [0.0, 1.0, -3.0, 9.0])
def test_a_warm_start_near_the_best_finds_the_full_searchs_value_in_fewer_runs(
    peak: float, offset: float
) -> None:
    full, full_runs = synthetic(peak)
    expected = full.best(GRID)
    assert expected.knob_value == peak  # the full search finds the peak to 1 req/s
    start = min(max(peak + offset, GRID[0]), GRID[-1])  # another seed found it there
    warm, warm_runs = synthetic(peak)
    found = warm.best(GRID, start)
    assert found.knob_value == expected.knob_value
    assert merit(found) == merit(expected)
    assert found.knob_edge == expected.knob_edge
    assert len(warm_runs) == len(set(warm_runs)) < len(full_runs)
    if abs(offset) <= 1:  # the same value or a neighbour: the bracket and a polish at most
        assert len(warm_runs) <= 5 < len(full_runs)


@pytest.mark.parametrize(("peak", "start"), [(98.0, 30.0), (9.0, 80.0), (61.0, 50.0)])
def test_a_warm_start_widens_while_the_best_is_on_its_edge(peak: float, start: float) -> None:
    full, _ = synthetic(peak)
    warm, ran = synthetic(peak)
    found = warm.best(GRID, start)
    assert found.knob_value == full.best(GRID).knob_value == peak
    # It went past its first bracket (start ± 2) towards the best, one doubling at a time.
    beyond = sorted(v for v in ran if abs(v - start) > 2)
    assert beyond
    toward = [v for v in beyond if (v - start) * (peak - start) > 0]
    assert toward == beyond  # never away from the best
    assert len(ran) <= 20


def test_a_best_on_the_ranges_edge_stops_there_and_says_so() -> None:
    for peak, edge in ((300.0, GRID[-1]), (-50.0, GRID[0])):
        warm, ran = synthetic(peak)
        found = warm.best(GRID, 60.0)
        assert found.knob_value == edge
        assert found.knob_edge
        assert min(ran) >= GRID[0]
        assert max(ran) <= GRID[-1]


def test_on_a_plateau_both_searches_find_its_lowest_value() -> None:
    # Above 60 req/s the knob never binds: every run alike (a real plateau, the top one).
    full, _ = synthetic(60.0, plateau=True)
    warm, _ = synthetic(60.0, plateau=True)
    expected = full.best(GRID)
    found = warm.best(GRID, 80.0)
    assert expected.knob_value is not None
    assert found.knob_value is not None
    assert abs(expected.knob_value - 60.0) <= 1.0
    assert abs(found.knob_value - 60.0) <= 1.0
    assert merit(found) == merit(expected)
