"""Admission: one EVALSHA per request checks every level and reserves its worst-case tokens.

`admit` answers allow / rate_limited (429) / budget_exhausted (402) / shed (503) /
too_large (400: the request can never fit a per-request or per-minute token limit) /
corrupt_state (503: a counter in Redis holds what no script writes; admit.lua names it) /
unknown_plan (403: the plan is not in the catalog) / not_configured (503: the controller has
written no limits yet) — the last two without running the script: nothing is reserved;
`settle` charges what the request really used, `release` refunds a request that failed.
The algorithm and the keys are described in docs/enforcement.md.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any, Literal, cast

import redis.asyncio

from controller.clients.redis import key_schema, not_governors, unanswered
from controller.clients.scripts import ADMIT, CHARGE, SETTLE, EnforcementError, load_scripts
from controller.contract.catalog import PlanInfo
from controller.contract.enforcement import EnforcementKeys, ip_id
from controller.gateway.background import ENDED, BackgroundCharge
from controller.gateway.background import REASON as BACKGROUND_REASON
from controller.gateway.catalog import PlanCatalog
from controller.gateway.limits import PERIOD_MS, LimitCache, Resolved
from controller.gateway.openai import EarlierKind
from controller.gateway.prices import PriceTable, to_micro
from controller.gateway.sharded import SlotAdmission
from controller.model import Address, LimitKind, Scope, model_key, validate_id

__all__ = [
    "Admission",
    "AdmissionRequest",
    "AdmissionResult",
    "Budget",
    "Degradation",
    "EnforcementError",
    "Outcome",
    "Quota",
    "TokensUsed",
    "UnansweredAdmissionError",
]

Outcome = Literal[
    "allow",
    "rate_limited",
    "budget_exhausted",
    "shed",
    "too_large",
    "corrupt_state",
    "unknown_plan",
    "not_configured",
]
# What admit.lua answers (the others are decided before it runs).
_OUTCOMES: frozenset[str] = frozenset(
    ("allow", "rate_limited", "budget_exhausted", "shed", "too_large")
)
# A 'stale' answer (the limits changed since they were read) reads them again; a limit
# written between that read and the next call is rare, three in a row is Redis misbehaving.
_ATTEMPTS = 3
# A conversation's record grows by ARGV[1] tokens and lives ARGV[2] ms more, if it is there
# (governor.gateway's GROW_RECORD, word for word): a record that expired meanwhile is not made
# again holding only the items added, under what the conversation holds.
GROW_RECORD = (
    "if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end "
    "redis.call('INCRBY', KEYS[1], ARGV[1]) "
    "redis.call('PEXPIRE', KEYS[1], ARGV[2]) "
    "return 1"
)
_FAIL_OPEN = "served fail-open while Redis was away"  # the history entry's reason
# charge.lua's KEYS index of each level's state.
_LEVEL_INDEX = {Scope.GLOBAL: 1, Scope.IP: 2, Scope.TENANT: 3, Scope.PLAN: 3, Scope.USER: 4}


class UnansweredAdmissionError(EnforcementError):
    """admit.lua went out and no answer came back (a timeout, a cut connection): Redis may
    have run it all the same — a stalled server runs what it had read once it wakes — and then
    holds the request's tokens, slot and credits until `reservation` is released."""

    def __init__(self, message: str, reservation: str) -> None:
        super().__init__(message)
        self.reservation = reservation


@dataclass(frozen=True)
class TokensUsed:
    """What one request used, in tokens."""

    prompt: int
    completion: int

    @property
    def total(self) -> int:
        return self.prompt + self.completion


@dataclass(frozen=True)
class AdmissionRequest:
    """One request as admission sees it; ids must be valid (controller.model.validate_id)."""

    tenant: str
    plan: str
    user: str | None
    ip: str | None  # the client address; the ip level keys its state by it (IPv6: by /64)
    model: str | None
    tokens: int  # worst case to reserve: prompt estimate + max_tokens
    request_id: str  # unique; the reservation's id (letters, digits, ._:+=~-)
    # Set when max_tokens was the gateway's default, not the client's: the reservation may
    # then be lowered to what the limits and the budget hold, down to this (prompt + 1 each).
    least_tokens: int | None = None


