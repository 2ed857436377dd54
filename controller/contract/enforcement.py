"""The keys each Lua enforcement script takes, built on the KeySchema (same ids, same tags)."""

from __future__ import annotations

import functools
import ipaddress
import re
from collections.abc import Sequence
from dataclasses import dataclass

from controller.contract.keys import SHARED_TAG, KeySchema, escape_id
from controller.errors import GovernorError
from controller.model import Address, LimitKind, Scope, validate_id


class ForwardedForError(GovernorError):
    """A trusted X-Forwarded-For that names no client address; the message is safe to show."""


@functools.lru_cache(maxsize=1 << 16)
def ip_id(ip: str) -> str:
    """A client address as an id: IPv4 as is, IPv6 by its /64 (one host usually owns one)."""
    try:
        address = ipaddress.ip_address(ip.strip())
    except ValueError:
        raise ValueError(f"client ip {ip!r} is not an IPv4 or IPv6 address") from None
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return address.exploded[:19] + "::"  # the first four groups: the /64 network
    return str(address)


FORWARDED_FOR_REFUSAL = (
    "X-Forwarded-For must end in the client's IPv4 or IPv6 address, as the proxy in front "
    "of the gateway appends it; its last entry is not one"
)


# `a.b.c.d:port`, `[v6]` or `[v6]:port` (Azure Application Gateway appends the port).
_WITH_PORT = re.compile(r"\[([^\]]+)\](?::[0-9]{1,5})?|([0-9.]+):[0-9]{1,5}")


def forwarded_client(values: Sequence[str]) -> str | None:
    """The client address in X-Forwarded-For (`values`: each header line, in order), as
    `ip_id` gives it; None when there is none (no header, or only blanks).

    The last entry is the address the trusted proxy saw and appended; the entries before it
    are whatever the client sent, so they decide nothing (taking the first let any caller
    pick its ip level's counter). A last entry that is no address is refused
    (ForwardedForError): serving it without an ip level would let the caller opt out of it.
    """
    joined = ",".join(values)  # repeated lines are one list (RFC 9110 §5.3)
    if not joined.strip():
        return None
    last = joined.rsplit(",", 1)[-1].strip()
    ported = _WITH_PORT.fullmatch(last)  # some proxies append the client's port too
    if ported is not None:
        last = ported.group(1) or ported.group(2)
    try:
        return ip_id(last)
    except ValueError:
        raise ForwardedForError(FORWARDED_FOR_REFUSAL) from None


_ANY = LimitKind.REQUESTS_PER_MINUTE  # a limits hash does not depend on the limit


@dataclass(frozen=True, slots=True)
class Level:
    """One level's enforcement state: a hash (rates, counters, holds) and its lease set."""

    state: str
    leases: str


