"""The Redis sink: limit hashes per scope owner, a ledger for drift, one MULTI/EXEC per apply."""

from __future__ import annotations

import dataclasses
import functools
import time
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from typing import cast

import redis

from controller.errors import SinkError
from controller.model import Address, AddressError, Decision, LimitKind, interned
from controller.reconcile import Change
from controller.settings import RedisSettings
from controller.sinks import ApplyResult, SinkState
from controller.sinks.connection import connect, location, wrapped
from controller.sinks.fence import Fence, FencedError
from controller.sinks.keys import CONTRACT_VERSION, KeySchema, format_value, parse_value
from controller.sinks.records import decision_key, decision_to_json

# Bump the version, stamp the contract and announce, atomically inside the apply's MULTI.
_BUMP = """
local version = redis.call('INCR', KEYS[1])
redis.call('SET', KEYS[2], ARGV[2])
redis.call('PUBLISH', ARGV[1], version)
return version
"""
# Read every owner hash, the ledger and the version in one atomic call (one command to pack
# and parse instead of one per hash: the client, not Redis, is the cost at 100k limits).
_READ = """
local out = {}
for i, key in ipairs(KEYS) do
  if i < #KEYS then out[i] = redis.call('HGETALL', key) end
end
out[#KEYS] = redis.call('GET', KEYS[#KEYS]) or '0'
return out
"""
# Read back after EXEC: which (key, field) pairs do not hold what we wrote ('' = deleted).
_VERIFY = """
local bad = {}
for i, key in ipairs(KEYS) do
  local value = redis.call('HGET', key, ARGV[i]) or ''
  if value ~= ARGV[#KEYS + i] then bad[#bad + 1] = i end
end
return bad
"""


_RECORDS_PER_WRITE = 5000


