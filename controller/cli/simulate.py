"""`governor simulate`: the policies against a simulated fleet, beside every baseline, scored
and plotted; `--all --seeds N` scores every scenario on many seeds (the scoreboard)."""

from __future__ import annotations

import json
import math
import resource
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import typer
from rich.console import Console
from rich.table import Table

from controller.cli._redis import console as fitted
from controller.errors import GovernorError

if TYPE_CHECKING:
    from controller.sim.compare import Comparison
    from controller.sim.scenario import Scenario
    from controller.sim.trace import TraceData
    from controller.sim.trace_formats import TimeUnit


def _amount(value: float) -> str:
    """A limit's value as people read one: 1,849,990, not `{:g}`'s 1.84999e+06 (its six
    significant digits turn to an exponent from a million on); below 1,000 as written
    (12, 2.5), thousands separated like the other counts of the scorecard."""
    return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:g}"


# (figure, label, its format: a str.format pattern, or a function of the value)
_FIGURES: tuple[tuple[str, str, str | Callable[[float], str]], ...] = (
    ("attainment", "SLO attainment (well-behaved)", "{:.1%}"),
    ("quiet_attainment", "… of tenants with no event of their own", "{:.1%}"),
    ("p99_ttft", "p99 TTFT (s)", "{:.2f}"),
    ("p99_increase", "p99 vs no-overload baseline", "{:+.0%}"),
    ("utilization_mean", "mean utilization", "{:.2f}"),
    ("utilization_within", "ticks ≤ target + 5%", "{:.0%}"),
    ("goodput_ratio", "goodput / oracle", "{:.0%}"),
    ("flaps_per_hour", "flaps per hour", "{:.1f}"),
    ("settling_ticks", "settling (ticks)", "{}"),
    ("recovery_ticks", "settling after the window (ticks)", "{}"),
    ("budget_overrun", "budget overrun (tokens)", "{:,.0f}"),
    ("jain", "Jain fairness (every well-behaved)", "{:.3f}"),
    ("worst_share", "worst-off tenant's share", "{:.0%}"),
    ("throttle_ticks", "runaway throttled from its start (ticks)", "{}"),
    ("runaway_attainment", "… others' attainment meanwhile", "{:.1%}"),
    ("knob_value", "static value found (hindsight)", _amount),
    ("timed_out", "requests timed out", "{:,}"),
)
_NEVER = ("settling_ticks", "recovery_ticks", "throttle_ticks")
# The shipped scenarios, for --help (read from the package's directory, without loading the
# simulator).
_SHIPPED = sorted(p.stem for p in (Path(__file__).parents[1] / "sim" / "scenarios").glob("*.yaml"))


def register(root: typer.Typer) -> None:
    """Add the top-level `simulate` command."""
    root.command("simulate")(simulate)


def _show(value: object, pattern: str | Callable[[float], str], figure: str) -> str:
    if value is None:
        return "never" if figure in _NEVER else "—"
    if isinstance(value, float) and math.isnan(value):
        return "—"
    if callable(pattern):
        return pattern(float(value)) if isinstance(value, int | float) else str(value)
    return pattern.format(value)


