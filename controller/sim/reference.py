"""What a run is judged against: the no-overload world, and the best static value in hindsight."""

from __future__ import annotations

import math

from controller.sim.record import RunRecord
from controller.sim.scenario import Scenario
from controller.sim.scorecard import attainment, window_ticks
from controller.sim.traffic import size_means

# A scenario without events is compared with the same pool under a demand capped at this
# share of its capacity at its peak: a real run with no overload, not the static run.
NO_OVERLOAD_SHARE = 0.5


def no_overload(scenario: Scenario) -> Scenario:
    """The no-overload baseline's world: without events (a trace at 1×, whose pool is sized
    for it); a scenario that has none instead keeps its shape with every synthetic tenant's
    rate scaled so its peak demand is NO_OVERLOAD_SHARE of the capacity."""
    quiet = scenario.without_events()
    if scenario.events or not scenario.tenants:
        return quiet
    peak = 0.0
    for group in scenario.tenants:
        prompt, output = size_means(group.size)
        swing = 1.0 + (group.diurnal.amplitude if group.pattern == "diurnal" else 0.0)
        peak += group.count * group.rate * swing * (prompt + output)
    capacity = sum(p.capacity_tokens_per_second for p in scenario.pools)
    scale = min(1.0, NO_OVERLOAD_SHARE * capacity / peak) if peak > 0 else 1.0
    groups = [g.model_copy(update={"rate": g.rate * scale}) for g in scenario.tenants]
    return quiet.model_copy(update={"tenants": groups})


def better(candidate: RunRecord, best: RunRecord | None) -> bool:
    """Hindsight's choice: the higher SLO attainment over the window (then goodput)."""
    if best is None:
        return True
    first, last = window_ticks(candidate)
    mine = (attainment(candidate, first, last), float(candidate.goodput[first:last].sum()))
    theirs = (attainment(best, first, last), float(best.goodput[first:last].sum()))
    return tuple(-1.0 if math.isnan(x) else x for x in mine) > tuple(
        -1.0 if math.isnan(x) else x for x in theirs
    )
