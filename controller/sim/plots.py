"""PNG plots of a simulation (matplotlib, Agg backend): one panel per quantity in real units,
the disturbances and the controller's events marked, each panel's verdict in a caption."""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from controller.extras import MissingExtraError

try:
    import matplotlib
except ImportError as exc:  # the sim extra: not in the controller's image
    raise MissingExtraError.of(exc, "the simulator's and the backtest's PNG plots") from None

matplotlib.use("Agg")  # files only: no display, safe in CI and in worker processes

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.patches import Patch
from matplotlib.ticker import FuncFormatter, MultipleLocator, NullFormatter

from controller.model import Address, FloatArray, LimitKind, Scope
from controller.sim.backtest import OPEN_LOOP, BacktestResult
from controller.sim.compare import BASELINE, VARIANTS, Comparison
from controller.sim.record import RunRecord, p99
from controller.sim.scenario import Event
from controller.sim.scorecard import UTILIZATION_MARGIN, Scorecard
from controller.sim.variants import AIMD, POLICIES, STATIC

COLORS = {POLICIES: "tab:blue", STATIC: "tab:red", AIMD: "tab:green", BASELINE: "0.5"}
NAMES = {
    POLICIES: "policies",
    STATIC: "static limits",
    AIMD: "plain AIMD",
    BASELINE: "baseline: no event, static limits",
}
AZURE_CREDIT = (
    'Traffic: Azure LLM inference trace 2023 (Patel et al., "Splitwise", ISCA 2024, CC BY 4.0)'
)
UNITS = {
    LimitKind.REQUESTS_PER_SECOND: "requests/s",
    LimitKind.REQUESTS_PER_MINUTE: "requests/min",
    LimitKind.TOKENS_PER_MINUTE: "tokens/min",
    LimitKind.TOKENS_PER_DAY: "tokens/day",
    LimitKind.CONCURRENT_REQUESTS: "concurrent requests",
    LimitKind.MAX_TOKENS_PER_REQUEST: "tokens/request",
}
TOKENS_PER_MINUTE = UNITS[LimitKind.TOKENS_PER_MINUTE]
CAPTION = "caption"  # gid of the verdict under each panel (tests find it by this)
MARK = "mark"  # gid of an event mark (engaged, released, cut, restored)
LINES_PER_PANEL = 6
LABELLED_MARKS = 10  # more text than this on one panel hides the data
MARKS_NAMED = 2  # events of one kind at one tick named one by one; more are counted


@dataclass(frozen=True)
class WindowStyle:
    color: str
    hatch: str


# A colour and a hatch per kind, so overlapping disturbances stay apart where they overlap.
WINDOWS = {
    "runaway": WindowStyle("tab:orange", "////"),
    "burst": WindowStyle("tab:purple", "\\\\\\\\"),
    "ddos": WindowStyle("tab:red", "xxxx"),
    "signal_outage": WindowStyle("0.35", "...."),
    "capacity": WindowStyle("tab:brown", "----"),
}


@dataclass(frozen=True)
class Mark:
    """A controller event at a tick: a policy engaged or released, a tenant cut or restored."""

    tick: int
    short: str  # beside the mark's line
    text: str  # in the caption
    color: str
    tenant: str | None


@dataclass(frozen=True)
class LimitLine:
    """One limit of one variant that moved, filled with its baseline where it inherits."""

    variant: str
    address: Address
    values: FloatArray
    baseline: float


