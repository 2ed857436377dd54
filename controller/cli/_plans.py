"""The plans that exist, for the commands that put a tenant, key or override on a plan."""

from __future__ import annotations

from dataclasses import dataclass

import redis

from controller.cli._redis import Stores
from controller.contract.catalog import unknown_plan_message
from controller.errors import ConfigurationError, PolicyError, SinkError
from controller.policy.loader import load_directory


@dataclass(frozen=True)
class KnownPlans:
    """Plan names and where they were read (said in every refusal)."""

    names: frozenset[str]
    source: str

    def require(self, plan: str) -> str:
        """`plan`, or ConfigurationError (exit 2) naming the known plans and the closest."""
        if plan not in self.names:
            raise ConfigurationError(
                unknown_plan_message(plan, self.names, self.source)
                + ". Gateways refuse a plan their catalog does not hold; add a `kind: Plan` "
                "document first, or pick a known plan"
            )
        return plan


def known_plans(s: Stores) -> KnownPlans:
    """The catalog the controller published to Redis: what every gateway enforces. Before its
    first publish (no controller has loaded the policies yet), the policy directory it is
    configured with (GOVERNOR_CONTROLLER__POLICY_DIR), which it will publish."""
    key = s.keys.catalog
    try:
        names = s.client.hkeys(key)
    except redis.RedisError as exc:
        raise SinkError(f"reading the plan catalog {key} failed: {exc}") from exc
    if names:
        return KnownPlans(frozenset(names), f"the plan catalog the controller published ({key})")
    directory = s.settings.controller.policy_dir
    try:
        policies = load_directory(directory)
    except (PolicyError, OSError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ConfigurationError(
            f"no plan catalog in Redis ({key}) yet, and the policy directory {directory} does "
            f"not load ({first}); start the controller (governor run) or set "
            "GOVERNOR_CONTROLLER__POLICY_DIR to its policy directory"
        ) from None
    return KnownPlans(
        frozenset(policies.plans),
        f"the policy directory {directory} (no plan catalog in Redis {key} yet)",
    )
