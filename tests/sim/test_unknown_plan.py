"""The simulated gateway refuses a plan the policy set does not define, as both real gateways
do (403 unknown-plan): it was served without any limit when the simulator was driven directly
rather than through `governor simulate` (which refuses such a scenario up front)."""

from __future__ import annotations

from pathlib import Path

from controller.control.reload import PolicyWatcher
from controller.sim.run import Simulation, embedded_redis
from controller.sim.scenario import load_scenario
from controller.sim.traffic import build_world
from tests.sim.conftest import POLICIES


def test_traffic_on_an_unknown_plan_is_refused_never_served(
    short_scenario: Path, tmp_path: Path
) -> None:
    text = short_scenario.read_text().replace("plan: paid", "plan: platinum")
    short_scenario.write_text(text)
    scenario = load_scenario(str(short_scenario))
    with embedded_redis(tmp_path) as client:
        world = build_world(scenario, None, 1)
        simulation = Simulation(scenario, world, PolicyWatcher(POLICIES), client, "policies")
        record = simulation.run(until=16)
    platinum = [t.index for t in world.tenants if t.plan == "platinum"]
    others = [t.index for t in world.tenants if t.plan != "platinum"]
    assert platinum
    assert others
    assert record.outcomes["unknown_plan"].sum() > 0
    # The platinum tenants asked and got nothing admitted; the enterprise tenants were served.
    assert record.tenant_admitted[:, platinum].sum() == 0
    assert record.tenant_admitted[:, others].sum() > 0
