"""One Redis (key contract 1) → a Redis Cluster (contract 2), by copy: `governor redis migrate`."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, cast

import redis

from controller.clients.redis import is_cluster, location
from controller.contract.keys import CONTRACT_VERSION, KeySchema
from controller.contract.migration import move_of
from controller.errors import ConfigurationError
from controller.model import Address, AddressError

_SCAN_COUNT = 1000  # keys per SCAN step: the source keeps serving between steps


@dataclass
class Migration:
    """What a migration did: keys copied, ledger and record fields regrouped per slot, keys
    left (rewritten on the Cluster), keys that are not Governor's (not copied)."""

    copied: int = 0
    regrouped: int = 0
    skipped: list[str] = field(default_factory=list)
    unknown: list[str] = field(default_factory=list)


def migrate(source: redis.Redis[str], target: redis.Redis[str], prefix: str) -> Migration:
    """Copy every key of `prefix` on `source` (one Redis, contract 1) to `target` (a
    Cluster, contract 2): values and TTLs by DUMP/RESTORE under their contract 2 names, the
    ledger and decision records split per slot, then contract 2 and a version stamped.
    Refuses a source that is not contract 1 and a target that holds any key of `prefix`."""
    v1, v2 = KeySchema(prefix), KeySchema(prefix, sharded=True)
    _check(source, target, v1, v2)
    done = Migration()
    for key in source.scan_iter(match=f"{prefix}:*", count=_SCAN_COUNT):
        move = move_of(key, v2)
        if move.action == "copy":
            _copy(source, target, key, move.target)
            done.copied += 1
        elif move.action == "split":
            done.regrouped += _split(source, target, key, v1, v2)
        else:
            (done.skipped if move.action == "skip" else done.unknown).append(key)
    seconds, micros = target.time()
    with target.pipeline(transaction=True) as pipe:  # both in the shared slot
        pipe.set(v2.contract, str(v2.contract_version))
        pipe.set(v2.version, str(int(seconds) * 1_000_000 + int(micros)))
        pipe.execute()
    return done


def _check(
    source: redis.Redis[str], target: redis.Redis[str], v1: KeySchema, v2: KeySchema
) -> None:
    if is_cluster(source) or not is_cluster(target):
        raise ConfigurationError(
            "migrate copies from one Redis (GOVERNOR_REDIS__URL: redis://, rediss://, unix:// "
            "or redis+sentinel://) to a Redis Cluster (--to redis+cluster://...)"
        )
    found = source.get(v1.contract)
    if found not in (None, str(CONTRACT_VERSION)):
        raise ConfigurationError(
            f"Redis at {location(source)} holds key contract {found}, not {CONTRACT_VERSION}"
        )
    for _ in target.scan_iter(match=f"{v2.prefix}:*", count=_SCAN_COUNT):
        raise ConfigurationError(
            f"the Cluster at {location(target)} holds keys under {v2.prefix}: already; "
            "migrate into an empty one (or another GOVERNOR_REDIS__KEY_PREFIX)"
        )


def _copy(source: redis.Redis[str], target: redis.Redis[str], key: str, to: str) -> None:
    """One key with its value and TTL (a key gone meanwhile is no error: expired)."""
    payload = cast(Any, source).dump(key)  # raw bytes, whatever the client decodes
    if payload is None:
        return
    ttl = int(source.pttl(key))
    target.restore(to, max(ttl, 0), payload, replace=True)


def _split(
    source: redis.Redis[str], target: redis.Redis[str], key: str, v1: KeySchema, v2: KeySchema
) -> int:
    """Contract 1's ledger or decision records (address → value) into contract 2's per-slot
    hashes, each beside the limits it is about; the number of fields moved."""
    per_slot = v2.ledger_of if key == v1.written else v2.decisions_of
    groups: dict[str, dict[str | bytes, str | bytes | float | int]] = defaultdict(dict)
    for name, value in source.hgetall(key).items():
        try:
            owner = v2.owner(Address.parse(name))
        except AddressError:
            continue  # a hand-made entry: not Governor's to carry over
        groups[per_slot(owner)][name] = value
    pipe = target.pipeline(transaction=False)
    for hash_key, fields in groups.items():
        pipe.hset(hash_key, mapping=fields)
    pipe.execute()
    return sum(len(fields) for fields in groups.values())