class Clock:
    """Simulated minutes on the axes, shown as the simulated UTC time of day."""

    def __init__(self, comparison: Comparison) -> None:
        self.start = comparison.scenario.start_time
        self.tick_minutes = comparison.scenario.tick / 60.0

    def text(self, minutes: float) -> str:
        moment = dt.datetime.fromtimestamp(self.start + minutes * 60.0, dt.UTC)
        return moment.strftime("%H:%M:%S" if moment.second else "%H:%M")

    def spans(self, mask: np.ndarray) -> list[tuple[float, float]]:
        """The runs of True ticks, as (start, end) minutes."""
        edges = np.diff(np.concatenate([[0], mask.astype(np.int8), [0]]))
        starts, ends = np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)
        return [
            (a * self.tick_minutes, b * self.tick_minutes)
            for a, b in zip(starts, ends, strict=True)
        ]

    def window(self, card: Scorecard) -> str:
        a, b = card.window
        return f"{self.text(a / 60)}–{self.text(b / 60)}"

    def step(self, minutes: float) -> float:
        """Minutes between time labels: a round step giving at most a dozen."""
        return next((s for s in (1, 2, 5, 10, 15, 30, 60, 120) if minutes / s <= 12), 240)

    def when(self, spans: Sequence[tuple[float, float]], most: int = 3) -> str:
        shown = ", ".join(f"{self.text(a)}–{self.text(b)}" for a, b in spans[:most])
        extra = len(spans) - most
        return shown + (f" and {extra} more" if extra > 0 else "")


def _minutes(record: RunRecord) -> np.ndarray:
    return record.times / 60.0


def _quantity(value: float) -> str:
    """1,234 / 56.8k / 5M: a number a person reads at a glance."""
    size = abs(value)
    if size >= 1e6:
        return f"{value / 1e6:.3g}M"
    if size >= 1e4:
        return f"{value / 1e3:.3g}k"
    return f"{value:,.4g}"


def _met(card: Scorecard, figure: str) -> str:
    verdict = card.verdicts().get(figure)
    return "n/a" if verdict is None else ("met" if verdict else "missed")


def _legend(ax: Axes) -> None:
    """Outside the plot, on its right: a legend never covers data."""
    ax.legend(
        loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0, fontsize=8, frameon=False
    )


def _caption(ax: Axes, text: str, offset: float) -> None:
    note = ax.annotate(
        text,
        xy=(0, 0),
        xycoords="axes fraction",
        xytext=(0, -offset),
        textcoords="offset points",
        va="top",
        ha="left",
        fontsize=8.5,
        wrap=True,
    )
    note.set_gid(CAPTION)


# --- disturbance windows ---------------------------------------------------------------------


def _window_label(event: Event) -> str:
    who = ", ".join(event.tenants) or "every tenant"
    labels = {
        "runaway": f"runaway: {who} ×{event.factor:g}",
        "burst": f"burst: {who} ×{event.factor:g}",
        "ddos": f"DDoS: {event.ips:,} IPs, {event.rate:g} requests/s on {event.keys} keys",
        "signal_outage": f"signal outage: {event.metric}",
        "capacity": f"capacity: {event.pool or 'every pool'} at {event.factor:.0%} of its GPUs",
    }
    return labels[event.kind]


def _windows(axes: Sequence[Axes], comparison: Comparison) -> list[Patch]:
    """Shade every disturbance on every panel; one legend handle per window."""
    handles: list[Patch] = []
    clock = Clock(comparison)
    for event in comparison.scenario.events:
        style = WINDOWS[event.kind]
        a, b = event.at / 60.0, event.end / 60.0
        for ax in axes:
            ax.axvspan(a, b, facecolor=style.color, alpha=0.08, linewidth=0, zorder=0)
            ax.axvspan(
                a,
                b,
                fill=False,
                hatch=style.hatch,
                edgecolor=style.color,
                alpha=0.3,
                linewidth=0,
                zorder=0,
            )
        handles.append(
            Patch(
                facecolor=style.color,
                alpha=0.35,
                hatch=style.hatch,
                edgecolor=style.color,
                label=f"{_window_label(event)} ({clock.text(a)}–{clock.text(b)})",
            )
        )
    return handles


# --- events: engaged, released, cut -----------------------------------------------------------


def _transition_marks(record: RunRecord) -> list[Mark]:
    marks = []
    for t in record.transitions:
        policy = t.policy.split("/", 1)[-1]
        who = f" for {t.key}" if t.key else ""
        easing = "released" in t.event or t.event in ("stale-recovered", "stale-ended")
        color = "tab:green" if easing else "tab:red"
        short = f"{t.event} {t.key or policy}"
        marks.append(Mark(t.tick, short, f"{policy} {t.event}{who}", color, t.key or None))
    return marks


