"""The scorecard of one run against the no-overload baseline and the oracle (docs/simulator.md
defines every figure; docs/control-quality.md holds the goals and the results)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass

import numpy as np

from controller.sim.record import RunRecord, p99
from controller.sim.variants import AIMD, GRADIENT, STATIC

UTILIZATION_MARGIN = 0.05  # the utilization diagnostic's band (no goal: see GOALS)
# Settling: a tick's SLO attainment within this many points of the steady state.
ATTAINMENT_MARGIN = 0.05
# The shipped runaway policy's `for: 5m` (20 ticks of 15 s) plus 2 ticks, counted from the
# runaway's start: the goal the design set, no longer counted from when the policy engaged.
THROTTLE_GOAL_TICKS = 22.0


@dataclass(frozen=True)
class Goal:
    """One goal: the figure it reads, how it is met, and the goal as text."""

    figure: str
    text: str
    check: str  # "le" or "ge"
    bound: float

    def met(self, value: float | None) -> bool | None:
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return None if self.figure == "jain" else False
        return value <= self.bound if self.check == "le" else value >= self.bound


# Utilization (`utilization_within`) is a diagnostic, not a goal: a goal on it would favour a
# controller whose setpoint is utilization over one that serves the SLO.
GOALS = (
    Goal("p99_increase", "p99 TTFT ≤ +15% over the no-overload baseline", "le", 0.15),
    Goal("goodput_ratio", "goodput ≥ 90% of the oracle", "ge", 0.90),
    Goal("flaps_per_hour", "≤ 2 flaps per hour of the window", "le", 2.0),
    Goal("settling_ticks", "attainment steady (±5 points) within 3 ticks", "le", 3.0),
    Goal("recovery_ticks", "attainment back to no-overload's within 3 ticks", "le", 3.0),
    Goal(
        "throttle_ticks", "runaway throttled ≤ 22 ticks from its start", "le", THROTTLE_GOAL_TICKS
    ),
    Goal("jain", "Jain fairness over every well-behaved tenant ≥ 0.95", "ge", 0.95),
    Goal("budget_overrun", "no token spent beyond a daily budget", "le", 0.0),
)


# The headline goal compares variants: attainment ≥ the best of these baselines' (each
# variant's worst seed against theirs), so it is judged by `headline`, not by a bound.
JUDGED_AGAINST = (STATIC, AIMD, GRADIENT)
HEADLINE_TEXT = "SLO attainment ≥ the best baseline's (static, plain-aimd, gradient)"


def headline(attainments: Mapping[str, float | None]) -> dict[str, bool | None]:
    """Per variant: its attainment ≥ the best of JUDGED_AGAINST's (None: not measurable)."""
    known = {v: a for v, a in attainments.items() if a is not None and not math.isnan(a)}
    best = max((a for v, a in known.items() if v in JUDGED_AGAINST), default=None)
    return {v: None if best is None or v not in known else known[v] >= best - 1e-12
            for v in attainments}  # fmt: skip


@dataclass(frozen=True)
class Scorecard:
    """Figures of one run over the scenario's disturbance window (the whole run if none);
    docs/simulator.md defines each one."""

    variant: str
    window: tuple[float, float]  # seconds since start
    attainment: float  # the headline: well-behaved requests served within the SLO / offered
    p99_ttft: float  # seconds, admitted requests, a timeout counted at the timeout
    baseline_p99_ttft: float
    p99_increase: float  # p99 / baseline − 1
    utilization_mean: float
    utilization_within: float  # share of ticks with utilization ≤ target + 5%
    goodput_ratio: float  # Σ goodput / Σ oracle, clamped at 1
    flaps_per_hour: float  # turns in the window per hour of the window
    settling_ticks: int | None  # None: never settled within the window
    recovery_ticks: int | None  # None: never settled after the window (or no time after it)
    budget_overrun: float  # tokens
    jain: float | None  # None: fewer than two well-behaved tenants with demand
    worst_share: float | None  # the worst-off well-behaved tenant's good work / demand
    throttle_ticks: int | None  # runaway: its start → a limit of its own below baseline
    runaway_attainment: float | None  # the others' attainment from its start to the deadline
    quiet_attainment: float | None  # well-behaved tenants without an event of their own
    timed_out: int
    errors: int
    has_runaway: bool = False
    has_after: bool = False  # ticks after the window exist (recovery is measurable)
    knob_value: float | None = None  # static sweep: the value found best in hindsight
    knob_edge: bool = False  # ... on the edge of the range searched: the best may lie beyond

    def figures(self) -> dict[str, object]:
        return asdict(self)

    def verdicts(self) -> dict[str, bool | None]:
        """Each goal: met (True), missed (False), or not applicable (None)."""
        out: dict[str, bool | None] = {}
        for goal in GOALS:
            value = getattr(self, goal.figure)
            if (goal.figure == "throttle_ticks" and not self.has_runaway) or (
                goal.figure == "recovery_ticks" and not self.has_after
            ):
                out[goal.figure] = None
                continue
            out[goal.figure] = goal.met(None if value is None else float(value))
        return out


