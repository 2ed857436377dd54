"""One `governor simulate` run: the given policies and every baseline (best static limit in
hindsight, AIMD on the same knob, a Gradient2 concurrency limiter, no limit) on the same world
and the same random arrivals, plus the no-overload baseline; scored side by side."""

from __future__ import annotations

import concurrent.futures
import math
import multiprocessing
import tempfile
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

from controller.logging import configure_logging
from controller.policy.loader import load_directory
from controller.policy.policyset import PolicySet
from controller.reload import PolicyWatcher
from controller.sim.limiters import FixedKnob, Gate, Gradient2, NoLimit
from controller.sim.record import RunRecord
from controller.sim.reference import better, no_overload
from controller.sim.run import Simulation, TickCallback, embedded_redis
from controller.sim.scenario import Scenario
from controller.sim.scorecard import Scorecard, score
from controller.sim.trace import TraceData, open_trace, peak_minute_rate
from controller.sim.traffic import build_world
from controller.sim.variants import (
    AIMD,
    GRADIENT,
    NO_LIMIT,
    POLICIES,
    STATIC,
    FixedPolicies,
    Knob,
    plain_aimd,
    policy_knob,
    static_limits,
)

BASELINE = "baseline"
VARIANTS = (POLICIES, STATIC, AIMD)  # drawn by plots.py
SCORED = (POLICIES, STATIC, AIMD, GRADIENT, NO_LIMIT)  # every scorecard


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


def _controller(
    variant: str, policies: Path, loaded: PolicySet, knob: Knob, scenario: Scenario,
    value: float | None,
) -> tuple[PolicyWatcher, Gate | None]:  # fmt: skip
    """The controller of a variant, and what its gateway enforces beside the limits."""
    if variant == POLICIES:
        return PolicyWatcher(policies), None
    if variant == AIMD:
        return FixedPolicies(plain_aimd(loaded, knob, scenario.target_utilization)), None
    static = FixedPolicies(static_limits(loaded))
    gates: dict[str, Callable[[], Gate | None]] = {
        STATIC: lambda: None if value is None else FixedKnob(knob.target, value),
        GRADIENT: Gradient2,
        NO_LIMIT: NoLimit,
        BASELINE: lambda: None,
    }
    return static, gates[variant]()


def run_variant(
    scenario: Scenario,
    policies: Path,
    variant: str,
    log_file: Path | None,
    trace: TraceData | None = None,
    on_tick: TickCallback | None = None,
    value: float | None = None,
) -> RunRecord:
    """One run in this process, on its own embedded Redis; its journal (structlog JSON) goes
    to `log_file`, then logging returns to stderr. `value`: the static knob's value."""
    with ExitStack() as stack:
        if log_file is not None:
            handle = stack.enter_context(log_file.open("w", encoding="utf-8"))
            configure_logging("info", handle)
            stack.callback(configure_logging, "warning", "stderr")
        loaded = load_directory(policies)
        knob = policy_knob(loaded, scenario.plain_aimd)
        watcher, gate = _controller(variant, policies, loaded, knob, scenario, value)
        world_scenario = no_overload(scenario) if variant == BASELINE else scenario
        world = build_world(world_scenario, trace, scenario.seed)
        directory = stack.enter_context(tempfile.TemporaryDirectory(prefix="governor-sim-"))
        client = stack.enter_context(embedded_redis(Path(directory)))
        record = Simulation(world_scenario, world, watcher, client, variant, gate).run(on_tick)
    # The baseline is scored over the scenario's window too, though nothing happened in it.
    record.events = [(e.kind, e.at, e.end) for e in scenario.events]
    record.knob_value = value
    return record


Task = tuple[str, float | None]


def tasks(scenario: Scenario, policies: Path) -> list[Task]:
    """Every run but the policies': the static sweep over the knob, then the others."""
    knob = policy_knob(load_directory(policies), scenario.plain_aimd)
    return [
        *((STATIC, value) for value in knob.sweep()),
        (AIMD, None),
        (GRADIENT, None),
        (NO_LIMIT, None),
        (BASELINE, None),
    ]


def _keep(result: Comparison, variant: str, record: RunRecord) -> None:
    if variant != STATIC:
        result.runs[variant] = record
    elif better(record, result.runs.get(STATIC)):
        result.runs[STATIC] = record


def compare(
    scenario: Scenario,
    policies: Path,
    *,
    trace: TraceData | None = None,
    log_dir: Path | None = None,
    workers: int = 2,
    on_tick: TickCallback | None = None,
) -> Comparison:
    """Run the policies (in this process, calling `on_tick`) and, meanwhile, every baseline
    in `workers` processes (0: one after the other, here)."""
    result = Comparison(scenario, policies)
    others = tasks(scenario, policies)

    def log(name: str) -> Path | None:
        return None if log_dir is None or name == STATIC else log_dir / f"journal-{name}.log"

    def own() -> RunRecord:
        return run_variant(scenario, policies, POLICIES, log(POLICIES), trace, on_tick)

    if workers > 0:
        context = multiprocessing.get_context("spawn")  # no inherited sockets or threads
        with concurrent.futures.ProcessPoolExecutor(
            workers, mp_context=context, initializer=configure_logging,
            initargs=("warning", "stderr"),
        ) as pool:  # fmt: skip
            futures = [
                (
                    name,
                    pool.submit(
                        run_variant, scenario, policies, name, log(name), trace, None, value
                    ),
                )
                for name, value in others
            ]
            result.runs[POLICIES] = own()
            for name, future in futures:
                _keep(result, name, future.result())
    else:
        result.runs[POLICIES] = own()
        for name, value in others:
            _keep(result, name, run_variant(scenario, policies, name, log(name), trace,
                                            None, value))  # fmt: skip
    for name in SCORED:
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