def _cut_marks(record: RunRecord) -> list[Mark]:
    """A tenant's own limit below what it inherits is a cut; its removal a restore."""
    marks = []
    for change in record.changes:
        address = Address.parse(change.address)
        if address.scope is not Scope.TENANT:
            continue
        base = record.baselines.get(change.address, math.nan)
        unit = UNITS[address.limit]
        if change.new is not None and not change.new >= base:
            text = f"{address.tenant} cut to {_quantity(change.new)} {unit}"
            short = f"cut {address.tenant}"
            marks.append(Mark(change.tick, short, text, "tab:purple", address.tenant))
        elif change.old is not None and change.new is None:
            text = f"{address.tenant}'s {address.limit} back to {_quantity(base)} {unit}"
            short = f"restored {address.tenant}"
            marks.append(Mark(change.tick, short, text, "tab:cyan", address.tenant))
    return marks


def _marks(record: RunRecord) -> list[Mark]:
    return sorted(_transition_marks(record) + _cut_marks(record), key=lambda m: m.tick)


def _numbered(marks: Sequence[Mark]) -> list[tuple[int, list[Mark]]]:
    """The marks grouped by tick, numbered from 1 in time order."""
    ticks = sorted({m.tick for m in marks})
    return [(n, [m for m in marks if m.tick == tick]) for n, tick in enumerate(ticks, 1)]


def _draw_marks(
    ax: Axes, marks: Sequence[Mark], tick_minutes: float, tenant: str | None = None
) -> None:
    """A numbered line per tick with events (only `tenant`'s, if given), its short text at
    the top (the caption says the rest); the text only on the first LABELLED_MARKS, so it
    never hides the data. Numbers are the same on every panel."""
    for number, group in _numbered(marks):
        group = [m for m in group if tenant is None or m.tenant == tenant]
        if not group:
            continue
        x = group[0].tick * tick_minutes
        color = group[0].color
        line = ax.axvline(x, color=color, linewidth=0.9, linestyle="-.", alpha=0.8)
        line.set_gid(MARK)
        if number <= LABELLED_MARKS:
            text = f"{number}: " + " + ".join(condensed(group, short=True))
            ax.text(
                x,
                0.97,
                text,
                transform=ax.get_xaxis_transform(),
                rotation=90,
                va="top",
                ha="right",
                fontsize=7,
                color=color,
                bbox={"facecolor": "white", "alpha": 0.75, "linewidth": 0, "pad": 1},
            )


def condensed(group: Sequence[Mark], short: bool = False, most: int = MARKS_NAMED) -> list[str]:
    """A tick's events as text, each kind (engaged, cut, restored, ...) naming at most `most`
    tenants and counting the rest: a fair share holding thirty tenants at once is one line,
    not thirty that run off the panel."""
    kinds: dict[str, list[Mark]] = {}
    for mark in group:
        kinds.setdefault(mark.short.split(" ", 1)[0], []).append(mark)
    out: list[str] = []
    for kind, marks in kinds.items():
        named = [m.short if short else m.text for m in marks]
        if len(marks) <= most:
            out += named
        elif short:
            out.append(f"{kind} {len(marks)} tenants")
        else:
            out.append(f"{', '.join(named[:most])} and {len(marks) - most} more {kind}")
    return out


def _marks_summary(marks: Sequence[Mark], clock: Clock, most: int = 6) -> str:
    if not marks:
        return "Events of the policies: none (no policy engaged or released, no tenant cut)."
    groups = _numbered(marks)
    shown = "; ".join(
        f"{n}: {clock.text(group[0].tick * clock.tick_minutes)} " + ", ".join(condensed(group))
        for n, group in groups[:most]
    )
    extra = len(groups) - most
    more = f"; and {extra} more (marked)" if extra > 0 else ""
    return f"Events of the policies (marked): {shown}{more}."


# --- panels ------------------------------------------------------------------------------------


