"""The credit ledger: a prepaid USD balance per tenant in Redis, with its history stream.

Amounts are integer micro-USD in Redis (no float drift); this module speaks USD.
Admission holds credits at each request's worst case and settle charges the actual cost
(admit.lua / settle.lua); top-ups and corrections go through `CreditLedger`.
"""

from __future__ import annotations

import math
import uuid
from dataclasses import dataclass

import redis

from controller.clients.redis import key_schema
from controller.clients.scripts import TOP_UP
from controller.contract.enforcement import EnforcementKeys
from controller.errors import SinkError
from controller.gateway.prices import MICRO, from_micro

MAX_TOP_UP_USD = 1_000_000_000.0  # far below 2^53 micro-USD, where integers stop being exact
# How long a booking's record makes a repeat of it a no-op: far beyond the client's retries
# (a few seconds), which send the same booking again when a try got no answer.
BOOKING_RECORD_MS = 3_600_000


@dataclass(frozen=True)
class CreditState:
    """A tenant's balance now: `available` is what new requests may still hold."""

    tenant: str
    balance_usd: float
    reserved_usd: float  # held by requests in flight

    @property
    def available_usd(self) -> float:
        return self.balance_usd - self.reserved_usd


@dataclass(frozen=True)
class LedgerEntry:
    """One history entry: a top-up, an adjustment or a request's charge."""

    id: str  # the stream id; its first part is the Redis server time in ms
    kind: str
    amount_usd: float  # + credit, - charge
    balance_usd: float  # after this entry
    reason: str = ""
    actor: str = ""
    request: str = ""
    model: str = ""
    tokens: int | None = None

    @property
    def at(self) -> float:
        """Unix seconds (Redis server time) of the entry."""
        return int(self.id.split("-")[0]) / 1000.0

    @classmethod
    def from_stream(cls, entry_id: str, fields: dict[str, str]) -> LedgerEntry:
        tokens = fields.get("tokens")
        return cls(
            id=entry_id,
            kind=fields.get("kind", "?"),
            amount_usd=from_micro(int(fields.get("amount_micro_usd", "0"))),
            balance_usd=from_micro(int(fields.get("balance_micro_usd", "0"))),
            reason=fields.get("reason", ""),
            actor=fields.get("actor", ""),
            request=fields.get("request", ""),
            model=fields.get("model", ""),
            tokens=int(tokens) if tokens else None,
        )


class CreditLedger:
    """Top-ups, balances and history of the credit ledger (synchronous, for the CLI)."""

    def __init__(self, client: redis.Redis[str], prefix: str, history_length: int = 10_000):
        self.client = client
        self.keys = EnforcementKeys(key_schema(client, prefix))
        self.history_length = history_length

    def top_up(self, tenant: str, usd: float, reason: str, actor: str) -> CreditState:
        """Add `usd` to `tenant`'s balance and log who and why; return the new state."""
        return self._book(tenant, "top-up", usd, reason, actor)

    def adjust(self, tenant: str, usd: float, reason: str, actor: str) -> CreditState:
        """Correct `tenant`'s balance by `usd` (negative: a charge by hand, e.g. usage served
        but not charged during an outage), logged as an adjustment; return the new state."""
        return self._book(tenant, "adjustment", usd, reason, actor)

    def _book(self, tenant: str, kind: str, usd: float, reason: str, actor: str) -> CreditState:
        # A top-up only adds; an adjustment goes either way, but is never 0.
        smallest = "above 0" if kind == "top-up" else "other than 0"
        allowed = usd > 0 if kind == "top-up" else usd != 0
        if not (math.isfinite(usd) and allowed and abs(usd) <= MAX_TOP_UP_USD):
            raise ValueError(
                f"{kind} amount {usd!r} USD must be a number {smallest} and at most "
                f"{MAX_TOP_UP_USD:,.0f} in size"
            )
        # Round to the micro-dollar the ledger keeps: the entry books exactly what it says.
        micro = round(usd * MICRO)
        # One id per booking: the client's retries repeat it, and topup.lua books it once.
        booking = self.keys.credit_booking(tenant, uuid.uuid4().hex)
        TOP_UP.run_sync(
            self.client,
            [self.keys.credits(tenant), self.keys.credit_history(tenant), booking],
            [micro, kind, reason, actor, self.history_length, BOOKING_RECORD_MS],
        )
        return self.state(tenant)

    def state(self, tenant: str) -> CreditState:
        key = self.keys.credits(tenant)
        try:
            balance, reserved = self.client.hmget(key, ["balance", "reserved"])
        except redis.RedisError as exc:
            raise SinkError(f"reading the credit balance {key} failed: {exc}") from exc
        return CreditState(tenant, from_micro(int(balance or 0)), from_micro(int(reserved or 0)))

    def history(self, tenant: str, count: int = 20) -> list[LedgerEntry]:
        """The newest `count` entries, newest first."""
        if count < 1:
            raise ValueError(f"count {count} must be at least 1")
        key = self.keys.credit_history(tenant)
        try:
            entries = self.client.xrevrange(key, count=count)
        except redis.RedisError as exc:
            raise SinkError(f"reading the credit history {key} failed: {exc}") from exc
        return [LedgerEntry.from_stream(entry_id, fields) for entry_id, fields in entries]
