"""A Python model of the enforcement scripts (controller/contract/lua/admit.lua, settle.lua)
on a clock the caller gives: the simulator cannot run the Lua, which reads Redis TIME.

Same levels, same lookup order, same checks in the same order, same arithmetic (doubles),
same answers: shed when a limit is 0, too_large, budget_exhausted (tokens, then credits),
rate_limited (GCRA and concurrency, global/concurrent_requests shared by weight when
global/concurrent_headroom is set), allow with a reservation settled later. The parity
test (tests/sim/test_admission_parity.py) feeds one request sequence to both.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Literal, NamedTuple

from controller.model import Address, LimitKind, Scope, weight_in_flight

Outcome = Literal["allow", "rate_limited", "budget_exhausted", "shed", "too_large"]
DAY_MS = 86_400_000.0
# As controller/gateway/limits.py: a request above one of these can never fit (too_large).
_SIZED = (LimitKind.MAX_TOKENS_PER_REQUEST, LimitKind.TOKENS_PER_MINUTE, LimitKind.TOKENS_PER_DAY)
KINDS = tuple(LimitKind)
PERIOD_MS = {
    LimitKind.REQUESTS_PER_SECOND: 1000.0,
    LimitKind.REQUESTS_PER_MINUTE: 60000.0,
    LimitKind.TOKENS_PER_MINUTE: 60000.0,
}
_SWEEP = 64  # leases released per level per call, as the script does
# The fields that share global/concurrent_requests by weight (only their plain values count).
_SLOTS = str(LimitKind.CONCURRENT_REQUESTS)
_HEADROOM, _WEIGHT = str(LimitKind.CONCURRENT_HEADROOM), str(LimitKind.CONCURRENT_WEIGHT)


class Decision(NamedTuple):
    """The script's first three answers and the reservation (allowed only)."""

    outcome: Outcome
    denied_by: str | None
    retry_ms: float
    reservation: str | None = None


_G, _I, _T, _U = 0, 1, 2, 3  # the levels, in the order the script walks them


@dataclass(frozen=True, slots=True)
class _Share:
    """global/concurrent_requests shared by weight, as one tenant meets it (admit.lua's f
    check): a request within the tenant's share may also take the headroom above it."""

    headroom: float
    weight: float
    mine: str  # o|<owner>: the tenant's requests in flight at the global level
    joined: str  # q|<owner>: the weight it joined the active weight `a` with

    def limit(self, state: dict[str, float], limit: float) -> float:
        """The limit for the tenant's next request: with the headroom (at least one request)
        while that request is within its share (weight ÷ the weight in flight, its own
        included, as it is now); a tenant with nothing in flight is always within."""
        mine = state.get(self.mine, 0.0)
        with_headroom = limit + max(1.0, limit * self.headroom)
        if mine <= 0:
            return with_headroom
        weight = self.weight
        total = weight_in_flight(weight, state.get("a", 0.0), state.get(self.joined, weight))
        return with_headroom if mine + 1 <= limit * weight / total else limit

    def join(self, state: dict[str, float]) -> None:
        """One more request in flight: the tenant's first brings its weight in, and a weight
        changed since it joined replaces the one it joined with."""
        mine = state.get(self.mine, 0.0)
        state[self.mine] = max(mine, 0.0) + 1
        weight = self.weight
        joined = state.get(self.joined, weight)
        if mine <= 0 or joined != weight:
            active = state.get("a", 0.0)
            if mine > 0:
                active = max(active - joined, 0.0)
            state[self.joined] = weight
            state["a"] = active + weight


def _unshare(state: dict[str, float], owner: str) -> None:
    """lib.lua's unshare: one request of `owner` fewer in flight; its last takes the weight
    it joined with out of the active weight."""
    mine = "o|" + owner
    left = state.pop(mine, 0.0) - 1
    if left > 0:
        state[mine] = left
        return
    active = state.get("a", 0.0) - state.pop("q|" + owner, 0.0)
    state["a"] = active if 1e-9 <= active < math.inf else 0.0  # rounding left over: nobody


