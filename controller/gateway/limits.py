"""The limits one request is checked against, resolved from the limit hashes and kept by the
contract's `<P>:version`: admit.lua takes them as arguments and checks only the version.

The resolution is the contract's lookup rule exactly as admit.lua applied it when it read
the hashes itself (docs/enforcement.md, "What one call checks"): per level, per limit kind,
the first of `limit@model` and `limit` that holds a number > 0 wins (the tenant level falls
back to the plan's hash); a 0 read anywhere on the way sheds; a request larger than a
`max_tokens_per_request`, `tokens_per_minute` or `tokens_per_day` value met before that is
`too_large` (it can never fit: no wait helps it).
"""

from __future__ import annotations

import functools
import math
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, cast

import redis
import redis.asyncio
from redis.exceptions import RedisClusterException

from controller.clients.redis import explained, is_cluster
from controller.clients.scripts import EnforcementError
from controller.contract.enforcement import EnforcementKeys
from controller.model import LimitKind, Scope, placement_problem, term_range, value_problem

__all__ = ["Check", "LimitCache", "Resolved", "read_limits", "resolve"]

KINDS = tuple(LimitKind)
# admit.lua's letter for each kind it checks (upper case: the model's own value).
LETTERS = {
    LimitKind.REQUESTS_PER_SECOND: "s",
    LimitKind.REQUESTS_PER_MINUTE: "m",
    LimitKind.TOKENS_PER_MINUTE: "t",
    LimitKind.TOKENS_PER_DAY: "d",
    LimitKind.CONCURRENT_REQUESTS: "c",
}
PERIOD_MS = {
    LimitKind.REQUESTS_PER_SECOND: 1000,
    LimitKind.REQUESTS_PER_MINUTE: 60000,
    LimitKind.TOKENS_PER_MINUTE: 60000,
}
_SIZED = (LimitKind.MAX_TOKENS_PER_REQUEST, LimitKind.TOKENS_PER_MINUTE, LimitKind.TOKENS_PER_DAY)


@dataclass(frozen=True, slots=True)
class Check:
    """One limit admit.lua checks: where it is written, its kind and its value."""

    address: str  # "tenant/acme/requests_per_minute@gpt-4" (a plan's value: the tenant's)
    kind: LimitKind
    text: str  # the value as stored: what admit.lua compares with its state's `l|`
    value: float


@dataclass(frozen=True)
class Resolved:
    """The checks of one (tenant, plan, user, ip or not, model), read under `version`."""

    version: str  # '' when the controller has written nothing yet
    letters: str  # admit.lua's ARGV 7: the checks' kinds by level, e.g. "s/m/mtd/m"
    checks: tuple[Check, ...]
    sized: tuple[tuple[float, str], ...]  # (value, address) met before `shed`, in order
    shed: str | None  # the first 0 read, if any

    @functools.cached_property
    def limits(self) -> tuple[str, ...]:
        """ARGV 7 and the checks' values, as admit.lua takes them."""
        return (self.letters, *(check.text for check in self.checks))

    def address(self, check: int, tenant: str) -> str | None:
        """What admit.lua's check number names: 0 none, -1 the tenant's credits."""
        if check < 0:
            return f"credits/{tenant}"
        return self.checks[check - 1].address if check > 0 else None

    def argv(
        self, request_id: str, tokens: int, settings: tuple[str, str, str], credits: tuple[str, ...]
    ) -> tuple[tuple[str | int, ...], tuple[str, ...], tuple[str, ...]]:
        """admit.lua's ARGV as (per request, repeated, per request): `settings` = lease ms,
        settle-record ms, model; `credits` = credits to hold and floor (micro-USD) or ()."""
        verdict = self.verdict(tokens)
        fixed = (self.version, *settings)
        if verdict is not None:
            return (request_id, tokens), (*fixed, verdict[0]), ()
        return (request_id, tokens), (*fixed, *self.limits), credits

    def fitted(self, tokens: int, least: int) -> int:
        """`tokens` lowered to the smallest size limit (never below `least`): what a request
        whose max_tokens the gateway chose may reserve."""
        room = min((value for value, _ in self.sized), default=float(tokens))
        return max(least, min(tokens, math.floor(room)))

    def verdict(self, tokens: int) -> tuple[str, str] | None:
        """too_large or shed when the limits alone decide (admit.lua then checks only the
        version), else None."""
        for value, address in self.sized:
            if tokens > value:
                return "too_large", address
        if self.shed is not None:
            return "shed", self.shed
        return None


# A decimal number, as the controller writes them and as Lua and Python read alike.
_DECIMAL = re.compile(r"\s*[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?\s*", re.ASCII)


def _number(text: str) -> float | None:
    """A stored value as a number; None unless it is a plain, finite decimal ≥ 0."""
    value = float(text) if _DECIMAL.fullmatch(text) else None
    return value if value is not None and 0 <= value < math.inf else None


