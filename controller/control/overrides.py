"""What people set by hand in Redis: overrides and the freeze flag (both expire by TTL), tenants.

A tenant's plan has one source of truth that the controller and the gateway both read: the
registry (`governor tenants set`, which also moves the tenant's API keys), and for a tenant
known only through its API keys (`governor keys create --tenant X --plan P`), the plan of
those keys, which is what the gateway enforces. Keys on several plans make it unknown.
"""

from __future__ import annotations

import json
import math
import time
from collections import defaultdict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

import redis

from controller.clients.paging import scan_hash
from controller.clients.redis import (
    Owned,
    is_wrong_type,
    location,
    not_governors,
    refuse_other_contract,
    wrapped,
    wrong_types,
)
from controller.contract.apikeys import parsed_records
from controller.contract.keys import KeySchema, checked
from controller.contract.records import override_from_json, override_to_json
from controller.errors import SinkError
from controller.model import Address, AddressError, Override, validate_id, value_problem

if TYPE_CHECKING:
    from redis.client import Pipeline

_Record = TypeVar("_Record")


@dataclass(frozen=True, slots=True)
class Freeze:
    """Automation is frozen until `expires_at`: automatic changes stop, overrides still apply."""

    actor: str
    reason: str
    set_at: float
    expires_at: float


@dataclass(frozen=True, slots=True)
class ReloadConfirmation:
    """A person let the policy set `version` in although it removes many limits."""

    version: str
    actor: str
    reason: str
    set_at: float
    expires_at: float


@dataclass(frozen=True, slots=True)
class ControlState:
    """Everything the resolver takes from people each tick."""

    overrides: Mapping[Address, Override]
    freeze: Freeze | None
    tenants: Mapping[str, str]  # tenant → plan (the registry, else its API keys' plan)

    @property
    def frozen(self) -> bool:
        return self.freeze is not None


# The plan of a tenant whose API keys are on several plans and which is not registered: no
# plan has this name, so an action scaling its plan's limit finds no baseline, and the loop
# reports the engagement as writing nothing (governor_engagements_unwritten_total).
CONFLICTING_PLANS = ""
# Key records are read again when their count changes, else at most this often (a plan
# moved by `governor tenants set` is in the registry at once, which wins).
KEY_PLANS_REFRESH_SECONDS = 60.0


def key_plans(records: Mapping[str, str]) -> dict[str, str]:
    """tenant → plan of the API key records; a record that does not parse as the gateway
    parses it stands for nobody (the gateway refuses it too)."""
    plans: defaultdict[str, set[str]] = defaultdict(set)
    for record in parsed_records(records.values()):
        plans[record.tenant].add(record.plan)
    return {t: next(iter(p)) if len(p) == 1 else CONFLICTING_PLANS for t, p in plans.items()}


def _ttl_ms(ttl_seconds: float) -> int:
    if not (math.isfinite(ttl_seconds) and ttl_seconds > 0):
        raise ValueError(f"TTL {ttl_seconds!r} must be a positive number of seconds")
    return max(1, round(ttl_seconds * 1000))