def simulate(
    scenario: str | None = typer.Argument(
        None,
        help=f"A shipped scenario ({', '.join(_SHIPPED)}) or a scenario YAML file. "
        "Optional with --trace.",
    ),
    policies: Path = typer.Option(Path("policies"), "--policies", help="Policy directory."),
    seed: int | None = typer.Option(None, "--seed", help="Random seed (default: the scenario's)."),
    out: Path | None = typer.Option(
        None, "--out", help="Where the PNG and journals go (default ./sim-out/<scenario>)."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print the scorecards as JSON."),
    trace: Path | None = typer.Option(
        None,
        "--trace",
        help="Replay this trace, CSV or JSON lines, gzipped or not (the Azure LLM inference, "
        "BurstGPT or Mooncake format; docs/simulator.md): alone, on a pool sized for it at "
        "1×; with SCENARIO, instead of its trace.",
    ),
    speed: float = typer.Option(1.0, "--speed", help="With --trace alone: replay speed."),
    start: str | None = typer.Option(
        None, "--start", help="With --trace alone: where the replay starts (e.g. 3d, 90m)."
    ),
    duration: str | None = typer.Option(
        None,
        "--duration",
        help="With --trace alone: how long the run lasts (default: to the trace's end, "
        "at most a day).",
    ),
    time_unit: str | None = typer.Option(
        None,
        "--time-unit",
        help="With --trace: the unit of numeric arrival times, s or ms (default: s in CSV, "
        "ms in JSON lines).",
    ),
    live: bool = typer.Option(False, "--live", help="Show a live table while it runs."),
    pace: float = typer.Option(0.0, "--pace", help="Wall seconds per tick (with --live)."),
    workers: int = typer.Option(
        2, "--workers", help="Processes for the comparison runs (0: run them one by one)."
    ),
    every: bool = typer.Option(False, "--all", help="Every shipped scenario (the scoreboard)."),
    seeds: int = typer.Option(
        1, "--seeds", min=1, help="Seeds per scenario: its own seed, +1, ...; median and worst."
    ),
    markdown: Path | None = typer.Option(
        None,
        "--markdown",
        help="Write the scoreboard as this markdown file "
        "(docs/control-quality.md is generated this way).",
    ),
) -> None:
    """Run the policies against a simulated fleet beside the baselines.

    SCENARIO's simulated fleet runs in closed loop with the REAL engine, resolver, Redis
    sink (embedded Redis) and journal on a simulated clock, for the given policies AND, on
    the same arrivals, the baselines: the best static limit in hindsight, plain AIMD on the
    policies' knob, a Gradient2 concurrency limiter and no limit; prints the scorecard and
    writes a PNG.

    Never touches a configured Redis or Prometheus. With --all, --seeds N or --markdown:
    the scoreboard (median and worst seed per scenario and variant), no PNG.
    """
    try:
        replay = _replay(trace, speed, start, duration, time_unit, seed)
    except GovernorError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    if every or seeds > 1 or markdown is not None:
        unused = {"--live": live, "--pace": pace != 0.0, "--out": out is not None,
                  "--json": as_json}  # fmt: skip
        refused = [name for name, given in unused.items() if given]
        _scoreboard(scenario, every, policies, seeds, workers, markdown, replay, refused)
        return
    from controller.sim.compare import compare
    from controller.sim.live import LiveView
    from controller.sim.plots import plot

    console = Console()
    try:
        world, data = _world(scenario, replay)
        _require_plans([world], policies)
        for note in slo_notes([world], policies):
            typer.echo(note, err=True)
        directory = out or Path("sim-out") / world.name
        directory.mkdir(parents=True, exist_ok=True)
        view = LiveView(f"governor simulate {world.name}", world.duration, pace, console)
        with view:
            comparison = compare(
                world,
                policies,
                trace=data,
                log_dir=directory,
                workers=workers,
                on_tick=view if live else None,
            )
        picture = plot(comparison, directory / f"{world.name}.png")
    except GovernorError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    cards = comparison.cards
    if as_json:
        payload = {
            "scenario": world.name,
            "seed": world.seed,
            "policies": str(policies),
            "png": str(picture),
            "scorecards": {name: card.figures() for name, card in cards.items()},
            "goals": {name: card.verdicts() for name, card in cards.items()},
        }
        typer.echo(json.dumps(payload, indent=2, default=_plain))
        return
    _print_scorecards(console, comparison, world, picture, directory)


def _print_scorecards(
    console: Console, comparison: Comparison, world: Scenario, picture: Path, directory: Path
) -> None:
    """The human table of one run: a column per variant, ✓/✗ against each goal."""
    cards = comparison.cards
    table = Table(title=f"scorecard: {world.name} (seed {world.seed}) — {world.description}")
    table.add_column("figure")
    for name in cards:
        table.add_column(name, justify="right")
    from controller.sim.scorecard import headline  # the simulator loads only when used

    verdicts = {name: card.verdicts() for name, card in cards.items()}
    for name, met in headline({n: c.attainment for n, c in cards.items()}).items():
        verdicts[name]["attainment"] = met  # the headline goal: against the best baseline
    for figure, label, pattern in _FIGURES:
        row = [label]
        for name, card in cards.items():
            text = _show(getattr(card, figure), pattern, figure)
            met = verdicts[name].get(figure)
            mark = "" if met is None else (" [green]✓[/green]" if met else " [red]✗[/red]")
            row.append(text + mark)
        table.add_row(*row)
    fitted().print(table)  # stacked when narrower than the table, like every CLI table
    first = next(iter(cards.values()))
    static = cards.get("static")
    if static is not None and static.knob_value is not None and static.knob_edge:
        console.print(
            f"[yellow]static: {_amount(static.knob_value)} is on the edge of the range "
            "searched (0.1–2× the pool's capacity); the best static value may lie beyond "
            "it[/yellow]"
        )
    console.print(
        f"window {first.window[0] / 60:g}–{first.window[1] / 60:g} min; baseline p99 TTFT "
        f"{first.baseline_p99_ttft:.2f}s; ✓/✗ against the goals in docs/control-quality.md"
    )
    for name, run in comparison.runs.items():
        for error in run.errors[:3]:
            console.print(f"[yellow]{name}: {error}[/yellow]")
    console.print(f"plot: {picture}")
    console.print(f"journals: {directory}/journal-*.log")


def _plain(value: object) -> object:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return str(value)


@dataclass(frozen=True)
class Replay:
    """What --trace, --speed, --start, --duration, --time-unit and --seed ask for."""

    file: Path | None
    speed: float = 1.0
    start: float | None = None
    duration: float | None = None
    unit: TimeUnit | None = None
    seed: int | None = None

    @property
    def windowed(self) -> bool:
        return self.start is not None or self.duration is not None


def _replay(
    file: Path | None, speed: float, start: str | None, duration: str | None,
    unit: str | None, seed: int | None,
) -> Replay:  # fmt: skip
    """The options checked: durations in the policies' forms, a known time unit."""
    from controller.durations import parse_duration

    def seconds(option: str, text: str | None) -> float | None:
        try:
            return None if text is None else parse_duration(text)
        except ValueError as exc:
            raise GovernorError(f"{option}: {exc}") from None

    if unit is not None and unit not in ("s", "ms"):
        raise GovernorError(f"--time-unit {unit!r}: give s or ms")
    length = seconds("--duration", duration)
    if length == 0.0:
        raise GovernorError("--duration 0s: give a window longer than 0, e.g. --duration 1h")
    known: TimeUnit | None = "s" if unit == "s" else "ms" if unit == "ms" else None
    return Replay(file, speed, seconds("--start", start), length, known, seed)


def _world(scenario: str | None, replay: Replay) -> tuple[Scenario, TraceData | None]:
    """The one world SCENARIO and the replay options describe, and its trace."""
    from controller.sim.compare import load_trace, trace_scenario
    from controller.sim.scenario import find_scenario, load_scenario
    from controller.sim.trace import read_trace, replay_window

    trace, seed = replay.file, replay.seed
    if scenario is None and trace is None:
        raise GovernorError("give a SCENARIO, or --trace FILE to replay a trace")
    if scenario is None:
        assert trace is not None
        start = replay.start or 0.0
        whole = read_trace(trace, replay.unit)
        replayed = replay_window(whole, trace, replay.speed, start, replay.duration)
        world = trace_scenario(replayed, trace, replay.speed, 1 if seed is None else seed,
                               start, replay.unit, replay.duration)  # fmt: skip
        return world, replayed
    if replay.speed != 1.0 or replay.windowed:
        raise GovernorError(
            "--speed, --start and --duration apply to --trace without a SCENARIO (a scenario "
            "file sets `trace.speed`, `trace.start` and `duration`); drop them"
        )
    world = load_scenario(scenario)
    if trace is not None:
        if world.trace is None:
            raise GovernorError(f"scenario {world.name!r} has no `trace` to replace")
        update = {"file": str(trace), "time_unit": replay.unit}
        world = world.model_copy(update={"trace": world.trace.model_copy(update=update)})
    if seed is not None:
        world = world.model_copy(update={"seed": seed})
    return world, load_trace(world, find_scenario(scenario))


def _scenario_plans(world: Scenario) -> dict[str, list[str]]:
    """Each plan the world puts traffic on, with who is on it (tenant groups, a trace's
    tenants, a ddos botnet's keys)."""
    found: dict[str, list[str]] = {}
    for group in world.tenants:
        found.setdefault(group.plan, []).append(f"tenants {group.name!r}")
    if world.trace is not None:
        found.setdefault(world.trace.plan, []).append("the trace's tenants")
    for event in world.events:
        if event.kind == "ddos":
            found.setdefault(event.plan, []).append("the ddos event's keys")
    return found


def slo_notes(worlds: list[Scenario], policies: Path) -> list[str]:
    """A line for each world whose TTFT SLO is not the latency objective an AdaptiveLimit
    aims at: the scorecard would judge the policies against a target they were not given."""
    from controller.policy.documents import AdaptiveLimit
    from controller.policy.loader import load_directory

    aims = {}
    for document in load_directory(policies).documents:
        if isinstance(document, AdaptiveLimit) and document.spec.capacity is not None:
            queue = document.spec.capacity.queue
            if queue is not None and queue.latency is not None:
                aims[document.metadata.name] = queue.latency.objective
    notes = []
    for world in worlds:
        for name, objective in sorted(aims.items()):
            if not math.isclose(objective, world.slo.ttft_seconds):
                notes.append(
                    f"note: scenario {world.name!r} scores a TTFT SLO of "
                    f"{world.slo.ttft_seconds:g}s, but AdaptiveLimit {name!r} aims its queue "
                    f"at {objective:g}s (capacity.queue.latency.objective): the policies are "
                    "judged against a target they were not given; give both the same value "
                    "(the scenario's `slo.ttft_seconds`, or the objective in a copy of the "
                    "policies)"
                )
    return notes


def _require_plans(worlds: list[Scenario], policies: Path) -> None:
    """Refuse a world whose traffic is on a plan the policy set does not define: a gateway
    refuses such a plan (403 unknown-plan), while the simulated one serves it with no plan
    limit and every model, so the scorecard would say nothing about these policies."""
    from controller.policy.loader import load_directory

    defined = load_directory(policies).plans
    for world in worlds:
        missing = {p: who for p, who in _scenario_plans(world).items() if p not in defined}
        if not missing:
            continue
        named = "; ".join(f"{plan!r} ({', '.join(who)})" for plan, who in sorted(missing.items()))
        raise GovernorError(
            f"scenario {world.name!r} puts traffic on plans {policies} does not define: "
            f"{named} (plans: {', '.join(sorted(defined)) or 'none'}). A gateway refuses an "
            "unknown plan; the simulator would serve it unlimited. Write a scenario file "
            "naming your plans and their models (docs/simulator.md, 'Scenario files'; a trace: "
            "`trace: {file: ..., plan: ..., model: ...}`), or add those `kind: Plan` documents"
        )


def _scenarios(
    scenario: str | None, every: bool, replay: Replay
) -> list[tuple[Scenario, TraceData | None]]:
    """The scoreboard's worlds: every shipped scenario, or the one the options describe."""
    from controller.sim.compare import load_trace
    from controller.sim.scenario import find_scenario, load_scenario, scenario_names

    if not every:
        return [_world(scenario, replay)]
    if scenario is not None:
        raise GovernorError("give either a SCENARIO (or --trace) or --all, not both")
    if replay != Replay(None):
        raise GovernorError(
            "--trace, --speed, --start, --duration, --time-unit and --seed describe one "
            "scenario; not with --all"
        )
    return [(w, load_trace(w, find_scenario(n))) for n in scenario_names()
            for w in [load_scenario(n)]]  # fmt: skip


def _command(scenario: str | None, every: bool, replay: Replay, seeds: int, markdown: Path) -> str:
    """The command that makes this scoreboard again, for the document's header."""
    from controller.durations import format_duration

    words = ["governor simulate", "--all" if every else scenario or ""]
    words += [f"--trace {replay.file}"] if replay.file is not None else []
    words += [f"--speed {replay.speed:g}"] if replay.speed != 1.0 else []
    words += [f"--start {format_duration(replay.start)}"] if replay.start is not None else []
    if replay.duration is not None:
        words.append(f"--duration {format_duration(replay.duration)}")
    words += [f"--time-unit {replay.unit}"] if replay.unit is not None else []
    words += [f"--seed {replay.seed}"] if replay.seed is not None else []
    return " ".join(w for w in [*words, f"--seeds {seeds}", f"--markdown {markdown}"] if w)


def _cpu_seconds() -> float:
    """CPU seconds of this process and of its children that ended (the workers, and the
    Redis servers they ran)."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def _scoreboard(
    scenario: str | None, every: bool, policies: Path, seeds: int, workers: int,
    markdown: Path | None, replay: Replay, unused: list[str],
) -> None:  # fmt: skip
    """`--all` / `--seeds`: every (scenario, seed) in `workers` processes, then the table."""
    from controller.sim.scoreboard import document, render, run_board

    started = time.monotonic()
    try:
        if unused:
            raise GovernorError(
                f"{', '.join(unused)}: not used by the scoreboard (--all, --seeds, --markdown); "
                "drop them, or run one scenario on one seed"
            )
        worlds = _scenarios(scenario, every, replay)
        _require_plans([world for world, _ in worlds], policies)
        for note in slo_notes([world for world, _ in worlds], policies):
            typer.echo(note, err=True)
        board = run_board(
            worlds, policies, seeds, workers,
            progress=lambda line: typer.echo(line, err=True),
        )  # fmt: skip
    except GovernorError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    elapsed = time.monotonic() - started
    typer.echo(render(board))
    typer.echo(f"wall-clock: {elapsed:.0f} s for {len(board.cards)} scenarios × {seeds} seeds "
               f"({workers} workers); {_cpu_seconds():.0f} CPU s (this process and its "
               "workers)")  # fmt: skip
    if markdown is not None:
        markdown.parent.mkdir(parents=True, exist_ok=True)
        text = document(board, elapsed, workers, _command(scenario, every, replay, seeds, markdown))
        markdown.write_text(text, encoding="utf-8")
        typer.echo(f"wrote {markdown}")
