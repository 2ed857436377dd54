"""Waiting, briefly, for the record of a Responses answer whose settle is still under way.

A client may send the next turn (`previous_response_id`, or the same `conversation`) the
instant it has the answer's last event: before the gateway that served it has written the
answer's record (nginx writes a stream's from a timer just after its last byte; any gateway
writes it only when the body ends, which a model server may do a moment after the event; a
record write waits out a Redis blip; the next turn may reach another replica). In `tenant`
scope a lookup that misses would refuse that turn 404, so it is asked again a few times over
`previous_response_wait_seconds` first (deploy/nginx/lua/governor/gateway.lua waits the same
way, at the same moments).

The wait is bounded, and so is what it can cost: one lookup waits at most that long and asks
Redis at most len(pauses(...)) more times, and a gateway process lets at most
`previous_response_waiters` lookups wait at once, one tenant a quarter of them (at least one).
A lookup past either bound is answered at once, as with no wait: an id that truly has no
record (another tenant's, unknown, lost) is refused 404 either way, never forwarded.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

# The first pause between two lookups; each next one doubles, the last is cut to the wait.
FIRST_PAUSE_SECONDS = 0.01


def pauses(seconds: float) -> list[float]:
    """The pauses before each further lookup of a record: 10 ms, doubling, cut so they add
    up to `seconds` (0.5 s: 10, 20, 40, 80, 160, 190 ms; 6 lookups). None for 0."""
    found: list[float] = []
    waited, step = 0.0, FIRST_PAUSE_SECONDS
    while seconds - waited > 1e-9:
        pause = min(step, seconds - waited)
        found.append(pause)
        waited += pause
        step *= 2
    return found


def tenant_share(waiters: int) -> int:
    """How many of `waiters` one tenant may hold: a quarter, at least one (none of none)."""
    return max(1, waiters // 4) if waiters > 0 else 0


@dataclass
class RecordWaits:
    """The lookups waiting for a record in this process, in all and by tenant."""

    seconds: float
    waiters: int
    waiting: dict[str, int] = field(default_factory=dict)
    total: int = 0

    @property
    def pauses(self) -> list[float]:
        return pauses(self.seconds)

    @contextmanager
    def slot(self, tenant: str) -> Iterator[bool]:
        """Whether `tenant` may wait now (within both bounds); held until the block ends."""
        mine = self.waiting.get(tenant, 0)
        if self.seconds <= 0 or self.total >= self.waiters or mine >= tenant_share(self.waiters):
            yield False
            return
        self.waiting[tenant] = mine + 1
        self.total += 1
        try:
            yield True
        finally:
            self.total -= 1
            left = self.waiting[tenant] - 1
            if left:
                self.waiting[tenant] = left
            else:
                del self.waiting[tenant]
