"""Baseline values: what an address is worth when no policy and no person says otherwise."""

from __future__ import annotations

from collections.abc import Mapping

from controller.model import Address, Scope
from controller.policy.policyset import PolicySet


class Baselines:
    """Looks up baselines from the Limits and Plan documents and the tenant registry.

    global/ip come from `kind: Limits`; plan/<p> from the plan; tenant/<t> inherits its plan's
    value; user/<t>/<u> has no baseline (unlimited unless a policy or a person sets one). An
    `@model` address inherits the value of the same address without the model.
    """

    def __init__(self, policies: PolicySet, registry: Mapping[str, str]) -> None:
        self._policies = policies
        self._registry = registry
        self._default_plan = policies.limits.spec.default_plan

    def plan_of(self, tenant: str) -> str:
        """The tenant's plan from the registry, else the Limits document's default_plan."""
        return self._registry.get(tenant, self._default_plan)

    def value(self, address: Address) -> float | None:
        """The baseline of an address, or None when nothing in the files limits it."""
        spec = self._policies.limits.spec
        if address.scope is Scope.GLOBAL:
            return spec.global_.get(address.limit)
        if address.scope is Scope.IP:
            return spec.ip.get(address.limit)
        if address.scope is Scope.USER:
            return None
        plan_name = (
            address.plan if address.scope is Scope.PLAN else self.plan_of(str(address.tenant))
        )
        plan = self._policies.plans.get(str(plan_name))
        return None if plan is None else plan.spec.limits.get(address.limit)
