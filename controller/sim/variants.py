"""The controllers compared in one run: the given policies and the baselines on the policy's own
knob (static sweep, AIMD), a gradient concurrency limiter and no limit (docs/simulator.md)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from controller.control.reload import Confirmations, PolicyWatcher, ReloadOutcome
from controller.errors import PolicyError
from controller.model import Address, LimitKind, Scope
from controller.policy.baselines import Baselines
from controller.policy.documents import AdaptiveLimit, DocumentFile, Limits, Plan
from controller.policy.policyset import PolicySet
from controller.sim.scenario import PlainAimd

POLICIES, STATIC, AIMD = "policies", "static", "plain-aimd"
GRADIENT, NO_LIMIT = "gradient", "no-limit"
SWEEP_POINTS = 6  # the static search's coarse grid, evenly over its range
# The static search's range, in shares of the pool's capacity in the knob's unit: set by the
# pool, not by the policy's bounds, so a hindsight value beyond them is found too.
SEARCH_RANGE = (0.1, 2.0)
SEARCH_RESOLUTION = 1.0  # in the knob's unit (1 req/s); token knobs: this share of capacity
# What a capacity in tokens/s is in each knob unit (requests: divided by the mean work).
_PER_SECOND = {LimitKind.REQUESTS_PER_SECOND: 1.0, LimitKind.REQUESTS_PER_MINUTE: 60.0}
_TOKENS_PER_SECOND = {LimitKind.TOKENS_PER_MINUTE: 60.0}


@dataclass(frozen=True)
class Knob:
    """The limit a policy set moves and how: what the AIMD and static baselines move too."""

    target: Address
    signal: str
    increase: float
    decrease_factor: float
    low: float
    high: float
    source: str  # "AdaptiveLimit/<name>", or the scenario's plain_aimd when there is none
    tolerance: float = 0.0  # the policy's dead band around the setpoint: one of its gains
    setpoint: float | None = None  # the policy's own; None: the scenario's target

    def search_range(
        self, capacity: float, mean_work: float, concurrency: float | None = None
    ) -> tuple[float, float, float]:
        """Where the static value is searched, and to what resolution: 0.1–2× the pool's
        `capacity` (tokens/s; `mean_work` tokens a request; `concurrency` requests it can
        hold at once) in the knob's unit; a knob of another unit keeps the policy's bounds."""
        kind = self.target.limit
        if kind is LimitKind.CONCURRENT_REQUESTS and concurrency is not None:
            return SEARCH_RANGE[0] * concurrency, SEARCH_RANGE[1] * concurrency, 1.0
        if kind in _PER_SECOND:
            full = capacity / mean_work * _PER_SECOND[kind]
            resolution = SEARCH_RESOLUTION * _PER_SECOND[kind]
        elif kind in _TOKENS_PER_SECOND:
            full = capacity * _TOKENS_PER_SECOND[kind]
            resolution = full / 100
        else:
            return self.low, self.high, max((self.high - self.low) / 100, 1e-9)
        return SEARCH_RANGE[0] * full, SEARCH_RANGE[1] * full, resolution

    def sweep(self, low: float, high: float, points: int = SWEEP_POINTS) -> list[float]:
        """The static search's coarse grid: evenly spaced over [low, high]."""
        return [float(v) for v in np.linspace(low, high, points)]


class FixedPolicies(PolicyWatcher):
    """A watcher over a policy set built in memory (it never changes)."""

    def __init__(self, policies: PolicySet) -> None:
        super().__init__(Path(f"<{policies.version}>"))
        self.current = policies

    def poll(self, confirmations: Confirmations | None = None) -> ReloadOutcome:
        return ReloadOutcome(changed=False)

    def load(self) -> PolicySet:
        assert self.current is not None
        return self.current


