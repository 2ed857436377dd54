"""FairShare: split a shared limit among the tenants by weight while it binds (water-filling).

Pure. Weighted max-min fairness (the allocation the Virtual Token Counter of "Fairness in
Serving Large Language Models", OSDI 2024, converges to): the level L in force is filled like
water, each tenant's share rising with its weight until it meets the tenant's demand; a tenant
whose demand is below its share keeps no limit from this policy (it is never refused because of
another tenant), the others are held to their shares, and the shares add up to L (less a
reserve for the others' swings, for concurrency) — for concurrency a tenant only once its
demand is beyond its share of L by more than its own swing, or while a hold in force still
finds it over that share. Stateless per sample: the same demands, L and limits in force give
the same shares, so a tick without a new sample repeats them instead of acting again.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from controller.model import (
    Address,
    AddressError,
    FloatArray,
    LimitKind,
    Proposal,
    Scope,
    SignalReading,
    Snapshot,
)
from controller.policy.baselines import Baselines
from controller.policy.documents import FairShare, FairShareSpec
from controller.policy.inputs import BoolArray, label_universe, vector_input
from controller.policy.policyset import FAIR_LABEL as LABEL
from controller.policy.targets import fill, filled
from controller.policy.text import fmt_number

# Limits that count things (requests in flight): a share is a whole number, at least one.
_WHOLE = frozenset({LimitKind.CONCURRENT_REQUESTS})


def water_fill(demands: FloatArray, weights: FloatArray, level: float) -> FloatArray:
    """Weighted max-min shares of `level`: share_i = min(demand_i, weight_i × λ), with the
    water level λ such that the shares add up to `level`; when the demands add up to no more
    than `level`, every share is its demand. Demands ≥ 0, weights > 0."""
    if len(demands) == 0 or float(demands.sum()) <= level:
        return demands.astype(np.float64, copy=True)
    ratio = demands / weights
    order = np.argsort(ratio, kind="stable")
    d, w, r = demands[order], weights[order], ratio[order]
    before = np.concatenate(([0.0], np.cumsum(d)[:-1]))  # the demands met below each
    from_here = np.cumsum(w[::-1])[::-1]  # the weight of each and those above it
    # With λ = r_k every demand below k is met and the rest get w × r_k: the total rises
    # with k, and the first k where it reaches the level holds the water line.
    totals = before + r * from_here
    k = min(int(np.searchsorted(totals, level, side="left")), len(d) - 1)
    water = max(level - before[k], 0.0) / from_here[k]
    shares: FloatArray = np.minimum(demands, weights * water)
    return shares


def whole_shares(shares: FloatArray, held: BoolArray, budget: float) -> FloatArray:
    """The shares of the tenants `held` (a mask) as whole numbers ≥ 1 adding up to the
    budget rounded down (largest remainders get the units left), the others unchanged."""
    out = shares.copy()
    if not held.any():
        return out
    part = shares[held]
    floors = np.floor(part)
    left = int(math.floor(budget + 1e-9) - floors.sum())
    if left > 0:
        # Stable, so equal remainders go to the earlier tenants (a deterministic tie-break).
        order = np.argsort(-(part - floors), kind="stable")[:left]
        floors[order] += 1.0
    out[held] = np.maximum(floors, 1.0)
    return out


@dataclass(frozen=True, slots=True)
class FairResult:
    proposals: tuple[Proposal, ...]
    engaged: bool  # contention: the demands reach engage_at × the level
    held: tuple[str, ...]  # the tenants held to their share
    notes: tuple[str, ...] = ()
    readings: tuple[SignalReading, ...] = ()


def evaluate_fair(
    policy: FairShare,
    snapshot: Snapshot,
    now: float,
    baselines: Baselines,
    level: float | None,
    in_force: Mapping[Address, float],
) -> FairResult:
    """One FairShare step: the level's value being applied this tick (`level`; None or inf:
    no limit there, nothing to split) split over the tenants' demands; a share within the
    tolerance of the tenant's limit in force (`in_force`) keeps that limit."""
    spec = policy.spec
    if level is None or not math.isfinite(level):
        return FairResult((), False, ())
    sample = snapshot.samples.get(spec.demand.key(LABEL))
    universe = label_universe([sample], [])
    demand = vector_input("demand", spec.demand, sample, universe, now)
    keep = demand.valid & (demand.values >= 0)
    positions = [
        i for i in np.flatnonzero(keep).tolist() if _takes_part(spec, universe[i], baselines)
    ]
    positions, addresses, ceilings = _addresses(policy, universe, positions, baselines)
    tenants = [universe[i] for i in positions]
    # A tenant's own limit (its plan's) caps what it can use: demand above it is not its share.
    wanted = np.minimum(demand.values[positions], ceilings)
    total = float(wanted.sum())
    readings = (
        SignalReading("demand", total, float(demand.timestamps[keep].max()) if keep.any() else now),
        SignalReading("level", level, now),
    )
    notes = (f"{policy.ref}: no valid demand sample",) if universe and not keep.any() else ()
    if not tenants or total < spec.engage_at * level:
        return FairResult((), False, (), notes, readings)
    plans = [baselines.plan_of(t) for t in tenants]
    weights = np.array([spec.weights.get(p, spec.default_weight) for p in plans])
    # Held now: a limit in force below the tenant's own (a hold not lifted yet).
    forced = np.array([in_force.get(a, math.inf) for a in addresses], dtype=np.float64)
    split = _Split(policy, level, wanted, weights, now, forced < ceilings)
    at = np.flatnonzero(split.held)
    current = np.array([in_force.get(addresses[i], math.nan) for i in at.tolist()])
    values, kept = hysteresis(split.shares[at], current, _bands(spec, current), split.budget)
    quotes = split.quotes(at)
    proposals = tuple(
        Proposal(
            addresses[i],
            float(values[k]),
            policy.ref,
            split.head,
            quotes,
            tail=split.kept if kept[k] else split.tail,
            at=k,
        )
        for k, i in enumerate(at.tolist())
    )
    return FairResult(proposals, True, tuple(tenants[i] for i in at.tolist()), notes, readings)


