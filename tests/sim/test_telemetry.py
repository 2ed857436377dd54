"""The controller's own control-quality metrics, observed while the simulator drives it: an
outage of the pool's vLLM metrics is counted as time in fallback, overshoot is exported while
the pool runs above the setpoint, and direction changes match the flap detector's turns."""

from __future__ import annotations

from pathlib import Path

from controller.control.reload import PolicyWatcher
from controller.sim.run import Simulation, TickView, embedded_redis
from controller.sim.scenario import load_scenario
from controller.sim.traffic import build_world
from tests.sim.conftest import POLICIES

ADAPTIVE = "AdaptiveLimit/global-inflight-by-gpu"


def test_fallback_overshoot_and_flaps(short_scenario: Path, tmp_path: Path) -> None:
    scenario = load_scenario(str(short_scenario))
    outage = {"kind": "signal_outage", "at": 240, "duration": 180, "metric": "vllm:"}
    scenario = scenario.model_validate(
        {**scenario.model_dump(), "events": [*scenario.model_dump()["events"], outage]}
    )
    overshoot: list[float] = []
    fallback: list[float] = []
    with embedded_redis(tmp_path) as client:
        simulation = Simulation(
            scenario, build_world(scenario, None, 1), PolicyWatcher(POLICIES), client, "policies"
        )
        registry = simulation.controller.metrics.registry

        def sample(view: TickView) -> None:
            labels = {"policy": ADAPTIVE}
            overshoot.append(
                registry.get_sample_value("governor_adaptive_overshoot_ratio", labels) or 0.0
            )
            fallback.append(
                registry.get_sample_value("governor_fallback_seconds_total", labels) or 0.0
            )

        record = simulation.run(sample)
        # The simulator keeps every turn (the controller only the newest threshold + 1).
        turns = sum(len(t) for t in simulation._flaps._turns.values())
        changes = sum(
            registry.get_sample_value("governor_limit_direction_changes_total", {"scope": s}) or 0.0
            for s in ("global", "ip", "plan", "tenant", "user")
        )
    tick = scenario.tick
    # Overshoot is the signal the tick read over the setpoint (1.1), minus 1; 0 at or below
    # it, and 0 while the signal is stale (from 5 min until fresh again after 7 min).
    signal = record.signals["global-inflight-by-gpu:occupancy"]
    assert max(overshoot) > 0.0
    for over, seen in zip(overshoot, signal.tolist(), strict=True):
        if over > 0.0:
            assert abs(over - (seen / 1.1 - 1.0)) <= 1e-9 * over
        if seen <= 1.1:
            assert over == 0.0
    assert all(o == 0.0 for o in overshoot[int(300 / tick) + 1 : int(420 / tick)])
    # The metric stops at 4 min; it is stale (60 s) from 5 min, fresh again after 7 min.
    before = int(300 / tick) - 1
    # The admitted rate (`irate`) needs two scrapes: the first two ticks estimate no
    # capacity and act on AIMD alone (15 s of fallback), then nothing until the outage.
    assert fallback[1] <= 15.0
    assert fallback[before] == fallback[1]
    assert 0.0 < fallback[-1] - fallback[before] <= 180.0
    assert fallback[-1] == fallback[int(450 / tick)]  # nothing more once the data is back
    assert changes == turns
