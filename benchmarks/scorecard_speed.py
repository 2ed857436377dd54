"""The scorecard's speed: the admission model and the static search, old path against new, in
one process.

Admission: one simulated run (burst-5x, static at 45 req/s, the scenario's seed) is recorded
call by call (every `load`, `set_balance`, `admit` and `settle` the simulator makes, with its
arguments); the same stream is then replayed through the admission model as it was before
this work (`controller/sim/admission.py` at commit OLD, read from the repository's history
with `git show`) and through today's, interleaved, best of ROUNDS. Both must give the same
answer to every call (checked, not assumed); the figure is admissions+settles per second and
the ratio new / old.

Static search (`--search SCENARIO`, slow: it runs the old search's whole runs too): the
number of runs and simulated ticks, the CPU seconds and the value found by the old search
(a 6-point grid, golden section on whole runs) and by today's (the same grid and
refinement on runs cut at the window's end, the best one run to the end), with the merit
each found: the baseline must stay as good (to 1 req/s).

Warm-started search (`--warm SCENARIO ...`, slow): on the scenario's own seed and the next
WARM_SEEDS - 1, the full search (grid + refinement) against the one the scoreboard runs on a
seed after the own one (StaticSearch.around, from the value the own seed's full search
found): the value and merit each finds and the runs each needs (a run at a value is done once
per seed and counted for every search that asks for it).

Run from the repository root: `.venv/bin/python -m benchmarks.scorecard_speed [--search
burst-5x] [--warm mixed-burst ddos runaway-tenant]`.
"""

from __future__ import annotations

import argparse
import importlib.util
import inspect
import subprocess
import sys
import time
from pathlib import Path
from types import ModuleType
from typing import Any

from controller.logging import configure_logging
from controller.sim.admission import AdmissionModel

OLD = "9948d60"  # main before the scorecard's speed work
PREVIOUS = "35b2409"  # main before the hot path's second pass (bound checks, issue #16)
ROUNDS = 5
ROOT = Path(__file__).resolve().parents[1]


def old_module(path: str, name: str, commit: str = OLD) -> ModuleType:
    """A module as it was at `commit`, from git's history (the old path, to compare
    in-process)."""
    try:
        source = subprocess.run(
            ["git", "show", f"{commit}:{path}"], cwd=ROOT, check=True, capture_output=True,
            text=True,
        ).stdout  # fmt: skip
    except (OSError, subprocess.CalledProcessError) as exc:
        raise SystemExit(
            f"cannot read {path} at {commit} from git ({exc}): run from a clone with its history"
        ) from None
    spec = importlib.util.spec_from_loader(name, loader=None)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while they are built
    exec(compile(source, f"{commit}:{path}", "exec"), module.__dict__)
    return module


Call = tuple[str, tuple[Any, ...], dict[str, Any]]