def _utilization(ax: Axes, comparison: Comparison, clock: Clock) -> str:
    target = comparison.runs[POLICIES].target
    ceiling = target + UTILIZATION_MARGIN
    ax.axhline(target * 100, color="k", linewidth=0.9, linestyle="--", label=f"target {target:.0%}")
    ax.axhspan(
        target * 100,
        ceiling * 100,
        color="gold",
        alpha=0.3,
        label=f"tolerance: target + {UTILIZATION_MARGIN * 100:g} pts = {ceiling:.0%}",
    )
    for name in (BASELINE, *VARIANTS):  # the reference underneath
        record = comparison.runs[name]
        ax.plot(
            _minutes(record),
            record.utilization * 100,
            color=COLORS[name],
            label=NAMES[name],
            linewidth=1.0 if name != BASELINE else 0.8,
        )
    ax.set_ylabel("GPU utilization: compute used (%)")
    ax.set_ylim(0, 105)
    cards = comparison.cards
    card = cards[POLICIES]
    above = clock.spans(comparison.runs[POLICIES].utilization > ceiling + 1e-12)
    others = ", ".join(f"{NAMES[v]} {cards[v].utilization_within:.0%}" for v in (STATIC, AIMD))
    where = f"above {ceiling:.0%} at {clock.when(above)}" if above else f"never above {ceiling:.0%}"
    return (
        f"Verdict: with the policies utilization stayed ≤ {ceiling:.0%} on "
        f"{card.utilization_within:.0%} of the ticks of the scored window {clock.window(card)} "
        f"(a diagnostic, no goal); {others}. Policies: {where}."
    )


def _p99_per_tick(record: RunRecord) -> np.ndarray:
    return np.array([p99(row) for row in record.ttft])


def _time_over(spans: Sequence[tuple[float, float]]) -> str:
    total = sum(b - a for a, b in spans)
    return f"above it for {total:g} min" if total else "never above it"


def _two_and_five(value: float, _position: float | None = None) -> str:
    if value <= 0:
        return ""
    mantissa = round(value / 10 ** math.floor(math.log10(value)), 6)
    return f"{value:g}" if mantissa in (2.0, 5.0) else ""


def _latency(ax: Axes, comparison: Comparison, clock: Clock) -> str:
    slo = comparison.runs[POLICIES].slo_seconds
    over: dict[str, list[tuple[float, float]]] = {}
    for name in (BASELINE, *VARIANTS):  # the reference underneath
        record = comparison.runs[name]
        series = _p99_per_tick(record)
        ax.plot(_minutes(record), series, color=COLORS[name], label=NAMES[name], linewidth=1.0)
        over[name] = clock.spans(np.nan_to_num(series) > slo)
    ax.axhline(slo, color="k", linestyle=":", linewidth=1.0, label=f"TTFT SLO {slo:g} s")
    ax.set_yscale("log")
    # Seconds as plain numbers (0.5, 2, 10), not 2×10⁰; 2 and 5 of each decade labelled
    # too, so a calm run (under one decade) still has numbers on its axis.
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.yaxis.set_minor_formatter(FuncFormatter(_two_and_five))
    ax.set_ylabel("p99 time to first token (s)")
    card = comparison.cards[POLICIES]
    mine = over[POLICIES]
    where = f"except {clock.when(mine)}" if mine else "throughout"
    others = ", ".join(f"{NAMES[v]} {_time_over(over[v])}" for v in (STATIC, AIMD))
    a, b = card.window
    return (
        f"Verdict: with the policies the per-tick p99 TTFT stayed under the {slo:g} s SLO "
        f"{where} ({others}). Over the window {clock.text(a / 60)}–{clock.text(b / 60)}: "
        f"p99 {card.p99_ttft:.2f} s vs {card.baseline_p99_ttft:.2f} s for the baseline (the "
        f"same traffic without the events, under static limits) "
        f"({card.p99_increase:+.0%}; goal ≤ +15%: {_met(card, 'p99_increase')})."
    )