@dataclass(frozen=True, slots=True)
class _Check:
    """One limit that applies to a request, with its state field names precomputed."""

    level: int
    kind: LimitKind
    field: str
    limit: float
    address: str
    period: float | None = None  # GCRA kinds
    interval: float = 0.0
    tokens: bool = False  # charged in tokens (tokens_per_minute) rather than requests
    sized: bool = False  # a request larger than the limit can never pass (too_large)
    # The state hash fields of this check (the script's f_tat, f_ivl, f_open, ...).
    tat: str = ""
    ivl: str = ""
    open: str = ""
    day: str = ""
    used: str = ""
    held: str = ""
    member: str = ""  # its lease member less the reservation id (concurrency)
    share: _Share | None = None  # global concurrent_requests shared by weight

    @classmethod
    def of(cls, level: int, kind: LimitKind, name: str, limit: float, address: str) -> _Check:
        period = PERIOD_MS.get(kind)
        return cls(
            level,
            kind,
            name,
            limit,
            address,
            period,
            period / limit if period is not None else 0.0,
            kind is LimitKind.TOKENS_PER_MINUTE,
            kind in _SIZED,
            "g|" + name,
            "i|" + name,
            "c|" + name,
            "d|" + name,
            "u|" + name,
            "v|" + name,
            "c|" + name + "|",
        )


@dataclass(frozen=True, slots=True)
class _Compiled:
    """The checks of one (tenant, plan, user, ip?, model), split by what the script does
    with them, each list in the script's order (so the first refusal is the script's)."""

    shed: str | None  # the first 0 found: every request is shed
    sized: tuple[_Check, ...] = ()  # too_large when a request exceeds one
    smallest: float = math.inf  # the smallest sized limit: at or below it, none refuses
    budgets: tuple[_Check, ...] = ()  # tokens_per_day
    rates: tuple[_Check, ...] = ()  # GCRA and concurrency

    @classmethod
    def of(cls, checks: list[_Check]) -> _Compiled:
        sized = tuple(c for c in checks if c.sized)
        return cls(
            None,
            sized,
            min((c.limit for c in sized), default=math.inf),
            tuple(c for c in checks if c.kind is LimitKind.TOKENS_PER_DAY),
            tuple(
                c for c in checks if c.period is not None or c.kind is LimitKind.CONCURRENT_REQUESTS
            ),
        )

    def refusal(self, tokens: float) -> Decision | None:
        """Shed (a 0 anywhere) or too_large: answered before any state is read."""
        if self.shed is not None:
            return Decision("shed", self.shed, 0.0)
        if tokens > self.smallest:
            first = next(c for c in self.sized if tokens > c.limit)
            return Decision("too_large", first.address, 0.0)
        return None


@dataclass
class _Level:
    """One level's state hash and lease set (a heap with lazy deletion)."""

    fields: dict[str, float] = field(default_factory=dict)
    leases: dict[str, float] = field(default_factory=dict)
    heap: list[tuple[float, str]] = field(default_factory=list)

    def lease(self, member: str, expires: float) -> None:
        self.leases[member] = expires
        heapq.heappush(self.heap, (expires, member))
        if len(self.heap) > 256 and len(self.heap) > 4 * len(self.leases):
            # Settled leases leave stale heap entries behind: drop them now and then.
            self.heap = sorted((e, m) for m, e in self.leases.items())

    def unlease(self, member: str) -> bool:
        return self.leases.pop(member, None) is not None


_Rate = tuple[_Check, dict[str, float], _Level, bool]  # check, its level's state, level, GCRA
_Hold = tuple[_Level, str, _Check, float, float]  # level, code, check, amount, interval
_Move = Callable[[tuple[_Rate, ...], list[float], float, str, float], list[_Hold]]


@dataclass(frozen=True, slots=True)
class _Bound:
    """One request's checks bound to the state they read (the levels of its tenant, user and
    ip): what admit walks for every request, without looking a level up per check."""

    compiled: _Compiled
    levels: tuple[_Level | None, ...]
    swept: tuple[tuple[_Level, str | None], ...]  # each level, and the tenant its leases hold
    budgets: tuple[tuple[_Check, _Level], ...]
    rates: tuple[_Rate, ...]
    tenant: _Level
    move: _Move  # _move, or _move_shared when a concurrency limit is shared by weight


@dataclass(slots=True)
class _Record:
    holds: list[_Hold]
    tenant: _Level
    credit: float
    charge: bool


