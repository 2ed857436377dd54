"""The simulated gateway hears of a response when it ends: admission and the pools advance
together, window by window of the engine step, so a request that ends in one window gives its
lease back before the next window's arrivals are admitted (a whole step of arrivals admitted
before any of its ends would hold them in flight on top of the pool: the edge's in-flight
limit would bind a step's arrivals early)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from controller.control.reload import PolicyWatcher
from controller.sim.pool import StepResult
from controller.sim.run import Simulation, embedded_redis
from controller.sim.scenario import load_scenario
from controller.sim.traffic import build_world
from tests.sim.conftest import POLICIES


def test_leases_are_given_back_window_by_window_of_the_engine_step(
    short_scenario: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Steps of 3 s, the engine's of 0.5 s: six windows a step.
    scenario = load_scenario(str(short_scenario)).model_copy(update={"step": 3.0})
    window = scenario.pools[0].engine_step_seconds
    admitted: list[float] = []  # when each request admitted since the last pool step came
    checked: list[tuple[int, int, float]] = []  # leases - held, admitted since, their span
    with embedded_redis(tmp_path) as client:
        simulation = Simulation(
            scenario, build_world(scenario, None, 1), PolicyWatcher(POLICIES), client, "policies"
        )
        gateway, pool = simulation.gateway, simulation.pools[0]
        admit, step = gateway.admit, pool.step

        def counted(*args: Any) -> Any:
            decision = admit(*args)
            if decision.reservation is not None:
                admitted.append(args[4] / 1000.0)
            leases = len(gateway.levels["g"].leases)  # the global level's
            held = pool.in_flight + len(simulation._settles)
            span = admitted[-1] - admitted[0] if admitted else 0.0
            checked.append((leases - held, len(admitted), span))
            return decision

        def stepped(*args: Any) -> StepResult:
            admitted.clear()
            return step(*args)

        monkeypatch.setattr(gateway, "admit", counted)
        monkeypatch.setattr(pool, "step", stepped)
        simulation.run(until=12)
    assert len(checked) > 1000
    # Every lease is a request the pool holds, one that ended and is not settled yet, or one
    # admitted since the pool last stepped; and those all came within one engine step.
    assert all(excess == since for excess, since, _ in checked)
    assert all(span <= window for _, _, span in checked)
    assert max(since for _, since, _ in checked) > 0
