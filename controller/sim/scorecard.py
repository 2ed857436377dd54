"""The scorecard of one run against the no-overload baseline and the oracle (docs/simulator.md
defines every figure; docs/control-quality.md holds the goals and the results)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

from controller.sim.record import RunRecord, p99

UTILIZATION_MARGIN = 0.05
# Jain's index over tenants with at least this many requests in the window: a tenant that
# sent three requests has a served share of 0, 1/3, 2/3 or 1 by chance alone.
FAIRNESS_MIN_REQUESTS = 30


@dataclass(frozen=True)
class Goal:
    """One goal: the figure it reads, how it is met, and the goal as text."""

    figure: str
    text: str
    check: str  # "le" or "ge"
    bound: float

    def met(self, value: float | None) -> bool | None:
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return None if self.figure in ("throttle_after_for_ticks", "jain") else False
        return value <= self.bound if self.check == "le" else value >= self.bound


GOALS = (
    Goal("p99_increase", "p99 TTFT ≤ +15% over the no-overload baseline", "le", 0.15),
    Goal("utilization_within", "utilization ≤ target + 5% on ≥ 95% of ticks", "ge", 0.95),
    Goal("goodput_ratio", "goodput ≥ 90% of the oracle", "ge", 0.90),
    Goal("flaps_per_hour", "≤ 2 flaps per hour", "le", 2.0),
    Goal("settling_ticks", "settles within 3 ticks", "le", 3.0),
    Goal("throttle_after_for_ticks", "runaway throttled ≤ 2 ticks after its `for:`", "le", 2.0),
    Goal("jain", "Jain fairness among well-behaved tenants ≥ 0.95", "ge", 0.95),
    Goal("budget_overrun", "no token spent beyond a daily budget", "le", 0.0),
)


@dataclass(frozen=True)
class Scorecard:
    """Figures of one run over the scenario's disturbance window (the whole run if none)."""

    variant: str
    window: tuple[float, float]  # seconds since start
    p99_ttft: float  # seconds, over the window
    baseline_p99_ttft: float
    p99_increase: float  # p99 / baseline − 1
    utilization_mean: float
    utilization_within: float  # share of ticks with utilization ≤ target + 5%
    goodput_ratio: float  # Σ goodput / Σ oracle
    flaps_per_hour: float
    settling_ticks: int | None  # None: never settled within the window
    budget_overrun: float  # tokens
    jain: float | None  # None: fewer than two well-behaved tenants with traffic
    throttle_ticks: int | None  # runaway: event start → its limit below baseline
    throttle_after_for_ticks: int | None  # runaway: engaged → its limit below baseline
    timed_out: int
    errors: int
    has_runaway: bool = False

    def figures(self) -> dict[str, object]:
        return asdict(self)

    def verdicts(self) -> dict[str, bool | None]:
        """Each goal: met (True), missed (False), or not applicable (None)."""
        out: dict[str, bool | None] = {}
        for goal in GOALS:
            value = getattr(self, goal.figure)
            if goal.figure.startswith("throttle") and not self.has_runaway:
                out[goal.figure] = None
                continue
            out[goal.figure] = goal.met(None if value is None else float(value))
        return out


def window_ticks(record: RunRecord) -> tuple[int, int]:
    """The ticks of the disturbance: from the first event's start to the last one's end."""
    spans = [(a, b) for kind, a, b in record.events if kind != "signal_outage"]
    if not spans:
        return 0, record.ticks
    first = math.floor(min(a for a, _ in spans) / record.tick_seconds)
    last = math.ceil(max(b for _, b in spans) / record.tick_seconds)
    return first, min(last, record.ticks)


def settling(record: RunRecord, first: int, last: int) -> int | None:
    """Ticks from the window's start until utilization stays ≤ target + 5% to its end."""
    ok = record.utilization[first:last] <= record.target + UTILIZATION_MARGIN + 1e-12
    if ok.all():
        return 0
    bad = np.flatnonzero(~ok)
    settled = int(bad[-1]) + 1
    return settled if settled < last - first else None


def jain_index(values: np.ndarray) -> float | None:
    """(Σx)² / (n·Σx²); None with fewer than two values."""
    if len(values) < 2:
        return None
    squares = float((values**2).sum())
    return float(values.sum() ** 2 / (len(values) * squares)) if squares > 0 else None


def _fairness(record: RunRecord, first: int, last: int) -> float | None:
    offered = record.tenant_offered[first:last].sum(axis=0)
    requests = record.tenant_requests[first:last].sum(axis=0)
    good = record.tenant_good[first:last].sum(axis=0)
    chosen = [
        t.index
        for t in record.tenants
        if t.well_behaved
        and t.index not in record.runaway
        and requests[t.index] >= FAIRNESS_MIN_REQUESTS
    ]
    return jain_index(good[chosen] / offered[chosen]) if chosen else None


def _throttle(record: RunRecord) -> tuple[int | None, int | None]:
    """For the first runaway tenant: ticks until a limit of its own was below its baseline
    (or 0) from the event's start, and from the tick a policy engaged for it."""
    runaways = [(kind, a) for kind, a, _ in record.events if kind == "runaway"]
    if not record.runaway or not runaways:
        return None, None
    name = record.tenants[record.runaway[0]].name
    start = math.floor(runaways[0][1] / record.tick_seconds)
    prefix = f"tenant/{name}/"
    throttled: int | None = None
    for address, values in record.limits.items():
        if not address.startswith(prefix):
            continue
        base = record.baselines.get(address, math.nan)
        below = np.flatnonzero(
            (values[start:] == 0) | (np.isfinite(base) & (values[start:] < base))
        )
        if len(below):
            tick = start + int(below[0])
            throttled = tick if throttled is None else min(throttled, tick)
    engaged = [
        t.tick
        for t in record.transitions
        if t.key == name and t.event in ("engaged", "stale-engaged") and t.tick >= start
    ]
    if throttled is None:
        return None, None
    after = throttled - engaged[0] if engaged else None
    return throttled - start, after


def score(record: RunRecord, baseline: RunRecord) -> Scorecard:
    """The scorecard of `record`, its latency judged against `baseline` (the same world with
    no event) over the same window."""
    first, last = window_ticks(record)
    latency = p99(record.ttft[first:last].sum(axis=0))
    reference = p99(baseline.ttft[first:last].sum(axis=0))
    utilization = record.utilization[first:last]
    oracle = float(record.oracle[first:last].sum())
    throttle, after = _throttle(record)
    hours = record.ticks * record.tick_seconds / 3600.0
    card = Scorecard(
        variant=record.variant,
        window=(first * record.tick_seconds, last * record.tick_seconds),
        p99_ttft=latency,
        baseline_p99_ttft=reference,
        p99_increase=latency / reference - 1.0 if reference > 0 else math.nan,
        utilization_mean=float(utilization.mean()) if len(utilization) else math.nan,
        utilization_within=float((utilization <= record.target + UTILIZATION_MARGIN + 1e-12).mean())
        if len(utilization)
        else math.nan,
        goodput_ratio=float(record.goodput[first:last].sum()) / oracle if oracle else math.nan,
        flaps_per_hour=record.flaps / hours if hours else 0.0,
        settling_ticks=settling(record, first, last),
        budget_overrun=record.budget_overrun,
        jain=_fairness(record, first, last),
        throttle_ticks=throttle,
        throttle_after_for_ticks=after,
        timed_out=int(record.timed_out.sum()),
        errors=len(record.errors),
        has_runaway=bool(record.runaway),
    )
    return card