class Recorder(AdmissionModel):
    """Today's model, writing down every call the simulator makes."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[Call] = []

    def load(self, limits: Any) -> None:
        self.calls.append(("load", (dict(limits),), {}))
        super().load(limits)

    def set_balance(self, tenant: str, usd_micro: float) -> None:
        self.calls.append(("set_balance", (tenant, usd_micro), {}))
        super().set_balance(tenant, usd_micro)

    def admit(self, *args: Any, **kwargs: Any) -> Any:
        # Written down by name: the old models take keywords only.
        named = inspect.signature(AdmissionModel.admit).bind(self, *args, **kwargs).arguments
        self.calls.append(("admit", (), {k: v for k, v in named.items() if k != "self"}))
        return super().admit(*args, **kwargs)

    def settle(self, *args: Any) -> bool:
        self.calls.append(("settle", args, {}))
        return super().settle(*args)


def record_stream(scenario: str, value: float) -> list[Call]:
    """Every admission call of one static run of `scenario` at `value`."""
    from controller.sim import run as run_module
    from controller.sim.compare import run_variant
    from controller.sim.scenario import load_scenario
    from controller.sim.variants import STATIC

    recorders: list[Recorder] = []

    def recording() -> Recorder:
        recorders.append(Recorder())
        return recorders[-1]

    original = vars(run_module)["AdmissionModel"]
    setattr(run_module, "AdmissionModel", recording)  # noqa: B010 (the simulator's own name)
    try:
        run_variant(load_scenario(scenario), ROOT / "policies", STATIC, None, value=value)
    finally:
        setattr(run_module, "AdmissionModel", original)  # noqa: B010
    return recorders[0].calls


def replay(model: Any, calls: list[Call]) -> tuple[float, list[object]]:
    """CPU seconds to replay `calls` on `model`, and every answer (outcome, denied_by)."""
    answers: list[object] = []
    keep = answers.append
    started = time.process_time()
    for name, args, kwargs in calls:
        found = getattr(model, name)(*args, **kwargs)
        keep((found.outcome, found.denied_by) if name == "admit" else found)
    return time.process_time() - started, answers


def admission(rounds: int) -> None:
    calls = record_stream("burst-5x", 45.0)
    admits = sum(1 for c in calls if c[0] == "admit")
    settles = sum(1 for c in calls if c[0] == "settle")
    models = {
        "old": old_module("controller/sim/admission.py", "_old_admission").AdmissionModel,
        "previous": old_module(
            "controller/sim/admission.py", "_previous_admission", PREVIOUS
        ).AdmissionModel,
        "new": AdmissionModel,
    }
    times: dict[str, list[float]] = {label: [] for label in models}
    answers: dict[str, list[object]] = {}
    for _ in range(rounds):  # interleaved: the machine's load touches both alike
        for label, factory in models.items():
            seconds, answers[label] = replay(factory(), calls)
            times[label].append(seconds)
    same = answers["old"] == answers["previous"] == answers["new"]
    print(f"admission stream: burst-5x static 45 req/s, {admits:,} admits, {settles:,} settles")
    print(f"  same answers, old ({OLD}), previous ({PREVIOUS}) and new: {same}")
    best = {label: min(values) for label, values in times.items()}
    for label in models:
        rate = (admits + settles) / best[label]
        print(f"  {label}: {best[label]:.2f} s CPU (best of {rounds}), {rate:,.0f} calls/s")
    print(f"  speed-up: {best['old'] / best['new']:.2f}x vs old, "
          f"{best['previous'] / best['new']:.2f}x vs previous")  # fmt: skip
    if not same:
        raise SystemExit("the new admission model answers differently from the old one")


# Whole runs compared (`--records`): scenario, static value, ticks run (a static candidate's).
RECORDS = (("burst-5x", 45.0, 120), ("demo", 40.0, 92), ("diurnal", 50.0, 120))


def records(rounds: int) -> None:
    """Static runs with the previous run.py and admission.py (PREVIOUS) and today's, in this
    process, interleaved: the same RunRecord, field by field, and the CPU each took."""
    from controller.sim import compare as compare_module
    from controller.sim import run as run_module
    from controller.sim.compare import run_variant
    from controller.sim.record import differences
    from controller.sim.scenario import load_scenario
    from controller.sim.variants import STATIC

    previous_run = old_module("controller/sim/run.py", "_previous_run", PREVIOUS)
    previous_run.AdmissionModel = old_module(  # type: ignore[attr-defined]
        "controller/sim/admission.py", "_previous_admission", PREVIOUS
    ).AdmissionModel
    paths = {"previous": previous_run.Simulation, "new": run_module.Simulation}
    total = dict.fromkeys(paths, 0.0)
    for name, value, until in RECORDS:
        scenario = load_scenario(name)
        best: dict[str, float] = {}
        found: dict[str, Any] = {}
        # Once untimed: the oracle's measurement, the arrivals drawn and cached, the imports.
        run_variant(scenario, ROOT / "policies", STATIC, None, value=value, until=until)
        for _ in range(rounds):
            for label, simulation in paths.items():
                setattr(compare_module, "Simulation", simulation)  # noqa: B010
                try:
                    started = time.process_time()
                    found[label] = run_variant(scenario, ROOT / "policies", STATIC, None,
                                               value=value, until=until)  # fmt: skip
                    seconds = time.process_time() - started
                finally:
                    setattr(compare_module, "Simulation", run_module.Simulation)  # noqa: B010
                best[label] = min(best.get(label, seconds), seconds)
        differ = differences(found["previous"], found["new"])
        for label in paths:
            total[label] += best[label]
        print(f"{name} static {value:g} to tick {until}: previous {best['previous']:.2f} s, "
              f"new {best['new']:.2f} s CPU (best of {rounds}), "
              f"{best['previous'] / best['new']:.2f}x; records identical: {not differ}"
              + (f" (differ in {differ})" if differ else ""))  # fmt: skip
        if differ:
            raise SystemExit(f"{name}: the new path records another run ({differ})")
    print(f"whole runs: {total['previous'] / total['new']:.2f}x vs previous")


def search(name: str) -> None:
    """The static search of `name` (its own seed) the old way and today's, in this process."""
    from controller.sim import compare as compare_module
    from controller.sim import run as run_module
    from controller.sim.compare import run_variant, search_ticks, standing, static_grid, whole
    from controller.sim.recorded import recorded_world
    from controller.sim.reference import StaticSearch, merit
    from controller.sim.scenario import load_scenario
    from controller.sim.traffic import build_world
    from controller.sim.variants import STATIC

    scenario = load_scenario(name)
    policies = ROOT / "policies"
    grid, resolution = static_grid(scenario, policies, build_world(scenario, None, scenario.seed))
    old = old_module("controller/sim/admission.py", "_old_admission")
    until = search_ticks(scenario)
    ticks: dict[str, int] = {"old": 0, "new": 0}

    def run(label: str, value: float, cut: int | None) -> Any:
        record = run_variant(scenario, policies, STATIC, None, value=value, until=cut)
        ticks[label] += scenario.ticks if cut is None else cut
        return record

    def old_way() -> Any:
        # Whole runs, the controller ticking, arrivals drawn by every run, the old admission
        # model (the step's outcome counting is today's in both).
        setattr(compare_module, "standing", lambda watcher: False)  # noqa: B010
        setattr(compare_module, "recorded_world", build_world)  # noqa: B010
        setattr(run_module, "AdmissionModel", old.AdmissionModel)  # noqa: B010
        try:
            found = StaticSearch(lambda vs: [run("old", v, None) for v in vs], resolution)
            return found, found.best(grid)
        finally:
            setattr(compare_module, "standing", standing)  # noqa: B010
            setattr(compare_module, "recorded_world", recorded_world)  # noqa: B010
            setattr(run_module, "AdmissionModel", AdmissionModel)  # noqa: B010

    def new_way() -> Any:  # as compare() does it
        found = StaticSearch(lambda vs: [run("new", v, until) for v in vs], resolution)
        best = found.best(grid)
        return found, whole(best, until, lambda v: run("new", v, None))

    print(f"static search: {name}, seed {scenario.seed}, grid {grid}")
    results = {}
    for label, way in (("old", old_way), ("new", new_way)):
        started = time.process_time()
        found, best = way()
        seconds = time.process_time() - started
        results[label] = (best.knob_value, merit(best))
        runs = len(found.seen) + (label == "new" and until is not None)
        print(f"  {label}: {runs} runs, {ticks[label]:,} simulated ticks, {seconds:.1f} s CPU; "
              f"best {best.knob_value:g} req/s, attainment {merit(best)[0]:.4f}")  # fmt: skip
    print(f"  same value and merit found: {results['old'] == results['new']}")


