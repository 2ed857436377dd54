"""What a run is judged against: the no-overload world, and the best static value in hindsight."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

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


def merit(record: RunRecord) -> tuple[float, float]:
    """Hindsight's order: the SLO attainment over the window, then goodput (NaN lowest)."""
    first, last = window_ticks(record)
    mine = (attainment(record, first, last), float(record.goodput[first:last].sum()))
    return (-1.0 if math.isnan(mine[0]) else mine[0], -1.0 if math.isnan(mine[1]) else mine[1])


Evaluate = Callable[[Sequence[float]], list[RunRecord]]  # runs static at each value
_GOLDEN = (math.sqrt(5) - 1) / 2


class StaticSearch:
    """The best static value in hindsight: a coarse grid over the range, then a golden-section
    refinement around the grid's best (attainment is unimodal enough in the value), each
    value rounded to `resolution` and run once."""

    def __init__(self, evaluate: Evaluate, resolution: float) -> None:
        self.evaluate = evaluate
        self.resolution = resolution
        self.seen: dict[float, RunRecord] = {}

    def at(self, values: Sequence[float]) -> list[RunRecord]:
        """Runs at `values` (rounded), the new ones in one batch (parallel if it can)."""
        rounded = [round(v / self.resolution) * self.resolution for v in values]
        new = sorted({v for v in rounded if v not in self.seen})
        self.seen.update(zip(new, self.evaluate(new), strict=True))
        return [self.seen[v] for v in rounded]

    def best(self, grid: Sequence[float]) -> RunRecord:
        """The best run found; its `knob_edge` says it sits on the range's edge."""
        scores = [merit(r) for r in self.at(grid)]
        k = scores.index(max(scores))
        self._refine(grid[max(k - 1, 0)], grid[min(k + 1, len(grid) - 1)])
        found = max(self.seen.values(), key=merit)
        value = found.knob_value if found.knob_value is not None else math.nan
        found.knob_edge = min(abs(value - grid[0]), abs(value - grid[-1])) <= self.resolution
        return found

    def _refine(self, low: float, high: float) -> None:
        inner = [high - _GOLDEN * (high - low), low + _GOLDEN * (high - low)]
        scores = [merit(r) for r in self.at(inner)]
        while high - low > 2 * self.resolution:
            if scores[0] >= scores[1]:  # the peak is left of the right probe
                high, inner[1], scores[1] = inner[1], inner[0], scores[0]
                inner[0] = high - _GOLDEN * (high - low)
                scores[0] = merit(self.at([inner[0]])[0])
            else:
                low, inner[0], scores[0] = inner[0], inner[1], scores[1]
                inner[1] = low + _GOLDEN * (high - low)
                scores[1] = merit(self.at([inner[1]])[0])
