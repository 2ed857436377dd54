"""How Governor's limits become Kong `rate-limiting` plugin instances: pure, no I/O.

Kong runs ONE instance of a plugin per request, the most specific one configured (consumer,
then consumer group, then global). So a consumer's instance must carry every per-tenant limit
of that tenant: its own values, and its plan's values for the fields it does not set itself.
The layout below computes, from the full desired state, which instance (owner) carries which
field, and from which Governor address the value comes.
"""

from __future__ import annotations

import enum
import math
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from controller.model import Address, LimitKind, Scope, validate_id
from controller.settings import KongSettings

PLUGIN = "rate-limiting"
# The limit kinds Kong's rate-limiting plugin counts, and the config field of each.
FIELDS: Mapping[LimitKind, str] = {
    LimitKind.REQUESTS_PER_SECOND: "second",
    LimitKind.REQUESTS_PER_MINUTE: "minute",
}
PERIODS = ("second", "minute", "hour", "day", "month", "year")
# The rate-limiting schema's default `protocols` (typedefs.protocols_http): the traffic its
# limits count. An instance whose protocols leave one out does not limit that traffic.
PROTOCOLS = ("grpc", "grpcs", "http", "https")
# Kong's rate-limiting refuses a request once a period's count has reached its limit
# (`remaining = limit - usage`, refused at <= 0), its schema wants every limit above 0 and a
# longer period's limit no lower than a shorter one's: a limit of 0 (shed everything) cannot
# be written as such, and the least it counts lets one request a period through. So an
# instance holding a 0 is written as shedding: each of its periods 1, and `year: 1` beside
# them. After one request its consumer (or the whole gateway, for the global instance) is
# refused until Governor lifts the 0, which writes its values back and removes `year`.
# Never the previous, higher values kept because Kong refused the 0: that served what the
# policy shed.
SHED_STAND_IN = 1
SHED_PERIOD = "year"
_NO_SHARING = (
    "Kong's rate-limiting plugin has no in-flight limit to share; Governor's "
    "governor-admission plugin enforces it on the Redis sink"
)
_UNSUPPORTED_KINDS: Mapping[LimitKind, str] = {
    LimitKind.TOKENS_PER_MINUTE: "token limits need Kong's AI Rate Limiting Advanced plugin "
    "(Enterprise), which Governor does not write; enforce them with Governor's gateway "
    "scripts on the Redis sink",
    LimitKind.TOKENS_PER_DAY: "token budgets need Kong's AI Rate Limiting Advanced plugin "
    "(Enterprise), which Governor does not write; enforce them with Governor's gateway "
    "scripts on the Redis sink",
    LimitKind.CONCURRENT_REQUESTS: "Kong's rate-limiting plugin counts requests per period, "
    "not requests in flight",
    LimitKind.MAX_TOKENS_PER_REQUEST: "Kong's rate-limiting plugin does not read request "
    "bodies; enforce max tokens with Governor's gateway scripts",
    LimitKind.CONCURRENT_HEADROOM: _NO_SHARING,
    LimitKind.CONCURRENT_WEIGHT: _NO_SHARING,
}


class OwnerKind(enum.StrEnum):
    """Which Kong entity an instance is scoped to."""

    GLOBAL = "global"  # no consumer (or the configured service)
    PLAN = "plan"  # a consumer group named like the plan
    TENANT = "tenant"  # the consumer whose custom_id (or username) is the tenant id


@dataclass(frozen=True, slots=True, order=True)
class Owner:
    """One plugin instance's scope: `global`, `plan/<plan>` or `tenant/<tenant>`."""

    kind: OwnerKind
    id: str | None = None

    def __str__(self) -> str:
        return self.kind.value if self.id is None else f"{self.kind.value}/{self.id}"

    @classmethod
    def parse(cls, text: str) -> Owner:
        """The inverse of str(); ValueError when `text` is not an owner with a safe id."""
        kind, _, ident = text.partition("/")
        owner = OwnerKind(kind)
        if owner is OwnerKind.GLOBAL:
            if ident:
                raise ValueError(f"owner {text!r}: global has no id")
            return cls(owner)
        return cls(owner, validate_id(ident, owner.value))


GLOBAL = Owner(OwnerKind.GLOBAL)
Slots = dict[str, tuple[Address, float]]  # config field → (the address it comes from, value)


def owner_of(address: Address) -> Owner:
    """The instance that holds a supported address's own value."""
    if address.scope is Scope.PLAN and address.plan is not None:
        return Owner(OwnerKind.PLAN, address.plan)
    if address.scope is Scope.TENANT and address.tenant is not None:
        return Owner(OwnerKind.TENANT, address.tenant)
    return GLOBAL


def unsupported_reason(address: Address, *, plans: bool) -> str | None:
    """Why Kong's rate-limiting plugin cannot enforce `address`; None when it can.

    `plans`: whether plan limits have somewhere to go (consumer groups or the registry).
    """
    if address.model is not None:
        return (
            "Kong's rate-limiting plugin cannot tell models apart (one instance per consumer); "
            "per-model limits need Governor's gateway scripts on the Redis sink"
        )
    if address.limit not in FIELDS:
        return _UNSUPPORTED_KINDS[address.limit]
    if address.scope is Scope.IP:
        return (
            "Kong allows one global rate-limiting instance and Governor's global limits use "
            "it; per-IP limits need Governor's gateway scripts on the Redis sink"
        )
    if address.scope is Scope.USER:
        return "Kong has no level below a consumer (tenant) to hold per-user limits"
    if address.scope is Scope.PLAN and not plans:
        return (
            "plan limits need consumer groups (Kong Enterprise) or the tenant registry "
            "(`governor tenants set`) to fold them into each tenant's consumer plugin"
        )
    return None


