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

from controller.control.reload import PolicyWatcher
from controller.durations import format_duration
from controller.logging import configure_logging
from controller.policy.loader import load_directory
from controller.policy.policyset import PolicySet
from controller.sim.limiters import FixedKnob, Gate, Gradient2, NoLimit
from controller.sim.record import RunRecord
from controller.sim.recorded import recorded_world
from controller.sim.reference import StaticSearch, bracket, no_overload
from controller.sim.run import Simulation, TickCallback, embedded_redis, mean_work
from controller.sim.scenario import Scenario
from controller.sim.scorecard import Scorecard, score, window_of
from controller.sim.trace import TraceData, open_trace, peak_minute_rate, trace_name
from controller.sim.trace_formats import TimeUnit
from controller.sim.traffic import World, build_world
from controller.sim.variants import (
    AIMD,
    GRADIENT,
    NO_LIMIT,
    POLICIES,
    STATIC,
    FixedPolicies,
    Knob,
    plain_aimd,
    plans_only,
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
    """The window of its trace a scenario replays: from `trace.start`, as long as the run
    lasts at the replay's speed (None: no trace)."""
    spec = scenario.trace
    if spec is None:
        return None
    whole = open_trace(spec.file, scenario_file, spec.time_unit)
    return whole.window(spec.start, scenario.duration * spec.speed)


def _controller(
    variant: str, policies: Path, loaded: PolicySet, knob: Knob, scenario: Scenario,
    value: float | None,
) -> tuple[PolicyWatcher, Gate | None]:  # fmt: skip
    """The controller of a variant, and what its gateway enforces beside the limits."""
    if variant == POLICIES:
        return PolicyWatcher(policies), None
    if variant == AIMD:
        setpoint = scenario.target_utilization if knob.setpoint is None else knob.setpoint
        return FixedPolicies(plain_aimd(loaded, knob, setpoint)), None
    if variant == GRADIENT:  # the only global limit: no Limits document's global rate
        return FixedPolicies(plans_only(loaded)), Gradient2()
    static = FixedPolicies(static_limits(loaded))
    gates: dict[str, Callable[[], Gate | None]] = {
        STATIC: lambda: None if value is None else FixedKnob(knob.target, value),
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
    until: int | None = None,
) -> RunRecord:
    """One run in this process, on its own embedded Redis; its journal (structlog JSON) goes
    to `log_file`, then logging returns to stderr. `value`: the static knob's value;
    `until`: the ticks run (default all: a static search's candidate needs only its window)."""
    with ExitStack() as stack:
        if log_file is not None:
            handle = stack.enter_context(log_file.open("w", encoding="utf-8"))
            configure_logging("info", handle)
            stack.callback(configure_logging, "warning", "stderr")
        loaded = load_directory(policies)
        knob = policy_knob(loaded, scenario.plain_aimd)
        watcher, gate = _controller(variant, policies, loaded, knob, scenario, value)
        world_scenario = no_overload(scenario) if variant == BASELINE else scenario
        world = recorded_world(world_scenario, trace, scenario.seed)
        directory = stack.enter_context(tempfile.TemporaryDirectory(prefix="governor-sim-"))
        client = stack.enter_context(embedded_redis(Path(directory)))
        simulation = Simulation(world_scenario, world, watcher, client, variant, gate)
        simulation.standing = standing(watcher)
        record = simulation.run(on_tick, until)
    # The baseline is scored over the scenario's window too, though nothing happened in it.
    record.events = [(e.kind, e.at, e.end) for e in scenario.events]
    record.knob_value = value
    return record


def standing(watcher: PolicyWatcher) -> bool:
    """Whether a run's controller has nothing to move after its first tick: a fixed set
    (never reloaded) without any policy, only Plans and Limits (static, no-limit, gradient,
    the no-overload run): its limits are their baselines on every tick."""
    if not isinstance(watcher, FixedPolicies):
        return False
    policies = watcher.load()
    return not policies.controllers


OTHERS = (AIMD, GRADIENT, NO_LIMIT, BASELINE)  # every run but the policies' and static's


def static_grid(scenario: Scenario, policies: Path, world: World) -> tuple[list[float], float]:
    """The static search's coarse grid over a range set by the pool (not the policy's
    bounds), and the resolution it is refined to."""
    knob = policy_knob(load_directory(policies), scenario.plain_aimd)
    capacity = sum(p.capacity_tokens_per_second for p in scenario.pools)
    works = [mean_work(world, p) for p in scenario.pools]
    held = sum(p.concurrency(w) for p, w in zip(scenario.pools, works, strict=True))
    low, high, resolution = knob.search_range(capacity, max(works), held)
    grid = {round(v / resolution) * resolution for v in knob.sweep(low, high)}
    return sorted(grid), resolution


def search_ticks(scenario: Scenario) -> int | None:
    """How far a static search's candidate runs: past the window's end, the last tick its
    merit (attainment, then goodput, over the window) reads, by the TTFT SLO (a request
    that arrived in the window and is served within the SLO counts there, its first token
    up to the SLO later); None: that reaches the run's end."""
    events = [(e.kind, e.at, e.end) for e in scenario.events]
    last = window_of(events, scenario.tick, scenario.ticks)[1]
    last += math.ceil(scenario.slo.ttft_seconds / scenario.tick)
    return None if last >= scenario.ticks else last


def whole(found: RunRecord, until: int | None, rerun: Callable[[float], RunRecord]) -> RunRecord:
    """The static search's best candidate run again to the end (the same run: same seed,
    same value, so the same ticks up to the window's end and its merit), to be scored."""
    if until is None or found.knob_value is None:
        return found
    record = rerun(found.knob_value)
    record.knob_edge = found.knob_edge
    return record


def compare(
    scenario: Scenario,
    policies: Path,
    *,
    trace: TraceData | None = None,
    log_dir: Path | None = None,
    workers: int = 2,
    on_tick: TickCallback | None = None,
    start: float | None = None,
) -> Comparison:
    """Run the policies (in this process, calling `on_tick`) and, meanwhile, every baseline
    in `workers` processes (0: one after the other, here); then refine the static search.
    `start`: the static value found on another seed of the scenario, where the search
    begins (StaticSearch.around) instead of on the whole grid."""
    result = Comparison(scenario, policies)
    grid, resolution = static_grid(scenario, policies, build_world(scenario, trace, scenario.seed))
    first_values = grid if start is None else bracket(grid, start, resolution)

    def log(name: str) -> Path | None:
        return None if log_dir is None or name == STATIC else log_dir / f"journal-{name}.log"

    def own() -> RunRecord:
        return run_variant(scenario, policies, POLICIES, log(POLICIES), trace, on_tick)

    def task(
        name: str, value: float | None = None, ticks: int | None = None
    ) -> Callable[[], RunRecord]:
        return lambda: run_variant(scenario, policies, name, log(name), trace, None, value, ticks)

    until = search_ticks(scenario)
    if workers > 0:
        context = multiprocessing.get_context("spawn")  # no inherited sockets or threads
        with concurrent.futures.ProcessPoolExecutor(
            workers, mp_context=context, initializer=configure_logging,
            initargs=("warning", "stderr"),
        ) as pool:  # fmt: skip

            def submit(
                name: str, value: float | None, ticks: int | None = None
            ) -> concurrent.futures.Future[RunRecord]:
                return pool.submit(run_variant, scenario, policies, name, log(name), trace,
                                   None, value, ticks)  # fmt: skip

            futures = {name: submit(name, None) for name in OTHERS}
            first = [submit(STATIC, v, until) for v in first_values]  # beside the policies
            result.runs[POLICIES] = own()
            search = StaticSearch(
                lambda values: [f.result() for f in [submit(STATIC, v, until) for v in values]],
                resolution,
            )
            search.seen.update(zip(first_values, [f.result() for f in first], strict=True))
            found = search.best(grid, start)
            result.runs[STATIC] = whole(found, until, lambda v: submit(STATIC, v).result())
            result.runs.update({name: f.result() for name, f in futures.items()})
    else:
        result.runs[POLICIES] = own()
        search = StaticSearch(lambda values: [task(STATIC, v, until)() for v in values], resolution)
        result.runs[STATIC] = whole(search.best(grid, start), until, lambda v: task(STATIC, v)())
        result.runs.update({name: task(name)() for name in OTHERS})
    for name in SCORED:
        result.cards[name] = score(result.runs[name], result.baseline)
    return result


def trace_scenario(
    trace: TraceData, path: Path, speed: float, seed: int, start: float = 0.0,
    unit: TimeUnit | None = None, duration: float | None = None,
) -> Scenario:  # fmt: skip
    """A scenario replaying `trace` (the window from `start`, `duration` seconds long: else
    to its last request) at `speed` on a pool sized for it at 1× (its busiest minute at the
    0.8 target), over 20 tenants split by Zipf(1)."""
    capacity = peak_minute_rate(trace) / 0.8
    at = f" from {format_duration(start)}" if start else ""
    return Scenario.model_validate(
        {
            "name": f"trace-{trace_name(path)}-{speed:g}x",
            "description": f"{path.name}{at} replayed at {speed:g}× on a pool sized for 1×",
            "duration": duration or max(trace.span / speed, 60.0),
            "seed": seed,
            "pools": [
                {
                    "name": "inference",
                    "gpus": max(1, math.ceil(capacity / 2000)),
                    "capacity_tokens_per_second": capacity,
                }
            ],
            "trace": {"file": str(path), "speed": speed, "start": start, "time_unit": unit},
        }
    )