def hysteresis(
    shares: FloatArray, current: FloatArray, bands: FloatArray, budget: float
) -> tuple[FloatArray, BoolArray]:
    """The values to propose for the tenants held, and which of them keep their limit in
    force (`current`, NaN: none): a share within its band of the limit in force keeps it
    (a limit moved by every noisy sample turns up and down: a flap) — below its share
    always, above it only while the limits still add up to no more than `budget`, the
    smallest excesses first (a hold must not take another tenant's share)."""
    with np.errstate(invalid="ignore"):
        near = np.isfinite(current) & (np.abs(shares - current) <= bands) & (current != shares)
    lower = near & (current < shares)
    values = np.where(lower, current, shares)
    slack = budget - float(values.sum())
    higher = np.flatnonzero(near & (current > shares))
    excess = (current - shares)[higher]
    order = np.argsort(excess, kind="stable")
    accepted = higher[order][np.cumsum(excess[order]) <= slack + 1e-9]
    values[accepted] = current[accepted]
    kept = lower.copy()
    kept[accepted] = True
    return values, kept


def _bands(spec: FairShareSpec, current: FloatArray) -> FloatArray:
    """How far a new share may be from the limit in force (NaN: none) and keep it: the
    tolerance; for a count, at least one request and its swing (a count held to c swings by
    √c on its own: a smaller move of the share is the demands' noise, and every move of a
    cap that comes back is a flap)."""
    bands: FloatArray = spec.tolerance * current
    if spec.level.limit in _WHOLE:
        with np.errstate(invalid="ignore"):
            bands = np.maximum(bands, np.maximum(spec.swing * np.sqrt(current), 1.0))
    return bands


def _beyond_swing(
    spec: FairShareSpec, demands: FloatArray, level_shares: FloatArray, holding: BoolArray
) -> BoolArray:
    """Which tenants over their share may be held (a mask). For a count: those whose demand
    exceeds their share of the whole level by more than their swing (`spec.swing` standard
    deviations of a Poisson count: √ of that share), and those held already (`holding`) while
    they still ask more than that share. A demand within its swing of the share is the
    count's noise, not a surge: held there, a tenant is refused at its own cap on every
    upward swing while the others' downward swings leave the pool room (tenants alike lose
    the pool's multiplexing), and no one is protected. Held already, a dip of its noisy
    demand does not lift the cap only to set it again; asking no more than its share of the
    level, it would fit beside the others' averages. Other limits: every tenant over."""
    if spec.level.limit not in _WHOLE:
        return np.ones(len(demands), dtype=bool)
    above = demands - level_shares
    beyond: BoolArray = (above > spec.swing * np.sqrt(level_shares)) | (holding & (above > 0))
    return beyond


def _reserve(spec: FairShareSpec, met: FloatArray) -> float:
    """What is kept free for the tenants not held: their demand is an average, and a count
    in flight swings around it (as a Poisson count: its variance is its mean), so
    `spec.reserve` standard deviations of their total; only for counts (concurrency)."""
    if spec.level.limit not in _WHOLE or not spec.reserve:
        return 0.0
    return spec.reserve * math.sqrt(float(met.sum()))


def _takes_part(spec: FairShareSpec, tenant: str, baselines: Baselines) -> bool:
    """Every tenant shares a global level; a plan's level, only that plan's tenants."""
    return spec.level.scope is not Scope.PLAN or baselines.plan_of(tenant) == spec.level.plan


