"""Admission on a Redis Cluster (contract 2): admit.lua and settle.lua once per slot, sent
together, their answers combined into the one answer a single call gives."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import redis.asyncio

from controller.clients.scripts import ADMIT, CHARGE, SETTLE, Arg
from controller.contract.enforcement import EnforcementKeys, Level, charge_record

Reply = list[str | int]
_LEVELS = 4
# admit.lua's answer: outcome, denied_by, retry_after_ms, then (check, remaining, ms) for the
# requests quota, the tokens quota and the budget. The check numbers sit at these indexes.
_CHECKS = (1, 3, 6, 9)
_REFUSALS = ("budget_exhausted", "rate_limited")
# Answers that end the admission as they are: the limits moved, or a counter is damaged.
_FINAL = ("stale", "corrupt")


@dataclass(frozen=True)
class SlotCall:
    """One slot's admit.lua call: its keys, its ARGV 7 (only its levels' letters), its
    share of the limit values, whether it checks the version, and where its checks start
    in the whole request's numbering."""

    keys: tuple[str, ...]
    letters: str
    values: tuple[str, ...]
    checks_version: bool
    offset: int
    credits: bool
    settle: tuple[str, ...]  # settle.lua's keys for this slot (a release after a refusal)

    def fixed(self, fixed: tuple[str, ...]) -> tuple[str, ...]:
        """admit.lua's fixed arguments for this call: the version ('' where not checked),
        the settings, this call's letters and values."""
        version = fixed[0] if self.checks_version else ""
        return (version, *fixed[1:4], self.letters, *self.values)

    def tail(self, credits: tuple[str, ...]) -> tuple[str, ...]:
        return credits if self.credits else ()


def _spread(level: Level) -> tuple[str, ...]:
    """A level's pair in every level's place: admit.lua and settle.lua read the levels a
    call has no letters for, and the one they keep the settle record in (the tenant's
    place), from keys of the call's own slot."""
    return (level.state, level.leases) * _LEVELS


def admit_calls(
    keys: EnforcementKeys, tenant: str, user: str, ip: str, letters: str, values: Sequence[str]
) -> list[SlotCall]:
    """The calls of one admission: the shared slot's (version, global level), the client
    address's (when it has checks) and the tenant's (tenant, user, credits)."""
    parts = letters.split("/")
    counts = [len(part) for part in parts]
    settles = settle_keys(keys, tenant, user, ip)
    shared = keys.global_level()
    calls = [
        SlotCall(
            (keys.schema.version, *_spread(shared), shared.state),
            f"{parts[0]}///",
            tuple(values[: counts[0]]),
            checks_version=True,
            offset=0,
            credits=False,
            settle=settles[0],
        )
    ]
    if ip and parts[1]:
        level = keys.ip_level(ip)
        calls.append(
            SlotCall(
                (_no_version(level), *_spread(level), level.state),
                f"/{parts[1]}//",
                tuple(values[counts[0] : counts[0] + counts[1]]),
                checks_version=False,
                offset=counts[0],
                credits=False,
                settle=settles[1],
            )
        )
    own = keys.tenant_level(tenant)
    mine = keys.user_level(tenant, user) if user else own
    start = counts[0] + counts[1]
    calls.append(
        SlotCall(
            (_no_version(own), own.state, own.leases, own.state, own.leases,
             own.state, own.leases, mine.state, mine.leases, keys.credits(tenant)),
            f"//{parts[2]}/{parts[3]}",
            tuple(values[start:]),
            checks_version=False,
            offset=start,
            credits=True,
            settle=settles[-1],
        )
    )  # fmt: skip
    return calls


def _no_version(level: Level) -> str:
    """A key of the level's slot that is never written: its call's version check (against
    '') always passes; the shared slot's call checks the real one."""
    return level.state + ":no-version"


def settle_keys(keys: EnforcementKeys, tenant: str, user: str, ip: str) -> list[tuple[str, ...]]:
    """settle.lua's keys for each slot an admission may have reserved in: each slot keeps
    its own settle record, so each settles what it holds."""
    shared = keys.global_level()
    calls = [(*_spread(shared), shared.state, shared.state)]
    if ip:
        level = keys.ip_level(ip)
        calls.append((*_spread(level), level.state, level.state))
    own = keys.tenant_level(tenant)
    mine = keys.user_level(tenant, user) if user else own
    calls.append(
        (own.state, own.leases, own.state, own.leases, own.state, own.leases,
         mine.state, mine.leases, keys.credits(tenant), keys.credit_history(tenant))
    )  # fmt: skip
    return calls


def renumbered(reply: Reply, offset: int) -> Reply:
    """A slot call's answer with its check numbers in the whole request's numbering."""
    out = list(reply)
    for at in _CHECKS:
        number = int(out[at])
        if number > 0:
            out[at] = number + offset
    return out


def combined(replies: Sequence[Reply], values: Sequence[float]) -> Reply:
    """One answer from the slots' (renumbered) answers, as a single call would give: a spent
    budget first (as admit.lua checks budgets first), else the rate refusal with the longest
    wait, else allow; the tightest quotas of all. `values`: each check's limit."""
    budgets = [r for r in replies if r[0] == "budget_exhausted"]
    rates = [r for r in replies if r[0] == "rate_limited"]
    out: Reply = ["allow", 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]
    if budgets:
        return list(budgets[0])
    if rates:
        worst = max(rates, key=lambda r: int(r[2]))
        out[0], out[1], out[2] = worst[0], worst[1], worst[2]
    for at in (3, 6):  # requests, tokens: the fewest left
        shown = [r for r in replies if int(r[at]) != 0]
        if shown:
            tightest = min(shown, key=lambda r: int(r[at + 1]))
            out[at : at + 3] = tightest[at : at + 3]
    out[9:12] = _tightest_budget(replies, values)
    return out


