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
        self._registry = registry
        spec = policies.limits.spec
        self._default_plan = spec.default_plan
        # Looked up once per tenant per tick (100k tenants): the documents' dicts, fetched once.
        self._global, self._ip = spec.global_, spec.ip
        self._plans = {name: plan.spec.limits for name, plan in policies.plans.items()}

    def plan_of(self, tenant: str) -> str:
        """A tenant's plan: the registry's, else the Limits document's default plan."""
        return self._registry.get(tenant, self._default_plan)

    def value(self, address: Address) -> float | None:
        """The baseline of an address, or None when nothing in the files limits it."""
        scope = address.scope
        if scope is Scope.TENANT:  # the most frequent by far
            plan = self._plans.get(self._registry.get(address.tenant or "", self._default_plan))
        elif scope is Scope.PLAN:
            plan = self._plans.get(str(address.plan))
        elif scope is Scope.GLOBAL:
            return self._global.get(address.limit)
        elif scope is Scope.IP:
            return self._ip.get(address.limit)
        else:  # user
            return None
        return None if plan is None else plan.get(address.limit)