def static_limits(policies: PolicySet) -> PolicySet:
    """Only the Plans and the Limits document: every limit stays at its baseline."""
    kept = [d for d in policies.documents if isinstance(d, Plan | Limits)]
    return PolicySet.from_documents(kept, version=f"static-{policies.version}")


def plans_only(policies: PolicySet) -> PolicySet:
    """The Plans, and the Limits document without its gateway-wide (`global`) limits and
    their floors and ceilings: the gradient limiter is the only global limit, a peer of the
    policies rather than one capped by the Limits document's global rate."""
    static = static_limits(policies)
    spec = static.limits.spec

    def local(bounds: dict[Address, float]) -> dict[Address, float]:
        return {a: v for a, v in bounds.items() if a.scope is not Scope.GLOBAL}

    limits = static.limits.model_copy(
        update={"spec": spec.model_copy(update={
            "global_": {}, "floors": local(spec.floors), "ceilings": local(spec.ceilings),
        })}
    )  # fmt: skip
    kept = [d for d in static.documents if isinstance(d, Plan)]
    return PolicySet.from_documents([*kept, limits], version=f"plans-{policies.version}")


def policy_knob(policies: PolicySet, spec: PlainAimd) -> Knob:
    """The first AIMD AdaptiveLimit's target, signal, gains and bounds; without one, the
    scenario's `plain_aimd` (its bounds default to the Limits floor/ceiling, else 5%–100% of
    the baseline, its increase to 5% of the baseline)."""
    for adaptive in policies.adaptives:
        aimd = adaptive.spec.aimd
        if adaptive.spec.algorithm == "aimd" and aimd is not None:
            bounds = adaptive.spec.bounds
            return Knob(adaptive.spec.target, adaptive.spec.signal.query, aimd.increase,
                        aimd.decrease_factor, bounds.min, bounds.max,
                        f"AdaptiveLimit/{adaptive.metadata.name}", aimd.tolerance,
                        adaptive.spec.setpoint)  # fmt: skip
    base = static_limits(policies)
    baseline = Baselines(base, {}).value(spec.target)
    floors, ceilings = base.limits.spec.floors, base.limits.spec.ceilings
    if baseline is None and (spec.max is None or spec.increase is None):
        raise PolicyError(
            f"plain AIMD target {spec.target} has no baseline in the policies; set "
            "plain_aimd.max and plain_aimd.increase in the scenario, or pick another target"
        )
    reference = baseline if baseline is not None else float(spec.max or 1.0)
    high = spec.max or ceilings.get(spec.target) or reference
    low = spec.min if spec.min is not None else floors.get(spec.target, 0.05 * reference)
    return Knob(spec.target, spec.signal, spec.increase or 0.05 * reference,
                spec.decrease_factor, min(low, high), high, "scenario plain_aimd")  # fmt: skip


def plain_aimd(policies: PolicySet, knob: Knob, setpoint: float) -> PolicySet:
    """The static set plus one textbook AIMD on the knob with its gains, tolerance band and
    bounds: no stabilization, no step limits."""
    base = static_limits(policies)
    document = {
        "apiVersion": "governor/v1",
        "kind": "AdaptiveLimit",
        "metadata": {"name": "plain-aimd", "description": "textbook AIMD, for comparison"},
        "spec": {
            "target": str(knob.target),
            "signal": {"name": "utilization", "query": knob.signal, "stale_after": "60s"},
            "setpoint": setpoint,
            "algorithm": "aimd",
            "aimd": {
                "increase": knob.increase,
                "decrease_factor": knob.decrease_factor,
                "tolerance": knob.tolerance,
            },
            "bounds": {"min": knob.low, "max": knob.high},
            "behavior": {"tighten": {"stabilization": "0s"}, "loosen": {"stabilization": "0s"}},
        },
    }
    adaptive = DocumentFile(document=document).document
    assert isinstance(adaptive, AdaptiveLimit)
    return PolicySet.from_documents(
        [*base.documents, adaptive], version=f"plain-aimd-{policies.version}"
    )
