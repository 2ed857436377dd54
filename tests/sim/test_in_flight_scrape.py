"""The simulator scrapes the gateway's per-tenant in-flight gauge: at every scrape the
tenants' gauges add up to the requests the pools hold (running, waiting or finished and not
yet settled), and a tenant that sends more has more in flight."""

from __future__ import annotations

from pathlib import Path

from controller.control.reload import PolicyWatcher
from controller.sim.run import Simulation, TickView, embedded_redis
from controller.sim.scenario import load_scenario
from controller.sim.traffic import build_world
from tests.sim.conftest import POLICIES


def test_the_in_flight_gauge_adds_up_to_the_requests_in_the_pools(
    short_scenario: Path, tmp_path: Path
) -> None:
    scenario = load_scenario(str(short_scenario))
    checked: list[tuple[float, float]] = []
    per_tenant: dict[str, float] = {}
    with embedded_redis(tmp_path) as client:
        simulation = Simulation(
            scenario, build_world(scenario, None, 1), PolicyWatcher(POLICIES), client, "policies"
        )

        def check(view: TickView) -> None:
            at = scenario.start_time + view.elapsed + scenario.tick  # the tick's last scrape
            gauges = {
                dict(series.labels)["tenant"]: series.newest(at)
                for series in simulation.store.named("gateway_requests_in_flight")
            }
            scraped = {t: point[1] for t, point in gauges.items() if point and point[0] == at}
            held = sum(pool.in_flight for pool in simulation.pools) + len(simulation._settles)
            checked.append((sum(scraped.values()), float(held)))
            per_tenant.update(scraped)

        simulation.run(check, until=12)
    assert len(checked) == 12
    assert all(gauge == held for gauge, held in checked)
    assert max(gauge for gauge, _ in checked) > 0  # the burst from 1 min keeps some in flight
    assert all(value >= 0 for value in per_tenant.values())
    # The enterprise tenants (1.2 requests/s each, bursting 4×) hold more than the paid ones
    # (0.02 requests/s).
    ent = [v for t, v in per_tenant.items() if t.startswith("ent")]
    paid = [v for t, v in per_tenant.items() if t.startswith("paid")]
    assert ent
    assert max(ent) > max(paid, default=0.0)
