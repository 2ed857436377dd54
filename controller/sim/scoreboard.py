"""Many seeds of many scenarios: every variant's scorecards, their median and worst seed, goals
judged on the worst seed, and the markdown of docs/control-quality.md (generated, never edited)."""

from __future__ import annotations

import concurrent.futures
import math
import multiprocessing
import statistics
import time
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

from controller.logging import configure_logging
from controller.sim.compare import SCORED, compare
from controller.sim.scenario import Scenario
from controller.sim.scorecard import GOALS, HEADLINE_TEXT, Scorecard, headline
from controller.sim.trace import TraceData
from controller.sim.variants import STATIC

Scored = tuple[dict[str, "Scorecard"], float]  # a unit's scorecards by variant, its CPU s


@dataclass(frozen=True)
class Figure:
    """A column of the table: the scorecard field, its label, its format, which way is worse."""

    name: str
    label: str
    pattern: str
    worse: str  # "low" or "high"


FIGURES = (
    Figure("attainment", "SLO attainment", "{:.1%}", "low"),
    Figure("quiet_attainment", "non-bursting tenants' attainment", "{:.1%}", "low"),
    Figure("p99_ttft", "p99 TTFT s", "{:.2f}", "high"),
    Figure("p99_increase", "p99 vs no-overload", "{:+.0%}", "high"),
    Figure("goodput_ratio", "goodput / oracle", "{:.0%}", "low"),
    Figure("jain", "Jain", "{:.3f}", "low"),
    Figure("worst_share", "worst-off share", "{:.0%}", "low"),
    Figure("utilization_within", "ticks ≤ target+5%", "{:.0%}", "low"),
    Figure("flaps_per_hour", "flaps/h", "{:.1f}", "high"),
    Figure("settling_ticks", "settling ticks", "{:.0f}", "high"),
    Figure("recovery_ticks", "recovery ticks", "{:.0f}", "high"),
    Figure("throttle_ticks", "runaway throttled ticks", "{:.0f}", "high"),
    Figure("runaway_attainment", "others' attainment meanwhile", "{:.1%}", "low"),
    Figure("knob_value", "static value", "{:g}", "high"),
)
_NEVER = ("settling_ticks", "recovery_ticks", "throttle_ticks")  # None there means "never"


def value(card: Scorecard, figure: str) -> float | None:
    """A figure as a number: None when it does not apply, +inf for "never"."""
    raw = getattr(card, figure)
    applies = {
        "recovery_ticks": card.has_after,
        "throttle_ticks": card.has_runaway,
        "runaway_attainment": card.has_runaway,
    }.get(figure, True)
    if not applies:
        return None
    if raw is None:
        return math.inf if figure in _NEVER else None
    number = float(raw)
    return None if math.isnan(number) else number


def median_and_worst(values: Sequence[float], worse: str) -> tuple[float, float]:
    worst = max(values) if worse == "high" else min(values)
    return statistics.median(values), worst


@dataclass
class Board:
    """Scenario name → variant → one scorecard per seed (in seed order)."""

    seeds: list[int]
    policies: Path
    cards: dict[str, dict[str, list[Scorecard]]] = field(default_factory=dict)
    descriptions: dict[str, str] = field(default_factory=dict)

    def summary(self, scenario: str, variant: str, figure: Figure) -> tuple[float, float] | None:
        found = [value(c, figure.name) for c in self.cards[scenario][variant]]
        numbers = [v for v in found if v is not None]
        return median_and_worst(numbers, figure.worse) if numbers else None

    def verdicts(self, scenario: str, variant: str) -> dict[str, bool | None]:
        """Each goal judged on the worst seed (None: not applicable)."""
        out: dict[str, bool | None] = {}
        for goal in GOALS:
            figure = Figure(goal.figure, "", "", "high" if goal.check == "le" else "low")
            found = self.summary(scenario, variant, figure)
            out[goal.figure] = None if found is None else goal.met(found[1])
        out["attainment"] = self.headline(scenario)[variant]
        return out

    def headline(self, scenario: str) -> dict[str, bool | None]:
        """The headline goal: each variant's worst-seed attainment against the best
        baseline's worst seed."""
        figure = FIGURES[0]  # attainment
        worst = {v: self.summary(scenario, v, figure) for v in self.cards[scenario]}
        return headline({v: None if w is None else w[1] for v, w in worst.items()})


def _cell(found: tuple[float, float] | None, pattern: str) -> str:
    if found is None:
        return "—"

    def show(number: float) -> str:
        return "never" if math.isinf(number) else pattern.format(number)

    median, worst = found
    return show(median) if median == worst else f"{show(median)} / {show(worst)}"


def _per_seed(cards: Sequence[Scorecard]) -> str:
    """The static value found on each seed, in seed order (a median of knob values means
    nothing); `*` marks one on the edge of the range searched."""
    found = [f"{c.knob_value:g}{'*' if c.knob_edge else ''}" for c in cards if c.knob_value]
    return ", ".join(found) if found else "—"


