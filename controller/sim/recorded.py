"""Arrivals drawn once per world and seed, handed again to every later run on them: they never
depend on what was admitted (common random numbers), so every run still sees the same
requests, and the comparison's runs in one process stop drawing them again and again."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np

from controller.sim.scenario import Scenario
from controller.sim.trace import TraceData
from controller.sim.traffic import Arrivals, World, build_world

KEPT = 2  # worlds kept per process: a scenario's and its no-overload run's


@dataclass
class RecordedWorld(World):
    """A world that keeps the arrivals it drew, step by step, and the generator's state after
    the last one: a run that goes further than any before it continues the draws there, so
    its arrivals are those a fresh generator would have drawn."""

    drawn: dict[tuple[float, float], Arrivals] = field(default_factory=dict)
    state: Mapping[str, Any] | None = None  # the generator's, after the last step drawn
    until: float = 0.0  # the end of the last step drawn

    def arrivals(self, elapsed: float, dt: float, rng: np.random.Generator) -> Arrivals:
        found = self.drawn.get((elapsed, dt))
        if found is not None:
            return found
        if elapsed != self.until:
            raise ValueError(
                f"arrivals asked at {elapsed} s while {self.until} s were drawn: a run asks "
                "for its steps in order, from the start"
            )
        if self.state is not None:
            rng.bit_generator.state = self.state  # where the last run that drew stopped
        found = self.drawn[(elapsed, dt)] = super().arrivals(elapsed, dt, rng)
        self.state = rng.bit_generator.state
        self.until = elapsed + dt
        return found


_KEPT: OrderedDict[tuple[str, int, int], RecordedWorld] = OrderedDict()


def recorded_world(scenario: Scenario, trace: TraceData | None, seed: int) -> RecordedWorld:
    """The world of `scenario` on `seed`, its arrivals shared with the runs before this one in
    this process (the KEPT latest worlds)."""
    key = (scenario.model_dump_json(), seed, id(trace))  # the world holds `trace`: a live id
    found = _KEPT.get(key)
    if found is None:
        world = build_world(scenario, trace, seed)
        found = RecordedWorld(**{f.name: getattr(world, f.name) for f in fields(World)})
        _KEPT[key] = found
        while len(_KEPT) > KEPT:
            _KEPT.popitem(last=False)
    _KEPT.move_to_end(key)
    return found