def limit_hashes(limits: Mapping[Address, float]) -> dict[str, dict[str, float]]:
    """The limits as the scripts read them: owner (`global/`, `plan/free/` ...) → field → value."""
    hashes: dict[str, dict[str, float]] = {}
    for address, value in limits.items():
        ids = {
            Scope.GLOBAL: (),
            Scope.IP: (),
            Scope.PLAN: (address.plan,),
            Scope.TENANT: (address.tenant,),
            Scope.USER: (address.tenant, address.user),
        }[address.scope]
        owner = "/".join([address.scope.value, *(str(i) for i in ids)]) + "/"
        name = f"{address.limit}@{address.model}" if address.model else str(address.limit)
        hashes.setdefault(owner, {})[name] = value
    return hashes


def used_today(day: float | None, used: float | None, today: float) -> float:
    return 0.0 if day is None or day != today else (used or 0.0)


def current_tat(
    tat: float | None, old: float | None, interval: float, now: float, period: float
) -> float:
    """A GCRA state read under the limit in force (the script's `current_tat`)."""
    value = max(tat or 0.0, now)
    previous = old or 0.0
    if previous > 0 and previous != interval and value > now:
        value = now + min((value - now) / previous * interval, period)
    return value


def _shared(checks: list[_Check], tenant: str) -> list[_Check]:
    """`checks` with global/concurrent_requests shared by weight when a global headroom is
    set (as controller/gateway/limits.py `_Found.share`): the tenant's weight is its own
    `concurrent_weight`, else its plan's, else 1. A value for one model does not count."""
    headroom, weight, slots = 0.0, 1.0, -1
    for i, c in enumerate(checks):
        if c.level == _G and c.field == _HEADROOM:
            headroom = c.limit
        elif c.level == _G and c.field == _SLOTS:
            slots = i
        elif c.level == _T and c.field == _WEIGHT:
            weight = c.limit
    if headroom <= 0 or slots < 0:
        return checks
    owner = f"tenant/{tenant}/"
    share = _Share(headroom, weight, "o|" + owner, "q|" + owner)
    checks[slots] = replace(checks[slots], member=f"o|{owner}|", share=share)
    return checks


def _fields(model: str) -> list[tuple[int, str]]:
    """Each kind's field names in the order the script looks them up (`limit@model` first)."""
    fields: list[tuple[int, str]] = []
    for index, kind in enumerate(KINDS):
        if model:
            fields.append((index, f"{kind}@{model}"))
        fields.append((index, str(kind)))
    return fields


def _rates(rates: tuple[_Rate, ...], tokens: float, now: float) -> Decision | list[float]:
    """Every GCRA rate and concurrency check: a refusal (429) naming the one that waits
    longest, or each check's new state (written only if all pass)."""
    wait, denied_by = 0.0, None
    values: list[float] = []
    for c, state, _, gcra in rates:
        if gcra:
            # current_tat's arithmetic, inlined: this runs for every limit of every request.
            tat = state.get(c.tat) or 0.0
            value = tat if tat > now else now
            previous = state.get(c.ivl) or 0.0
            interval = c.interval
            period: float = c.period  # type: ignore[assignment]
            if previous > 0 and previous != interval and value > now:
                value = now + min((value - now) / previous * interval, period)
            value = value + (tokens if c.tokens else 1.0) * interval
            over = value - now - period
        else:  # concurrency: one more open request; refused for a second
            value = state.get(c.open, 0.0) + 1
            # A share is read only over the limit: below it the headroom changes nothing.
            over = (
                1000.0
                if value > c.limit and (c.share is None or value > c.share.limit(state, c.limit))
                else 0.0
            )
        # The script keeps the largest wait; a concurrency refusal never shortens one.
        if over > 0 and (denied_by is None or over > wait):
            denied_by, wait = c.address, over
        values.append(value)
    if denied_by is not None:
        return Decision("rate_limited", denied_by, wait)
    return values


def _move(
    rates: tuple[_Rate, ...], values: list[float], tokens: float, rid: str, expires: float
) -> list[_Hold]:
    """Write the rates' and concurrency's new state; what settle must give back."""
    holds: list[_Hold] = []
    for (c, state, level, gcra), value in zip(rates, values, strict=True):
        if gcra:
            state[c.tat], state[c.ivl] = value, c.interval
            if c.tokens:
                holds.append((level, "t", c, tokens, c.interval))
        else:
            state[c.open] = value
            level.lease(c.member + rid, expires)
            holds.append((level, "c", c, 1.0, 0.0))
    return holds


