"""The Redis sink: limit hashes per owner, a ledger for drift, applies in bounded transactions."""

from __future__ import annotations

import dataclasses
import time
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from typing import cast

import redis

from controller.changes import Change
from controller.clients.paging import (
    CHANGES_PER_TRANSACTION,
    FIELDS_PER_WRITE,
    batches,
    grouped_batches,
    read_with_ledger,
    scan_fields,
)
from controller.clients.redis import (
    check_contract,
    connect,
    key_schema,
    location,
    refuse_cluster_node,
    refuse_cluster_url,
    refuse_other_contract,
    wrapped,
)
from controller.contract.fence import Fence, FencedError
from controller.contract.keys import CONTRACT_VERSION, KeySchema, format_value, parse_value
from controller.contract.records import decision_key, decision_to_json
from controller.errors import SinkError
from controller.model import Address, AddressError, Decision, LimitKind, interned
from controller.settings import RedisSettings
from controller.sinks import ApplyResult, PartialApplyError, SinkState
from controller.sinks.fencing import check_fence
from controller.sinks.redis_cluster import ClusterWrites

# Bump the version, stamp the contract and announce, inside the apply's last MULTI.
_BUMP = """
local version = redis.call('INCR', KEYS[1])
redis.call('SET', KEYS[2], ARGV[2])
redis.call('PUBLISH', ARGV[1], version)
return version
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

_Mapping = dict[str | bytes, str | bytes | float | int]


@dataclasses.dataclass
class _Writes:
    """One transaction's writes grouped per hash, its ledger's, and the (key, field, value)
    triples read back after EXEC ('' for a deletion)."""

    sets: defaultdict[str, _Mapping] = dataclasses.field(default_factory=lambda: defaultdict(dict))
    deletes: defaultdict[str, list[str]] = dataclasses.field(
        default_factory=lambda: defaultdict(list)
    )
    ledger_sets: _Mapping = dataclasses.field(default_factory=dict)
    ledger_deletes: list[str] = dataclasses.field(default_factory=list)
    verify_keys: list[str] = dataclasses.field(default_factory=list)
    verify_fields: list[str] = dataclasses.field(default_factory=list)
    verify_values: list[str] = dataclasses.field(default_factory=list)

    @classmethod
    def of(cls, changes: Sequence[Change], place: Callable[[Address], tuple[str, str]]) -> _Writes:
        """The writes of `changes`; `place` gives an address's (owner hash key, field)."""
        writes = cls()
        for change in changes:
            key, name = place(change.address)
            text = str(change.address)
            writes.verify_keys.append(key)
            writes.verify_fields.append(name)
            if change.new is None:
                writes.deletes[key].append(name)
                writes.ledger_deletes.append(text)
                writes.verify_values.append("")
            else:
                value = format_value(change.new)
                writes.sets[key][name] = writes.ledger_sets[text] = value
                writes.verify_values.append(value)
        return writes

    @property
    def verify_args(self) -> list[str]:
        return self.verify_fields + self.verify_values

    def queue(self, pipe: redis.client.Pipeline[str], ledger: str) -> None:
        """HSET and HDEL per hash, then the ledger's."""
        for key, mapping in self.sets.items():
            pipe.hset(key, mapping=mapping)
        for key, names in self.deletes.items():
            pipe.hdel(key, *names)
        if self.ledger_sets:
            pipe.hset(ledger, mapping=self.ledger_sets)
        if self.ledger_deletes:
            pipe.hdel(ledger, *self.ledger_deletes)