class RedisSink:
    """Limits in Redis per docs/redis-contract.md. One instance per process; not thread-safe,
    except `read`, which keeps no state of its own (the loop reads back in a thread)."""

    def __init__(
        self, client: redis.Redis[str], keys: KeySchema, clock: Callable[[], float] = time.time
    ) -> None:
        self.client = client
        self.keys = keys
        self._clock = clock
        # Set by the daemon: the leader's fence, checked atomically by every apply.
        self.fence: Callable[[], Fence | None] | None = None
        self._verify = client.register_script(_VERIFY)
        self._read = client.register_script(_READ)
        # The hash of the decision last recorded per address (`decision_key`): 8 bytes, not
        # the key's tuples, per tenant. Two different decisions of one address with equal
        # 64-bit hashes (odds 2^-64) would leave its record one decision behind.
        # None: not yet read back.
        self._recorded: dict[Address, int] | None = None

    @classmethod
    def from_url(cls, url: str, settings: RedisSettings) -> RedisSink:
        return cls(connect(url, settings), KeySchema(settings.key_prefix))

    @property
    def location(self) -> str:
        return location(self.client)

    def check(self) -> None:
        """PING, and refuse a Redis written under another contract version."""
        with wrapped(self.client, "check"):
            self.client.ping()
            found = self.client.get(self.keys.contract)
        if found is not None and found != str(CONTRACT_VERSION):
            raise SinkError(
                f"Redis at {self.location} holds key contract {found}, this Governor speaks "
                f"{CONTRACT_VERSION}; use another GOVERNOR_REDIS__KEY_PREFIX or migrate"
            )

    def version(self) -> int:
        with wrapped(self.client, "read the version"):
            return int(self.client.get(self.keys.version) or 0)

    def stored(self, address: Address) -> float | None:
        """The value gateways see for one address now (None: not set)."""
        key, name = self.keys.owner_and_field(address)
        with wrapped(self.client, f"read {address}"):
            text: str | None = self.client.hget(key, name)
        return None if text is None else parse_value(text)

    def read(self) -> SinkState:
        """Every limit in the hashes Governor has written to, its ledger and the version."""
        with wrapped(self.client, "read limits"):
            owners = sorted({_ledger_entry(self.keys.prefix, t)[0] for t in self._ledger()} - {""})
            reply = self._read(keys=[*owners, self.keys.written, self.keys.version])
        pairs = [_pairs(r) for r in reply[:-1]]
        hashes, ledger, version = pairs[:-1], pairs[-1], reply[-1]
        actual: dict[Address, float] = {}
        foreign: list[str] = []
        prefix = self.keys.prefix
        for key, fields in zip(owners, hashes, strict=True):
            for name, text in fields.items():
                address = _field_address(prefix, key, name)
                if address is None:
                    foreign.append(f"{key} {name}")
                else:
                    actual[address] = parse_value(text)
        written: dict[Address, float] = {}
        for text, value in ledger.items():
            address = _ledger_entry(prefix, text)[1]
            if address is not None:
                written[address] = parse_value(value)
        return SinkState(actual, written, int(version or 0), tuple(foreign))

    def _ledger(self) -> list[str]:
        names: list[str] = self.client.hkeys(self.keys.written)
        return names

    def apply(self, changes: Sequence[Change]) -> ApplyResult:
        """Write `changes` and the ledger in ONE MULTI/EXEC with a version bump; read back.

        Nothing to do: no command is sent. Redis runs a transaction all-or-nothing with
        respect to connection failures, so a retried apply never lands half-way.
        """
        if not changes:
            return ApplyResult(version=self.version())
        prefix = self.keys.prefix
        sets: dict[str, dict[str | bytes, str | bytes | float | int]] = defaultdict(dict)
        deletes: dict[str, list[str]] = defaultdict(list)
        ledger_sets: dict[str | bytes, str | bytes | float | int] = {}
        ledger_deletes: list[str] = []
        verify_keys: list[str] = []
        verify_fields: list[str] = []
        verify_values: list[str] = []
        for change in changes:
            key, name, text = _target(prefix, change.address)
            verify_keys.append(key)
            verify_fields.append(name)
            if change.new is None:
                deletes[key].append(name)
                ledger_deletes.append(text)
                verify_values.append("")
            else:
                value = format_value(change.new)
                sets[key][name] = ledger_sets[text] = value
                verify_values.append(value)
        with wrapped(self.client, f"apply {len(changes)} limit changes"):
            pipe = self.client.pipeline(transaction=True)
            fence = self.fence() if self.fence is not None else None
            if fence is not None:
                # WATCH, check the token, then MULTI: EXEC fails if leadership changed meanwhile.
                pipe.watch(fence.key)
                # After WATCH the pipeline runs commands at once: `get` returns the value.
                holder = cast("str | None", pipe.get(fence.key))
                if holder != fence.token:
                    pipe.reset()
                    raise FencedError(
                        f"not applying {len(changes)} changes: this replica no longer holds "
                        f"the leader lock {fence.key!r}"
                    )
                pipe.multi()
            for key, mapping in sets.items():
                pipe.hset(key, mapping=mapping)
            for key, names in deletes.items():
                pipe.hdel(key, *names)
            if ledger_sets:
                pipe.hset(self.keys.written, mapping=ledger_sets)
            if ledger_deletes:
                pipe.hdel(self.keys.written, *ledger_deletes)
            # Inline EVAL: a registered script in a pipeline costs an extra SCRIPT EXISTS trip.
            pipe.eval(_BUMP, 2, self.keys.version, self.keys.contract, self.keys.channel,
                      CONTRACT_VERSION)  # fmt: skip
            try:
                version = int(pipe.execute()[-1])
            except redis.WatchError:
                raise FencedError(
                    f"not applied: leadership changed while writing {len(changes)} changes"
                ) from None
            bad = self._verify(keys=verify_keys, args=verify_fields + verify_values)
        mismatched = tuple(changes[int(i) - 1] for i in bad)
        return ApplyResult(version=version, applied=tuple(changes), mismatched=mismatched)

    def record_decisions(self, decisions: Mapping[Address, Decision], tick: int | None) -> int:
        """Store each address's last decision for `explain`; only records whose decision
        changed (`decision_key`) are written, and records of addresses gone are removed."""
        now = self._clock()
        fresh = {a: hash(decision_key(d)) for a, d in decisions.items()}
        gone: list[str] = []
        recorded = self._recorded
        if recorded is None:  # first call: forget records of addresses no longer desired
            with wrapped(self.client, "read decision records"):
                stored: list[str] = self.client.hkeys(self.keys.decisions)
            gone = sorted(set(stored) - {str(a) for a in fresh})
            recorded = {}
        changed = [a for a, key in fresh.items() if recorded.get(a) != key]
        gone += [str(a) for a in recorded if a not in fresh]
        if not changed and not gone:
            self._recorded = fresh
            return 0
        with wrapped(self.client, "record decisions"):
            # In slices: the first tick records every limit, and 100k JSON records encoded
            # at once (then packed into one command) would set the process's memory peak.
            for start in range(0, len(changed), _RECORDS_PER_WRITE):
                self.client.hset(
                    self.keys.decisions,
                    mapping={
                        str(a): decision_to_json(decisions[a], tick=tick, at=now)
                        for a in changed[start : start + _RECORDS_PER_WRITE]
                    },
                )
            if gone:
                self.client.hdel(self.keys.decisions, *gone)
        self._recorded = fresh  # only once written: a failed write is retried next tick
        return len(changed) + len(gone)

    def read_decision(self, address: Address) -> str | None:
        """The JSON last-decision record of an address, if the controller wrote one."""
        with wrapped(self.client, "read a decision"):
            text: str | None = self.client.hget(self.keys.decisions, str(address))
        return text


def _pairs(flat: list[str]) -> dict[str, str]:
    return dict(zip(flat[::2], flat[1::2], strict=True))


@functools.lru_cache(maxsize=1 << 18)
def _target(prefix: str, address: Address) -> tuple[str, str, str]:
    """(owner hash key, field, address text) of a checked address, computed once."""
    key, name = KeySchema(prefix).owner_and_field(address)
    return key, name, str(address)


# Caches keyed by strings (hashed once) so a tick over 100k limits parses nothing twice.
@functools.lru_cache(maxsize=1 << 18)
def _ledger_entry(prefix: str, text: str) -> tuple[str, Address | None]:
    """A ledger field → (owner hash key, address); ("", None) for an entry we cannot read."""
    try:
        address = interned(text)
    except AddressError:
        return "", None  # a hand-made ledger entry: not ours to interpret
    owner = KeySchema(prefix).owner(address)
    _OWNER_BASES[owner] = address.without_model()
    return owner, address


_OWNER_BASES: dict[str, Address] = {}


@functools.lru_cache(maxsize=1 << 18)
def _field_address(prefix: str, owner: str, name: str) -> Address | None:
    """A field of an owner hash → its address; None when it is not a limit we know."""
    limit, at, model = name.partition("@")
    try:
        base = _OWNER_BASES[owner]
        address = dataclasses.replace(base, limit=LimitKind(limit), model=model if at else None)
        return interned(str(address))
    except (KeyError, ValueError, AddressError):
        return None