def _move_shared(
    rates: tuple[_Rate, ...], values: list[float], tokens: float, rid: str, expires: float
) -> list[_Hold]:
    """_move, and the tenant's request in flight on the limit shared by weight (admit.lua's
    f check, step 4): one lease gives back the slot and the share (code `o`)."""
    holds = _move(rates, values, tokens, rid, expires)
    for i, (level, _, c, amount, interval) in enumerate(holds):
        if c.share is not None:
            c.share.join(level.fields)
            holds[i] = (level, "o", c, amount, interval)
    return holds


class AdmissionModel:
    """State of every level, keyed like the scripts' hashes; times in milliseconds."""

    def __init__(self, lease_ms: float = 600_000.0, record_ms: float = 3_600_000.0) -> None:
        self.lease_ms = lease_ms
        self.record_ms = record_ms
        self.hashes: dict[str, dict[str, float]] = {}
        self.levels: dict[str, _Level] = {}
        self.credits: dict[str, dict[str, float]] = {}
        self._records: dict[str, _Record] = {}
        self._compiled: dict[tuple[str, str, str, bool, str], _Compiled] = {}
        self._level_cache: dict[tuple[str, str, str], tuple[_Level | None, ...]] = {}
        self._bound: dict[tuple[str, str, str, str, str], _Bound] = {}

    # --- limits -----------------------------------------------------------------------------

    def load(self, limits: Mapping[Address, float]) -> None:
        """The limits in force (what the controller wrote): replaces the previous ones."""
        hashes = limit_hashes(limits)
        if hashes != self.hashes:
            self.hashes = hashes
            self._compiled.clear()
            self._bound.clear()

    def set_balance(self, tenant: str, usd_micro: float) -> None:
        self.credits.setdefault(tenant, {"reserved": 0.0})["balance"] = usd_micro

    def _checks(self, tenant: str, plan: str, user: str, has_ip: bool, model: str) -> _Compiled:
        key = (tenant, plan, user, has_ip, model)
        found = self._compiled.get(key)
        if found is None:
            found = self._compiled[key] = self._compile(tenant, plan, user, has_ip, model)
        return found

    def _compile(self, tenant: str, plan: str, user: str, has_ip: bool, model: str) -> _Compiled:
        """The script's walk: level by level, each of its hashes (a tenant's own before its
        plan's), each kind `limit@model` before `limit`; the first value of a kind wins."""
        levels: list[tuple[int, str, list[str]]] = [(_G, "global/", ["global/"])]
        if has_ip:
            levels.append((_I, "ip/", ["ip/"]))
        levels.append((_T, f"tenant/{tenant}/", [f"tenant/{tenant}/", f"plan/{plan}/"]))
        if user:
            levels.append((_U, f"user/{tenant}/{user}/", [f"user/{tenant}/{user}/"]))
        fields = _fields(model)
        checks: list[_Check] = []
        for level, owner, hashes in levels:
            found: set[int] = set()
            for name in hashes:
                shed = self._walk(level, owner, name, fields, found, checks)
                if shed is not None:
                    return _Compiled(shed)
        return _Compiled.of(_shared(checks, tenant))

    def _walk(
        self, level: int, owner: str, name: str, fields: list[tuple[int, str]],
        found: set[int], checks: list[_Check],
    ) -> str | None:  # fmt: skip
        """One hash of a level: its checks appended to `checks`; the shed address if it
        holds a 0."""
        values = self.hashes.get(name, {})
        for index, field_name in fields:
            value = values.get(field_name)
            if value is None or math.isnan(value) or value < 0:
                continue  # not written by Governor: the script ignores it
            if value == 0:
                return name + field_name
            if index not in found:
                found.add(index)
                checks.append(_Check.of(level, KINDS[index], field_name, value, owner + field_name))
        return None

    # --- admit ------------------------------------------------------------------------------

    def _level(self, key: str) -> _Level:
        found = self.levels.get(key)
        if found is None:
            found = self.levels[key] = _Level()
        return found

    def admit(
        self,
        rid: str,
        tokens: float,
        tenant: str,
        plan: str,
        now: float,
        model: str = "",
        user: str = "",
        ip: str = "",
        credit_cost: float | None = None,
        credit_floor: float = 0.0,
    ) -> Decision:
        """One admit.lua call at `now` (ms). Credits in micro-USD (None: no credits). The
        simulator passes its arguments by position (it calls this for every request)."""
        bound = self._bound.get((tenant, plan, user, ip, model))
        if bound is None:
            bound = self._bind(tenant, plan, user, ip, model)
        compiled = bound.compiled
        if compiled.shed is not None or tokens > compiled.smallest:
            return compiled.refusal(tokens)  # type: ignore[return-value]
        for level, owner in bound.swept:  # the expired leases go first, as in the script
            heap = level.heap
            if heap and heap[0][0] <= now:
                self._sweep(level, owner, now)
        today = math.floor(now / DAY_MS)
        # Budgets first: when a budget is spent, waiting will not help (402).
        budgets: list[tuple[_Check, float, float]] = []
        refusal = self._budgets(bound.budgets, tokens, today, now, budgets)
        if refusal is None and credit_cost is not None:
            refusal = self._credits(tenant, credit_cost, credit_floor)
        if refusal is not None:
            return refusal
        # Rates (GCRA) and concurrency; nothing is written until every check passed.
        values = _rates(bound.rates, tokens, now)
        if isinstance(values, Decision):
            return values
        expires = now + self.lease_ms
        holds = bound.move(bound.rates, values, tokens, rid, expires)
        tenant_level = bound.tenant
        if budgets:
            self._hold_budgets(budgets, bound.levels, tokens, today, rid, expires, holds)
        if credit_cost is not None:
            ledger = self.credits[tenant]
            ledger["reserved"] += credit_cost
            ledger["r|" + rid] = credit_cost
            tenant_level.lease("$|" + rid, expires)
        self._records[rid] = _Record(
            holds, tenant_level, credit_cost or 0.0, credit_cost is not None
        )
        tenant_level.lease("x|" + rid, expires + self.record_ms)
        return Decision("allow", None, 0.0, rid)

    def _bind(self, tenant: str, plan: str, user: str, ip: str, model: str) -> _Bound:
        compiled = self._checks(tenant, plan, user, bool(ip), model)
        levels = self._levels(tenant, ip, user)
        tenant_level = levels[_T]
        assert tenant_level is not None
        swept = tuple(
            (level, tenant if code == _T else None)
            for code, level in enumerate(levels)
            if level is not None
        )

        def level_of(c: _Check) -> _Level:
            found = levels[c.level]
            assert found is not None
            return found

        shared = any(c.share is not None for c in compiled.rates)
        bound = _Bound(
            compiled,
            levels,
            swept,
            tuple((c, level_of(c)) for c in compiled.budgets),
            tuple(
                (c, level_of(c).fields, level_of(c), c.period is not None) for c in compiled.rates
            ),
            tenant_level,
            _move_shared if shared else _move,
        )
        self._bound[(tenant, plan, user, ip, model)] = bound
        return bound

    @staticmethod
    def _budgets(
        checks: tuple[tuple[_Check, _Level], ...], tokens: float, today: float, now: float,
        out: list[tuple[_Check, float, float]],
    ) -> Decision | None:  # fmt: skip
        """The daily budgets: a refusal (402) when one cannot hold `tokens` more; else each
        budget's (check, used today, held) appended to `out`."""
        for c, level in checks:
            state = level.fields
            used = used_today(state.get(c.day), state.get(c.used), today)
            held = state.get(c.held, 0.0)
            if tokens > c.limit - used - held:
                return Decision("budget_exhausted", c.address, (today + 1) * DAY_MS - now)
            out.append((c, used, held))
        return None

    def _credits(self, tenant: str, cost: float, floor: float) -> Decision | None:
        """A refusal (402) when the balance less what is reserved cannot pay `cost`."""
        ledger = self.credits.get(tenant)
        if ledger is None:
            ledger = self.credits[tenant] = {"reserved": 0.0}
        available = ledger.get("balance", 0.0) - ledger["reserved"]
        if available - cost < floor:
            return Decision("budget_exhausted", f"credits/{tenant}", 0.0)
        return None

    @staticmethod
    def _hold_budgets(
        budgets: list[tuple[_Check, float, float]], levels: tuple[_Level | None, ...],
        tokens: float, today: float, rid: str, expires: float, holds: list[_Hold],
    ) -> None:  # fmt: skip
        """Reserve `tokens` of each budget under a lease (released if never settled)."""
        for c, used, held in budgets:
            level = levels[c.level]
            assert level is not None
            state = level.fields
            state[c.day], state[c.used], state[c.held] = today, used, held + tokens
            state[f"r|{c.field}|{rid}"] = tokens
            level.lease(f"b|{c.field}|{rid}", expires)
            holds.append((level, "b", c, tokens, 0.0))

    def _levels(self, tenant: str, ip: str, user: str) -> tuple[_Level | None, ...]:
        key = (tenant, ip, user)
        found = self._level_cache.get(key)
        if found is None:
            found = self._level_cache[key] = (
                self._level("g"),
                self._level(f"i:{ip}") if ip else None,
                self._level(f"t:{tenant}"),
                self._level(f"u:{tenant}:{user}") if user else None,
            )
        return found

    def _sweep(self, level: _Level, tenant: str | None, now: float) -> None:
        released = 0
        while level.heap and level.heap[0][0] <= now and released < _SWEEP:
            expires, member = heapq.heappop(level.heap)
            if level.leases.get(member) != expires:
                continue  # settled (or re-leased) since: a stale heap entry
            del level.leases[member]
            released += 1
            self._release(level, tenant, member)

    def _release(self, level: _Level, tenant: str | None, member: str) -> None:
        code = member[0]
        state = level.fields
        if code == "c":
            name = member[2 : member.rindex("|")]
            state["c|" + name] = state.get("c|" + name, 0.0) - 1
        elif code == "b":
            name, _, rid = member[2:].rpartition("|")
            held = state.pop(f"r|{name}|{rid}", 0.0)
            state["v|" + name] = state.get("v|" + name, 0.0) - held
        elif code == "x":
            self._records.pop(member[2:], None)
        elif code == "$" and tenant is not None:
            ledger = self.credits.setdefault(tenant, {"reserved": 0.0})
            held = ledger.pop("r|" + member[2:], 0.0)
            ledger["reserved"] = ledger.get("reserved", 0.0) - held
        elif code == "o":  # 'o|<owner>|<id>': a slot of the limit shared by weight, and its share
            state["c|" + _SLOTS] = state.get("c|" + _SLOTS, 0.0) - 1
            _unshare(state, member[2 : member.rindex("|")])

    # --- settle -----------------------------------------------------------------------------

    def settle(self, rid: str, tenant: str, actual: float, cost: float, now: float) -> bool:
        """One settle.lua call at `now` (ms): refund or charge the difference; False when the
        reservation is unknown (settled already, or released with its record)."""
        record = self._records.pop(rid, None)
        if record is None:
            return False
        today = math.floor(now / DAY_MS)
        for level, code, c, reserved, interval in record.holds:
            state = level.fields
            if code == "t":
                interval = state.get(c.ivl) or interval
                tat = max(state.get(c.tat, 0.0), now)
                state[c.tat], state[c.ivl] = tat + (actual - reserved) * interval, interval
            elif code == "c":
                if level.unlease(c.member + rid):
                    state[c.open] = state.get(c.open, 0.0) - 1
            elif code == "b":
                if level.unlease(f"b|{c.field}|{rid}"):
                    state[c.held] = state.get(c.held, 0.0) - reserved
                    state.pop(f"r|{c.field}|{rid}", None)
                used = used_today(state.get(c.day), state.get(c.used), today)
                state[c.day], state[c.used] = today, used + actual
            elif code == "o" and level.unlease(c.member + rid):
                # A slot of the limit shared by weight: the tenant's share goes with it.
                state[c.open] = state.get(c.open, 0.0) - 1
                _unshare(state, c.member[2:-1])  # the owner, from 'o|<owner>|'
        if record.charge:  # admitted on credits (else there is nothing to move)
            self._settle_credits(record, rid, tenant, cost)
        record.tenant.unlease("x|" + rid)
        return True

    def _settle_credits(self, record: _Record, rid: str, tenant: str, cost: float) -> None:
        """Release the credits held (unless their lease expired) and charge `cost`."""
        ledger = self.credits.setdefault(tenant, {"reserved": 0.0})
        if record.credit > 0 and record.tenant.unlease("$|" + rid):
            ledger["reserved"] -= record.credit
            ledger.pop("r|" + rid, None)
        if cost > 0:
            ledger["balance"] = ledger.get("balance", 0.0) - cost

    # --- reading ----------------------------------------------------------------------------

    def budget_used(self, tenant: str, name: str, now: float) -> float:
        """Settled tokens today of a tenant-level budget field (e.g. `tokens_per_day`)."""
        state = self._level(f"t:{tenant}").fields
        return used_today(state.get("d|" + name), state.get("u|" + name), math.floor(now / DAY_MS))
