"""API keys: made once and shown once, stored only as a hash, checked in constant time."""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Any, cast

import redis
import redis.asyncio
import structlog

from controller.clients.redis import Owned, wrapped
from controller.contract.apikeys import KeyRecord, parsed_records
from controller.contract.keys import KeySchema
from controller.errors import SinkError
from controller.model import validate_id

if TYPE_CHECKING:
    from redis.client import Pipeline

# `gov_<id>_<secret>`: the id is public (listing, revoking, logs), the secret never stored.
_KEY_PATTERN = re.compile(r"gov_([0-9a-f]{16})_([A-Za-z0-9_-]{43})")
_CACHE_SIZE = 10_000
_log = structlog.get_logger("governor.gateway")


def key_id_of(key: str) -> str | None:
    """The id inside a presented key, or None when it is not shaped like one of ours."""
    match = _KEY_PATTERN.fullmatch(key)
    return match.group(1) if match else None


def digest(key: str, secret: str | None) -> str:
    """The stored form of a key: HMAC-SHA256 with the server secret, else plain SHA-256."""
    if secret is None:
        return "sha256:" + hashlib.sha256(key.encode()).hexdigest()
    return "hmac-sha256:" + hmac.new(secret.encode(), key.encode(), hashlib.sha256).hexdigest()


def matches(record: KeyRecord, key: str, secret: str | None) -> bool:
    """Does `key` hash to the record's digest? Constant time in the digest's content."""
    return hmac.compare_digest(digest(key, secret).encode(), record.digest.encode())


def new_key() -> tuple[str, str]:
    """(key id, full key) from the OS's cryptographic random source."""
    key_id = secrets.token_hex(8)
    return key_id, f"gov_{key_id}_{secrets.token_urlsafe(32)}"


class KeyStore:
    """Create, list and revoke keys (the CLI's side, synchronous)."""

    def __init__(self, client: redis.Redis[str], keys: KeySchema, secret: str | None) -> None:
        self.client = client
        self.key = keys.api_keys
        self.secret = secret

    def _owned(self) -> dict[str, Owned]:
        """The key the API keys live in, and its repair when it holds something else: not a
        delete (that revokes every key; nothing writes them again)."""
        return {
            self.key: Owned(
                "hash",
                f"every API key lives in it, and deleting it revokes them all: move it aside "
                f"(redis-cli RENAME {self.key} {self.key}.damaged), then restore the hash from "
                "a backup or issue the keys again (governor keys create)",
            )
        }

    def create(
        self, tenant: str, plan: str, user: str | None = None, name: str | None = None
    ) -> tuple[str, KeyRecord]:
        """A new key for tenant/plan[/user]: returns the key (shown once) and its record."""
        validate_id(tenant, "tenant")
        validate_id(plan, "plan")
        if user is not None:
            validate_id(user, "user")
        key_id, key = new_key()
        with wrapped(self.client, "create an API key", self._owned):
            seconds, micros = self.client.time()
            record = KeyRecord(
                key_id, tenant, plan, user, digest(key, self.secret), seconds + micros / 1e6, name
            )
            if not self.client.hsetnx(self.key, key_id, record.to_json()):
                raise SinkError(f"API key id {key_id} already exists (run the command again)")
        return key, record

    def list(self, tenant: str | None = None) -> list[KeyRecord]:
        """Every key's record (digests included), optionally of one tenant, oldest first."""
        with wrapped(self.client, "list API keys", self._owned):
            values = self.client.hvals(self.key)
        records = [KeyRecord.from_json(text) for text in values]
        return sorted(
            (r for r in records if tenant is None or r.tenant == tenant),
            key=lambda r: (r.created_at, r.key_id),
        )

    def move_tenant(
        self, tenant: str, plan: str, first: Callable[[Pipeline[str]], None] | None = None
    ) -> tuple[tuple[str, ...], Sequence[Any]]:
        """Put every key of `tenant` on `plan` (the tenant changed plans); returns the ids of
        the keys that moved and the results of what `first` queued in the same transaction
        (the tenant's registration: both are written or neither). Atomic against concurrent
        key changes (WATCH/MULTI)."""
        validate_id(tenant, "tenant")
        validate_id(plan, "plan")
        with (
            wrapped(self.client, f"move the API keys of tenant {tenant}", self._owned),
            self.client.pipeline(transaction=True) as pipe,
        ):
            while True:
                try:
                    pipe.watch(self.key)
                    moved: dict[str | bytes, bytes | float | int | str] = {
                        record.key_id: replace(record, plan=plan).to_json()
                        # Immediate while WATCHing (before MULTI): the values themselves.
                        for record in parsed_records(cast(Iterable[str], pipe.hvals(self.key)))
                        if record.tenant == tenant and record.plan != plan
                    }
                    pipe.multi()
                    if first is not None:
                        first(pipe)
                    if moved:
                        pipe.hset(self.key, mapping=moved)
                    results = pipe.execute()
                    firsts = results[: len(results) - 1] if moved else results  # the HSET's last
                    return tuple(sorted(str(key_id) for key_id in moved)), firsts
                except redis.WatchError:
                    continue  # a key was made or revoked meanwhile: read again

    def revoke(self, key_id: str) -> dict[str, object] | None:
        """Delete a key's record; what it said (never its digest, for the journal), or None
        when there was none."""
        with wrapped(self.client, f"revoke API key {key_id}", self._owned):
            pipe = self.client.pipeline(transaction=True)
            pipe.hget(self.key, key_id)
            pipe.hdel(self.key, key_id)
            text, removed = pipe.execute()
        if not removed:
            return None
        try:
            return KeyRecord.from_json(text).public()
        except ValueError:
            return {"key_id": key_id}  # a hand-written record is gone all the same


