"""When Redis is unreachable: fail closed (503), or fail open through a local limiter that
allows each gateway its share — the last known limit divided by the live gateway count.

The count comes from a heartbeat: every gateway scores itself into `<P>:gateways` (a sorted
set, score = expiry in Redis server time) every `heartbeat_seconds`, expiring after three
missed beats; the same call prunes the dead and returns how many are alive. During an outage
the last count is kept: gateways that died since make each share smaller (safe), gateways
started since make it larger by their number (bounded, and logged by their own failure).
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Literal

import redis.asyncio

from controller.contract.keys import KeySchema, parse_value
from controller.gateway.admission import AdmissionResult, Quota
from controller.model import Address, LimitKind, Scope

_PRESENCE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if ARGV[3] == '1' then
  redis.call('ZREM', KEYS[1], ARGV[1])
else
  redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])
end
return redis.call('ZCARD', KEYS[1])
"""
_MISSED_BEATS = 3
_MEMORY_SIZE = 100_000
_WINDOWS: dict[LimitKind, tuple[float, Literal["requests", "tokens"]]] = {
    LimitKind.REQUESTS_PER_SECOND: (1.0, "requests"),
    LimitKind.REQUESTS_PER_MINUTE: (60.0, "requests"),
    LimitKind.TOKENS_PER_MINUTE: (60.0, "tokens"),
}


class Presence:
    """This gateway's heartbeat and the live gateway count it returns."""

    def __init__(
        self, client: redis.asyncio.Redis[str], keys: KeySchema, gateway_id: str, beat: float
    ) -> None:
        self.client = client
        self.key = keys.gateways
        self.gateway_id = gateway_id
        self.beat = beat
        self.live = 1  # until the first beat answers: this gateway alone (the strictest share)
        self._script = client.register_script(_PRESENCE)

    async def heartbeat(self) -> int:
        """Announce this gateway, prune the dead, return (and keep) the live count."""
        ttl = self.beat * _MISSED_BEATS
        count = await self._script(keys=[self.key], args=[self.gateway_id, ttl, "0"])
        self.live = max(1, int(count))
        return self.live

    async def leave(self) -> None:
        """Take this gateway out of the count at a clean shutdown."""
        await self._script(keys=[self.key], args=[self.gateway_id, 0, "1"])


@dataclass(frozen=True, slots=True)
class Rate:
    """A rate limit as the local limiter needs it."""

    address: str
    limit: float
    window_seconds: float
    unit: Literal["requests", "tokens"]


@dataclass
class _Bucket:
    capacity: float
    level: float
    updated: float


@dataclass(frozen=True, slots=True)
class FailDecision:
    """What to do with one request while Redis is away."""

    outcome: Literal["open", "limited", "closed"]
    address: str | None = None  # the local rate that said no
    wait: float = 0.0


class LimitMemory:
    """The limits last seen: each tenant's tightest quotas from its last admission, and each
    plan's baseline rates read at the heartbeat (for tenants not seen yet)."""

    def __init__(self) -> None:
        self._tenants: OrderedDict[tuple[str, str | None], tuple[Rate, ...]] = OrderedDict()
        self._plans: dict[str, tuple[Rate, ...]] = {}
        self.plans_seen: set[str] = set()

    def remember(self, tenant: str, user: str | None, result: AdmissionResult) -> None:
        quotas: tuple[tuple[Quota | None, Literal["requests", "tokens"]], ...] = (
            (result.requests, "requests"),
            (result.tokens, "tokens"),
        )
        rates = tuple(_rate(q, unit) for q, unit in quotas if q is not None)
        if rates:
            self._tenants[(tenant, user)] = rates
            self._tenants.move_to_end((tenant, user))
            while len(self._tenants) > _MEMORY_SIZE:
                self._tenants.popitem(last=False)

    def set_plan(self, plan: str, values: Mapping[str, float]) -> None:
        """A plan's baseline rates (field → value, as in its limit hash)."""
        rates = []
        for kind, (window, unit) in _WINDOWS.items():
            value = values.get(kind.value, math.nan)
            if math.isfinite(value):
                address = str(Address(Scope.PLAN, kind, plan=plan))
                rates.append(Rate(address, value, window, unit))
        self._plans[plan] = tuple(rates)

    def rates(self, tenant: str, user: str | None, plan: str) -> tuple[Rate, ...]:
        """The rates to hold this caller to; () when none is known (then: fail closed)."""
        return self._tenants.get((tenant, user)) or self._plans.get(plan, ())


def _rate(quota: Quota, unit: Literal["requests", "tokens"]) -> Rate:
    return Rate(quota.address, quota.limit, quota.window_seconds, unit)


class LocalLimiter:
    """Token buckets in this process: each rate's limit ÷ live gateways per window."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._buckets: OrderedDict[tuple[str, str, str | None], _Bucket] = OrderedDict()

    def take(
        self, tenant: str, user: str | None, rates: Iterable[Rate], tokens: int, gateways: int
    ) -> FailDecision:
        """Admit one request of `tokens` worst-case tokens if every rate's share allows it."""
        now = self._clock()
        wanted: list[tuple[_Bucket, float, Rate]] = []
        for rate in rates:
            cost = float(tokens) if rate.unit == "tokens" else 1.0
            bucket = self._bucket((rate.address, tenant, user), rate, gateways, now)
            if bucket.level < cost:
                refill = bucket.capacity / rate.window_seconds
                wait = (cost - bucket.level) / refill if refill > 0 else rate.window_seconds
                return FailDecision("limited", rate.address, wait)
            wanted.append((bucket, cost, rate))
        for bucket, cost, _ in wanted:
            bucket.level -= cost
        return FailDecision("open")

    def _bucket(
        self, key: tuple[str, str, str | None], rate: Rate, gateways: int, now: float
    ) -> _Bucket:
        capacity = rate.limit / max(1, gateways)
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = self._buckets[key] = _Bucket(capacity, capacity, now)
        else:
            refill = bucket.capacity / rate.window_seconds * (now - bucket.updated)
            bucket.capacity = capacity  # the share follows the live count
            bucket.level = min(capacity, bucket.level + refill)
            bucket.updated = now
        self._buckets.move_to_end(key)
        while len(self._buckets) > _MEMORY_SIZE:
            self._buckets.popitem(last=False)
        return bucket


class FailMode:
    """Decides for a request that could not reach Redis, by its plan's declared fail mode."""

    def __init__(self, presence: Presence | None, memory: LimitMemory, limiter: LocalLimiter):
        self.presence = presence
        self.memory = memory
        self.limiter = limiter

    def decide(
        self, tenant: str, user: str | None, plan: str, mode: str | None, tokens: int
    ) -> FailDecision:
        if mode != "open":
            return FailDecision("closed")
        rates = self.memory.rates(tenant, user, plan)
        if not rates:
            return FailDecision("closed")  # no limit known: never "unlimited"
        gateways = self.presence.live if self.presence is not None else 1
        return self.limiter.take(tenant, user, rates, tokens, gateways)

    async def refresh_plans(self, client: redis.asyncio.Redis[str], keys: KeySchema) -> None:
        """Read the baseline rates of every plan seen so far (one round trip)."""
        plans = sorted(self.memory.plans_seen)
        if not plans:
            return
        pipe = client.pipeline(transaction=False)
        for plan in plans:
            pipe.hgetall(keys.owner(Address(Scope.PLAN, LimitKind.REQUESTS_PER_MINUTE, plan=plan)))
        for plan, fields in zip(plans, await pipe.execute(), strict=True):
            self.memory.set_plan(plan, {k: parse_value(v) for k, v in fields.items()})