def _work(ax: Axes, comparison: Comparison) -> str:
    first = comparison.runs[POLICIES]
    x = _minutes(first)
    offered = first.offered * 60
    top = 2.0 * first.capacity * 60
    # An overload offers many times the capacity: drawn whole, it would flatten what was
    # served to the bottom of the panel. Above twice the capacity it leaves the panel.
    clipped = float(offered.max()) > top
    peak = f"; peaks at {_quantity(float(offered.max()))}, off the panel" if clipped else ""
    ax.plot(x, offered, color="k", linewidth=0.8, label=f"offered (every tenant{peak})")
    ax.plot(x, first.oracle * 60, color="k", linestyle="--", linewidth=0.9, label="oracle")
    ax.axhline(first.capacity * 60, color="0.3", linestyle=":", label="GPU capacity")
    for name in VARIANTS:
        record = comparison.runs[name]
        ax.plot(
            x,
            record.goodput * 60,
            color=COLORS[name],
            linewidth=1.0,
            label=f"goodput: {NAMES[name]}",
        )
    ax.set_ylabel(f"work ({TOKENS_PER_MINUTE})")
    if clipped:
        ax.set_ylim(0, top)
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: _quantity(v)))
    cards = comparison.cards
    card = cards[POLICIES]
    others = ", ".join(f"{cards[v].goodput_ratio:.0%} with {NAMES[v]}" for v in (STATIC, AIMD))
    slo = first.slo_seconds
    return (
        f"Goodput: tokens of well-behaved tenants' requests answered within the {slo:g} s TTFT "
        f"SLO. Oracle: the most of that any controller could serve knowing the true capacity "
        f"(demand, capped at the highest utilization that keeps p99 TTFT within the SLO).\n"
        f"Verdict: over the window goodput reached {card.goodput_ratio:.0%} of the oracle with "
        f"the policies (goal ≥ 90%: {_met(card, 'goodput_ratio')}), {others}."
    )


def _moved(record: RunRecord, variant: str) -> list[LimitLine]:
    """Every limit of `record` that changed or was ever away from its baseline (a schedule
    can hold one off its baseline for the whole run)."""
    lines = []
    for name, values in sorted(record.limits.items()):
        base = record.baselines.get(name, math.nan)
        # An inheriting limit (a tenant's) exists only while it differs: absent is baseline.
        filled = np.where(np.isnan(values), base, values)
        finite = filled[np.isfinite(filled)]
        away = math.isfinite(base) and bool(np.any(finite != base))
        if len(finite) and (away or not np.all(finite == finite[0])):
            lines.append(LimitLine(variant, Address.parse(name), filled, base))
    return lines


def _by_unit(comparison: Comparison) -> dict[str, list[LimitLine]]:
    """The limits that moved, by unit: every variant's fleet-wide limits before any
    tenant's (a panel shows the first LINES_PER_PANEL, and a fair share moves one limit per
    tenant held)."""
    groups: dict[str, list[LimitLine]] = {}
    for variant in VARIANTS:
        for line in _moved(comparison.runs[variant], variant):
            groups.setdefault(UNITS[line.address.limit], []).append(line)
    narrow = (Scope.TENANT, Scope.USER)
    for lines in groups.values():
        lines.sort(key=lambda line: line.address.scope in narrow)  # stable: variant order kept
    return groups


def _describe(line: LimitLine, clock: Clock, unit: str) -> str:
    values = line.values
    who = f"{NAMES[line.variant]}: {line.address}"
    base = f"baseline {_quantity(line.baseline)}" if math.isfinite(line.baseline) else "no baseline"
    if np.all(values == values[0]):
        return f"{who} held at {_quantity(float(values[0]))} {unit} all run ({base})"
    low = int(np.nanargmin(values))
    return (
        f"{who} lowest {_quantity(float(values[low]))} {unit} at "
        f"{clock.text(low * clock.tick_minutes)} ({base}; "
        f"at the end {_quantity(float(values[-1]))})"
    )


def _value_axis(ax: Axes, values: np.ndarray) -> None:
    """Readable numbers (100k, 5M); a log scale when what is drawn spans more than 20×, as a
    fleet-wide limit and a tenant's cut do (linear, the cut would lie on the axis)."""
    positive = values[np.isfinite(values) & (values > 0)]
    if len(positive) and positive.max() / positive.min() > 20:
        ax.set_yscale("log")
        ax.yaxis.set_minor_formatter(NullFormatter())
        # Room below the smallest reference drawn, not down to a near-empty tick's value.
        ax.set_ylim(bottom=float(positive.min()) / 4)
    else:
        ax.set_ylim(bottom=0)  # a limit or a rate: its distance from 0 is what matters
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: _quantity(v)))