class KeyVerifier:
    """The gateway's side: a presented key → its record, or None. Verified keys are cached."""

    def __init__(
        self,
        client: redis.asyncio.Redis[str],
        keys: KeySchema,
        secret: str | None,
        cache_seconds: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.client = client
        self.key = keys.api_keys
        self.secret = secret
        self.cache_seconds = cache_seconds
        self._clock = clock
        self._cache: OrderedDict[str, tuple[float, KeyRecord]] = OrderedDict()
        self._revoked: OrderedDict[str, None] = OrderedDict()  # ids once verified, now gone

    async def verify(self, key: str) -> KeyRecord | None:
        """The record of a valid key; None for an unknown, revoked or wrong key.

        Raises redis errors for keys not verified before: the caller decides what an outage
        means.
        """
        key_id = key_id_of(key)
        if key_id is None:
            return None
        record = self._cached(key_id)
        if record is None:
            record = await self._read(key_id)
        if record is None or not matches(record, key, self.secret):
            return None
        self._remember(record)
        return record

    async def _read(self, key_id: str) -> KeyRecord | None:
        """The usable record Redis holds for `key_id`, else None; while Redis is away, the
        one verified before the outage (a fail-open plan must keep serving its callers)."""
        try:
            text = await self.client.hget(self.key, key_id)
        except redis.RedisError:
            stale = self._cache.get(key_id)
            if stale is not None:
                return stale[1]  # checked against its digest by the caller
            if key_id in self._revoked:
                return None  # Redis said so: a 401, not a 503 asking to retry
            raise
        record = None
        if text is not None:
            try:
                record = KeyRecord.from_json(text).usable()
            except ValueError as exc:
                # A hand-edited record authenticates nobody; the operator is told which.
                _log.warning("API key record unusable; it authenticates nobody", error=str(exc))
        if record is None:
            self._forget(key_id)
        return record

    def _forget(self, key_id: str) -> None:
        """Drop a key Redis no longer vouches for (revoked, or its record spoiled): kept in
        the cache, an outage later would serve it again. Only keys once verified are
        remembered as revoked, so made-up ids cannot fill the memory."""
        if self._cache.pop(key_id, None) is None:
            return
        self._revoked[key_id] = None
        while len(self._revoked) > _CACHE_SIZE:
            self._revoked.popitem(last=False)

    def _cached(self, key_id: str) -> KeyRecord | None:
        entry = self._cache.get(key_id)
        if entry is None or self._clock() - entry[0] > self.cache_seconds:
            return None
        return entry[1]

    def _remember(self, record: KeyRecord) -> None:
        self._revoked.pop(record.key_id, None)  # a record restored from a backup
        if record.key_id not in self._cache or self._cached(record.key_id) is None:
            self._cache[record.key_id] = (self._clock(), record)
        self._cache.move_to_end(record.key_id)
        while len(self._cache) > _CACHE_SIZE:
            self._cache.popitem(last=False)