def layout(
    desired: Mapping[Address, float], registry: Mapping[str, str] | None, *, groups: bool
) -> dict[Owner, Slots]:
    """Which instance carries which field, from the full desired state. Pure.

    `desired` holds supported addresses only; `registry` maps tenant → plan (None: unknown);
    `groups`: plans have their own consumer-group instance. A tenant gets an instance when
    it has limits of its own, or (without groups) when its plan has limits.
    """
    out: dict[Owner, Slots] = defaultdict(dict)
    plans: dict[str, Slots] = defaultdict(dict)
    tenants: dict[str, Slots] = defaultdict(dict)
    for address, value in sorted(desired.items()):
        field = FIELDS[address.limit]
        owner = owner_of(address)
        if owner.kind is OwnerKind.GLOBAL:
            out[owner][field] = (address, value)
        elif owner.kind is OwnerKind.PLAN and owner.id is not None:
            plans[owner.id][field] = (address, value)
        elif owner.id is not None:
            tenants[owner.id][field] = (address, value)
    if groups:
        for plan, slots in plans.items():
            out[Owner(OwnerKind.PLAN, plan)] = dict(slots)
    members = _members(registry)
    candidates = set(tenants)
    if not groups:
        candidates |= {tenant for tenant, plan in members.items() if plan in plans}
    for tenant in sorted(candidates):
        slots = dict(plans.get(members.get(tenant, ""), {}))
        slots.update(tenants.get(tenant, {}))
        out[Owner(OwnerKind.TENANT, tenant)] = slots
    return dict(out)


def _members(registry: Mapping[str, str] | None) -> dict[str, str]:
    """The registry's safe entries (it is written through validated ids, but is data)."""
    members: dict[str, str] = {}
    for tenant, plan in (registry or {}).items():
        try:
            members[validate_id(tenant, "tenant")] = validate_id(plan, "plan")
        except ValueError:
            continue
    return members


def placed(instances: Iterable[Slots]) -> set[Address]:
    """Every address some instance carries."""
    return {address for slots in instances for address, _ in slots.values()}


def number(value: float) -> int | float:
    """A limit as Kong's `number` fields take it: integers without a fraction."""
    return int(value) if float(value).is_integer() else float(value)


def sheds(values: Iterable[float]) -> bool:
    """Whether an instance holding `values` is written as shedding (one of them is 0)."""
    return any(value == 0 for value in values)


def kong_value(value: float, shedding: bool) -> float:
    """What a limit is written as in its period's field: itself, or SHED_STAND_IN in an
    instance that sheds."""
    return SHED_STAND_IN if shedding else value


def plugin_config(
    settings: KongSettings, owner: Owner, slots: Slots, *, password: bool = True
) -> dict[str, Any]:
    """The `rate-limiting` config for one instance (Kong 3.6+ schema, `config.redis` record).

    Every period Governor does not set is null, so a hand-added period is removed.
    `password`: include `config.redis.password` (the Kubernetes sink patches it in from a
    Secret instead of writing it into an object).
    """
    config: dict[str, Any] = dict.fromkeys(PERIODS)
    shedding = sheds(value for _, value in slots.values())
    for field, (_, value) in slots.items():
        config[field] = number(kong_value(value, shedding))
    if shedding:
        config[SHED_PERIOD] = SHED_STAND_IN  # one request, then refused until lifted
    config.update(
        limit_by=settings.global_limit_by if owner.kind is OwnerKind.GLOBAL else settings.limit_by,
        policy=settings.policy,
        fault_tolerant=settings.fault_tolerant,
        hide_client_headers=settings.hide_client_headers,
    )
    if settings.policy == "redis":
        redis: dict[str, Any] = {
            "host": settings.redis_host,
            "port": settings.redis_port,
            "timeout": settings.redis_timeout_ms,
            "database": settings.redis_database,
            "username": settings.redis_username,
            "ssl": settings.redis_ssl,
            "ssl_verify": settings.redis_ssl_verify,
            "server_name": settings.redis_server_name,
        }
        if password and settings.redis_password is not None:
            redis["password"] = settings.redis_password.get_secret_value()
        config["redis"] = redis
    return config


def config_differences(target: Mapping[str, Any], actual: Mapping[str, Any]) -> list[str]:
    """The config keys (dotted) whose actual value is not the target's. Names only: a
    password is compared but never returned as a value."""
    differences: list[str] = []
    for key, wanted in target.items():
        found = actual.get(key)
        if isinstance(wanted, Mapping):
            nested = found if isinstance(found, Mapping) else {}
            differences += [f"{key}.{k}" for k in config_differences(wanted, nested)]
        elif not _equal(wanted, found):
            differences.append(key)
    return differences


def _equal(wanted: Any, found: Any) -> bool:
    if isinstance(wanted, bool) or isinstance(found, bool):
        return wanted is found
    if isinstance(wanted, int | float) and isinstance(found, int | float):
        return float(wanted) == float(found)
    return bool(wanted == found)


def field_value(config: Mapping[str, Any], field: str) -> float | None:
    """A period's value as stored: None when unset, NaN when it is not a number."""
    value = config.get(field)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        return math.nan
    return float(value) if math.isfinite(float(value)) else math.nan


def restored_protocols(protocols: Any) -> list[str] | None:
    """The `protocols` to write back when a hand edit left one of PROTOCOLS out (every one
    found is kept), else None: the instance counts all the traffic it should."""
    if not isinstance(protocols, list):
        return None  # unset: Kong's default, every one of PROTOCOLS
    found = [str(p) for p in protocols]
    missing = [p for p in PROTOCOLS if p not in found]
    return sorted({*found, *missing}) if missing else None