def plural(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"


def table(board: Board, scenario: str) -> list[str]:
    """One markdown table: a row per variant, a column per figure, `median / worst`."""
    used = [
        f
        for f in FIGURES
        if any(board.summary(scenario, v, f) is not None for v in board.cards[scenario])
    ]
    lines = [
        "| variant | " + " | ".join(f.label for f in used) + " |",
        "|---|" + "---|" * len(used),
    ]
    for variant in board.cards[scenario]:
        cells = [
            _per_seed(board.cards[scenario][variant])
            if f.name == "knob_value"
            else _cell(board.summary(scenario, variant, f), f.pattern)
            for f in used
        ]
        lines.append(f"| {variant} | " + " | ".join(cells) + " |")
    return lines


def goal_table(board: Board, scenario: str) -> list[str]:
    """Each goal × variant, judged on the worst seed."""
    variants = list(board.cards[scenario])
    lines = [
        "| goal (worst seed) | " + " | ".join(variants) + " |",
        "|---|" + "---|" * len(variants),
    ]
    verdicts = {v: board.verdicts(scenario, v) for v in variants}
    for figure, text in [("attainment", HEADLINE_TEXT), *((g.figure, g.text) for g in GOALS)]:
        row = [{True: "✓", False: "✗", None: "—"}[verdicts[v][figure]] for v in variants]
        if any(mark != "—" for mark in row):
            lines.append(f"| {text} | " + " | ".join(row) + " |")
    return lines


def render(board: Board) -> str:
    """The scoreboard as printed and as docs/control-quality.md's generated part."""
    parts = [
        f"{plural(len(board.seeds), 'seed')} per scenario (its own seed + 0 … "
        f"{board.seeds[-1]}); policies: `{board.policies}`. Each cell: median / worst seed "
        "(one value when they agree); static value: the value found on each seed (`*`: on the "
        "edge of the range searched). Goals are judged on the worst seed.",
        "",
    ]
    for scenario in board.cards:
        parts += [f"### {scenario}", "", board.descriptions.get(scenario, ""), ""]
        parts += [*table(board, scenario), "", *goal_table(board, scenario), ""]
    return "\n".join(parts)


def score_seed(
    scenario: Scenario, policies: Path, trace: TraceData | None, start: float | None = None
) -> Scored:
    """Every variant's scorecard for one scenario and seed, all runs in this process, and
    the CPU seconds they took; `start`: the static value found on the scenario's own seed,
    where its search begins."""
    started = time.process_time()
    cards = compare(scenario, policies, trace=trace, workers=0, start=start).cards
    return cards, time.process_time() - started


@dataclass
class _Unit:
    """One (scenario, seed) to score; `after`: its scenario's own seed, whose static value
    warm-starts this one's search (None: the own seed itself, searched in full)."""

    scenario: Scenario
    trace: TraceData | None
    after: int | None = None

    @property
    def length(self) -> float:
        return self.scenario.duration / self.scenario.step


def _units(scenarios: Sequence[tuple[Scenario, TraceData | None]], seeds: int) -> list[_Unit]:
    units: list[_Unit] = []
    for s, trace in scenarios:
        own = len(units)
        units.append(_Unit(s, trace))
        units += [
            _Unit(s.model_copy(update={"seed": s.seed + j}), trace, own) for j in range(1, seeds)
        ]
    return units


def _schedule(
    units: list[_Unit], run: Callable[[_Unit, float | None], concurrent.futures.Future[Scored]],
    workers: int, progress: Callable[[str], None] | None,
) -> list[dict[str, Scorecard]]:  # fmt: skip
    """Every unit scored, at most `workers` at a time: a scenario's own seed first, its
    other seeds once it is done (from the static value it found); of the units ready, the
    longest simulation first, so that no worker is left alone with one at the end."""
    results: dict[int, dict[str, Scorecard]] = {}
    ready = [k for k, u in enumerate(units) if u.after is None]
    running: dict[concurrent.futures.Future[Scored], int] = {}
    while ready or running:
        ready.sort(key=lambda k: units[k].length)
        while ready and len(running) < max(workers, 1):
            k = ready.pop()
            after = units[k].after
            start = None if after is None else results[after][STATIC].knob_value
            running[run(units[k], start)] = k
        done, _ = concurrent.futures.wait(running, return_when=concurrent.futures.FIRST_COMPLETED)
        for future in done:
            k = running.pop(future)
            results[k] = _told(*future.result(), units[k], len(results), len(units), progress)
            ready += [j for j, u in enumerate(units) if u.after == k]
    return [results[k] for k in range(len(units))]


def run_board(
    scenarios: Sequence[tuple[Scenario, TraceData | None]],
    policies: Path,
    seeds: int,
    workers: int = 2,
    progress: Callable[[str], None] | None = None,
) -> Board:
    """Every scenario on `seeds` seeds (the scenario's own seed, +1, ...), one (scenario,
    seed) per task in `workers` processes (0: here, one after the other); `progress` hears
    of each one done. A scenario's other seeds start their static search from the value
    its own seed found (StaticSearch.around)."""
    board = Board(seeds=list(range(seeds)), policies=policies)
    units = _units(scenarios, seeds)
    for scenario, _ in scenarios:
        board.cards[scenario.name] = {v: [] for v in SCORED}
        board.descriptions[scenario.name] = scenario.description
    with ExitStack() as stack:
        if workers > 0:
            context = multiprocessing.get_context("spawn")
            pool = stack.enter_context(concurrent.futures.ProcessPoolExecutor(
                workers, mp_context=context, initializer=configure_logging,
                initargs=("warning", "stderr"),
            ))  # fmt: skip

            def run(unit: _Unit, start: float | None) -> concurrent.futures.Future[Scored]:
                return pool.submit(score_seed, unit.scenario, policies, unit.trace, start)
        else:

            def run(unit: _Unit, start: float | None) -> concurrent.futures.Future[Scored]:
                future: concurrent.futures.Future[Scored] = concurrent.futures.Future()
                future.set_result(score_seed(unit.scenario, policies, unit.trace, start))
                return future

        results = _schedule(units, run, workers, progress)
    # Seed order within each scenario, whatever order they ran in.
    for unit, cards in sorted(zip(units, results, strict=True), key=lambda r: r[0].scenario.seed):
        for variant, card in cards.items():
            board.cards[unit.scenario.name][variant].append(card)
    return board


def _told(
    cards: dict[str, Scorecard], seconds: float, unit: _Unit, k: int, total: int,
    progress: Callable[[str], None] | None,
) -> dict[str, Scorecard]:  # fmt: skip
    if progress is not None:
        scenario = unit.scenario
        how = "full static search" if unit.after is None else "warm-started static search"
        progress(f"scored {scenario.name} seed {scenario.seed} ({k + 1}/{total}; "
                 f"{seconds:.0f} s CPU, {how})")  # fmt: skip
    return cards


DOCUMENT_HEAD = """# Control quality: the scoreboard

<!-- Generated by `{command}`
     from the runs; do not edit by hand: run the command again. -->

Measured with the closed-loop simulator (`docs/simulator.md`, which defines every figure):
the real engine, resolver, Redis sink and journal on a simulated clock, a gateway model with
the admission scripts' semantics, and a GPU pool model. Every scenario runs on {seeds};
on each seed the policies and every baseline see the same arrivals:

- **policies**: the policy directory given (`{policies}`);
- **static**: the best static value in hindsight of the policies' own knob (the first AIMD
  AdaptiveLimit's target), searched over 0.1–2× the pool's capacity in the knob's unit (to
  1 request in flight, or 1 req/s) per scenario
  and seed, the best SLO attainment kept; the value found is in the last column;
- **plain-aimd**: AIMD on the same knob with the policy's own gains, tolerance band and
  bounds, every tick, no stabilization;
- **gradient**: a global concurrency limit adapted like Netflix concurrency-limits'
  Gradient2 from the latency the gateway sees;
- **no-limit**: the gateway admits everything.

The headline is **SLO attainment**: the share of the well-behaved tenants' requests served
within the TTFT SLO (a refusal or a timeout is a miss). Goals are judged on the **worst
seed**; a goal no variant can meet in a scenario is still shown as missed. The scenarios were
written before any policy was scored against them and are not tuned to any policy.

Reproduce: `{command}` (every scenario on 10 seeds: `governor simulate --all --seeds 10
--markdown docs/control-quality.md`).

## Results

"""

DOCUMENT_TAIL = """
## Credits

Request sizes and the `azure-conv-3x` traffic: the Azure LLM inference trace 2023,
published by Microsoft (AzurePublicDataset) under CC BY 4.0 — Pratyush Patel, Esha Choukse,
Chaojie Zhang, Aashaka Shah, Íñigo Goiri, Saeed Maleki, Ricardo Bianchini. "Splitwise:
Efficient generative LLM inference using phase splitting", ISCA 2024.
"""


def document(board: Board, elapsed: float, workers: int, command: str) -> str:
    """docs/control-quality.md: the generated scoreboard with how to read and reproduce it
    (`command`, the one that made it), and how long this run took."""
    head = DOCUMENT_HEAD.format(
        command=command, policies=board.policies, seeds=plural(len(board.seeds), "seed")
    )
    took = (
        f"This run: {plural(len(board.cards), 'scenario')} × "
        f"{plural(len(board.seeds), 'seed')} in "
        f"{elapsed / 60:.1f} minutes of wall-clock time with {workers} worker processes.\n\n"
    )
    return head + took + render(board) + DOCUMENT_TAIL
