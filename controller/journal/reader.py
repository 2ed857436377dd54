"""Reading the journal back: the newest events, or following new ones (`governor audit`)."""

from __future__ import annotations

from collections.abc import Iterator

import redis

from controller.clients.redis import wrapped
from controller.contract.keys import KeySchema
from controller.journal.events import JournalEntry, stored_entry
from controller.model import under_prefix


def read_events(
    client: redis.Redis[str],
    keys: KeySchema,
    *,
    count: int = 20,
    since: float | None = None,
    address: str | None = None,
    exact: bool = False,
    scan_limit: int = 100_000,
) -> list[JournalEntry]:
    """The newest `count` events (oldest first), optionally since a unix time and for an
    address prefix (`exact`: that address only); looks at most `scan_limit` entries back."""
    low = f"{int(since * 1000)}-0" if since is not None else "-"
    found: list[JournalEntry] = []
    high, scanned = "+", 0
    with wrapped(client, "read the journal"):
        while len(found) < count and scanned < scan_limit:
            page = client.xrevrange(keys.journal, max=high, min=low, count=500)
            if not page:
                break
            scanned += len(page)
            for entry_id, fields in page:
                if _matches(fields.get("address", ""), address, exact):
                    found.append(stored_entry(entry_id, fields))
            high = "(" + page[-1][0]
    return list(reversed(found[:count]))


def _matches(value: str, wanted: str | None, exact: bool) -> bool:
    if wanted is None:
        return True
    return value == wanted if exact else under_prefix(value, wanted)


def follow_events(
    client: redis.Redis[str],
    keys: KeySchema,
    *,
    after: str = "$",
    address: str | None = None,
    block_ms: int = 1000,
) -> Iterator[JournalEntry]:
    """Events appended after `after` (a stream id; '$' = from now), forever."""
    last = after
    while True:
        with wrapped(client, "follow the journal"):
            reply = client.xread({keys.journal: last}, block=block_ms, count=100)
        for _stream, entries in reply or ():
            for entry_id, fields in entries:
                last = entry_id
                if _matches(fields.get("address", ""), address, exact=False):
                    yield stored_entry(entry_id, fields)
