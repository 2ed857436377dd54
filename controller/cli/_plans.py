"""The plans that exist, for the commands that put a tenant, key or override on a plan."""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from dataclasses import dataclass, field

import redis

from controller.cli._redis import Stores
from controller.contract.catalog import PlanInfo, unknown_plan_message
from controller.errors import ConfigurationError, PolicyError, SinkError
from controller.model import model_key
from controller.policy.loader import load_directory


@dataclass(frozen=True)
class KnownPlans:
    """Plan names and where they were read (said in every refusal)."""

    names: frozenset[str]
    source: str
    models: Mapping[str, tuple[str, ...]] = field(default_factory=dict)  # per plan; (): any

    def require(self, plan: str) -> str:
        """`plan`, or ConfigurationError (exit 2) naming the known plans and the closest."""
        if plan not in self.names:
            found = unknown_plan_message(plan, self.names, self.source)
            raise ConfigurationError(
                found + ("" if found.endswith("?") else ".")  # no "?." after a guess
                + " Gateways refuse a plan their catalog does not hold; add a `kind: Plan` "
                "document first, or pick a known plan"
            )  # fmt: skip
        return plan

    def require_model(self, model: str, plan: str | None, tenant: str | None = None) -> str:
        """`model`, or ConfigurationError (exit 2) when no plan in scope (`plan`, else every
        plan) may call it: a limit narrowed to it (`…@model`) would pin what no request meets.
        A plan that may call any model (or a catalog entry that cannot be read) accepts it.
        `tenant`: the limit is that tenant's, `plan` its plan (named in the refusal)."""
        scope = [plan] if plan is not None else sorted(self.names)
        lists = [self.models.get(name, ()) for name in scope]
        if not lists or not all(lists):
            return model
        known = sorted({m for found in lists for m in found})
        if model_key(model) in {model_key(m) for m in known}:
            return model  # limits are met without regard to case (model_key)
        close = difflib.get_close_matches(model, known, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        who = f"plan {plan!r} may not call" if plan is not None else "no plan may call"
        if tenant is not None:
            who = f"tenant {tenant!r} is on plan {plan!r}, which may not call"
        raise ConfigurationError(
            f"{who} model {model!r} (models in {self.source}: {', '.join(known)}){hint}: a "
            f"limit narrowed to @{model} would pin what no request meets; pick one of them"
        )


def _models(entries: Mapping[str, str]) -> dict[str, tuple[str, ...]]:
    """Each catalog entry's models; an entry that does not read is left out (any model: the
    gateways refuse that plan anyway, this check does not guess for them)."""
    found: dict[str, tuple[str, ...]] = {}
    for name, text in entries.items():
        try:
            found[name] = PlanInfo.from_json(text).models
        except ValueError:
            continue
    return found


def known_plans(s: Stores) -> KnownPlans:
    """The catalog the controller published to Redis: what every gateway enforces. Before its
    first publish (no controller has loaded the policies yet), the policy directory it is
    configured with (GOVERNOR_CONTROLLER__POLICY_DIR), which it will publish."""
    key = s.keys.catalog
    try:
        entries = s.client.hgetall(key)
    except redis.RedisError as exc:
        raise SinkError(f"reading the plan catalog {key} failed: {exc}") from exc
    if entries:
        source = f"the plan catalog the controller published ({key})"
        return KnownPlans(frozenset(entries), source, _models(entries))
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
        {name: tuple(plan.spec.models) for name, plan in policies.plans.items()},
    )


def registered_plan(s: Stores, tenant: str, anyway: str) -> tuple[str | None, str | None]:
    """`tenant`'s plan as the controller reads it (the registry, else its API keys'), and a
    warning when neither names it while other tenants are known: likely a typo, acting on a
    tenant nobody is. Not refused: a tenant may send traffic (a JWT's plan claim) before it
    is registered. `anyway`: what was done all the same (a sentence, said in the warning)."""
    plan = s.control.tenant_plan(tenant)  # one HGET: the usual case reads no more
    if plan is not None:
        return plan, None
    known = s.control.plans()
    if not known or tenant in known:
        return known.get(tenant) or None, None  # "": keys on several plans, none known
    close = difflib.get_close_matches(tenant, sorted(known), n=3)
    hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else "."
    return None, (
        f"warning: tenant {tenant!r} is not registered (no `governor tenants set`, no API "
        f"key names it){hint} {anyway}; register it with `governor tenants set {tenant} PLAN`"
    )