def _limits(ax: Axes, lines: Sequence[LimitLine], unit: str, clock: Clock) -> str:
    styles = ("-", "--", ":", "-.")
    for index, line in enumerate(lines[:LINES_PER_PANEL]):
        ax.step(
            np.arange(len(line.values)) * clock.tick_minutes,
            line.values,
            where="post",
            color=COLORS[line.variant],
            linestyle=styles[index % len(styles)],
            linewidth=1.3,
            label=f"{NAMES[line.variant]}: {line.address}",
        )
    shown = lines[:LINES_PER_PANEL]
    # Each limit's baseline, dotted in its colour: how far it moved reads off the panel.
    for base, color in sorted({(line.baseline, COLORS[line.variant]) for line in shown}):
        if math.isfinite(base):
            ax.axhline(base, color=color, linestyle=":", linewidth=0.9, alpha=0.7)
    ax.plot([], [], color="0.3", linestyle=":", label="dotted: that colour's baseline")
    ax.set_ylabel(f"limit ({unit})")
    bases = np.array([line.baseline for line in shown])
    _value_axis(ax, np.concatenate([bases, *(line.values for line in shown)]))
    said = "; ".join(_describe(line, clock, unit) for line in lines[:3])
    extra = len(lines) - 3
    return f"{said}" + (f"; and {extra} more limits in {unit}" if extra > 0 else "") + "."


def _tenant_index(comparison: Comparison) -> tuple[int, str]:
    """The runaway tenant, else the tenant the policies cut first, else the busiest."""
    first = comparison.runs[POLICIES]
    if first.runaway:
        return first.runaway[0], "runaway tenant"
    names = {t.name: t.index for t in first.tenants}
    for mark in _cut_marks(first):
        if mark.tenant in names:
            return names[mark.tenant], "tenant cut first"
    return int(first.tenant_admitted.sum(axis=0).argmax()), "busiest tenant"


def _tenant(ax: Axes, comparison: Comparison, clock: Clock) -> tuple[str, str]:
    index, role = _tenant_index(comparison)
    first = comparison.runs[POLICIES]
    name = first.tenants[index].name
    per_minute = 60.0 / first.tick_seconds
    x = _minutes(first)
    ax.plot(
        x, first.tenant_offered[:, index] * per_minute, color="k", linewidth=0.8, label="offered"
    )
    for variant in VARIANTS:
        record = comparison.runs[variant]
        ax.plot(
            x,
            record.tenant_admitted[:, index] * per_minute,
            color=COLORS[variant],
            label=f"admitted: {NAMES[variant]}",
        )
    # The scale follows the tenant's peak and its own limits, if any were drawn.
    drawn = [np.array([first.tenant_offered[:, index].max() * per_minute])]
    for line in _by_unit(comparison).get(TOKENS_PER_MINUTE, []):
        if line.address.tenant == name:
            ax.step(
                x,
                line.values,
                where="post",
                color=COLORS[line.variant],
                linestyle="--",
                linewidth=1.3,
                label=f"its limit: {NAMES[line.variant]}",
            )
            drawn.append(line.values)
    ax.set_ylabel(f"{role} {name} ({TOKENS_PER_MINUTE})")
    _value_axis(ax, np.concatenate(drawn))
    return name, _tenant_verdict(comparison, index, role, clock)


