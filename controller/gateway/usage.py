"""A tenant's usage against each limit in force for it (`governor usage`): the limits resolved
by the gateway's own lookup rule (`limits.read_limits`), their state read from the level
hashes admit.lua keeps (docs/enforcement.md), at Redis's time."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import redis

from controller.clients.redis import is_cluster, not_governors
from controller.contract.enforcement import EnforcementKeys
from controller.errors import SinkError
from controller.gateway.limits import PERIOD_MS, Check, Resolved, read_limits
from controller.model import Address, LimitKind, Scope, model_key, weight_in_flight

_DAY_MS = 86_400_000
_SHARE = LimitKind.CONCURRENT_HEADROOM  # the gateway's f check: how the limit below is shared
_SHARED = "global/concurrent_requests"
_WINDOWS = {
    LimitKind.REQUESTS_PER_SECOND: "second",
    LimitKind.REQUESTS_PER_MINUTE: "minute",
    LimitKind.TOKENS_PER_MINUTE: "minute",
    LimitKind.TOKENS_PER_DAY: "UTC day",
    LimitKind.CONCURRENT_REQUESTS: "in flight",
    LimitKind.MAX_TOKENS_PER_REQUEST: "per request",
}


@dataclass(frozen=True)
class LimitUsage:
    """One limit: what it allows, what is used of it now, what remains, when it is full."""

    address: str  # where its value is written (a plan's value under the tenant's address)
    kind: LimitKind
    window: str
    limit: float
    used: float | None  # None: nothing is counted (max_tokens_per_request)
    held: float  # tokens held by requests in flight (daily budgets), else 0
    remaining: float | None
    resets_in: float | None  # seconds until fully available again; None: when a slot frees


@dataclass(frozen=True)
class TenantUsage:
    """Everything `governor usage` shows for one tenant."""

    tenant: str
    plan: str
    user: str | None
    model: str | None
    version: str  # the limits' version ('' : the controller has written none yet)
    shed: str | None  # a limit at 0: the controller sheds this traffic
    limits: tuple[LimitUsage, ...]
    # State fields that hold what no script writes: admission refuses 503 #corrupt-state.
    damaged: tuple[str, ...] = ()


def gcra(check: Check, tat: float, stored_limit: str | None, now: float) -> LimitUsage:
    """A rate's state as admit.lua reads it: the backlog before now, in requests or tokens."""
    period = PERIOD_MS[check.kind]
    interval = period / check.value
    backlog = max(0.0, tat - now)
    old = _float(stored_limit)
    if backlog and old and stored_limit != check.text:  # built under another limit: rescaled
        backlog = min(backlog / (period / old) * interval, period)
    left = math.floor((period - backlog) / interval + 1e-9)
    used = backlog / interval
    return LimitUsage(check.address, check.kind, _WINDOWS[check.kind], check.value,
                      used, 0.0, max(0, left), backlog / 1000)  # fmt: skip


def budget(check: Check, values: Sequence[str | None], now: float) -> LimitUsage:
    """A daily budget from (day, settled, held): settled today (0 once the UTC day changed)
    and held by requests in flight."""
    day, settled, held = values
    today = math.floor(now / _DAY_MS)
    used = (_float(settled) or 0.0) if _float(day) == today else 0.0
    holding = _float(held) or 0.0
    resets = ((today + 1) * _DAY_MS - now) / 1000
    return LimitUsage(check.address, check.kind, _WINDOWS[check.kind], check.value, used,
                      holding, max(0.0, check.value - used - holding), resets)  # fmt: skip


def concurrency(check: Check, open_now: str | None) -> LimitUsage:
    used = _float(open_now) or 0.0
    return LimitUsage(check.address, check.kind, _WINDOWS[check.kind], check.value, used, 0.0,
                      max(0.0, check.value - used), None)  # fmt: skip


def share(check: Check, resolved: Resolved, values: Sequence[str | None]) -> LimitUsage:
    """The tenant's share of global/concurrent_requests as admit.lua's f check sees it now:
    the limit × its weight ÷ the weight in flight (its own included), and its requests in
    flight there; beyond it, it meets the limit where the others may take the headroom."""
    weight = float(check.text.split()[1])
    limit = next(c.value for c in resolved.checks if c.address == _SHARED)
    mine = _float(values[0]) or 0.0
    joined = (_float(values[2]) or weight) if mine > 0 else None
    total = weight_in_flight(weight, _float(values[1]) or 0.0, joined)
    allowed = limit * weight / total
    address = f"{_SHARED}: its share (weight {weight:g} of {total:g} in flight)"
    return LimitUsage(address, LimitKind.CONCURRENT_WEIGHT, _WINDOWS[LimitKind.CONCURRENT_REQUESTS],
                      allowed, mine, 0.0, max(0.0, allowed - mine), None)  # fmt: skip


def _float(text: str | None) -> float | None:
    try:
        return float(text) if text is not None else None
    except ValueError:
        return None


