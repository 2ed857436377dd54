"""One decision: the engine's proposals, the fair shares of the levels they leave in force,
then the resolver. Pure; the control loop, the policy tests and the backtest decide so."""

from __future__ import annotations

from collections.abc import Mapping

from controller.model import Address, Override, Snapshot
from controller.policy.baselines import Baselines
from controller.policy.engine import EngineState, Evaluation, evaluate, share
from controller.policy.policyset import PolicySet
from controller.policy.resolver import Resolution, ResolverState, applied, resolve


def decide(
    policies: PolicySet,
    snapshot: Snapshot,
    engine: EngineState,
    resolver: ResolverState,
    now: float,
    baselines: Baselines,
    overrides: Mapping[Address, Override],
    frozen: bool = False,
) -> tuple[Evaluation, Resolution]:
    """Evaluate every policy and resolve every limit for one tick."""
    # The limits in force matter to AdaptiveLimits and FairShares only: not built else.
    in_force = resolver.in_force() if policies.adaptives or policies.fair_shares else None
    evaluation = evaluate(policies, snapshot, engine, now, baselines, in_force)
    if policies.fair_shares:
        # A FairShare splits the level as this tick applies it: an AdaptiveLimit may move it
        # now, and an override, a floor or pacing may hold it elsewhere than proposed.
        levels = applied(
            policies,
            baselines,
            evaluation.proposals,
            overrides,
            resolver,
            now,
            {fair.spec.level for fair in policies.fair_shares},
            frozen,
        )
        evaluation = share(policies, evaluation, snapshot, now, baselines, levels, in_force or {})
    resolution = resolve(
        policies, baselines, evaluation.proposals, overrides, resolver, now, frozen=frozen
    )
    return evaluation, resolution