class RedisSink:
    """Limits in Redis per docs/redis-contract.md. One instance per process; not thread-safe,
    except `read`, which only adds to the address table (`_place`, a cache whose entries
    never change), so the loop can read back in a thread."""

    def __init__(
        self,
        client: redis.Redis[str],
        keys: KeySchema,
        clock: Callable[[], float] = time.time,
        fence_client: redis.Redis[str] | None = None,
    ) -> None:
        self.client = client
        self.keys = keys
        self._clock = clock
        # Set by the composition root: the leader's fence, checked atomically by every apply
        # when it lives on this sink's server; on `fence_client` (Governor's own Redis, for a
        # further Redis sink) it is checked just before writing, as the Kong sink does.
        self.fence: Callable[[], Fence | None] | None = None
        self.fence_client = fence_client
        self._verify = client.register_script(_VERIFY)
        # The hash of the decision last recorded per address (`decision_key`): 8 bytes, not
        # the key's tuples, per tenant. Two different decisions of one address with equal
        # 64-bit hashes (odds 2^-64) would leave its record one decision behind.
        # None: not yet read back.
        self._recorded: dict[Address, int] | None = None
        # Each address's (owner hash, field), worked out once: 100k limits are read back
        # and diffed every tick. One table per sink instead of a cache per step.
        self._places: dict[Address, tuple[str, str]] = {}
        # One int per distinct decision hash (few: most limits are decided alike), shared by
        # the addresses in `_recorded`: a new int per changed record would outlive its tick
        # scattered among the tick's short-lived objects, and keep their memory allocated.
        self._hashes: dict[int, int] = {}
        # Contract 2 (a Redis Cluster): writes, read back and records per slot.
        self._cluster = ClusterWrites(client, keys, self._place) if keys.sharded else None

    @classmethod
    def from_url(
        cls, url: str, settings: RedisSettings, fence_client: redis.Redis[str] | None = None
    ) -> RedisSink:
        """A further Redis sink: its fence (if any) lives on `fence_client`."""
        refuse_cluster_url(url, settings)
        client = connect(url, settings)
        return cls(client, key_schema(client, settings.key_prefix), fence_client=fence_client)

    @property
    def location(self) -> str:
        return location(self.client)

    def check(self) -> None:
        """PING, and refuse a Cluster node behind a plain URL, or a Redis written under
        another contract version."""
        refuse_cluster_node(self.client)
        with wrapped(self.client, "check"):
            self.client.ping()
            found = self.client.get(self.keys.contract)
        check_contract(found, self.keys, self.location)

    def version(self) -> int:
        with wrapped(self.client, "read the version"):
            return self._version(self.client.get(self.keys.version))

    def _version(self, text: str | None) -> int:
        """The stored version; SinkError for one Governor never wrote (an INCR on it would fail
        inside the apply's MULTI after the limits were written: applied, but never announced)."""
        try:
            return int(text or 0)
        except ValueError:
            raise SinkError(
                f"Redis at {self.location}: {self.keys.version} holds {str(text)[:40]!r}, not the "
                "integer version Governor writes: delete the key (the count starts again and "
                "gateways reread their limits within a minute)"
            ) from None

    def stored(self, address: Address) -> float | None:
        """The value gateways see for one address now (None: not set)."""
        key, name = self.keys.owner_and_field(address)
        with wrapped(self.client, f"read {address}"):
            text: str | None = self.client.hget(key, name)
        return None if text is None else parse_value(text)

    def read(self) -> SinkState:
        """Every limit in the hashes Governor has written to, its ledger and the version, in
        short commands (`controller.clients.paging`): the version first, so what follows
        is no older. On a Cluster: per slot (`ClusterWrites`)."""
        if self._cluster is not None:
            return self._read_sharded(self._cluster)
        # Each owner hash's first ledger address (most hold one limit): its fields are
        # matched against it, so nothing read back is parsed again.
        bases: dict[str, Address] = {}

        def owner_of(text: str) -> str | None:
            address = _ledger_address(text)
            if address is None:
                return None
            key = self._place(address)[0]
            bases.setdefault(key, address)
            return key

        with wrapped(self.client, "read limits"):
            text, contract = self.client.mget(self.keys.version, self.keys.contract)
            check_contract(contract, self.keys, self.location)
            version = self._version(text)
            ledger, hashes = read_with_ledger(self.client, self.keys.written, owner_of)
        actual: dict[Address, float] = {}
        foreign: list[str] = []
        places = self._places
        # Limits hold few distinct values: each text parsed once (one float each, not one per
        # limit: 200k floats a read at 100k tenants, allocated while the tick decodes).
        values: dict[str, float] = {}
        for key, pairs in hashes.items():
            base = bases[key]
            field = (places.get(base) or self._place(base))[1]
            for name, text in pairs:
                found = base if field == name else self._field_address(base, name)
                if found is None:
                    foreign.append(f"{key} {name}")
                else:
                    actual[found] = values.get(text) or _parsed(values, text)
        written: dict[Address, float] = {}
        for text, value in ledger.items():
            address = _ledger_address(text)
            if address is not None:
                written[address] = values.get(value) or _parsed(values, value)
        return SinkState(actual, written, version, tuple(foreign))

    def _read_sharded(self, cluster: ClusterWrites) -> SinkState:
        """`read` on a Cluster: every slot's ledger, then the owner hashes they name (both
        pipelined per master), then the version. Not one atomic read: a tick's diff
        repairs next tick what an apply running meanwhile changed."""
        written: dict[Address, float] = {}
        values: dict[str, float] = {}
        with wrapped(self.client, "read limits"):
            for ledger in cluster.hashes(self.keys.ledgers()):
                for text, value in ledger.items():
                    address = _ledger_address(text)
                    if address is not None:
                        written[address] = values.get(value) or _parsed(values, value)
            owners = sorted({self._place(address)[0] for address in written})
            hashes = cluster.hashes(owners)
            version = self.client.get(self.keys.version)
            check_contract(self.client.get(self.keys.contract), self.keys, self.location)
        base = {self._place(address)[0]: address for address in written}
        actual: dict[Address, float] = {}
        foreign: list[str] = []
        for owner, fields in zip(owners, hashes, strict=True):
            for name, text in fields.items():
                found = self._field_address(base[owner], name)
                if found is None:
                    foreign.append(f"{owner} {name}")
                else:
                    actual[found] = values.get(text) or _parsed(values, text)
        return SinkState(actual, written, self._version(version), tuple(foreign))

    def _place(self, address: Address) -> tuple[str, str]:
        """(owner hash key, field) of a checked address, computed once per sink."""
        place = self._places.get(address)
        if place is None:
            if len(self._places) >= _PLACES_MAX:
                self._places.clear()  # addresses gone for good (tenants churn): start over
            owner, name = self.keys.owner_and_field(address)
            place = self._places[address] = (owner, _FIELDS.setdefault(name, name))
        return place

    def _field_address(self, base: Address, name: str) -> Address | None:
        """Another field of `base`'s owner hash → its address; None when it is not a limit
        we know (a hand-made entry). Parsed each time: rare (several limits per owner)."""
        limit, at, model = name.partition("@")
        try:
            address = dataclasses.replace(base, limit=LimitKind(limit), model=model if at else None)
            found = interned(str(address))
        except (ValueError, AddressError):
            return None
        return found if self._place(found) == (self._place(base)[0], name) else None

    def apply(self, changes: Sequence[Change]) -> ApplyResult:
        """Write `changes` and their ledger entries, a few hundred per MULTI/EXEC (one EXEC
        runs as one command: 10k changes in one would hold every admission waiting); the
        last transaction also bumps the version. Each read back after its EXEC.

        Nothing to do: no command is sent. Each transaction lands whole or not at all, its
        limits with their ledger entries, so a stop part-way (PartialApplyError) leaves only
        values this tick decided, no drift, and the old version: gateways keep what they
        cached under it, and the next tick diffs against what landed, writes the rest and
        bumps it. An owner hash's changes stay in one transaction (up to the bound).
        On a Cluster: one script per slot, fenced in each (`ClusterWrites.apply`).
        """
        if not changes:
            return ApplyResult(version=self.version())
        refuse_other_contract(self.client, self.keys, f"apply {len(changes)} limit changes")
        if self._cluster is not None:
            return self._apply_sharded(self._cluster, changes)

        def owner(change: Change) -> str:
            return self._place(change.address)[0]

        parts = grouped_batches(sorted(changes, key=owner), owner, CHANGES_PER_TRANSACTION)
        # Every part's writes made (each value formatted) before the first is sent: a value
        # that cannot be stored fails the whole apply, not its middle.
        writes = [_Writes.of(part, self._place) for part in parts]
        applied: list[Change] = []
        mismatched: list[Change] = []
        version = 0
        try:
            with wrapped(self.client, f"apply {len(changes)} limit changes"):
                for index, (part, write) in enumerate(zip(parts, writes, strict=True)):
                    version = self._transact(write, len(changes), bump=index == len(parts) - 1)
                    applied.extend(part)
                    bad = self._verify(keys=write.verify_keys, args=write.verify_args)
                    mismatched.extend(part[int(i) - 1] for i in bad)
        except SinkError as exc:
            if not applied:
                raise
            raise PartialApplyError(
                f"{exc}; {len(applied)} of the {len(changes)} changes were written before "
                "(each with its ledger entry) and the version was not bumped: the next tick "
                "writes the rest",
                applied,
            ) from exc
        return ApplyResult(version=version, applied=tuple(changes), mismatched=tuple(mismatched))

    def _apply_sharded(self, cluster: ClusterWrites, changes: Sequence[Change]) -> ApplyResult:
        """On a Cluster: one script per slot, fenced in each (`ClusterWrites.apply`); a lock
        kept on Governor's own Redis (a further sink) is checked just before, as elsewhere."""
        fence = self.fence() if self.fence is not None else None
        if self.fence_client is not None:
            check_fence(self.fence, self.fence_client, f"{len(changes)} changes to {self.location}")
        with wrapped(self.client, f"apply {len(changes)} limit changes"):
            version = cluster.apply(changes, fence, lock_here=self.fence_client is None)
        return ApplyResult(version=version, applied=tuple(changes))

    def _transact(self, writes: _Writes, total: int, *, bump: bool) -> int:
        """One MULTI/EXEC of `writes` (and the version bump when `bump`), fenced; the
        version after it (0 when not bumped)."""
        pipe = self.client.pipeline(transaction=True)
        self._watch_fence(pipe, total)
        writes.queue(pipe, self.keys.written)
        if bump:
            # Inline EVAL: a registered script in a pipeline costs an extra SCRIPT EXISTS trip.
            pipe.eval(_BUMP, 2, self.keys.version, self.keys.contract, self.keys.channel,
                      CONTRACT_VERSION)  # fmt: skip
        try:
            replies = pipe.execute()
        except redis.WatchError:
            raise FencedError(
                f"not applied: leadership changed while writing {total} changes"
            ) from None
        return int(replies[-1]) if bump else 0

    def _watch_fence(self, pipe: redis.client.Pipeline[str], count: int) -> None:
        """With a fence: WATCH it, check the token, then MULTI, so that EXEC fails if the
        leadership changed meanwhile. Without one the pipeline is a plain MULTI/EXEC."""
        if self.fence_client is not None:
            check_fence(self.fence, self.fence_client, f"{count} changes to {self.location}")
            return
        fence = self.fence() if self.fence is not None else None
        if fence is None:
            return
        pipe.watch(fence.key)
        # After WATCH the pipeline runs commands at once: `get` returns the value.
        holder = cast("str | None", pipe.get(fence.key))
        if holder != fence.token:
            pipe.reset()
            raise FencedError(
                f"not applying {count} changes: this replica no longer holds "
                f"the leader lock {fence.key!r}"
            )
        pipe.multi()

    def record_decisions(self, decisions: Mapping[Address, Decision], tick: int | None) -> int:
        """Store each address's last decision for `explain`; only records whose decision
        changed (`decision_key`) are written, and records of addresses gone are removed."""
        now = self._clock()
        gone: list[Address] = []
        stale: list[str]
        recorded = self._recorded
        if recorded is None:  # first call: forget records of addresses no longer desired
            with wrapped(self.client, "read decision records"):
                stored = self._recorded_addresses()
            stale = sorted(set(stored) - {str(a) for a in decisions})
            recorded = {}
        else:
            stale = []
            gone = [a for a in recorded if a not in decisions]
        # Only the changed hashes are kept: the table is updated in place, so a tick does not
        # rebuild 100k entries (new objects between the tick's own, pinning its memory).
        fresh: dict[Address, int] = {}
        get = recorded.get
        hashes = self._hashes
        if len(hashes) >= _PLACES_MAX:
            hashes.clear()  # decisions long gone: start over
        for address, decision in decisions.items():
            key = hash(decision_key(decision))
            if get(address) != key:
                fresh[address] = hashes.setdefault(key, key)
        if not fresh and not gone and not stale:
            self._recorded = recorded
            return 0
        changed = list(fresh)
        removed = stale + [str(a) for a in gone]
        with wrapped(self.client, "record decisions"):
            self._write_records(changed, removed, decisions, tick, now)
        # Only once written: a failed write is retried next tick.
        recorded.update(fresh)
        for address in gone:
            del recorded[address]
        self._recorded = recorded
        return len(changed) + len(removed)

    def read_decision(self, address: Address) -> str | None:
        """The JSON last-decision record of an address, if the controller wrote one."""
        key = self.keys.decisions_of(self._place(address)[0])
        with wrapped(self.client, "read a decision"):
            text: str | None = self.client.hget(key, str(address))
        return text

    def _recorded_addresses(self) -> set[str]:
        """Every address with a decision record (contract 2: in every slot's hash), read in
        pages on a single Redis."""
        if self._cluster is None:
            return scan_fields(self.client, self.keys.decisions)
        decisions = [self.keys.decisions_of(ledger) for ledger in self.keys.ledgers()]
        return {name for fields in self._cluster.hashes(decisions) for name in fields}

    def _write_records(
        self,
        changed: Sequence[Address],
        removed: Sequence[str],
        decisions: Mapping[Address, Decision],
        tick: int | None,
        now: float,
    ) -> None:
        """HSET the `changed` addresses' records, HDEL the `removed` fields, each in its hash
        (one, or one per slot on a Cluster; pipelined per master). In slices: the first tick
        records every limit, and 100k JSON records encoded at once would set the process's
        memory peak; and in commands of a few hundred fields: one HSET of thousands would
        hold Redis for milliseconds."""
        for start in range(0, len(changed), _RECORDS_PER_WRITE):
            records: dict[str, dict[str | bytes, str | bytes | float | int]] = defaultdict(dict)
            for address in changed[start : start + _RECORDS_PER_WRITE]:
                records[self._records_of(address)][str(address)] = decision_to_json(
                    decisions[address], tick=tick, at=now
                )
            pipe = self.client.pipeline(transaction=False)
            for key, mapping in records.items():
                for names in batches(list(mapping), FIELDS_PER_WRITE):
                    pipe.hset(key, mapping={name: mapping[name] for name in names})
            pipe.execute()
        gone: dict[str, list[str]] = defaultdict(list)
        for text in removed:
            parsed = _ledger_address(text)
            if parsed is not None or self._cluster is None:  # v2: a hand-made name stays
                gone[self._records_of(parsed)].append(text)
        if not gone:
            return
        pipe = self.client.pipeline(transaction=False)
        for key, names in gone.items():
            for batch in batches(names, FIELDS_PER_WRITE):
                pipe.hdel(key, *batch)
        pipe.execute()

    def _records_of(self, address: Address | None) -> str:
        """The hash that holds `address`'s decision record."""
        if self._cluster is None or address is None:
            return self.keys.decisions
        return self.keys.decisions_of(self._place(address)[0])


def _parsed(values: dict[str, float], text: str) -> float:
    """`parse_value(text)`, remembered in `values`."""
    value = values[text] = parse_value(text)
    return value


# Sizes beyond any deployment's limits: past them a table is dropped and rebuilt, so
# addresses gone for good do not stay in memory forever.
_PLACES_MAX = 1 << 20
_FIELDS: dict[str, str] = {}  # one string per field name (a few) for every address


def _ledger_address(text: str) -> Address | None:
    """A ledger field → its address; None for an entry we cannot read (hand-made: not ours
    to interpret)."""
    try:
        return interned(text)
    except AddressError:
        return None