def resolve(
    version: str,
    hashes: Sequence[tuple[str, Sequence[dict[str, str] | None]]],
    plan_owner: str,
    model: str,
) -> Resolved:
    """`hashes`: per level (global, ip, tenant, user), its owner ("tenant/acme/"; '' for an
    absent level) and its limit hashes in lookup order (the tenant's own, then its plan's,
    whose shed is reported under `plan_owner`)."""
    fields = _fields(model)
    found = _Found()
    for owner, level_hashes in hashes:
        shed = found.level(owner, level_hashes if owner else (), fields, plan_owner)
        if shed is not None:
            return Resolved(version, "", (), tuple(found.sized), shed)
    found.share(hashes[2][0])
    return Resolved(version, "/".join(found.letters), tuple(found.checks), tuple(found.sized), None)


def _fields(model: str) -> list[tuple[LimitKind, str, bool]]:
    """The hash fields looked up per kind, in order: `kind@model` (scoped) first, then `kind`."""
    fields: list[tuple[LimitKind, str, bool]] = []
    for kind in KINDS:
        if model:
            fields.append((kind, f"{kind}@{model}", True))
        fields.append((kind, str(kind), False))
    return fields


@dataclass(slots=True)
class _Found:
    """The limits found so far, level by level: per level the first value of a kind wins."""

    checks: list[Check] = field(default_factory=list)
    sized: list[tuple[float, str]] = field(default_factory=list)
    letters: list[str] = field(default_factory=list)
    headroom: Check | None = None  # global/concurrent_headroom
    weight: str = "1"  # the tenant's concurrent_weight (its own, else its plan's), as stored

    def level(
        self,
        owner: str,
        level_hashes: Sequence[dict[str, str] | None],
        fields: Sequence[tuple[LimitKind, str, bool]],
        plan_owner: str,
    ) -> str | None:
        """Take one level's limits; or the address of a value that sheds."""
        kinds: set[LimitKind] = set()
        letters = ""
        for position, values in enumerate(level_hashes):
            if not values:
                continue
            for kind, name, scoped in fields:
                text = values.get(name)
                if text is None:
                    continue
                value = _number(text)
                # A 0 sheds. So does a value Governor never writes (`abc`, -1, 1e400, a sharing
                # term out of its place or range): ignoring it served that traffic with no
                # limit at all until drift repair (fail closed).
                if value is None or value == 0 or _misplaced(owner, position, kind, value, scoped):
                    return (plan_owner if position == 1 else owner) + name
                if kind not in kinds:
                    kinds.add(kind)
                    letters += self._take(owner + name, kind, text, value, scoped)
        self.letters.append(letters)
        return None

    def _take(self, address: str, kind: LimitKind, text: str, value: float, scoped: bool) -> str:
        """Note a limit; admit.lua's letter for it ('' for a kind it does not check)."""
        # Sharing terms reach here only where they belong (global headroom, a tenant's or
        # its plan's weight, no `@model`): anywhere else they shed.
        if kind is LimitKind.CONCURRENT_HEADROOM:
            self.headroom = Check(address, kind, text, value)
        elif kind is LimitKind.CONCURRENT_WEIGHT:
            self.weight = text.strip()
        if kind in _SIZED:
            self.sized.append((value, address))
        letter = LETTERS.get(kind)
        if letter is None:
            return ""
        self.checks.append(Check(address, kind, text, value))
        return letter.upper() if scoped else letter

    def share(self, tenant_owner: str) -> None:
        """With a global headroom and global concurrent_requests, the f check after the
        global level's others: admit.lua shares that limit by weight (its value: headroom,
        the tenant's weight, the tenant)."""
        headroom = self.headroom
        if headroom is None or not tenant_owner or "c" not in self.letters[0]:
            return
        text = f"{headroom.text.strip()} {self.weight} {tenant_owner}"
        at = len(self.letters[0])  # after the global level's checks, a letter each
        self.checks.insert(at, Check(headroom.address, headroom.kind, text, headroom.value))
        self.letters[0] += "f"


def _misplaced(owner: str, position: int, kind: LimitKind, value: float, scoped: bool) -> bool:
    """A sharing term where Governor never writes one (another level, `@model`) or out of
    its range."""
    if term_range(kind) is None:
        return False
    scope = Scope.PLAN if position == 1 else Scope(owner.partition("/")[0])
    problem = placement_problem(scope, kind, "m" if scoped else None)
    return problem is not None or value_problem(kind, value) is not None


class _Transaction(Protocol):
    # types-redis leaves the asyncio pipeline's commands untyped.
    def get(self, name: str) -> Any: ...
    def hgetall(self, name: str) -> Any: ...