WARM_SEEDS = 3


def warm(names: list[str]) -> None:
    """Full search against the warm-started one, per scenario and seed."""
    from controller.sim.compare import run_variant, search_ticks, static_grid
    from controller.sim.reference import StaticSearch, merit
    from controller.sim.scenario import load_scenario
    from controller.sim.traffic import build_world
    from controller.sim.variants import STATIC

    policies = ROOT / "policies"
    totals = {"full": 0, "warm": 0}
    agree = 0
    for name in names:
        own = load_scenario(name)
        start = None
        for offset in range(WARM_SEEDS):
            scenario = own.model_copy(update={"seed": own.seed + offset})
            world = build_world(scenario, None, scenario.seed)
            grid, resolution = static_grid(scenario, policies, world)
            until = search_ticks(scenario)
            runs: dict[float, Any] = {}
            seconds = [0.0]

            def evaluate(values: Any, runs: Any = runs, scenario: Any = scenario,
                         until: Any = until, seconds: Any = seconds) -> Any:  # fmt: skip
                for v in values:
                    if v not in runs:
                        started = time.process_time()
                        runs[v] = run_variant(scenario, policies, STATIC, None, value=v,
                                              until=until)  # fmt: skip
                        seconds[0] += time.process_time() - started
                return [runs[v] for v in values]

            full = StaticSearch(evaluate, resolution)
            best = full.best(grid)
            line = (f"{name} seed {scenario.seed}: full {best.knob_value:g} "
                    f"(attainment {merit(best)[0]:.4f}) in {len(full.seen)} runs")  # fmt: skip
            totals["full"] += len(full.seen)
            if start is None:
                start = best.knob_value
                totals["warm"] += len(full.seen)  # the own seed: searched in full either way
                print(line + " (own seed: the warm start)", flush=True)
                continue
            warmed = StaticSearch(evaluate, resolution)
            found = warmed.best(grid, start)
            same = found.knob_value == best.knob_value
            near = abs((found.knob_value or 0) - (best.knob_value or 0)) <= resolution
            agree += same or near or merit(found) >= merit(best)
            totals["warm"] += len(warmed.seen)
            print(f"{line}; warm from {start:g}: {found.knob_value:g} (attainment "
                  f"{merit(found)[0]:.4f}) in {len(warmed.seen)} runs; same value: {same}, "
                  f"within resolution: {near}, merit as good: {merit(found) >= merit(best)}; "
                  f"{seconds[0]:.0f} s CPU for both", flush=True)  # fmt: skip
    pairs = len(names) * (WARM_SEEDS - 1)
    print(f"warm start: {agree}/{pairs} warm-started seeds found the full search's value (or "
          f"within the resolution, or as good a merit); runs {totals['full']} full → "
          f"{totals['warm']} warm-started ({totals['full'] - totals['warm']} saved, plus none "
          f"of the whole re-runs of the winner, the same in both)")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=ROUNDS)
    parser.add_argument("--search", metavar="SCENARIO", help="also compare the static search")
    parser.add_argument("--warm", metavar="SCENARIO", nargs="+", help="the warm-started search")
    parser.add_argument("--no-admission", action="store_true", help="skip the admission stream")
    parser.add_argument("--records", action="store_true", help="whole runs, previous vs new")
    options = parser.parse_args()
    configure_logging("warning", "stderr")  # the runs' journals are not the benchmark's output
    if not options.no_admission:
        admission(options.rounds)
    if options.records:
        records(max(1, options.rounds // 2))
    if options.warm:
        warm(options.warm)
    if options.search:
        search(options.search)


if __name__ == "__main__":
    main()