class ControlStore:
    """Overrides, freeze and the tenant registry under one key prefix."""

    def __init__(
        self, client: redis.Redis[str], keys: KeySchema, clock: Callable[[], float] = time.time
    ) -> None:
        self.client = client
        self.keys = keys
        self._clock = clock
        # The key-registered tenants: (record count, read at, tenant → plan).
        self._key_plans: tuple[int, float, dict[str, str]] = (-1, -math.inf, {})

    # Overrides: the string key's TTL is the promise; the sorted set only indexes them.
    def set_override(
        self, address: Address, value: float, *, ttl_seconds: float, actor: str, reason: str
    ) -> tuple[Override, Override | None]:
        """Pin `address` to `value` for `ttl_seconds`; returns (new, previous or None)."""
        if not (math.isfinite(value) and value >= 0):
            raise ValueError(f"override value {value!r} must be a finite number >= 0")
        problem = value_problem(address.limit, value)
        if problem is not None:
            raise ValueError(f"override value {value!r}: {problem}")
        ttl = _ttl_ms(ttl_seconds)
        now = self._clock()
        override = Override(checked(address), value, now + ttl / 1000, actor, reason)
        key = self.keys.override(address)
        with wrapped(self.client, f"set the override of {address}", self._owned):
            self._refuse_other_contract(f"set the override of {address}")
            previous = self._replaced_override(address)
            # MULTI does not roll back: with an index of another type the record would be
            # written and its ZADD refused, an override that is never applied nor listed.
            index = self.keys.override_index
            named = wrong_types(self.client, {index: self._owned()[index]})
            if named:
                raise SinkError(
                    f"Redis at {location(self.client)}: set the override of {address} failed, "
                    f"nothing written: {named}"
                )
            pipe = self.client.pipeline(transaction=True)
            pipe.set(key, override_to_json(override, set_at=now), px=ttl)
            pipe.zadd(self.keys.override_index, {str(address): override.expires_at})
            pipe.execute()
        return override, previous

    def clear_override(self, address: Address) -> Override | None:
        """Remove an override; returns what was removed (None: there was none)."""
        with wrapped(self.client, f"clear the override of {address}", self._owned):
            self._refuse_other_contract(f"clear the override of {address}")
            previous = self._replaced_override(address)
            pipe = self.client.pipeline(transaction=True)
            pipe.delete(self.keys.override(address))
            pipe.zrem(self.keys.override_index, str(address))
            pipe.execute()
        return previous

    def override(self, address: Address) -> Override | None:
        with wrapped(self.client, f"read the override of {address}", self._owned):
            return self._get_override(address)

    def _get_override(self, address: Address) -> Override | None:
        pipe = self.client.pipeline(transaction=True)
        pipe.get(self.keys.override(address))
        pipe.pttl(self.keys.override(address))
        text, pttl = pipe.execute()
        return self._decode_override(self.keys.override(address), text, pttl)

    def _replaced_override(self, address: Address) -> Override | None:
        """The override about to be replaced or cleared; None for an unreadable one, which
        setting or clearing is the way to repair (also when the key holds another type)."""
        try:
            return self._get_override(address)
        except SinkError:
            return None
        except redis.ResponseError as exc:
            if not is_wrong_type(exc):
                raise
            return None

    def _decode_override(self, key: str, text: str | None, pttl: int) -> Override | None:
        if text is None or pttl == -2:
            return None
        try:
            # The key's remaining TTL is the truth (server clock), not the stored expiry.
            return override_from_json(text, expires_at=self._clock() + max(pttl, 0) / 1000)
        except (ValueError, KeyError, TypeError) as exc:
            raise _unreadable(
                key, text, exc, "`governor override clear ADDRESS` removes it"
            ) from None

    def overrides(self) -> dict[Address, Override]:
        """Every override in force now (expired ones are gone with their keys)."""
        with wrapped(self.client, "list overrides", self._owned):
            return self._overrides()

    def _overrides(self) -> dict[Address, Override]:
        index = self.keys.override_index
        names, expired = self._indexed_addresses()
        keys = [self.keys.override(Address.parse(name)) for name in names]
        pipe = self.client.pipeline(transaction=False)
        for key in keys:
            pipe.get(key)
            pipe.pttl(key)
        replies = pipe.execute()
        found: dict[Address, Override] = {}
        for i, name in enumerate(names):
            override = self._decode_override(keys[i], replies[2 * i], replies[2 * i + 1])
            if override is None:
                expired.append(name)
            else:
                found[override.address] = override
        # The index is pruned by what Redis says expired, never by our clock.
        if expired:
            self.client.zrem(index, *expired)
        return found

    def _indexed_addresses(self) -> tuple[list[str], list[str]]:
        """The override index's addresses, and the members that are none (pruned with the
        expired: the index is Governor's own, and such a member indexes no override)."""
        names: list[str] = self.client.zrange(self.keys.override_index, 0, -1)
        good: list[str] = []
        for name in names:
            try:
                Address.parse(name)
            except AddressError:
                continue
            good.append(name)
        return good, [name for name in names if name not in good]

    # Freeze: one key whose TTL ends it.
    def freeze(self, *, ttl_seconds: float, actor: str, reason: str) -> Freeze:
        ttl = _ttl_ms(ttl_seconds)
        now = self._clock()
        freeze = Freeze(actor, reason, now, now + ttl / 1000)
        record = {"actor": actor, "reason": reason, "set_at": now, "expires_at": freeze.expires_at}
        with wrapped(self.client, "freeze"):
            self._refuse_other_contract("freeze")
            self.client.set(self.keys.freeze, json.dumps(record, sort_keys=True), px=ttl)
        return freeze

    def unfreeze(self) -> Freeze | None:
        """Lift the freeze; returns the freeze that was lifted (None: there was none)."""
        with wrapped(self.client, "unfreeze", self._owned):
            self._refuse_other_contract("unfreeze")
            try:
                previous = self._freeze()
            except SinkError:  # an unreadable flag is lifted all the same
                previous = None
            except redis.ResponseError as exc:  # so is a key of another type
                if not is_wrong_type(exc):
                    raise
                previous = None
            self.client.delete(self.keys.freeze)
        return previous

    def frozen(self) -> Freeze | None:
        with wrapped(self.client, "read the freeze flag", self._owned):
            return self._freeze()

    def _freeze(self) -> Freeze | None:
        text: str | None = self.client.get(self.keys.freeze)
        if text is None:
            return None
        return _record(
            self.keys.freeze,
            text,
            lambda data: Freeze(
                str(data["actor"]),
                str(data["reason"]),
                float(data["set_at"]),
                float(data["expires_at"]),
            ),
            "`governor unfreeze` clears it",
        )

    # Reload confirmation: one key, for one policy version, whose TTL ends it.
    def confirm_reload(
        self, version: str, *, ttl_seconds: float, actor: str, reason: str
    ) -> ReloadConfirmation:
        ttl = _ttl_ms(ttl_seconds)
        now = self._clock()
        confirmation = ReloadConfirmation(version, actor, reason, now, now + ttl / 1000)
        record = json.dumps(
            {
                "version": version,
                "actor": actor,
                "reason": reason,
                "set_at": now,
                "expires_at": confirmation.expires_at,
            },
            sort_keys=True,
        )
        with wrapped(self.client, "confirm the policy reload"):
            self._refuse_other_contract("confirm the policy reload")
            self.client.set(self.keys.reload_confirmation, record, px=ttl)
        return confirmation

    def reload_confirmation(self) -> ReloadConfirmation | None:
        """The confirmation in force, whatever version it names (None: there is none)."""
        with wrapped(self.client, "read the policy reload confirmation", self._owned):
            text: str | None = self.client.get(self.keys.reload_confirmation)
        if text is None:
            return None
        return _record(
            self.keys.reload_confirmation,
            text,
            lambda data: ReloadConfirmation(
                str(data["version"]),
                str(data["actor"]),
                str(data["reason"]),
                float(data["set_at"]),
                float(data["expires_at"]),
            ),
            "`governor policy confirm-reload VERSION --reason '...'` replaces it",
        )

    # The tenant registry: tenant → plan.
    def set_tenant(self, tenant: str, plan: str) -> str | None:
        """Put `tenant` on `plan`; returns the previous plan (None: it was not registered)."""
        register = self.tenant_registration(tenant, plan)
        with wrapped(self.client, f"register tenant {tenant}", self._owned):
            pipe = self.client.pipeline(transaction=True)
            register(pipe)
            previous: str | None = pipe.execute()[0]
        return previous

    def tenant_registration(self, tenant: str, plan: str) -> Callable[[Pipeline[str]], None]:
        """What puts `tenant` on `plan`, to queue in a transaction (the CLI's, beside its
        API keys' move: both or neither): an HGET of the previous plan (the first of the
        queued results), then the HSET. Checked before anything is queued."""
        validate_id(tenant, "tenant")
        validate_id(plan, "plan")
        with wrapped(self.client, f"register tenant {tenant}", self._owned):
            self._refuse_other_contract(f"register tenant {tenant}")

        def queue(pipe: Pipeline[str]) -> None:
            pipe.hget(self.keys.tenants, tenant)
            pipe.hset(self.keys.tenants, tenant, plan)

        return queue

    def tenant_plan(self, tenant: str) -> str | None:
        validate_id(tenant, "tenant")
        with wrapped(self.client, f"read tenant {tenant}", self._owned):
            plan: str | None = self.client.hget(self.keys.tenants, tenant)
        return plan

    def tenants(self) -> dict[str, str]:
        with wrapped(self.client, "list tenants", self._owned):
            # In HSCAN pages: a registry of 100k tenants in one HGETALL holds Redis ~0.1 s.
            registry = scan_hash(self.client, self.keys.tenants)
        return dict(sorted(registry.items()))

    def plans(self) -> dict[str, str]:
        """Every known tenant → its plan: the registry, else its API keys' plan."""
        with wrapped(self.client, "read the API keys' tenants", self._owned):
            return {**self._tenants_of_keys(), **self.tenants()}

    def _tenants_of_keys(self) -> dict[str, str]:
        count, read_at, plans = self._key_plans
        now = self._clock()
        found = int(self.client.hlen(self.keys.api_keys))
        if found != count or not 0 <= now - read_at < KEY_PLANS_REFRESH_SECONDS:
            plans = key_plans(scan_hash(self.client, self.keys.api_keys))
            self._key_plans = (found, now, plans)
        return plans

    def read(self) -> ControlState:
        """Overrides, freeze and tenants for one tick."""
        with wrapped(self.client, "read overrides, freeze and tenants", self._owned):
            return ControlState(self._overrides(), self._freeze(), self.plans())

    def _refuse_other_contract(self, action: str) -> None:
        """Before any write: a Redis laid out by another key contract is refused, as the sink
        and the catalog refuse it (its keys mean something else there)."""
        refuse_other_contract(self.client, self.keys, action)

    def _owned(self) -> dict[str, Owned]:
        """The keys people's state lives in, each with its type and its repair (asked only
        to name the key of a WRONGTYPE error)."""
        k = self.keys
        owned = {
            k.override_index: Owned(
                "zset",
                f"delete it (redis-cli DEL {k.override_index}), then set the overrides in force "
                "again with `governor override set`: they are found through it",
            ),
            k.freeze: Owned("string", "`governor unfreeze` deletes it"),
            k.reload_confirmation: Owned(
                "string", "`governor policy confirm-reload VERSION --reason '...'` replaces it"
            ),
            k.tenants: Owned(
                "hash",
                f"delete it (redis-cli DEL {k.tenants}) and register the tenants again with "
                "`governor tenants set`",
            ),
            k.api_keys: Owned(
                "hash",
                f"delete it (redis-cli DEL {k.api_keys}) and create the API keys again with "
                "`governor keys create`",
            ),
        }
        try:
            names, _ = self._indexed_addresses()
        except redis.RedisError:
            names = []
        for name in names:
            key = k.override(Address.parse(name))
            owned[key] = Owned("string", f"`governor override clear {name}` deletes it")
        return owned


def _unreadable(key: str, text: str, exc: Exception, fix: str) -> SinkError:
    """A record at `key` that Governor never wrote; the tick keeps the last control state it
    read (loop.py) instead of failing on it every tick."""
    return SinkError(not_governors(key, text, type(exc).__name__, fix))


def _record(key: str, text: str, build: Callable[[Any], _Record], fix: str) -> _Record:
    """A JSON record read back from `key` and built, or the error naming the key and `fix`."""
    try:
        return build(json.loads(text))
    except (ValueError, KeyError, TypeError) as exc:
        raise _unreadable(key, text, exc, fix) from None