@dataclass(frozen=True, slots=True)
class _Request:
    tenant: str
    plan: str
    user: str
    has_ip: bool
    model: str

    def owners(self, keys: EnforcementKeys) -> list[tuple[str, tuple[str, ...]]]:
        """Per level (global, ip, tenant, user): its owner ('' absent) and limit hashes."""
        tenant = (
            keys.limits(Scope.TENANT, tenant=self.tenant),
            keys.limits(Scope.PLAN, plan=self.plan),
        )
        user = (keys.limits(Scope.USER, tenant=self.tenant, user=self.user),) if self.user else ()
        return [
            ("global/", (keys.limits(Scope.GLOBAL),)),
            ("ip/", (keys.limits(Scope.IP),)) if self.has_ip else ("", ()),
            (f"tenant/{self.tenant}/", tenant),
            (f"user/{self.tenant}/{self.user}/", user) if self.user else ("", ()),
        ]

    def queue(self, keys: EnforcementKeys, pipe: _Transaction) -> None:
        """The version and every hash, for one MULTI."""
        pipe.get(keys.schema.version)
        for _, names in self.owners(keys):
            for name in names:
                pipe.hgetall(name)

    def resolve(self, keys: EnforcementKeys, replies: Sequence[Any]) -> Resolved:
        read = iter(replies[1:])
        hashes = [
            (owner, [next(read) for _ in names] if owner else [None])
            for owner, names in self.owners(keys)
        ]
        return resolve(str(replies[0] or ""), hashes, f"plan/{self.plan}/", self.model)


def read_limits(
    client: redis.Redis[str],
    keys: EnforcementKeys,
    tenant: str,
    plan: str,
    user: str,
    has_ip: bool,
    model: str,
) -> Resolved:
    """One resolution read now, for a synchronous client (tests, tools)."""
    request = _Request(tenant, plan, user, has_ip, model)
    clustered = is_cluster(client)  # several slots: the version first, as LimitCache does
    before = client.get(keys.schema.version) if clustered else None
    pipe = client.pipeline(transaction=not clustered)
    request.queue(keys, cast(_Transaction, pipe))
    replies = list(pipe.execute())
    if clustered:
        replies[0] = before
    return request.resolve(keys, replies)


class LimitCache:
    """Resolutions kept until `<P>:version` moves, read with the version in one MULTI.

    Each is also read again after `max_age_seconds`: a version number can come back with
    other limits behind it when Redis loses writes (a failover, a restart without
    persistence) and the controller applies again; an idle gateway would not have seen the
    number change. The age bounds how long such a resolution could be used.
    """

    def __init__(
        self,
        client: redis.asyncio.Redis[str],
        keys: EnforcementKeys,
        max_entries: int = 65536,
        max_age_seconds: float = 60.0,
    ) -> None:
        self.client = client
        self.keys = keys
        self.max_entries = max_entries
        self.max_age_seconds = max_age_seconds
        self._version: str | None = None
        self._resolved: dict[tuple[str, str, str, bool, str], tuple[Resolved, float]] = {}

    async def get(self, tenant: str, plan: str, user: str, has_ip: bool, model: str) -> Resolved:
        """The request's resolution, read from Redis when none is kept (or it is too old)."""
        found = self._resolved.get((tenant, plan, user, has_ip, model))
        if found is None or time.monotonic() - found[1] > self.max_age_seconds:
            return await self._read(_Request(tenant, plan, user, has_ip, model))
        return found[0]

    def stale(self, version: str) -> None:
        """admit.lua answered 'stale': every resolution older than `version` goes."""
        if version != self._version:
            self._resolved.clear()
            self._version = None

    async def _replies(self, request: _Request) -> list[Any]:
        """The version and the hashes: in one MULTI; on a Cluster (several slots) the
        version first, then the hashes: limits read after their version are at least as
        new, and a change since makes admit.lua answer 'stale' (read again)."""
        clustered = is_cluster(self.client)
        before = await self.client.get(self.keys.schema.version) if clustered else None
        pipe = self.client.pipeline(transaction=not clustered)
        request.queue(self.keys, cast(_Transaction, pipe))
        replies = list(await pipe.execute())
        if clustered:
            replies[0] = before
        return replies

    async def _read(self, request: _Request) -> Resolved:
        try:
            resolved = request.resolve(self.keys, await self._replies(request))
        except (redis.RedisError, RedisClusterException) as exc:
            text = explained(exc, is_cluster(self.client))
            raise EnforcementError(f"reading the limits failed: {text}") from exc
        if not resolved.version:
            return resolved  # nothing written yet: kept would outlive the first write
        if resolved.version != self._version:
            self._resolved.clear()
            self._version = resolved.version
        elif len(self._resolved) >= self.max_entries:
            # The oldest entry goes (insertion order): past the bound, a gateway serving more
            # request shapes than it keeps re-reads the least recent, not everything.
            del self._resolved[next(iter(self._resolved))]
        key = (request.tenant, request.plan, request.user, request.has_ip, request.model)
        self._resolved[key] = (resolved, time.monotonic())
        return resolved