def _addresses(
    policy: FairShare, universe: tuple[str, ...], positions: list[int], baselines: Baselines
) -> tuple[list[int], list[Address], FloatArray]:
    """The positions of the tenants whose target address can be formed, each address and the
    tenant's own limit there (inf: none); a label value that cannot form an address is left
    out (no gateway could enforce it)."""
    known = filled(policy.spec.target, LABEL)
    kept: list[int] = []
    addresses: list[Address] = []
    ceilings: list[float] = []
    for i in positions:
        key = universe[i]
        try:
            address = known.get(key) or fill(known, policy.spec.target, LABEL, key)
        except AddressError:
            continue
        own = baselines.value(address)
        kept.append(i)
        addresses.append(address)
        ceilings.append(math.inf if own is None else own)
    return kept, addresses, np.array(ceilings, dtype=np.float64)


class _Split:
    """One split of the level: the shares, and the parts of the reasons every tenant held
    shares (its own figures are quoted only when its reason is read: tens of thousands of
    tenants may be held, and the journal reads the few whose limit changes)."""

    def __init__(
        self,
        policy: FairShare,
        level: float,
        demands: FloatArray,
        weights: FloatArray,
        now: float,
        holding: BoolArray,
    ) -> None:
        spec = policy.spec
        self.demands, self.weights, self.now = demands, weights, now
        shares = level_shares = water_fill(demands, weights, level)
        self.reserve = reserve = _reserve(spec, demands[demands <= shares])
        if reserve > 0:
            shares = water_fill(demands, weights, max(level - reserve, 0.0))
        over = demands > shares
        self.held = held = over & _beyond_swing(spec, demands, level_shares, holding)
        met = demands[~over]
        # What the tenants held may take together: their shares (those over their share by
        # less than their swing are not held, and theirs is not given to the others).
        self.budget = budget = float(shares[held].sum())
        self.exact = shares
        if spec.level.limit in _WHOLE:
            shares = whole_shares(shares, held, budget)
        self.shares = shares
        self.level_shares = level_shares
        self.head, self.tail, self.kept = _texts(
            spec, level, demands, float(weights[held].sum()), budget, reserve, met, over & ~held
        )

    def quotes(self, at: npt.NDArray[np.int64]) -> _Quoted:
        return _Quoted(
            self.demands[at], self.weights[at], self.exact[at], self.level_shares[at], self.now
        )


def _texts(
    spec: FairShareSpec,
    level: float,
    demands: FloatArray,
    weight: float,
    budget: float,
    reserve: float,
    met: FloatArray,
    unheld: BoolArray,
) -> tuple[str, str, str]:
    """The parts of the reasons every tenant held shares: the head (the level split), the
    tail (how the share is made, and why the tenant is held) and the tail of a limit kept
    within its band."""
    count = spec.level.limit in _WHOLE
    head = (
        f"{spec.level} = {fmt_number(level)} under contention (demands "
        f"{fmt_number(float(demands.sum()))}): held to its weighted max-min share"
    )
    tail = f"; share = {fmt_number(budget)} × weight / {fmt_number(weight)}"
    if len(met):
        tail += f" after the {len(met)} smaller demands ({fmt_number(float(met.sum()))}) are met"
        if reserve > 0:
            tail += f" and {fmt_number(reserve)} kept free for their swings"
    if unheld.any():
        tail += (
            f"; {int(unheld.sum())} over their share by no more than their swing "
            f"({fmt_number(float(demands[unheld].sum()))}) are not held"
        )
    if count:
        tail += (
            "; held: its demand exceeds share_of_level by more than its swing "
            f"({fmt_number(spec.swing)} × √share_of_level), or it is held already and still "
            "asks more than share_of_level"
        )
    band = f"±{fmt_number(spec.tolerance * 100)}%"
    if count:
        band += f" (at least 1 and {fmt_number(spec.swing)} × √ the limit)"
    return head, tail, f"{tail}; within {band} of the limit in force: hold"


class _Quoted:
    """The figures of each tenant held, quoted when its reason is read (`Quotes`)."""

    __slots__ = ("demands", "level_shares", "now", "shares", "weights")

    def __init__(
        self,
        demands: FloatArray,
        weights: FloatArray,
        shares: FloatArray,
        level_shares: FloatArray,
        now: float,
    ) -> None:
        self.demands, self.weights, self.shares, self.now = demands, weights, shares, now
        self.level_shares = level_shares

    def readings(self, at: int) -> tuple[SignalReading, ...]:
        now = self.now
        return (
            SignalReading("demand", float(self.demands[at]), now),
            SignalReading("weight", float(self.weights[at]), now),
            SignalReading("share", float(self.shares[at]), now),
            SignalReading("share_of_level", float(self.level_shares[at]), now),
        )