def _tenant_verdict(comparison: Comparison, index: int, role: str, clock: Clock) -> str:
    first = comparison.runs[POLICIES]
    name = first.tenants[index].name
    lo, hi = (int(t / first.tick_seconds) for t in comparison.cards[POLICIES].window)
    per_minute = 60.0 / first.tick_seconds
    offered = float(first.tenant_offered[lo:hi, index].mean()) * per_minute
    admitted = ", ".join(
        f"{_quantity(float(comparison.runs[v].tenant_admitted[lo:hi, index].mean()) * per_minute)}"
        f" with {NAMES[v]}"
        for v in VARIANTS
    )
    throttled = comparison.cards[POLICIES].throttle_ticks
    when = (
        f" The policies cut it {throttled} ticks ({throttled * clock.tick_minutes:g} min) after"
        " its runaway began."
        if throttled is not None
        else ""
    )
    return (
        f"Verdict: over the window the {role} {name} offered {_quantity(offered)} "
        f"{TOKENS_PER_MINUTE} on average; admitted {admitted}.{when}"
    )


# --- the figure --------------------------------------------------------------------------------


def _title(comparison: Comparison) -> str:
    scenario = comparison.scenario
    record = comparison.runs[POLICIES]
    names = ", ".join(record.policy_names) or "none"
    minutes = scenario.duration / 60
    length = f"{minutes / 60:g} h" if minutes >= 120 else f"{minutes:g} min"
    return (
        f"Simulated scenario '{scenario.name}' (seed {scenario.seed}, {length}): "
        f"{scenario.description}\n"
        f"The policy set {comparison.policies.name}/ (policies: {names})\n"
        f"compared with static limits (its Plans and Limits only) and plain AIMD"
    )


Panel = Callable[[Axes], str]


def _panels(comparison: Comparison, clock: Clock) -> list[Panel]:
    marks = _marks(comparison.runs[POLICIES])
    summary = _marks_summary(marks, clock)
    panels: list[Panel] = [
        lambda ax: _utilization(ax, comparison, clock),
        lambda ax: _latency(ax, comparison, clock),
        lambda ax: _work(ax, comparison),
    ]
    order = list(UNITS.values())
    for unit, lines in sorted(_by_unit(comparison).items(), key=lambda i: order.index(i[0])):
        # The events are listed once, under the first limits panel; every one marks them.
        panels.append(_limit_panel(lines, unit, clock, marks, summary if len(panels) == 3 else ""))
    if len(panels) == 3:
        panels.append(lambda ax: _no_limit(ax, marks, clock, summary))
    panels.append(lambda ax: _tenant_panel(ax, comparison, clock, marks))
    return panels


def _limit_panel(
    lines: Sequence[LimitLine], unit: str, clock: Clock, marks: Sequence[Mark], summary: str
) -> Panel:
    def draw(ax: Axes) -> str:
        said = _limits(ax, lines, unit, clock)
        _draw_marks(ax, marks, clock.tick_minutes)
        return f"{said}\n{summary}".strip()

    return draw


def _no_limit(ax: Axes, marks: Sequence[Mark], clock: Clock, summary: str) -> str:
    ax.set_ylabel("limits (no unit: none moved)")
    ax.set_yticks([])
    _draw_marks(ax, marks, clock.tick_minutes)
    return f"No limit moved off its baseline in any variant. {summary}"


def _tenant_panel(ax: Axes, comparison: Comparison, clock: Clock, marks: Sequence[Mark]) -> str:
    name, verdict = _tenant(ax, comparison, clock)
    _draw_marks(ax, marks, clock.tick_minutes, name)
    return verdict


