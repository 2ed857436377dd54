"""One `governor simulate` run: the given policies, static limits and plain AIMD on the same
world and the same random arrivals, plus the no-overload baseline; scored side by side."""

from __future__ import annotations

import concurrent.futures
import math
import multiprocessing
import tempfile
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

from controller.logging import configure_logging
from controller.policy.loader import load_directory
from controller.reload import PolicyWatcher
from controller.sim.record import RunRecord
from controller.sim.run import Simulation, TickCallback, embedded_redis
from controller.sim.scenario import Scenario
from controller.sim.scorecard import Scorecard, score
from controller.sim.trace import TraceData, open_trace, peak_minute_rate
from controller.sim.traffic import build_world
from controller.sim.variants import AIMD, POLICIES, STATIC, FixedPolicies, plain_aimd, static_limits

BASELINE = "baseline"
VARIANTS = (POLICIES, STATIC, AIMD)


@dataclass
class Comparison:
    """Every run of one simulation and its scorecards."""

    scenario: Scenario
    policies: Path
    runs: dict[str, RunRecord] = field(default_factory=dict)
    cards: dict[str, Scorecard] = field(default_factory=dict)

    @property
    def baseline(self) -> RunRecord:
        return self.runs[BASELINE]


def load_trace(scenario: Scenario, scenario_file: Path | None = None) -> TraceData | None:
    if scenario.trace is None:
        return None
    return open_trace(scenario.trace.file, scenario_file)


def run_variant(
    scenario: Scenario,
    policies: Path,
    variant: str,
    log_file: Path | None,
    trace: TraceData | None = None,
    on_tick: TickCallback | None = None,
) -> RunRecord:
    """One run in this process, on its own embedded Redis; its journal (structlog JSON) goes
    to `log_file`, then logging returns to stderr."""
    with ExitStack() as stack:
        if log_file is not None:
            handle = stack.enter_context(log_file.open("w", encoding="utf-8"))
            configure_logging("info", handle)
            stack.callback(configure_logging, "warning", "stderr")
        loaded = load_directory(policies)
        watcher: PolicyWatcher
        if variant == POLICIES:
            watcher = PolicyWatcher(policies)
        elif variant == AIMD:
            watcher = FixedPolicies(
                plain_aimd(loaded, scenario.plain_aimd, scenario.target_utilization)
            )
        else:
            watcher = FixedPolicies(static_limits(loaded))
        # The baseline: the same world with nothing happening, under static limits.
        world_scenario = scenario.without_events() if variant == BASELINE else scenario
        world = build_world(world_scenario, trace, scenario.seed)
        directory = stack.enter_context(tempfile.TemporaryDirectory(prefix="governor-sim-"))
        client = stack.enter_context(embedded_redis(Path(directory)))
        record = Simulation(world_scenario, world, watcher, client, variant).run(on_tick)
    # The baseline is scored over the scenario's window too, though nothing happened in it.
    record.events = [(e.kind, e.at, e.end) for e in scenario.events]
    return record


def compare(
    scenario: Scenario,
    policies: Path,
    *,
    trace: TraceData | None = None,
    log_dir: Path | None = None,
    workers: int = 2,
    on_tick: TickCallback | None = None,
) -> Comparison:
    """Run the policies (in this process, calling `on_tick`) and, meanwhile, static limits,
    plain AIMD and the baseline in `workers` processes (0: one after the other, here)."""
    result = Comparison(scenario, policies)
    others = (STATIC, AIMD, BASELINE)

    def log(name: str) -> Path | None:
        return None if log_dir is None else log_dir / f"journal-{name}.log"

    if workers > 0:
        context = multiprocessing.get_context("spawn")  # no inherited sockets or threads
        with concurrent.futures.ProcessPoolExecutor(workers, mp_context=context) as pool:
            futures = {
                name: pool.submit(run_variant, scenario, policies, name, log(name), trace)
                for name in others
            }
            result.runs[POLICIES] = run_variant(
                scenario, policies, POLICIES, log(POLICIES), trace, on_tick
            )
            for name, future in futures.items():
                result.runs[name] = future.result()
    else:
        result.runs[POLICIES] = run_variant(
            scenario, policies, POLICIES, log(POLICIES), trace, on_tick
        )
        for name in others:
            result.runs[name] = run_variant(scenario, policies, name, log(name), trace)
    for name in VARIANTS:
        result.cards[name] = score(result.runs[name], result.baseline)
    return result


def trace_scenario(trace: TraceData, path: Path, speed: float, seed: int) -> Scenario:
    """A scenario replaying `trace` at `speed` on a pool sized for it at 1× (its busiest
    minute at the 0.8 target), over 20 tenants split by Zipf(1)."""
    capacity = peak_minute_rate(trace) / 0.8
    return Scenario.model_validate(
        {
            "name": f"trace-{path.stem}-{speed:g}x",
            "description": f"{path.name} replayed at {speed:g}× on a pool sized for 1×",
            "duration": max(trace.span / speed, 60.0),
            "seed": seed,
            "pools": [
                {
                    "name": "inference",
                    "gpus": max(1, math.ceil(capacity / 2000)),
                    "capacity_tokens_per_second": capacity,
                }
            ],
            "trace": {"file": str(path), "speed": speed},
        }
    )