def _fields(check: Check) -> tuple[str, ...]:
    """The state fields admit.lua keeps for one check (docs/enforcement.md)."""
    if check.kind is _SHARE:  # its requests in flight there, the weight in flight, its own
        owner = check.text.split()[2]
        return (f"o|{owner}", "a", f"q|{owner}")
    body, at, model = check.address.partition("@")  # a model may hold a `/` (org/name)
    name = body.rsplit("/", 1)[1] + at + model  # e.g. "tokens_per_day@gpt-4"
    if check.kind is LimitKind.TOKENS_PER_DAY:
        return (f"d|{name}", f"u|{name}", f"v|{name}")
    if check.kind is LimitKind.CONCURRENT_REQUESTS:
        return (f"c|{name}",)
    return (f"g|{name}", f"l|{name}")


def _state_key(keys: EnforcementKeys, check: Check) -> str:
    address = Address.parse(check.address)
    if address.scope is Scope.GLOBAL:
        return keys.global_level().state
    if address.scope is Scope.USER and address.tenant and address.user:
        return keys.user_level(address.tenant, address.user).state
    return keys.tenant_level(address.tenant or "").state


def usage_of(check: Check, values: Sequence[str | None], now: float) -> LimitUsage:
    """One check's usage from its state fields (`_fields` order) at Redis time `now` (ms)."""
    if check.kind is LimitKind.TOKENS_PER_DAY:
        return budget(check, values, now)
    if check.kind is LimitKind.CONCURRENT_REQUESTS:
        return concurrency(check, values[0])
    return gcra(check, _float(values[0]) or 0.0, values[1], now)


def _size_limits(resolved: Resolved) -> list[LimitUsage]:
    """`max_tokens_per_request`: a size, nothing counted."""
    found = []
    for value, address in resolved.sized:
        kind = LimitKind(address.partition("@")[0].rsplit("/", 1)[1])
        if kind is LimitKind.MAX_TOKENS_PER_REQUEST:
            found.append(LimitUsage(address, kind, _WINDOWS[kind], value, None, 0.0, None, None))
    return found


def read_usage(
    client: redis.Redis[str],
    keys: EnforcementKeys,
    tenant: str,
    plan: str,
    user: str | None = None,
    model: str | None = None,
) -> TenantUsage:
    """Every limit a request of `tenant` (on `plan`, as `user`, for `model`) is checked
    against, except the per-client-address ones, with its state now. Raises SinkError."""
    try:
        resolved = read_limits(
            client, keys, tenant, plan, user or "", False, model_key(model or "")
        )
        checks = [c for c in resolved.checks if c.kind in _WINDOWS or c.kind is _SHARE]
        read = [(_state_key(keys, c), _fields(c)) for c in checks]  # where each check's state is
        # One instant on one Redis; on a Cluster each slot's read is its own (and TIME, a
        # node's clock, cannot be pipelined there).
        clustered = is_cluster(client)
        pipe = client.pipeline(transaction=not clustered)
        if not clustered:
            pipe.time()
        for key, fields in read:
            pipe.hmget(key, list(fields))
        replies = pipe.execute()
        if clustered:
            replies = [client.time(), *replies]
    except redis.RedisError as exc:
        raise SinkError(f"reading the usage of tenant {tenant!r} failed: {exc}") from exc
    seconds, micros = replies[0]
    now = seconds * 1000 + micros / 1000
    limits = [
        share(c, resolved, v) if c.kind is _SHARE else usage_of(c, v, now)
        for c, v in zip(checks, replies[1:], strict=True)
    ]
    damaged = [
        problem
        for (key, fields), v in zip(read, replies[1:], strict=True)
        for problem in _damage(key, fields, v)
    ]
    return TenantUsage(tenant, plan, user, model, resolved.version, resolved.shed,
                       tuple(limits + _size_limits(resolved)), tuple(damaged))  # fmt: skip


def _damage(key: str, fields: Sequence[str], values: Sequence[str | None]) -> list[str]:
    """The fields read that admit.lua would refuse (not a finite number; a settled count
    below 0): shown, not read as 0, so `governor usage` explains a 503 #corrupt-state."""
    found = []
    for field, text in zip(fields, values, strict=True):
        value = _float(text) if text is not None else 0.0
        settled = field.startswith("u|")
        if value is None or not math.isfinite(value) or (settled and value < 0):
            found.append(not_governors(f"{key} field {field}", text or "", _REFUSED, _REPAIR))
    return found


_REFUSED = "admission refuses this tenant 503 #corrupt-state until it is repaired"
_REPAIR = "the gateway's answer names the redis-cli command that repairs it (docs/enforcement.md)"


def usage_json(usage: TenantUsage) -> Mapping[str, object]:
    """The --json shape: numbers as numbers, a GCRA's used count rounded up to whole units."""
    return {
        "tenant": usage.tenant,
        "plan": usage.plan,
        "user": usage.user,
        "model": usage.model,
        "limits_version": usage.version or None,
        "shed_by": usage.shed,
        "damaged": list(usage.damaged),
        "limits": [
            {
                "address": item.address,
                "kind": str(item.kind),
                "window": item.window,
                "limit": item.limit,
                "used": None if item.used is None else whole(item.used),
                "held": item.held,
                "remaining": item.remaining,
                "resets_in_seconds": item.resets_in,
            }
            for item in usage.limits
        ],
    }


def whole(value: float) -> float:
    # A GCRA backlog decays continuously: 2.9997 requests still in the window is 3.
    return float(math.ceil(value - 1e-6))