def _tightest_budget(replies: Sequence[Reply], values: Sequence[float]) -> Reply:
    """The token budget with the smallest share left, else the credits (-1), else none."""
    tokens = [r for r in replies if int(r[9]) > 0]
    if tokens:
        best = min(tokens, key=lambda r: int(r[10]) / max(values[int(r[9]) - 1], 1.0))
        return list(best[9:12])
    credits = [r for r in replies if int(r[9]) < 0]
    return list(credits[0][9:12]) if credits else [0, 0, 0]


def refused(reply: Reply) -> bool:
    return reply[0] in _REFUSALS


class SlotAdmission:
    """admit.lua per slot, concurrently; what a slot took is released when another refused
    (or answered 'stale', or failed): a slot never keeps a hold the request does not get."""

    def __init__(self, client: redis.asyncio.Redis[str], keys: EnforcementKeys) -> None:
        self.client = client
        self.keys = keys

    async def admit(
        self,
        who: tuple[str, str, str],
        head: tuple[Arg, ...],
        fixed: tuple[str, ...],
        resolved: tuple[str, tuple[str, ...], tuple[float, ...]],
        credits: tuple[str, ...],
    ) -> Reply:
        """`who`: tenant, user, ip; `head`: request id, tokens; `fixed`: version, lease ms,
        record ms, model; `resolved`: ARGV 7 (letters, or a verdict), the values, their
        limits as numbers. Raises what a call raised, after the releases."""
        letters, values, limits = resolved
        calls = admit_calls(self.keys, *who, letters if "/" in letters else "///", values)
        if "/" not in letters:  # shed or too_large: only the version is checked
            calls = [SlotCall(calls[0].keys, letters, (), True, 0, False, calls[0].settle)]
        runs = [
            ADMIT.run(self.client, call.keys, head, call.fixed(fixed), call.tail(credits))
            for call in calls
        ]
        replies: list[Any] = await asyncio.gather(*runs, return_exceptions=True)
        failed = [r for r in replies if isinstance(r, BaseException)]
        whole = not failed and not any(r[0] in _FINAL or refused(r) for r in replies)
        if not whole:
            taken = [c for c, r in zip(calls, replies, strict=True) if _took(r)]
            await self._release(str(head[0]), [c.settle for c in taken])
        if failed:
            raise failed[0]
        final = [r for r in replies if r[0] in _FINAL]
        if final or "/" not in letters:
            return list((final or replies)[0])
        return combined(
            [renumbered(r, c.offset) for c, r in zip(calls, replies, strict=True)], limits
        )

    async def settle(self, who: tuple[str, str, str], args: tuple[Arg, ...]) -> bool:
        """settle.lua in every slot the admission may hold something in; True when the
        tenant's slot knew the reservation (it always keeps a record)."""
        calls = settle_keys(self.keys, *who)
        done = await asyncio.gather(*(SETTLE.run(self.client, k, args, ()) for k in calls))
        return bool(done[-1])

    async def charge(self, who: tuple[str, str, str], args: tuple[Arg, ...]) -> int:
        """charge.lua per slot: each slot's daily budgets (ARGV 11...: '<level><field>'),
        the credits with the tenant's; the number of budgets charged. Each slot keeps its own
        charge record: a repeat after a partial failure charges only the slots it missed."""
        tenant, user, ip = who
        head, budgets = args[:10], [str(b) for b in args[10:]]
        rid = str(head[0])
        shared = self.keys.global_level().state
        own = self.keys.tenant_level(tenant).state
        mine = self.keys.user_level(tenant, user).state if user else own
        calls = [((shared,) * 6 + (charge_record(shared, rid),),
                  [b for b in budgets if b[0] == "1"], False)]  # fmt: skip
        if ip:
            state = self.keys.ip_level(ip).state
            calls.append(((state,) * 6 + (charge_record(state, rid),),
                          [b for b in budgets if b[0] == "2"], False))  # fmt: skip
        tenant_keys = (own, own, own, mine, self.keys.credits(tenant),
                       self.keys.credit_history(tenant), charge_record(own, rid))  # fmt: skip
        calls.append((tenant_keys, [b for b in budgets if b[0] in "34"], True))
        runs = [
            CHARGE.run(
                self.client, keys, (*head[:2], head[2] if paid else "", *head[3:], *own_budgets)
            )
            for keys, own_budgets, paid in calls
            if own_budgets or paid
        ]
        return sum(int(n) for n in await asyncio.gather(*runs))

    async def _release(self, request_id: str, calls: list[tuple[str, ...]]) -> None:
        args: tuple[Arg, ...] = (request_id, 0, 0, "", 1, "", "")
        await asyncio.gather(*(SETTLE.run(self.client, keys, args, ()) for keys in calls))


def _took(reply: Any) -> bool:
    return isinstance(reply, list) and reply[0] == "allow"