def figure(comparison: Comparison) -> Figure:
    """The comparison as one figure: a panel per quantity, sharing the time axis."""
    clock = Clock(comparison)
    panels = _panels(comparison, clock)
    header = 1.0 if comparison.scenario.events else 0.75  # the title, the windows' legend
    height = 3.6 * len(panels) + header
    fig, axes = plt.subplots(len(panels), 1, figsize=(14, height), sharex=True, squeeze=False)
    column = list(axes[:, 0])
    windows = _windows(column, comparison)
    for ax, panel in zip(column, panels, strict=True):
        ax.grid(alpha=0.3)
        caption = panel(ax)
        ax.tick_params(labelbottom=True)  # each panel reads alone
        if ax.get_legend_handles_labels()[0]:
            _legend(ax)
        _caption(ax, caption, 30 if ax is column[-1] else 16)
    column[-1].set_xlabel(f"simulated time (UTC, {clock.text(0)} = start of the run)")
    column[-1].xaxis.set_major_formatter(FuncFormatter(lambda v, _: clock.text(v)))
    column[-1].xaxis.set_major_locator(
        MultipleLocator(clock.step(comparison.scenario.duration / 60))
    )
    top = 1.0 - header / height
    title = fig.suptitle(_title(comparison), fontsize=11, y=1.0 - 0.1 / height, va="top")
    title.set_in_layout(False)  # its room is `header`: tight_layout would reserve it twice
    if windows:
        fig.legend(
            handles=windows,
            loc="upper center",
            bbox_to_anchor=(0.5, 1.0 - 0.68 / height),
            ncol=len(windows),
            fontsize=8.5,
            frameon=False,
        )
    if comparison.scenario.trace is not None:
        fig.text(0.5, 0.002, AZURE_CREDIT, ha="center", fontsize=7, color="0.3")
    fig.tight_layout(rect=(0, 0.01, 1, top), h_pad=2.5)
    return fig


def plot(comparison: Comparison, path: Path) -> Path:
    """Write the comparison's figure as a PNG; returns its path."""
    fig = figure(comparison)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def _backtest_units(result: BacktestResult) -> dict[str, list[str]]:
    """The limits the backtest would have written, grouped by unit (units in UNITS order)."""
    groups: dict[str, list[str]] = {unit: [] for unit in UNITS.values()}
    for address in sorted({w.address for w in result.writes}):
        groups[UNITS[Address.parse(address).limit]].append(address)
    return {unit: found for unit, found in groups.items() if found}


def _backtest_limits(ax: Axes, result: BacktestResult, unit: str, addresses: list[str]) -> None:
    """The values each limit would have had, in its unit; absent where none was written."""
    minutes = (np.array(result.times) - result.start) / 60.0
    for address in addresses[:LINES_PER_PANEL]:
        written = np.array([step.get(Address.parse(address), np.nan) for step in result.limits])
        ax.step(minutes, written, where="post", label=address)
    ax.set_ylabel(f"limit it would write ({unit})", fontsize=8)
    values = np.array([v for step in result.limits for a, v in step.items() if str(a) in addresses])
    _value_axis(ax, values)
    _legend(ax)


def plot_backtest(result: BacktestResult, path: Path) -> Path:
    """Write the backtest's figure as a PNG; returns its path."""
    fig = backtest_figure(result)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def backtest_figure(result: BacktestResult) -> Figure:
    """One panel per policy (its signals, shaded where it was active), then one per unit of
    the limits it would have written; titled as the open-loop replay it is."""
    policies = sorted({name.split(":", 1)[0] for name in result.signals})
    units = _backtest_units(result)
    count = len(policies) + max(len(units), 1)
    fig, axes = plt.subplots(count, 1, figsize=(13, 2.6 * count), sharex=True, squeeze=False)
    minutes = (np.array(result.times) - result.start) / 60.0
    for ax, policy in zip(axes[:, 0], policies, strict=False):
        for name, series in sorted(result.signals.items()):
            if name.split(":", 1)[0] == policy:
                ax.plot(minutes, series, linewidth=1.0, label=name.split(":", 1)[1])
        active = np.array(
            [any(ref.split("/", 1)[1] == policy for ref in step) for step in result.active]
        )
        for index in np.flatnonzero(active):
            ax.axvspan(minutes[index], minutes[index] + result.step / 60, color="orange",
                       alpha=0.25, linewidth=0)  # fmt: skip
        ax.set_ylabel(policy, fontsize=8)
        _legend(ax)
        ax.grid(alpha=0.3)
    for ax, (unit, addresses) in zip(axes[len(policies) :, 0], units.items(), strict=False):
        _backtest_limits(ax, result, unit, addresses)
    if not units:
        axes[-1, 0].set_ylabel("limits it would write (none)", fontsize=8)
    axes[-1, 0].set_xlabel("minutes since --from")
    for ax in axes[len(policies) :, 0]:
        ax.grid(alpha=0.3)
    fig.suptitle(OPEN_LOOP, fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    return fig
