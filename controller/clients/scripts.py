"""Running the contract's Lua enforcement scripts on Redis by EVALSHA (async and sync)."""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, cast

import redis
import redis.asyncio
from redis.exceptions import NoScriptError, RedisClusterException

from controller.clients.redis import explained, is_cluster
from controller.contract.scripts import script_source
from controller.errors import SinkError

Arg = str | int | float


class _AsyncCommands(Protocol):
    # types-redis leaves the asyncio client's execute_command untyped.
    def execute_command(self, *args: Arg) -> Awaitable[Any]: ...


class EnforcementError(SinkError):
    """Redis could not run an enforcement script (down, timed out, or refused it)."""


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
        source = script_source(name)
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
        if is_cluster(client):
            return await self._run_routed(client, (*keys, *args, *fixed, *tail), len(keys))
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
            raise self._failed(exc, clustered=False) from exc
        finally:
            await pool.release(connection)

    async def _run_routed(
        self, client: redis.asyncio.Redis[str], values: Sequence[Arg], key_count: int
    ) -> Any:
        """On a Cluster: the client routes by the keys' slot (and follows MOVED); a script
        missing on the node that serves it (a promoted replica) is loaded there first."""
        commands = cast(_AsyncCommands, client)
        try:
            try:
                return await commands.execute_command("EVALSHA", self.sha, key_count, *values)
            except NoScriptError:
                # SCRIPT LOAD goes to every master: the next miss is on another new one.
                await cast(Any, client).script_load(self.source)
                return await commands.execute_command("EVALSHA", self.sha, key_count, *values)
        except (redis.RedisError, RedisClusterException) as exc:
            raise self._failed(exc, clustered=True) from exc

    def _failed(self, exc: Exception, *, clustered: bool) -> EnforcementError:
        return EnforcementError(f"the {self.name} script failed: {explained(exc, clustered)}")

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
        except (redis.RedisError, RedisClusterException) as exc:
            raise self._failed(exc, clustered=is_cluster(client)) from exc


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
    except (redis.RedisError, RedisClusterException) as exc:
        raise EnforcementError(f"loading the enforcement scripts failed: {exc}") from exc