def window_ticks(record: RunRecord) -> tuple[int, int]:
    """The ticks of the disturbance: from the first event's start to the last one's end."""
    return window_of(record.events, record.tick_seconds, record.ticks)


def window_of(
    events: Sequence[tuple[str, float, float]], tick_seconds: float, ticks: int
) -> tuple[int, int]:
    """The window of these events (kind, start, end) in ticks (the whole run without any)."""
    spans = [(a, b) for kind, a, b in events if kind != "signal_outage"]
    if not spans:
        return 0, ticks
    first = math.floor(min(a for a, _ in spans) / tick_seconds)
    last = math.ceil(max(b for _, b in spans) / tick_seconds)
    return first, min(last, ticks)


def tick_attainment(record: RunRecord) -> np.ndarray:
    """Per tick: the well-behaved tenants' SLO attainment (NaN where they offered nothing)."""
    good = _good_tenants(record)
    offered = record.tenant_requests[:, good].sum(axis=1)
    served = record.tenant_good_requests[:, good].sum(axis=1)
    return np.where(offered > 0, served / np.maximum(offered, 1e-12), np.nan)


def settling(record: RunRecord, first: int, last: int, steady: float) -> int | None:
    """Ticks from `first` until every later tick up to `last` has its attainment within
    ATTAINMENT_MARGIN of `steady` (both directions; a tick without demand is settled)."""
    found = tick_attainment(record)[first:last]
    if math.isnan(steady):  # no demand to serve over the reference span: nothing to settle
        return 0
    ok = np.isnan(found) | (np.abs(found - steady) <= ATTAINMENT_MARGIN + 1e-12)
    if ok.all():
        return 0
    done = int(np.flatnonzero(~ok)[-1]) + 1
    return done if done < last - first else None


