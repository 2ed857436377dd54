"""The Lua enforcement scripts (package data, run by EVALSHA) and the keys they take."""

from __future__ import annotations

import functools
import hashlib
import ipaddress
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass
from importlib import resources
from typing import Any, Protocol, cast

import redis
import redis.asyncio
from redis.exceptions import NoScriptError

from controller.errors import SinkError
from controller.model import Address, LimitKind, Scope, validate_id
from controller.sinks.keys import KeySchema, escape_id

Arg = str | int | float


class _AsyncCommands(Protocol):
    # types-redis leaves the asyncio client's execute_command untyped.
    def execute_command(self, *args: Arg) -> Awaitable[Any]: ...


class EnforcementError(SinkError):
    """Redis could not run an enforcement script (down, timed out, or refused it)."""


def _source(name: str) -> str:
    return resources.files("controller.gateway").joinpath(f"lua/{name}.lua").read_text()


def _bulk(value: Arg) -> bytes:
    """One RESP bulk string."""
    data = value.encode() if type(value) is str else str(value).encode()
    return b"$%d\r\n%s\r\n" % (len(data), data)


@functools.lru_cache(maxsize=1 << 16)
def _packed(keys: tuple[str, ...]) -> bytes:
    return b"".join(_bulk(key) for key in keys)


@functools.lru_cache(maxsize=1 << 12)
def _packed_fixed(args: tuple[str, ...]) -> bytes:
    # A separate cache: per-request values must not push a tenant's keys out of `_packed`.
    return b"".join(_bulk(arg) for arg in args)


@dataclass(frozen=True)
class Script:
    """One script: lib.lua + its body, known by the SHA1 Redis gives it."""

    name: str
    source: str
    sha: str

    @classmethod
    def named(cls, name: str) -> Script:
        # One shared prelude (time, field names, lease sweep) keeps the scripts consistent.
        source = _source("lib") + "\n" + _source(name)
        return cls(name, source, hashlib.sha1(source.encode()).hexdigest())

    async def run(
        self,
        client: redis.asyncio.Redis[str],
        keys: Sequence[str],
        args: Sequence[Arg],
        fixed: tuple[str, ...] = (),
        tail: Sequence[Arg] = (),
    ) -> Any:
        """EVALSHA; on NOSCRIPT (a restarted or flushed server) load it and call again.

        The command goes out as RESP built here, on a connection of the client's own pool:
        redis-py's generic packing costs ~0.7 µs per argument, more than the rest of the
        client side together. The keys, and `fixed` (arguments that follow `args` and repeat
        from call to call: settings, a request's resolved limits), are encoded once and
        cached; `tail` follows them. No automatic retry: a retried admit could reserve twice.
        """
        head = b"*%d\r\n$7\r\nEVALSHA\r\n$40\r\n%s\r\n$%d\r\n%d\r\n" % (
            3 + len(keys) + len(args) + len(fixed) + len(tail),
            self._sha,
            len(str(len(keys))),
            len(keys),
        )
        payload = b"".join(
            (
                head,
                _packed(tuple(keys)),
                *[_bulk(arg) for arg in args],
                _packed_fixed(fixed),
                *[_bulk(arg) for arg in tail],
            )
        )
        pool = client.connection_pool
        connection = await pool.get_connection()
        try:
            try:
                await connection.send_packed_command(payload)
                return await connection.read_response()
            except NoScriptError:
                await connection.send_packed_command(self._load)
                await connection.read_response()
                await connection.send_packed_command(payload)
                return await connection.read_response()
        except redis.RedisError as exc:
            raise EnforcementError(f"the {self.name} script failed: {exc}") from exc
        finally:
            await pool.release(connection)

    @functools.cached_property
    def _sha(self) -> bytes:
        return self.sha.encode()

    @functools.cached_property
    def _load(self) -> bytes:
        return b"*3\r\n$6\r\nSCRIPT\r\n$4\r\nLOAD\r\n" + _bulk(self.source)

    def run_sync(self, client: redis.Redis[str], keys: Sequence[str], args: Sequence[Arg]) -> Any:
        """The same for a synchronous client (the CLI)."""
        try:
            try:
                return client.execute_command("EVALSHA", self.sha, len(keys), *keys, *args)
            except NoScriptError:
                client.execute_command("SCRIPT LOAD", self.source)
                return client.execute_command("EVALSHA", self.sha, len(keys), *keys, *args)
        except redis.RedisError as exc:
            raise EnforcementError(f"the {self.name} script failed: {exc}") from exc


ADMIT = Script.named("admit")
SETTLE = Script.named("settle")
CHARGE = Script.named("charge")
TOP_UP = Script.named("topup")
ALL_SCRIPTS = (ADMIT, SETTLE, CHARGE, TOP_UP)


async def load_scripts(client: redis.asyncio.Redis[str]) -> None:
    """SCRIPT LOAD every script once at start-up (EVALSHA then never misses)."""
    try:
        for script in ALL_SCRIPTS:
            await cast(_AsyncCommands, client).execute_command("SCRIPT LOAD", script.source)
    except redis.RedisError as exc:
        raise EnforcementError(f"loading the enforcement scripts failed: {exc}") from exc


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
    def for_prefix(cls, prefix: str) -> EnforcementKeys:
        return cls(KeySchema(prefix))

    def _key(self, *parts: str) -> str:
        return ":".join((self.schema.prefix, *parts))

    def limits(self, scope: Scope, *, plan: str = "", tenant: str = "", user: str = "") -> str:
        """A limits hash the controller writes (validates every id on the way)."""
        ids = {"plan": plan or None, "tenant": tenant or None, "user": user or None}
        return self.schema.owner(Address(scope, _ANY, **ids))

    def global_level(self) -> Level:
        return self._level(self._key("enforce", "global"))

    def ip_level(self, ip: str) -> Level:
        """`ip` as returned by `ip_id`."""
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

    @staticmethod
    def _level(state: str) -> Level:
        return Level(state, state + ":leases")

    def admit_keys(self, tenant: str, user: str | None, ip: str | None) -> tuple[str, ...]:
        """The 10 keys of admit.lua (absent levels get placeholder keys it never touches)."""
        return _admit_keys(self, tenant, user or "", ip or "")

    def settle_keys(self, tenant: str, user: str | None, ip: str | None) -> tuple[str, ...]:
        """The 10 keys of settle.lua."""
        return _settle_keys(self, tenant, user or "", ip or "")

    def charge_keys(self, tenant: str, user: str | None, ip: str | None) -> tuple[str, ...]:
        """The 6 keys of charge.lua: each level's state, then the credits and their history."""
        states = _levels(self, tenant, user or "", ip or "")[::2]
        return (*states, self.credits(tenant), self.credit_history(tenant))


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
