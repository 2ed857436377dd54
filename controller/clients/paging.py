"""Big Redis state read and written in commands that each stay short (#18: ≤ 5 ms).

Redis runs one command at a time: a script, an EXEC or an HGETALL over 100k fields keeps
every gateway's admission waiting until it ends. So hashes of any size are walked with
HSCAN pages, and many small hashes are read by a script over a bounded batch of keys that
also stops at a bounded number of fields. The sizes hold each command to well under a
millisecond on an idle Redis, leaving room for a loaded one.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from itertools import groupby
from typing import Any, TypeVar

import redis

# HSCAN's COUNT: buckets visited per page (about as many fields in a hash table).
SCAN_COUNT = 512
# Keys per read script call, and the fields it may return in all (one hash larger than
# that is returned as its size and walked with HSCAN instead). At 256 keys / 1,024 fields
# a call took up to 24 ms at 100k tenants on an idle machine; at 64 / 256, 5.4 ms with O(1)
# commands at 5.2 ms in the same window (benchmarks/tick_scale.py), the tick no slower.
KEYS_PER_READ = 64
FIELDS_PER_READ = 256
# Fields per write command (HSET/HDEL of one hash), and changes per MULTI/EXEC.
FIELDS_PER_WRITE = 256
CHANGES_PER_TRANSACTION = 64  # also the keys of its read-back script call

# Each key's fields and values (HGETALL's flat reply), up to ARGV[1] fields in all. A hash
# over ARGV[1] fields alone is answered by its size (a number): the caller scans it. The
# reply ends early when the budget is spent: the keys after it go in the next call.
_READ = """
local out, budget = {}, tonumber(ARGV[1])
local left = budget
for i, key in ipairs(KEYS) do
  local n = redis.call('HLEN', key)
  if n > budget then
    out[i] = n
  elseif n > left then
    break
  else
    left = left - n
    out[i] = redis.call('HGETALL', key)
  end
end
return out
"""
# One HSCAN page's field names only: the values (JSON records) are not needed.
_FIELD_PAGE = """
local page = redis.call('HSCAN', KEYS[1], ARGV[1], 'COUNT', ARGV[2])
local names = {}
for i = 1, #page[2], 2 do names[#names + 1] = page[2][i] end
return {page[1], names}
"""

T = TypeVar("T")


def batches(items: Sequence[T], size: int) -> Iterator[Sequence[T]]:
    """`items` in consecutive slices of at most `size`."""
    for start in range(0, len(items), size):
        yield items[start : start + size]


def grouped_batches(items: Sequence[T], key: Callable[[T], object], size: int) -> list[list[T]]:
    """`items` (sorted by `key`) cut into batches of at most `size`, each run of equal keys
    kept in one batch unless the run alone is longer than `size`."""
    done: list[list[T]] = []
    batch: list[T] = []
    for _, run in groupby(items, key=key):
        group = list(run)
        if batch and len(batch) + len(group) > size:
            done.append(batch)
            batch = []
        batch.extend(group)
        while len(batch) > size:  # one run longer than a batch: cut inside it
            done.append(batch[:size])
            batch = batch[size:]
    if batch:
        done.append(batch)
    return done


def scan_hash(client: redis.Redis[str], key: str) -> dict[str, str]:
    """Every field of hash `key`, page by page. A field present throughout is returned; one
    written meanwhile may or may not be (HSCAN's guarantee), as with a concurrent HGETALL."""
    found: dict[str, str] = {}
    cursor = 0
    while True:
        cursor, page = client.hscan(key, cursor, count=SCAN_COUNT)
        found.update(page)
        if cursor == 0:
            return found


def scan_fields(client: redis.Redis[str], key: str) -> set[str]:
    """The field names of hash `key` (without their values), page by page."""
    names: set[str] = set()
    cursor = "0"
    while True:
        cursor, page = client.execute_command("EVAL", _FIELD_PAGE, 1, key, cursor, SCAN_COUNT)
        names.update(page)
        if str(cursor) == "0":
            return names


def read_with_ledger(
    client: redis.Redis[str], ledger: str, owner_of: Callable[[str], str | None]
) -> tuple[dict[str, str], dict[str, Iterable[Sequence[str]]]]:
    """The ledger hash (field → value) and the (field, value) pairs of every hash that
    `owner_of` names for a ledger field (None: no hash), each read once.

    The ledger is walked with HSCAN; each page's new hashes are read in the same round trip
    as the next page (both depend only on the page before), by `_READ` calls in batches.
    """
    entries: dict[str, str] = {}
    hashes: dict[str, Iterable[Sequence[str]]] = {}
    seen: set[str] = set()
    waiting: list[str] = []  # hashes named but not yet read
    cursor: int | None = 0  # None: the ledger is walked to its end
    while cursor is not None or waiting:
        scanning = cursor is not None
        pipe = client.pipeline(transaction=False)
        if cursor is not None:
            pipe.hscan(ledger, cursor, count=SCAN_COUNT)
        for batch in batches(waiting, KEYS_PER_READ):
            pipe.eval(_READ, len(batch), *batch, FIELDS_PER_READ)
        replies = pipe.execute()
        page: dict[str, str] = {}
        if scanning:
            following, page = replies.pop(0)
            cursor = following or None
            entries.update(page)
        waiting = _store(client, waiting, replies, hashes)
        for name in page:
            owner = owner_of(name)
            if owner is not None and owner not in seen:
                seen.add(owner)
                waiting.append(owner)
    return entries, hashes


def _store(
    client: redis.Redis[str],
    keys: list[str],
    replies: list[Any],
    hashes: dict[str, Iterable[Sequence[str]]],
) -> list[str]:
    """Keep what the `_READ` calls for `keys` returned; the keys they left for later."""
    left: list[str] = []
    for batch, reply in zip(batches(keys, KEYS_PER_READ), replies, strict=True):
        for key, flat in zip(batch, reply, strict=False):
            if isinstance(flat, int):  # its size: too big for one call
                hashes[key] = scan_hash(client, key).items()
            else:  # most hold one limit: its pair as is, not a zip over it
                hashes[key] = (flat,) if len(flat) == 2 else _pairs(flat)
        left.extend(batch[len(reply) :])
    return left


def _pairs(flat: list[str]) -> Iterator[tuple[str, str]]:
    """The (field, value) pairs of an HGETALL reply, without a dict per hash."""
    items = iter(flat)
    return zip(items, items, strict=True)