def steady_in_window(record: RunRecord, first: int, last: int) -> float:
    """The steady state under the disturbance: attainment over the window's last quarter."""
    return attainment(record, last - max(1, (last - first) // 4), last)


def jain_index(values: np.ndarray) -> float | None:
    """(Σx)² / (n·Σx²); None with fewer than two values."""
    if len(values) < 2:
        return None
    squares = float((values**2).sum())
    return float(values.sum() ** 2 / (len(values) * squares)) if squares > 0 else None


def _good_tenants(record: RunRecord) -> np.ndarray:
    return np.array(
        [t.well_behaved and t.index not in record.runaway for t in record.tenants], dtype=bool
    )


def attainment(record: RunRecord, first: int, last: int, only: np.ndarray | None = None) -> float:
    """Well-behaved requests served within the SLO over those they offered (a refusal by
    the controller, a shed or a timeout is a miss; NaN when they offered none); `only`: of
    these tenants alone (a mask)."""
    good = _good_tenants(record) if only is None else _good_tenants(record) & only
    offered = float(record.tenant_requests[first:last, good].sum())
    served = float(record.tenant_good_requests[first:last, good].sum())
    return served / offered if offered else math.nan


def fairness(record: RunRecord, first: int, last: int) -> tuple[float | None, float | None]:
    """Jain's index over every well-behaved tenant with demand in the window, x = its good
    work / its demand; and the smallest x (the worst-off tenant)."""
    offered = record.tenant_offered[first:last].sum(axis=0)
    good = record.tenant_good[first:last].sum(axis=0)
    chosen = _good_tenants(record) & (offered > 0)
    if not chosen.any():
        return None, None
    shares = good[chosen] / offered[chosen]
    return jain_index(shares), float(shares.min())


def _throttle(record: RunRecord) -> tuple[int | None, float | None]:
    """For the first runaway tenant: ticks from the event's start until a limit of its own
    was below its baseline (or 0), and the others' attainment over one span fixed for every
    variant: the runaway's start to the goal's deadline (start + THROTTLE_GOAL_TICKS), so a
    controller that throttles early is not measured over a quieter span than one that never
    does."""
    runaways = [(a, b) for kind, a, b in record.events if kind == "runaway"]
    if not record.runaway or not runaways:
        return None, None
    name = record.tenants[record.runaway[0]].name
    start = math.floor(runaways[0][0] / record.tick_seconds)
    throttled = _first_below(record, f"tenant/{name}/", start)
    until = min(start + int(THROTTLE_GOAL_TICKS), record.ticks)
    meanwhile = attainment(record, start, until) if until > start else math.nan
    return (None if throttled is None else throttled - start), (
        None if math.isnan(meanwhile) else meanwhile
    )


def _first_below(record: RunRecord, prefix: str, start: int) -> int | None:
    """The first tick from `start` at which a limit under `prefix` is 0 or below baseline."""
    found: int | None = None
    for address, values in record.limits.items():
        if not address.startswith(prefix):
            continue
        base = record.baselines.get(address, math.nan)
        below = np.flatnonzero(
            (values[start:] == 0) | (np.isfinite(base) & (values[start:] < base))
        )
        if len(below):
            tick = start + int(below[0])
            found = tick if found is None else min(found, tick)
    return found


def _flaps_per_hour(record: RunRecord, first: int, last: int) -> float:
    low, high = first * record.tick_seconds, last * record.tick_seconds
    hours = (high - low) / 3600.0
    turns = sum(1 for t in record.flap_times if low <= t < high)
    return turns / hours if hours else 0.0


def _quiet_attainment(record: RunRecord, first: int, last: int) -> float | None:
    """The attainment of the well-behaved tenants that had no event of their own (None when
    every one had): what a surge cost those who did not surge, which Jain can hide."""
    quiet = np.ones(len(record.tenants), dtype=bool)
    quiet[record.bursting] = False
    found = attainment(record, first, last, quiet)
    return None if math.isnan(found) else found


def _goodput_ratio(goodput: float, oracle: float) -> float:
    """Goodput over the oracle's, at most 1: the oracle (ρ*, the highest constant load that
    meets the p99 SLO, applied as a per-step cap) is a reference, not an upper bound: a
    varying admission can serve a little more good work, and beating it is no merit."""
    return min(1.0, goodput / oracle) if oracle else math.nan


def _recovery(record: RunRecord, baseline: RunRecord, last: int) -> int | None:
    """Settling after the window, toward the no-overload run's attainment over the same ticks
    (the run's own tail when the baseline offered nothing there): back to normal service,
    not merely steady at a throttled level."""
    if last >= record.ticks:
        return None
    normal = attainment(baseline, last, record.ticks)
    if math.isnan(normal):
        normal = steady_in_window(record, last, record.ticks)
    return settling(record, last, record.ticks, normal)


def score(record: RunRecord, baseline: RunRecord) -> Scorecard:
    """The scorecard of `record`, its latency judged against `baseline` (the same world with
    no overload) over the same window."""
    first, last = window_ticks(record)
    latency = p99(record.ttft[first:last].sum(axis=0))
    reference = p99(baseline.ttft[first:last].sum(axis=0))
    utilization = record.utilization[first:last]
    oracle = float(record.oracle[first:last].sum())
    throttle, meanwhile = _throttle(record)
    jain, worst = fairness(record, first, last)
    within = utilization <= record.target + UTILIZATION_MARGIN + 1e-12
    return Scorecard(
        variant=record.variant,
        window=(first * record.tick_seconds, last * record.tick_seconds),
        attainment=attainment(record, first, last),
        p99_ttft=latency,
        baseline_p99_ttft=reference,
        p99_increase=latency / reference - 1.0 if reference > 0 else math.nan,
        utilization_mean=float(utilization.mean()) if len(utilization) else math.nan,
        utilization_within=float(within.mean()) if len(utilization) else math.nan,
        goodput_ratio=_goodput_ratio(float(record.goodput[first:last].sum()), oracle),
        flaps_per_hour=_flaps_per_hour(record, first, last),
        settling_ticks=settling(record, first, last, steady_in_window(record, first, last)),
        recovery_ticks=_recovery(record, baseline, last),
        budget_overrun=record.budget_overrun,
        jain=jain,
        worst_share=worst,
        throttle_ticks=throttle,
        runaway_attainment=meanwhile,
        quiet_attainment=_quiet_attainment(record, first, last),
        timed_out=int(record.timed_out.sum()),
        errors=len(record.errors),
        has_runaway=bool(record.runaway),
        has_after=last < record.ticks,
        knob_value=record.knob_value,
        knob_edge=record.knob_edge,
    )
