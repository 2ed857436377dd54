"""The scorecard's shortcuts change no figure: a run whose controller has nothing to move ticks
it once and records the same run, a static search's candidate cut at the window's end has
the merit of the whole run, and arrivals drawn once are those every run would have drawn
(benchmarks/scorecard_speed.py measures what they save)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest

from controller.control import tick as loop
from controller.control.reload import PolicyWatcher
from controller.control.tick import Controller, TickOutcome
from controller.policy.loader import load_directory
from controller.sim import compare as compare_module
from controller.sim.compare import run_variant, search_ticks, standing, whole
from controller.sim.record import differences
from controller.sim.recorded import recorded_world
from controller.sim.reference import merit
from controller.sim.scenario import load_scenario
from controller.sim.scorecard import window_ticks
from controller.sim.traffic import Arrivals, build_world
from controller.sim.variants import (
    GRADIENT,
    NO_LIMIT,
    STATIC,
    FixedPolicies,
    plain_aimd,
    policy_knob,
    static_limits,
)
from tests.sim.conftest import POLICIES


def test_only_a_fixed_set_without_policies_stands() -> None:
    loaded = load_directory(POLICIES)
    knob = policy_knob(loaded, load_scenario("burst-5x").plain_aimd)
    assert standing(FixedPolicies(static_limits(loaded)))
    assert not standing(FixedPolicies(plain_aimd(loaded, knob, 0.8)))  # AIMD moves its knob
    assert not standing(PolicyWatcher(POLICIES))  # the policies: a directory that reloads


@pytest.mark.parametrize(("variant", "value"), [(STATIC, 9.0), (NO_LIMIT, None), (GRADIENT, None)])
def test_a_standing_run_ticks_once_and_records_the_same_run(
    short_scenario: Path, monkeypatch: pytest.MonkeyPatch, variant: str, value: float | None
) -> None:
    scenario = load_scenario(str(short_scenario))
    ticks: list[int] = []
    real_tick = Controller.tick

    def counted(self: Controller) -> TickOutcome:
        ticks.append(self.tick_id)
        return real_tick(self)

    monkeypatch.setattr(loop.Controller, "tick", counted)
    still = run_variant(scenario, POLICIES, variant, None, value=value)
    assert len(ticks) == 1  # the first tick writes the baselines; nothing moves after it
    monkeypatch.setattr(compare_module, "standing", lambda watcher: False)
    ticking = run_variant(scenario, POLICIES, variant, None, value=value)
    assert len(ticks) == 1 + scenario.ticks
    assert differences(still, ticking) == []
    assert still.changes  # a real run, not an empty one
    assert still.outcomes["allow"].sum() > 0


def test_a_static_candidate_cut_at_the_window_end_has_the_whole_runs_merit(
    short_scenario: Path,
) -> None:
    scenario = load_scenario(str(short_scenario))
    until = search_ticks(scenario)
    # The burst ends at 6 min (24 ticks of 15 s, of 32); a request that arrived in its last
    # tick counts there when served within the 2 s SLO: one tick more.
    assert until == 25
    cut = run_variant(scenario, POLICIES, STATIC, None, value=12.0, until=until)
    full = run_variant(scenario, POLICIES, STATIC, None, value=12.0)
    assert window_ticks(cut) == window_ticks(full) == (4, 24)
    assert merit(cut) == merit(full)
    assert 0 < merit(cut)[0] < 1  # the knob binds in the window: a merit worth comparing
    assert cut.offered[until:].sum() == 0 < full.offered[until:].sum()
    # The best candidate is run again whole, keeping what the search learnt about it.
    cut.knob_edge = True
    again = whole(cut, until, lambda v: run_variant(scenario, POLICIES, STATIC, None, value=v))
    assert again.knob_value == 12.0
    assert again.knob_edge
    assert differences(dataclasses.replace(again, knob_edge=False), full) == []
    # A window that ends with the run: candidates are whole already.
    assert search_ticks(scenario.without_events()) is None
    assert whole(full, None, lambda v: pytest.fail("not run again")) is full


def test_recorded_arrivals_are_those_a_fresh_generator_draws(short_scenario: Path) -> None:
    scenario = load_scenario(str(short_scenario)).model_copy(update={"seed": 11})
    step = scenario.step
    fresh = build_world(scenario, None, scenario.seed)
    rng = np.random.default_rng([scenario.seed, 0])
    expected = [fresh.arrivals(k * step, step, rng) for k in range(40)]
    world = recorded_world(scenario, None, scenario.seed)
    assert recorded_world(scenario, None, scenario.seed) is world  # the next run shares it
    # A run cut short, then one that goes further: each with its own fresh generator.
    for steps in (15, 40):
        own = np.random.default_rng([scenario.seed, 0])
        got = [world.arrivals(k * step, step, own) for k in range(steps)]
        for mine, theirs in zip(got, expected, strict=False):
            assert all(
                np.array_equal(getattr(mine, f.name), getattr(theirs, f.name))
                for f in dataclasses.fields(Arrivals)
            )
    assert sum(len(a) for a in expected) > 100  # requests, not empty steps
    with pytest.raises(ValueError, match="in order"):
        world.arrivals(100 * step, step, np.random.default_rng(0))