@dataclass(frozen=True)
class EnforcementKeys:
    """Every key the scripts touch, built on the contract's KeySchema (same ids, same tags)."""

    schema: KeySchema

    @classmethod
    def for_prefix(cls, prefix: str, *, sharded: bool = False) -> EnforcementKeys:
        return cls(KeySchema(prefix, sharded))

    def _key(self, *parts: str) -> str:
        return ":".join((self.schema.prefix, *parts))

    def limits(self, scope: Scope, *, plan: str = "", tenant: str = "", user: str = "") -> str:
        """A limits hash the controller writes (validates every id on the way)."""
        ids = {"plan": plan or None, "tenant": tenant or None, "user": user or None}
        return self.schema.owner(Address(scope, _ANY, **ids))

    def global_level(self) -> Level:
        if self.schema.sharded:
            return self._level(self._key(SHARED_TAG, "enforce", "global"))
        return self._level(self._key("enforce", "global"))

    def ip_level(self, ip: str) -> Level:
        """`ip` as returned by `ip_id`."""
        if self.schema.sharded:
            return self._level(self._key(self.schema.ip_tag(ip), "enforce"))
        return self._level(self._key("enforce", "ip", escape_id(ip)))

    def tenant_level(self, tenant: str) -> Level:
        return self._level(self._key(self.schema.tenant_tag(tenant), "enforce"))

    def user_level(self, tenant: str, user: str) -> Level:
        user_part = escape_id(validate_id(user, "user"))
        return self._level(self._key(self.schema.tenant_tag(tenant), "user", user_part, "enforce"))

    def credits(self, tenant: str) -> str:
        """Hash: balance and reserved (micro-USD), one `r|<reservation>` field per hold."""
        return self._key(self.schema.tenant_tag(tenant), "credits")

    def credit_history(self, tenant: str) -> str:
        """Stream: one entry per top-up, adjustment or charge."""
        return self._key(self.schema.tenant_tag(tenant), "credits", "history")

    def credit_booking(self, tenant: str, booking: str) -> str:
        """String, kept an hour: top-up or adjustment `booking` (a hex id the CLI makes per
        command) was booked; topup.lua books a repeat of it as nothing."""
        return self._key(self.schema.tenant_tag(tenant), "credits", "booked", booking)

    @staticmethod
    def _level(state: str) -> Level:
        return Level(state, state + ":leases")

    def admit_keys(self, tenant: str, user: str | None, ip: str | None) -> tuple[str, ...]:
        """The 10 keys of admit.lua (absent levels get placeholder keys it never touches)."""
        return _admit_keys(self, tenant, user or "", ip or "")

    def settle_keys(self, tenant: str, user: str | None, ip: str | None) -> tuple[str, ...]:
        """The 10 keys of settle.lua."""
        return _settle_keys(self, tenant, user or "", ip or "")

    def admit_groups(
        self, tenant: str, user: str | None, ip: str | None
    ) -> tuple[tuple[str, ...], ...]:
        """Contract 2: an admission's keys by slot, one script call each — the shared slot
        (the version, the global state and leases), the client address's (its state and
        leases; absent without an ip) and the tenant's (tenant and user state and leases,
        credits and their history)."""
        shared = (self.schema.version, *_pair(self.global_level()))
        tenant_level = self.tenant_level(tenant)
        own = (
            *_pair(tenant_level),
            *_pair(self.user_level(tenant, user) if user else tenant_level),
            self.credits(tenant),
            self.credit_history(tenant),
        )
        if not ip:
            return (shared, own)
        return (shared, _pair(self.ip_level(ip)), own)

    def charge_keys(
        self, tenant: str, user: str | None, ip: str | None, request_id: str
    ) -> tuple[str, ...]:
        """The 7 keys of charge.lua: each level's state, the credits and their history, then
        the request's charge record (beside the tenant's state)."""
        states = _levels(self, tenant, user or "", ip or "")[::2]
        record = charge_record(states[2], request_id)
        return (*states, self.credits(tenant), self.credit_history(tenant), record)


def charge_record(state: str, request_id: str) -> str:
    """String, kept the record grace: the fail-open request `request_id` was charged by
    charge.lua from the slot of the level state `state`; a repeated charge finds it and
    charges nothing."""
    return f"{state}:charged:{request_id}"


def _pair(level: Level) -> tuple[str, str]:
    return (level.state, level.leases)


def _levels(keys: EnforcementKeys, tenant: str, user: str, ip: str) -> tuple[str, ...]:
    # Absent levels still need a key in their slot; the tenant's own keep Cluster happy.
    spare = keys.tenant_level(tenant)
    levels = (
        keys.global_level(),
        keys.ip_level(ip) if ip else spare,
        spare,
        keys.user_level(tenant, user) if user else spare,
    )
    return tuple(key for level in levels for key in (level.state, level.leases))


@functools.lru_cache(maxsize=1 << 16)
def _admit_keys(keys: EnforcementKeys, tenant: str, user: str, ip: str) -> tuple[str, ...]:
    return (keys.schema.version, *_levels(keys, tenant, user, ip), keys.credits(tenant))


@functools.lru_cache(maxsize=1 << 16)
def _settle_keys(keys: EnforcementKeys, tenant: str, user: str, ip: str) -> tuple[str, ...]:
    return (*_levels(keys, tenant, user, ip), keys.credits(tenant), keys.credit_history(tenant))
