"""What one simulated run leaves behind: per-tick series, per-tenant work, limits, events."""

from __future__ import annotations

from dataclasses import dataclass, field, fields

import numpy as np
import numpy.typing as npt

from controller.model import FloatArray
from controller.sim.traffic import SimTenant

# TTFT histogram bins: log-spaced from 1 ms to 10,000 s (3.5% wide): p99 read from it.
TTFT_EDGES: FloatArray = np.geomspace(1e-3, 1e4, 401)
OUTCOMES = (
    "allow",
    "rate_limited",
    "budget_exhausted",
    "shed",
    "too_large",
    "model_not_allowed",
    "unknown_plan",  # a plan the policy set does not define: refused, as the gateways do
)


@dataclass(frozen=True)
class Transition:
    tick: int
    policy: str
    key: str
    event: str


@dataclass(frozen=True)
class Change:
    tick: int
    address: str
    old: float | None
    new: float | None


@dataclass
class RunRecord:
    """Every tick of one run (one controller variant on one scenario)."""

    variant: str
    ticks: int
    tick_seconds: float
    tenants: list[SimTenant]
    capacity: float  # tokens/s, the whole fleet
    target: float  # utilization setpoint
    slo_seconds: float
    events: list[tuple[str, float, float]] = field(default_factory=list)  # kind, start, end
    runaway: list[int] = field(default_factory=list)  # tenant indices
    times: FloatArray = field(default_factory=lambda: np.empty(0))
    utilization: FloatArray = field(default_factory=lambda: np.empty(0))
    offered: FloatArray = field(default_factory=lambda: np.empty(0))  # tokens/s, everyone
    offered_good: FloatArray = field(default_factory=lambda: np.empty(0))  # well-behaved
    admitted: FloatArray = field(default_factory=lambda: np.empty(0))  # tokens/s
    goodput: FloatArray = field(default_factory=lambda: np.empty(0))  # well-behaved, in SLO
    oracle: FloatArray = field(default_factory=lambda: np.empty(0))
    timed_out: FloatArray = field(default_factory=lambda: np.empty(0))  # requests
    outcomes: dict[str, FloatArray] = field(default_factory=dict)  # requests per tick
    ttft: npt.NDArray[np.int64] = field(default_factory=lambda: np.empty((0, 0), np.int64))
    tenant_offered: FloatArray = field(default_factory=lambda: np.empty((0, 0)))  # tokens
    tenant_requests: FloatArray = field(default_factory=lambda: np.empty((0, 0)))  # eligible
    tenant_admitted: FloatArray = field(default_factory=lambda: np.empty((0, 0)))
    tenant_good: FloatArray = field(default_factory=lambda: np.empty((0, 0)))
    # Requests (not tokens) served within the SLO: the numerator of SLO attainment, whose
    # denominator is tenant_requests (refusals and timeouts are misses).
    tenant_good_requests: FloatArray = field(default_factory=lambda: np.empty((0, 0)))
    held_back: FloatArray = field(default_factory=lambda: np.empty(0))  # well-behaved 429/shed
    flap_times: list[float] = field(default_factory=list)  # seconds since start, every turn
    bursting: list[int] = field(default_factory=list)  # tenants with an event of their own
    knob_value: float | None = None  # a static sweep's value of the policy's knob
    knob_edge: bool = False  # that value sits on the edge of the range searched
    limits: dict[str, FloatArray] = field(default_factory=dict)  # in force after the tick
    baselines: dict[str, float] = field(default_factory=dict)
    signals: dict[str, FloatArray] = field(default_factory=dict)
    transitions: list[Transition] = field(default_factory=list)
    changes: list[Change] = field(default_factory=list)
    flaps: int = 0
    budget_overrun: float = 0.0
    errors: list[str] = field(default_factory=list)
    policy_names: list[str] = field(default_factory=list)  # the run's policies, for the plot

    @classmethod
    def empty(
        cls,
        variant: str,
        ticks: int,
        tick_seconds: float,
        tenants: list[SimTenant],
        capacity: float,
        target: float,
        slo_seconds: float,
    ) -> RunRecord:
        n = len(tenants)
        return cls(
            variant=variant,
            ticks=ticks,
            tick_seconds=tick_seconds,
            tenants=tenants,
            capacity=capacity,
            target=target,
            slo_seconds=slo_seconds,
            times=np.arange(ticks, dtype=np.float64) * tick_seconds,
            utilization=np.zeros(ticks),
            offered=np.zeros(ticks),
            offered_good=np.zeros(ticks),
            admitted=np.zeros(ticks),
            goodput=np.zeros(ticks),
            oracle=np.zeros(ticks),
            timed_out=np.zeros(ticks),
            outcomes={o: np.zeros(ticks) for o in OUTCOMES},
            ttft=np.zeros((ticks, len(TTFT_EDGES) - 1), dtype=np.int64),
            tenant_offered=np.zeros((ticks, n)),
            tenant_requests=np.zeros((ticks, n)),
            tenant_admitted=np.zeros((ticks, n)),
            tenant_good=np.zeros((ticks, n)),
            tenant_good_requests=np.zeros((ticks, n)),
            held_back=np.zeros(ticks),
        )

    def series(self, table: dict[str, FloatArray], name: str) -> FloatArray:
        """The per-tick array `name` of `table`, created NaN-filled on first use."""
        found = table.get(name)
        if found is None:
            found = table[name] = np.full(self.ticks, np.nan)
        return found


def differences(a: RunRecord, b: RunRecord) -> list[str]:
    """The fields in which two records differ (arrays compared exactly, NaN equal to NaN):
    how a shortcut or a faster path shows it records the same run."""
    differ = []
    for f in fields(RunRecord):
        x, y = getattr(a, f.name), getattr(b, f.name)
        if isinstance(x, np.ndarray):
            same = np.array_equal(x, y, equal_nan=True)
        elif isinstance(x, dict) and x and isinstance(next(iter(x.values())), np.ndarray):
            same = x.keys() == y.keys() and all(
                np.array_equal(x[k], y[k], equal_nan=True) for k in x
            )
        else:
            same = x == y or (x != x and y != y)
        if not same:
            differ.append(f.name)
    return differ


def p99(histogram: npt.NDArray[np.int64]) -> float:
    """The 99th percentile of a TTFT histogram (upper edge of the bin reaching 99%)."""
    total = int(histogram.sum())
    if total == 0:
        return float("nan")
    index = int(np.searchsorted(np.cumsum(histogram), 0.99 * total, side="left"))
    return float(TTFT_EDGES[index + 1])
