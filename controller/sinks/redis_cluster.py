"""The Redis sink on a Redis Cluster (contract 2): writes grouped per slot, fenced in each."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import redis
from redis.exceptions import NoScriptError

from controller.changes import Change
from controller.contract.fence import Fence, FencedError
from controller.contract.keys import KeySchema, format_value
from controller.model import Address

# One slot's writes, atomic: refuse a writer older than one that wrote here already (the
# fence: the leader lock sits in another slot), then each owner's fields and the ledger.
# KEYS  1 the slot's fence  2 its ledger  3... owner hashes
# ARGV  1 the writer's epoch ('' unfenced), then per owner: the count of sets and of
#       deletes, each set as field, value, address; each delete as field, address.
# Returns 1, or -1 when fenced (nothing written).
_SLOT_WRITE = """
local epoch = ARGV[1]
if epoch ~= '' then
  local seen = tonumber(redis.call('GET', KEYS[1]) or '0') or 0
  if tonumber(epoch) < seen then return -1 end
  if tonumber(epoch) > seen then redis.call('SET', KEYS[1], epoch) end
end
local a = 2
for i = 3, #KEYS do
  local sets, deletes = tonumber(ARGV[a]), tonumber(ARGV[a + 1])
  a = a + 2
  for _ = 1, sets do
    redis.call('HSET', KEYS[i], ARGV[a], ARGV[a + 1])
    redis.call('HSET', KEYS[2], ARGV[a + 2], ARGV[a + 1])
    a = a + 3
  end
  for _ = 1, deletes do
    redis.call('HDEL', KEYS[i], ARGV[a])
    redis.call('HDEL', KEYS[2], ARGV[a + 1])
    a = a + 2
  end
end
return 1
"""
# The version last, in the shared slot, once every slot holds its limits: a time-ordered
# token (server microseconds, above the stored one), so a promoted replica that lost the
# last bump never hands out a version gateways already hold for other limits.
# KEYS 1 version 2 contract 3 leader lock; ARGV 1 channel 2 contract 3 holder ('' none)
_BUMP = """
if ARGV[3] ~= '' and redis.call('GET', KEYS[3]) ~= ARGV[3] then return -1 end
local t = redis.call('TIME')
local now = t[1] * 1000000 + t[2]
local stored = tonumber(redis.call('GET', KEYS[1]) or '0') or 0
local text = string.format('%d', math.max(stored + 1, now))
redis.call('SET', KEYS[1], text)
redis.call('SET', KEYS[2], ARGV[2])
redis.call('PUBLISH', ARGV[1], text)
return text
"""


def epoch_of(fence: Fence | None) -> str:
    """The epoch in a leader token (`<identity>#<epoch>`); '' for no fence."""
    if fence is None:
        return ""
    epoch = fence.token.rpartition("#")[2]
    return epoch if epoch.isdigit() else ""


@dataclass
class _SlotWrite:
    """One slot's share of an apply: its owners' sets and deletes, as _SLOT_WRITE takes them."""

    fence: str
    ledger: str
    owners: dict[str, tuple[list[str], list[str]]] = field(default_factory=dict)

    def add(self, owner: str, name: str, address: str, value: str | None) -> None:
        sets, deletes = self.owners.setdefault(owner, ([], []))
        if value is None:
            deletes += (name, address)
        else:
            sets += (name, value, address)

    def call(self, epoch: str) -> tuple[list[str], list[str]]:
        keys, args = [self.fence, self.ledger, *self.owners], [epoch]
        for sets, deletes in self.owners.values():
            args += (str(len(sets) // 3), str(len(deletes) // 2), *sets, *deletes)
        return keys, args


class ClusterWrites:
    """Apply, read back and decision records of the Redis sink on a Cluster."""

    def __init__(
        self, client: redis.Redis[str], keys: KeySchema, place: Callable[[Address], tuple[str, str]]
    ) -> None:
        self.client = client
        self.keys = keys
        self.place = place

    def apply(self, changes: Sequence[Change], fence: Fence | None, *, lock_here: bool) -> int:
        """Write `changes` (one script per slot, pipelined: redis-py sends each master its
        share before reading any answer), then bump the version; the new version.
        `lock_here`: the leader lock is on this cluster (the bump checks it atomically)."""
        groups: dict[str, _SlotWrite] = {}
        for change in changes:
            owner, name = self.place(change.address)
            ledger = self.keys.ledger_of(owner)
            group = groups.get(ledger)
            if group is None:
                group = groups[ledger] = _SlotWrite(self.keys.fence_of(owner), ledger)
            value = None if change.new is None else format_value(change.new)
            group.add(owner, name, str(change.address), value)
        epoch = epoch_of(fence)
        answers = self._scripts(_SLOT_WRITE, [g.call(epoch) for g in groups.values()])
        if any(int(answer) < 0 for answer in answers):
            raise FencedError(
                f"not applied in full: a newer leader wrote to {sum(int(a) < 0 for a in answers)}"
                " slot(s) already; this replica no longer leads"
            )
        keys = [self.keys.version, self.keys.contract, self.keys.leader]
        holder = fence.token if fence is not None and lock_here else ""
        args = [self.keys.channel, str(self.keys.contract_version), holder]
        (version,) = self._scripts(_BUMP, [(keys, args)])
        if int(version) < 0:
            raise FencedError(
                f"{len(changes)} changes written, version not raised: this replica lost the "
                f"leader lock {self.keys.leader!r} meanwhile (the new leader rewrites them)"
            )
        return int(version)

    def _scripts(self, source: str, calls: Sequence[tuple[list[str], list[str]]]) -> list[Any]:
        """EVALSHA each call on its slot's master, all in one pipeline; a master that lacks
        the script (promoted, restarted) gets it and those calls go again, once."""
        loader = cast(Any, self.client)  # types-redis leaves script_load untyped
        sha = str(loader.script_load(source))  # every master
        answers = self._pipelined(sha, calls)
        missing = [i for i, answer in enumerate(answers) if isinstance(answer, NoScriptError)]
        if missing:
            loader.script_load(source)
            again = self._pipelined(sha, [calls[i] for i in missing])
            for i, answer in zip(missing, again, strict=True):
                answers[i] = answer
        for answer in answers:
            if isinstance(answer, Exception):
                raise answer
        return answers

    def _pipelined(self, sha: str, calls: Sequence[tuple[list[str], list[str]]]) -> list[Any]:
        pipe = self.client.pipeline(transaction=False)
        for keys, args in calls:
            pipe.evalsha(sha, len(keys), *keys, *args)
        return list(pipe.execute(raise_on_error=False))

    def hashes(self, names: Iterable[str]) -> list[dict[str, str]]:
        """HGETALL of each hash, pipelined per master."""
        pipe = self.client.pipeline(transaction=False)
        for name in names:
            pipe.hgetall(name)
        return list(pipe.execute())
