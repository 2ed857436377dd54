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
# A search warm-started from another seed's value first runs it and this many resolutions
# either side, then widens (doubling) towards a better edge.
WARM_SPAN = 1


def snap(value: float, resolution: float) -> float:
    """A value searched, rounded to the search's resolution (the key of its run)."""
    return round(value / resolution) * resolution


def bracket(grid: Sequence[float], start: float, resolution: float) -> list[float]:
    """A warm-started search's first values: `start` and WARM_SPAN resolutions either side,
    within the grid's range, rounded to the resolution."""
    span = WARM_SPAN * resolution
    ends = (max(start - span, grid[0]), start, min(start + span, grid[-1]))
    return sorted({snap(v, resolution) for v in ends})


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
        rounded = [snap(v, self.resolution) for v in values]
        new = sorted({v for v in rounded if v not in self.seen})
        self.seen.update(zip(new, self.evaluate(new), strict=True))
        return [self.seen[v] for v in rounded]

    def best(self, grid: Sequence[float], start: float | None = None) -> RunRecord:
        """The best run found; its `knob_edge` says it sits on the range's edge. `start`: a
        value found best on another seed of the scenario: the search begins there (around)
        instead of on the whole grid."""
        if start is None:
            scores = [merit(r) for r in self.at(grid)]
            k = scores.index(max(scores))
            self._refine(grid[max(k - 1, 0)], grid[min(k + 1, len(grid) - 1)])
        else:
            self._refine(*self.around(grid, start))
        return self._found(grid)

    def around(self, grid: Sequence[float], start: float) -> tuple[float, float]:
        """A bracket of the best value, from `start`: the best of the values run so far is
        found inside it, else the bracket doubles its step beyond the edge the best lies on
        (up to the grid's range) until a run is no better. With a merit unimodal in the
        value (the full search assumes it too) the best lies between the best run's two
        neighbours, so the refinement finds what the full search finds."""
        values = bracket(grid, start, self.resolution)
        step = WARM_SPAN * self.resolution
        while True:
            scores = [merit(r) for r in self.at(values)]
            k = scores.index(max(scores))
            if 0 < k < len(values) - 1 or len(values) == 1:
                break
            step *= 2
            if k == 0 and values[0] > grid[0]:
                values.insert(0, max(values[0] - step, grid[0]))
            elif k > 0 and values[-1] < grid[-1]:
                values.append(min(values[-1] + step, grid[-1]))
            else:
                break  # the best is on the range's own edge: nothing beyond to search
        return values[max(k - 1, 0)], values[min(k + 1, len(values) - 1)]

    def _leader(self) -> tuple[float, RunRecord]:
        """The best value run so far; ties (a plateau: values at which the knob never binds
        run alike) go to the lowest, whatever order the values were run in."""
        return max(sorted(self.seen.items()), key=lambda item: merit(item[1]))

    def _polish(self, grid: Sequence[float]) -> None:
        """Step to a better neighbour one resolution away until neither is better: the
        golden section's probes are rounded, so it may stop a resolution short; with a merit
        unimodal in the value, a value no neighbour beats is the best of the range, whichever
        bracket the search came from (so the warm start finds what the full search finds)."""
        while True:
            value, best = self._leader()
            beside = [v for v in (value - self.resolution, value + self.resolution)
                      if grid[0] <= v <= grid[-1]]  # fmt: skip
            if all(merit(r) <= merit(best) for r in self.at(beside)):
                return

    def _found(self, grid: Sequence[float]) -> RunRecord:
        self._polish(grid)
        found = self._leader()[1]
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