@dataclass(frozen=True)
class Quota:
    """One rate limit's state after this decision, for the response headers."""

    address: str  # e.g. "tenant/acme/requests_per_minute"
    limit: float
    remaining: float
    reset_seconds: float  # until the quota is fully available again
    window_seconds: float


@dataclass(frozen=True)
class Budget:
    """A budget's state: a daily token budget, or a tenant's credit balance."""

    address: str  # "tenant/acme/tokens_per_day[@model]" or "credits/acme"
    kind: Literal["tokens", "credits"]
    limit: float | None  # None for credits (a balance, not a limit)
    remaining: float  # tokens, or USD spendable (balance minus open holds)
    resets_at: float | None  # unix seconds (the next UTC midnight); None for credits


@dataclass(frozen=True)
class Degradation:
    """Allowed, but a budget is nearly spent: what the gateway should change, and why."""

    max_tokens: int | None
    model: str | None
    reason: str


@dataclass(frozen=True)
class AdmissionResult:
    """The decision and every state the gateway needs for its answer and headers."""

    outcome: Outcome
    denied_by: str | None  # the address that said no
    retry_after: float | None  # seconds: 429 (before jitter), 402 tokens (until reset)
    requests: Quota | None  # the tightest request-rate quota
    tokens: Quota | None  # the tightest token-rate quota
    budget: Budget | None  # the tightest budget (the one that said no, if one did)
    reservation: str | None  # set when allowed: pass to settle() or release()
    degrade: Degradation | None  # allowed, but a budget is past the plan's degrade.at_percent
    reserved: int | None = None  # allowed: the tokens held (below `tokens` when lowered)
    damage: str | None = None  # corrupt_state: the key and field, what it holds, its repair


