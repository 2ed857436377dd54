"""A Python model of the enforcement scripts (controller/contract/lua/admit.lua, settle.lua)
on a clock the caller gives: the simulator cannot run the Lua, which reads Redis TIME.

Same levels, same lookup order, same checks in the same order, same arithmetic (doubles),
same answers: shed when a limit is 0, too_large, budget_exhausted (tokens, then credits),
rate_limited (GCRA and concurrency), allow with a reservation settled later. The parity
test (tests/sim/test_admission_parity.py) feeds one request sequence to both.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

from controller.model import Address, LimitKind, Scope

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


@dataclass(frozen=True, slots=True)
class Decision:
    """The script's first three answers and the reservation (allowed only)."""

    outcome: Outcome
    denied_by: str | None
    retry_ms: float
    reservation: str | None = None


_G, _I, _T, _U = 0, 1, 2, 3  # the levels, in the order the script walks them


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
        )


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


@dataclass
class _Record:
    holds: list[tuple[_Level, str, _Check, float, float]]  # level, code, check, amount, interval
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


class AdmissionModel:
    """State of every level, keyed like the scripts' hashes; times in milliseconds."""

    def __init__(self, lease_ms: float = 600_000.0, record_ms: float = 3_600_000.0) -> None:
        self.lease_ms = lease_ms
        self.record_ms = record_ms
        self.hashes: dict[str, dict[str, float]] = {}
        self.levels: dict[str, _Level] = {}
        self.credits: dict[str, dict[str, float]] = {}
        self._records: dict[str, _Record] = {}
        self._compiled: dict[tuple[str, str, str, bool, str], tuple[str | None, list[_Check]]] = {}
        self._level_cache: dict[tuple[str, str, str], tuple[_Level | None, ...]] = {}

    # --- limits -----------------------------------------------------------------------------

    def load(self, limits: Mapping[Address, float]) -> None:
        """The limits in force (what the controller wrote): replaces the previous ones."""
        hashes = limit_hashes(limits)
        if hashes != self.hashes:
            self.hashes = hashes
            self._compiled.clear()

    def set_balance(self, tenant: str, usd_micro: float) -> None:
        self.credits.setdefault(tenant, {"reserved": 0.0})["balance"] = usd_micro

    def _checks(
        self, tenant: str, plan: str, user: str, has_ip: bool, model: str
    ) -> tuple[str | None, list[_Check]]:
        key = (tenant, plan, user, has_ip, model)
        found = self._compiled.get(key)
        if found is None:
            found = self._compiled[key] = self._compile(tenant, plan, user, has_ip, model)
        return found

    def _compile(
        self, tenant: str, plan: str, user: str, has_ip: bool, model: str
    ) -> tuple[str | None, list[_Check]]:
        levels: list[tuple[int, str, list[str]]] = [(_G, "global/", ["global/"])]
        if has_ip:
            levels.append((_I, "ip/", ["ip/"]))
        levels.append((_T, f"tenant/{tenant}/", [f"tenant/{tenant}/", f"plan/{plan}/"]))
        if user:
            levels.append((_U, f"user/{tenant}/{user}/", [f"user/{tenant}/{user}/"]))
        fields: list[tuple[int, str]] = []
        for index, kind in enumerate(KINDS):
            if model:
                fields.append((index, f"{kind}@{model}"))
            fields.append((index, str(kind)))
        checks: list[_Check] = []
        for level, owner, hashes in levels:
            found: set[int] = set()
            for name in hashes:
                values = self.hashes.get(name, {})
                for index, field_name in fields:
                    value = values.get(field_name)
                    if value is None or math.isnan(value) or value < 0:
                        continue  # not written by Governor: the script ignores it
                    if value == 0:
                        return name + field_name, []
                    if index not in found:
                        found.add(index)
                        checks.append(
                            _Check.of(level, KINDS[index], field_name, value, owner + field_name)
                        )
        return None, checks

    # --- admit ------------------------------------------------------------------------------

    def _level(self, key: str) -> _Level:
        found = self.levels.get(key)
        if found is None:
            found = self.levels[key] = _Level()
        return found

    def admit(
        self,
        *,
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
        """One admit.lua call at `now` (ms). Credits in micro-USD (None: no credits)."""
        shed, checks = self._checks(tenant, plan, user, bool(ip), model)
        if shed is not None:
            return Decision("shed", shed, 0.0)
        for c in checks:
            if c.sized and tokens > c.limit:
                return Decision("too_large", c.address, 0.0)
        today = math.floor(now / DAY_MS)
        levels = self._levels(tenant, ip, user)
        for code, level in enumerate(levels):
            if level is not None and level.heap and level.heap[0][0] <= now:
                self._sweep(level, tenant if code == _T else None, now)
        # Budgets first: when a budget is spent, waiting will not help (402).
        budgets: list[tuple[_Check, float, float]] = []
        for c in checks:
            if c.kind is LimitKind.TOKENS_PER_DAY:
                state = levels[c.level].fields  # type: ignore[union-attr]
                used = used_today(state.get(c.day), state.get(c.used), today)
                held = state.get(c.held, 0.0)
                if tokens > c.limit - used - held:
                    return Decision("budget_exhausted", c.address, (today + 1) * DAY_MS - now)
                budgets.append((c, used, held))
        ledger = self.credits.get(tenant)
        if credit_cost is not None:
            if ledger is None:
                ledger = self.credits[tenant] = {"reserved": 0.0}
            available = ledger.get("balance", 0.0) - ledger["reserved"]
            if available - credit_cost < credit_floor:
                return Decision("budget_exhausted", f"credits/{tenant}", 0.0)
        # Rates (GCRA) and concurrency; nothing is written until every check passed.
        wait, denied_by = 0.0, None
        moves: list[tuple[_Check, float]] = []
        for c in checks:
            state = levels[c.level].fields  # type: ignore[union-attr]
            if c.period is not None:
                tat = current_tat(state.get(c.tat), state.get(c.ivl), c.interval, now, c.period)
                new_tat = tat + (tokens if c.tokens else 1.0) * c.interval
                over = new_tat - now - c.period
                if over > 0 and (denied_by is None or over > wait):
                    denied_by, wait = c.address, over
                moves.append((c, new_tat))
            elif c.kind is LimitKind.CONCURRENT_REQUESTS:
                opened = state.get(c.open, 0.0)
                if opened + 1 > c.limit and (denied_by is None or wait < 1000.0):
                    denied_by, wait = c.address, 1000.0
                moves.append((c, opened + 1))
        if denied_by is not None:
            return Decision("rate_limited", denied_by, wait)
        expires = now + self.lease_ms
        holds: list[tuple[_Level, str, _Check, float, float]] = []
        for c, value in moves:
            level = levels[c.level]
            assert level is not None
            if c.period is not None:
                level.fields[c.tat], level.fields[c.ivl] = value, c.interval
                if c.tokens:
                    holds.append((level, "t", c, tokens, c.interval))
            else:
                level.fields[c.open] = value
                level.lease(f"{c.open}|{rid}", expires)
                holds.append((level, "c", c, 1.0, 0.0))
        for c, used, held in budgets:
            level = levels[c.level]
            assert level is not None
            state = level.fields
            state[c.day], state[c.used], state[c.held] = today, used, held + tokens
            state[f"r|{c.field}|{rid}"] = tokens
            level.lease(f"b|{c.field}|{rid}", expires)
            holds.append((level, "b", c, tokens, 0.0))
        tenant_level = levels[_T]
        assert tenant_level is not None
        if credit_cost is not None and ledger is not None:
            ledger["reserved"] += credit_cost
            ledger["r|" + rid] = credit_cost
            tenant_level.lease("$|" + rid, expires)
        self._records[rid] = _Record(
            holds, tenant_level, credit_cost or 0.0, credit_cost is not None
        )
        tenant_level.lease("x|" + rid, now + self.lease_ms + self.record_ms)
        return Decision("allow", None, 0.0, rid)

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
                if level.unlease(f"{c.open}|{rid}"):
                    state[c.open] = state.get(c.open, 0.0) - 1
            elif code == "b":
                if level.unlease(f"b|{c.field}|{rid}"):
                    state[c.held] = state.get(c.held, 0.0) - reserved
                    state.pop(f"r|{c.field}|{rid}", None)
                used = used_today(state.get(c.day), state.get(c.used), today)
                state[c.day], state[c.used] = today, used + actual
        ledger = self.credits.setdefault(tenant, {"reserved": 0.0})
        if record.credit > 0 and record.tenant.unlease("$|" + rid):
            ledger["reserved"] -= record.credit
            ledger.pop("r|" + rid, None)
        if cost > 0 and record.charge:
            ledger["balance"] = ledger.get("balance", 0.0) - cost
        record.tenant.unlease("x|" + rid)
        return True

    # --- reading ----------------------------------------------------------------------------

    def budget_used(self, tenant: str, name: str, now: float) -> float:
        """Settled tokens today of a tenant-level budget field (e.g. `tokens_per_day`)."""
        state = self._level(f"t:{tenant}").fields
        return used_today(state.get("d|" + name), state.get("u|" + name), math.floor(now / DAY_MS))