class Admission:
    """The Python side of admit.lua and settle.lua, for one Redis and key prefix."""

    def __init__(
        self,
        client: redis.asyncio.Redis[str],
        prefix: str,
        prices: PriceTable,
        catalog: PlanCatalog,
        *,
        lease_seconds: float = 600.0,
        record_grace_seconds: float = 3600.0,
        history_length: int = 10_000,
    ) -> None:
        """`lease_seconds`: a reservation not settled by then is released (a crashed gateway
        leaks nothing); keep it above the longest streamed response. A settle arriving up to
        `record_grace_seconds` after the lease still charges the actual usage."""
        if lease_seconds <= 0 or record_grace_seconds < 0:
            raise ValueError("lease_seconds must be > 0 and record_grace_seconds >= 0")
        self.client = client
        self.keys = EnforcementKeys(key_schema(client, prefix))
        self.limits = LimitCache(client, self.keys)
        # A Redis Cluster: one call per slot (contract 2) instead of one call.
        self.slots = SlotAdmission(client, self.keys) if self.keys.schema.sharded else None
        self.prices = prices
        self.catalog = catalog
        self.lease_seconds = lease_seconds
        self._lease_ms = str(round(lease_seconds * 1000))
        self._record_ms = str(round(record_grace_seconds * 1000))
        self._history_length = str(history_length)

    async def load(self) -> None:
        """Load the scripts now (optional: the first call loads them on NOSCRIPT anyway)."""
        await load_scripts(self.client)

    async def admit(self, request: AdmissionRequest) -> AdmissionResult:
        """Decide on one request: one round trip while the limits stand still (after a change
        admit.lua answers 'stale': the limits are read again and the call repeated). Raises
        EnforcementError if Redis fails."""
        validate_id(request.request_id, "request id")
        if request.tokens < 0:
            raise ValueError(f"tokens {request.tokens} must be >= 0")
        plan = await self.catalog.current(request.plan)
        if plan is None:  # never a default: an unknown plan would be served unrestricted
            return _decided("unknown_plan", f"plan/{request.plan}")
        ip = ip_id(request.ip) if request.ip else ""
        keys = self.keys.admit_keys(request.tenant, request.user, ip)
        model = model_key(request.model or "")  # its limits are met without case
        settings = (self._lease_ms, self._record_ms, model)
        last: AdmissionResult | None = None
        for _ in range(_ATTEMPTS):
            limits = await self.limits.get(
                request.tenant, request.plan, request.user or "", bool(ip), model
            )
            if not limits.version:  # the controller has written nothing: no limit is known
                return _decided("not_configured", None)
            if request.least_tokens is not None:
                request = replace(request, tokens=limits.fitted(request.tokens,
                                                                request.least_tokens))  # fmt: skip
            credits = self._credits(plan, request)
            args, fixed, tail = limits.argv(request.request_id, request.tokens, settings, credits)
            reply = await self._call(request, ip, keys, limits, (args, fixed, tail))
            if isinstance(reply, list) and len(reply) == 2 and reply[0] == "stale":
                self.limits.stale(str(reply[1]))
                continue
            last = _parse(reply, plan, request, ip, limits)
            lowered = _lowered(last, request)
            if lowered is None:
                return last
            request = replace(request, tokens=lowered)  # a default that fits what is left
        if last is not None:
            return last
        raise EnforcementError(f"the limits changed {_ATTEMPTS} times during one admission")

    async def _call(
        self,
        request: AdmissionRequest,
        ip: str,
        keys: tuple[str, ...],
        limits: Resolved,
        argv: tuple[tuple[str | int, ...], tuple[str, ...], tuple[str, ...]],
    ) -> Reply:
        """admit.lua, once (one call per slot on a Cluster); UnansweredAdmissionError when it
        went out and no answer came back."""
        args, fixed, tail = argv
        try:
            if self.slots is None:
                reply: Reply = await ADMIT.run(self.client, keys, args, fixed, tail)
                return reply
            who = (request.tenant, request.user or "", ip)
            return await self.slots.admit(who, args, fixed[:4], _resolved(fixed, limits), tail)
        except EnforcementError as exc:  # raised once the call was sent
            if unanswered(exc):
                raise UnansweredAdmissionError(str(exc), _reservation(request, ip)) from exc
            raise

    def _credits(self, plan: PlanInfo, request: AdmissionRequest) -> tuple[str, ...]:
        """admit.lua's credit arguments: the request's worst-case cost and the plan's floor."""
        if plan.credits is None:
            return ()
        return (
            str(to_micro(self.prices.worst_case(request.model, request.tokens))),
            str(to_micro(plan.credits.min_balance_usd)),
        )

    async def settle(
        self,
        reservation: str,
        tenant: str,
        actual_tokens: int,
        model: str | None,
        *,
        prompt_tokens: int | None = None,
        completion_tokens: int | None = None,
        keep_slots: bool = False,
    ) -> bool:
        """Charge what the request used; refund the rest of its hold or charge the excess.

        With `prompt_tokens` and `completion_tokens` credits are charged at their own prices,
        else all `actual_tokens` at the dearer of the two. `keep_slots`: the request goes on
        after its answer (a background response): its concurrency slots stay held until
        `release` (or their lease ends). Returns False when the reservation was unknown
        (already settled, or older than its lease plus the record grace).
        """
        if prompt_tokens is not None and completion_tokens is not None:
            cost = self.prices.cost(model, prompt_tokens, completion_tokens)
        else:
            cost = self.prices.worst_case(model, actual_tokens)
        return await self._settle(
            reservation,
            tenant,
            max(actual_tokens, 0),
            to_micro(cost) if actual_tokens > 0 else 0,
            model,
            (prompt_tokens, completion_tokens),
            keep_slots=keep_slots,
        )

    async def charge(self, request: AdmissionRequest, usage: TokensUsed) -> int:
        """Charge a request served without a reservation (a fail-open plan while Redis was
        away) once Redis answers: the daily token budgets in force now and the credits, as a
        settle would. Rates are not charged (their windows have passed). Once only: a repeat
        (its first answer lost) finds the request's charge record and charges nothing.
        Returns how many budgets were charged; raises EnforcementError if Redis fails (the
        caller holds it)."""
        plan = await self.catalog.current(request.plan)
        cost = ""
        if plan is not None and plan.credits is not None and usage.total > 0:
            price = self.prices.cost(request.model, usage.prompt, usage.completion)
            cost = str(to_micro(price))
        amounts = (usage.total, cost, usage.prompt, usage.completion)
        return await self._charge(request, amounts, _FAIL_OPEN, self._record_ms, "")

    async def _charge(
        self,
        request: AdmissionRequest,
        amounts: tuple[int, str, int, int],
        reason: str,
        record_ms: str,
        day: str,
    ) -> int:
        """charge.lua for `request` (its request id names the charge record): `amounts` are
        the tokens and the micro-USD ('' : no credits) charged (below 0: given back), then
        the usage they are for; `day` the day tokens given back were charged on."""
        ip = ip_id(request.ip) if request.ip else ""
        model = model_key(request.model or "")  # its limits are met without case
        limits = await self.limits.get(request.tenant, request.plan, request.user or "",
                                       bool(ip), model)  # fmt: skip
        budgets = [
            f"{_LEVEL_INDEX[address.scope]}{address.limit}"
            + (f"@{address.model}" if address.model else "")
            for check in limits.checks
            if check.kind is LimitKind.TOKENS_PER_DAY
            for address in (Address.parse(check.address),)
        ]
        tokens, cost, prompt, completion = amounts
        args: tuple[str | int, ...] = (request.request_id, tokens, cost, model,
                                       self._history_length, prompt, completion, record_ms,
                                       reason, day, *budgets)  # fmt: skip
        if self.slots is not None:
            return await self.slots.charge((request.tenant, request.user or "", ip), args)
        keys = self.keys.charge_keys(request.tenant, request.user, ip, request.request_id)
        return int(await CHARGE.run(self.client, keys, args))

    async def keep_background(
        self,
        tenant: str,
        response_id: str,
        reservation: str,
        charged: BackgroundCharge,
        ttl_seconds: float,
    ) -> bool:
        """Keep what `tenant`'s background answer `response_id`, admitted as `reservation`,
        is being settled at (its client address: the reservation's; its day: Redis's today),
        for `ttl_seconds` (as long as its response record). Returns whether a cancel ended
        the response before (it found no record and left ENDED: `mark_ended`), read in the
        same command that keeps the charge, so no cancel falls between: the caller then gives
        the slots back (the charge is kept for a read with usage). False too for an id that
        is no safe id (nothing kept: its charge stands)."""
        try:
            key = self.keys.schema.background(tenant, response_id)
        except ValueError:
            return False
        ip = _split_reservation(reservation)[2] or None
        try:
            seconds, _micros = await self.client.time()
            kept = replace(charged, ip=ip, day=int(seconds) // 86_400)
            ttl_ms = max(1, round(ttl_seconds * 1000))
            # With `get` the value replaced comes back (redis-py types only the plain reply).
            before: object = await self.client.set(key, kept.encoded(), px=ttl_ms, get=True)
        except redis.RedisError as exc:
            raise EnforcementError(f"recording {key} failed: {exc}") from exc
        return before in (ENDED, ENDED.encode())

    async def mark_ended(
        self, tenant: str, response_id: str, ttl_seconds: float
    ) -> BackgroundCharge | None:
        """A cancel ended `tenant`'s response `response_id` and found no charge record: leave
        ENDED in its place for `ttl_seconds` (a streamed create settling after it reads it
        as it keeps its charge), or, the record there by now (the create kept it between
        the cancel's lookup and this), the charge it holds, for the cancel to settle."""
        try:
            key = self.keys.schema.background(tenant, response_id)
        except ValueError:
            return None
        try:
            if await self.client.set(key, ENDED, px=max(1, round(ttl_seconds * 1000)), nx=True):
                return None
            text = await self.client.get(key)
        except redis.RedisError as exc:
            raise EnforcementError(f"marking {key} ended failed: {exc}") from exc
        return None if text is None else BackgroundCharge.decoded(text)

    async def background_charge(self, tenant: str, response_id: str) -> BackgroundCharge | None:
        """What `tenant`'s background answer `response_id` was charged, while it is not yet
        settled at its usage; None otherwise (settled, expired, no background answer, a value
        no gateway writes)."""
        try:
            key = self.keys.schema.background(tenant, response_id)
        except ValueError:
            return None
        try:
            text = await self.client.get(key)
        except redis.RedisError as exc:
            raise EnforcementError(f"reading {key} failed: {exc}") from exc
        return None if text is None else BackgroundCharge.decoded(text)

    async def settle_background(
        self,
        tenant: str,
        response_id: str,
        charged: BackgroundCharge,
        used: TokensUsed | None,
        ttl_seconds: float,
    ) -> int:
        """Settle `tenant`'s finished background answer: the concurrency slots it kept while
        it generated are given back (settle.lua's kept holds; once: the record goes with
        them), and, with the `used` its response reports, it is charged at that usage: the
        difference from what it was charged, on the daily budgets (tokens given back only to
        a budget still counting the day they were charged on) and the credits (at today's
        prices), once — a repeat finds the charge record (kept as long as the response's
        record) and changes nothing. Its record then holds its true total (a turn
        continuing it reserves that), and what it was charged is forgotten. No `used` (a
        finished answer that says none): the charge stands, for a later read to settle.
        Returns the budgets charged. Raises EnforcementError if Redis fails (the caller
        holds it: a repeat is harmless)."""
        await self.release(charged.reservation, tenant)
        if used is None:
            return 0
        cost = ""
        if charged.cost_micro is not None:
            price = to_micro(self.prices.cost(charged.model, used.prompt, used.completion))
            cost = str((price if used.total > 0 else 0) - charged.cost_micro)
        request = AdmissionRequest(tenant, charged.plan, charged.user, charged.ip, charged.model,
                                   charged.tokens, f"{charged.request_id}.background")  # fmt: skip
        amounts = (used.total - charged.tokens, cost, used.prompt, used.completion)
        ttl_ms = max(1, round(ttl_seconds * 1000))
        charged_budgets = await self._charge(request, amounts, BACKGROUND_REASON, str(ttl_ms),
                                             str(charged.day))  # fmt: skip
        record = self.keys.schema.response(tenant, response_id)
        try:
            # Only a record still there (a deleted response is not made again).
            await self.client.set(record, str(used.total), xx=True, keepttl=True)
            await self.client.delete(self.keys.schema.background(tenant, response_id))
        except redis.RedisError as exc:
            raise EnforcementError(f"settling background response {record} failed: {exc}") from exc
        return charged_budgets

    def _earlier_key(self, what: EarlierKind, tenant: str, found: str) -> str:
        """`tenant`'s record of response or conversation `found`; ValueError for an id that is
        no safe id (never put in a key)."""
        if what == "conversation":
            return self.keys.schema.conversation(tenant, found)
        return self.keys.schema.response(tenant, found)

    def can_record(self, tenant: str, response_id: str, what: EarlierKind = "response") -> bool:
        """Whether `response_id` is an id a record can be kept under (a safe id)."""
        try:
            self._earlier_key(what, tenant, response_id)
        except ValueError:
            return False
        return True

    async def earlier_tokens(
        self, tenant: str, response_id: str, what: EarlierKind = "response"
    ) -> int | None:
        """The tokens recorded for `tenant`'s response (or conversation) `response_id` (what a
        request naming it makes the model server read again); None when there is no record:
        expired, made elsewhere, another tenant's (only the tenant's own key is read), an id
        that is no safe id, or a value no gateway writes."""
        try:
            key = self._earlier_key(what, tenant, response_id)
        except ValueError:
            return None  # never put in a key: the caller refuses it, or reserves its default
        try:
            text = await self.client.get(key)
        except redis.RedisError as exc:
            raise EnforcementError(f"reading {key} failed: {exc}") from exc
        # Decimal digits only, as the Lua module reads it ('^%d+$'): not '²', '-1' or '1e9'.
        return int(text) if text is not None and text.isascii() and text.isdigit() else None

    async def remember_response(
        self,
        tenant: str,
        response_id: str,
        tokens: int,
        ttl_seconds: float,
        what: EarlierKind = "response",
    ) -> bool:
        """Record what a later request naming `response_id` (or the conversation) will read
        back: its input and output tokens (the input holds its own earlier conversation
        already), for `ttl_seconds`. False for an id that is no safe id (nothing written)."""
        try:
            key = self._earlier_key(what, tenant, response_id)
        except ValueError:
            return False
        try:
            await self.client.set(key, str(max(tokens, 0)), px=max(1, round(ttl_seconds * 1000)))
        except redis.RedisError as exc:
            raise EnforcementError(f"recording {key} failed: {exc}") from exc
        return True

    async def grow_conversation(
        self, tenant: str, conversation_id: str, tokens: int, ttl_seconds: float
    ) -> bool:
        """Items were added to `tenant`'s conversation through the Conversations API: its
        record (what a later turn in it reserves) grows by their `tokens`, and lives another
        `ttl_seconds`. Only a record there is grows (one step, in Redis): none, or an id that
        is no safe id, changes nothing (False), as a turn naming it meets no record anyway."""
        try:
            key = self._earlier_key("conversation", tenant, conversation_id)
        except ValueError:
            return False
        ttl_ms = max(1, round(ttl_seconds * 1000))
        try:
            # types-redis leaves the asyncio client's eval untyped.
            grown = await cast(Any, self.client).eval(GROW_RECORD, 1, key, str(max(tokens, 0)),
                                                      str(ttl_ms))  # fmt: skip
        except redis.RedisError as exc:
            raise EnforcementError(f"growing {key} failed: {exc}") from exc
        return bool(grown)

    async def forget(self, tenant: str, found: str, what: EarlierKind = "conversation") -> None:
        """`tenant`'s conversation (or response) `found` was deleted: a later request naming
        it meets no record."""
        try:
            key = self._earlier_key(what, tenant, found)
        except ValueError:
            return
        try:
            await self.client.delete(key)
        except redis.RedisError as exc:
            raise EnforcementError(f"deleting {key} failed: {exc}") from exc

    async def release(self, reservation: str, tenant: str) -> bool:
        """The request failed before using anything: refund its whole hold."""
        return await self._settle(reservation, tenant, 0, 0, None, (None, None))

    async def renew(self, reservation: str, tenant: str) -> bool:
        """A background answer a read found still running: the slots its settle kept get a
        new lease as long as an admission's, from now, every level's at once (settle.lua's
        renewal; on a Cluster once per slot, as a release). Idempotent (a lease is never
        shortened). False when nothing was kept for it any more (given back, or its lease
        ended: a sweep freed the slots and a renewal does not take them again). Raises
        EnforcementError if Redis fails."""
        return await self._settle(reservation, tenant, 0, 0, None, (None, None), mode="2")

    async def _settle(
        self,
        reservation: str,
        tenant: str,
        tokens: int,
        cost_micro: int,
        model: str | None,
        split: tuple[int | None, int | None],
        *,
        keep_slots: bool = False,
        mode: str = "",
    ) -> bool:
        """settle.lua; `mode` its ARGV 8 when not `keep_slots`' ('2': a renewal)."""
        request_id, user, ip = _split_reservation(reservation)
        args: tuple[str | int, ...] = (
            request_id,
            tokens,
            cost_micro,
            model or "",
            self._history_length,
            "" if split[0] is None else split[0],
            "" if split[1] is None else split[1],
            "1" if keep_slots else mode,
            self._lease_ms,
            self._record_ms,
        )
        if self.slots is not None:
            return await self.slots.settle((tenant, user, ip), args)
        keys = self.keys.settle_keys(tenant, user, ip)
        return bool(await SETTLE.run(self.client, keys, args))


def _resolved(
    fixed: tuple[str, ...], limits: Resolved
) -> tuple[str, tuple[str, ...], tuple[float, ...]]:
    """From admit.lua's fixed arguments (version, 3 settings, ARGV 7, the values): ARGV 7,
    the values, and their checks' limits as numbers (the combined answer's tightest budget;
    none after a verdict, which passes no values)."""
    values = fixed[5:]
    return fixed[4], values, tuple(check.value for check in limits.checks) if values else ()


def _decided(outcome: Outcome, denied_by: str | None) -> AdmissionResult:
    """A refusal decided before admit.lua: nothing reserved, no quota read."""
    return AdmissionResult(outcome, denied_by, None, None, None, None, None, None)


def _lowered(result: AdmissionResult, request: AdmissionRequest) -> int | None:
    """A daily budget refused a reservation the gateway sized by default: what is left of
    that budget, when the request still fits in it (else None: the refusal stands)."""
    budget = result.budget
    least = request.least_tokens
    if least is None or result.outcome != "budget_exhausted" or budget is None:
        return None
    room = math.floor(budget.remaining)
    if budget.kind != "tokens" or not least <= room < request.tokens:
        return None
    return room


def _reservation(request: AdmissionRequest, ip: str) -> str:
    """What settle() and release() take: the request id, the user and the client's ip id."""
    return f"{request.request_id}/{request.user or ''}/{ip}"


def _split_reservation(reservation: str) -> tuple[str, str, str]:
    parts = reservation.split("/")
    if len(parts) != 3 or not parts[0]:
        raise ValueError(
            f"reservation {reservation!r} is not one admit() returned "
            "(expected '<request id>/<user>/<ip>')"
        )
    return parts[0], parts[1], parts[2]


Reply = list[str | int]  # admit.lua answers strings and integers


def _quota(limits: Resolved, check: int, remaining: int, reset_ms: int) -> Quota | None:
    if check <= 0:
        return None
    found = limits.checks[check - 1]
    return Quota(
        found.address,
        found.value,
        float(remaining),
        reset_ms / 1000,
        PERIOD_MS.get(found.kind, 0) / 1000,
    )


def _budget(
    limits: Resolved, tenant: str, check: int, remaining: int, resets_at_ms: int
) -> Budget | None:
    if check == 0:
        return None
    if check < 0:
        return Budget(f"credits/{tenant}", "credits", None, remaining / 1_000_000, None)
    found = limits.checks[check - 1]
    return Budget(found.address, "tokens", found.value, float(remaining), resets_at_ms / 1000)


def _parse(
    reply: Reply,
    plan: PlanInfo,
    request: AdmissionRequest,
    ip: str,
    limits: Resolved,
) -> AdmissionResult:
    """admit.lua's answer as a result: its check numbers name the checks `limits` holds; the
    reservation names the levels settle must touch."""
    if isinstance(reply, list) and len(reply) == 5 and reply[0] == "corrupt":
        return _corrupt(reply)
    if not isinstance(reply, list) or len(reply) != 12 or reply[0] not in _OUTCOMES:
        raise EnforcementError(f"admit.lua answered {reply!r}: the script and client disagree")
    outcome: Outcome = reply[0]  # type: ignore[assignment]
    verdict = limits.verdict(request.tokens)
    if verdict is not None:
        return AdmissionResult(outcome, verdict[1], None, None, None, None, None, None)
    # denied_by, retry_after_ms, then requests, tokens and budget: (check, remaining, ms) each
    numbers = [int(value) for value in reply[1:]]
    budget = _budget(limits, request.tenant, *numbers[8:11])
    retry: float | None = None
    if outcome == "rate_limited" or (
        outcome == "budget_exhausted" and budget is not None and budget.kind == "tokens"
    ):
        retry = numbers[1] / 1000  # a credit balance does not refill by itself: no retry
    reservation = degrade = None
    if outcome == "allow":
        reservation = _reservation(request, ip)
        degrade = _degrade(plan, budget, request.model)
    return AdmissionResult(
        outcome=outcome,
        denied_by=limits.address(numbers[0], request.tenant),
        retry_after=retry,
        requests=_quota(limits, *numbers[2:5]),
        tokens=_quota(limits, *numbers[5:8]),
        budget=budget,
        reservation=reservation,
        degrade=degrade,
        reserved=request.tokens if outcome == "allow" else None,
    )


def _corrupt(reply: Reply) -> AdmissionResult:
    """admit.lua's {'corrupt', key, field, what it holds, repair}: refused whatever the
    plan's fail mode (Redis answered; its count is what cannot be trusted)."""
    key, field, text, fix = (str(value) for value in reply[1:])
    damage = not_governors(f"{key} field {field}", text, "refused: fail closed", fix)
    return replace(_decided("corrupt_state", f"{key} {field}"), damage=damage)


def _degrade(plan: PlanInfo, budget: Budget | None, model: str | None) -> Degradation | None:
    """The plan's degradation once the tightest token budget is past `at_percent` spent."""
    spec = plan.degrade
    if spec is None or budget is None or budget.kind != "tokens" or not budget.limit:
        return None
    spent = 100.0 * (1.0 - budget.remaining / budget.limit)
    if spent < spec.at_percent:
        return None
    target = spec.model if spec.model != model else None
    if spec.max_tokens is None and target is None:
        return None
    return Degradation(
        spec.max_tokens,
        target,
        f"{budget.address} is {spent:.0f}% spent (the plan degrades from {spec.at_percent:g}%)",
    )
