"""Settles and releases that could not reach Redis, kept and retried in order once it answers:
a Redis blip between admission and settle must not hand the tenant its tokens for free.

A settle stays possible until the reservation's settle record expires (its lease plus the
record grace, an hour by default): the queue keeps a call no longer than `max_age_seconds`,
and no more than `max_calls` of them (the oldest go first); what it gives up is counted.

A call that Redis refuses by itself (a key of the wrong type on one tenant) stays held, and
the calls behind it go on: one broken record must not hold every other tenant's settle until
all of them expire.

A release held for an admission that got no answer (Redis may have run it) is `spare`: it
frees holds a lease would free later anyway, charges nothing, so a full queue gives it up
before any settle or charge."""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import structlog

StoreCall = Callable[[], Awaitable[object]]
# When it was held, its operation, the call, and whether it is spare (charges nothing).
_Held = tuple[float, str, StoreCall, bool]

_log = structlog.get_logger("governor.gateway")


@dataclass
class PendingCalls:
    """Store calls (settle, release) to repeat once Redis answers again."""

    store_errors: tuple[type[BaseException], ...]
    max_calls: int = 10_000
    max_age_seconds: float = 3600.0
    clock: Callable[[], float] = time.monotonic
    lost: int = 0  # given up: too old, or pushed out by newer ones
    on_lost: Callable[[str], None] = lambda operation: None  # e.g. a metric, per operation
    # Whether a failure was Redis refusing that one call (the others may go on), not an outage.
    refused_alone: Callable[[BaseException], bool] = lambda error: False
    # This many refusals in a row and Redis is taken to refuse every call (out of memory, a
    # read-only replica): the pass stops instead of trying each held call on every heartbeat.
    max_refusals_in_a_row: int = 8
    _calls: deque[_Held] = field(default_factory=deque)
    _retrying: bool = False
    _task: asyncio.Task[int] | None = None

    def __len__(self) -> int:
        return len(self._calls)

    def hold(self, operation: str, call: StoreCall, *, spare: bool = False) -> None:
        """Keep a call that failed, to be repeated by `retry`; a `spare` one charges nothing
        (a lease would undo it later) and is the first given up from a full queue."""
        self._calls.append((self.clock(), operation, call, spare))
        while len(self._calls) > self.max_calls:
            # The oldest spare one, else the oldest, wherever it is: a refused call moved to
            # the back is older than the head, whose settle record still has the longest to live.
            oldest = min(self._calls, key=lambda held: (not held[3], held[0]))
            self._calls.remove(oldest)
            self._give_up(oldest, "the queue of store calls is full")

    def retry_soon(self) -> None:
        """Start `retry` in the background unless it runs already (from a request's path:
        the request does not wait for it)."""
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self.retry())

    async def retry(self) -> int:
        """Repeat the held calls oldest first; stop at the first that meets an outage (Redis
        is still away). A call Redis refuses by itself goes to the back of the queue and the
        pass goes on. Returns how many went through. Calls past their age are given up."""
        if self._retrying:  # one pass at a time: the heartbeat and the middleware both call
            return 0
        self._retrying = True
        try:
            done = await self._pass()
        finally:
            self._retrying = False
        if done:
            _log.info("held store calls went through", calls=done, still_held=len(self._calls))
        return done

    async def _pass(self) -> int:
        done = refusals = 0
        for _ in range(len(self._calls)):  # each call once: a refused one comes round again
            if not self._calls or refusals >= self.max_refusals_in_a_row:
                break
            held = at, operation, call, _ = self._calls[0]
            if self.clock() - at > self.max_age_seconds:
                self._calls.popleft()
                self._give_up(held, "its settle record has expired")
                continue
            try:
                await call()
            except self.store_errors as exc:
                if not self.refused_alone(exc):
                    break
                refusals += 1
                self._off_the_head(held, requeue=True)
                _log.warning("a held store call was refused; the ones behind it go on",
                             operation=operation, error=str(exc))  # fmt: skip
                continue
            refusals = 0
            done += 1
            self._off_the_head(held, requeue=False)
        return done

    def _off_the_head(self, held: _Held, *, requeue: bool) -> None:
        # `hold` may have pushed it out meanwhile (a full queue): then it is gone already.
        if self._calls and self._calls[0] is held:
            self._calls.popleft()
            if requeue:
                self._calls.append(held)

    def _give_up(self, held: _Held, why: str) -> None:
        operation = held[1]
        if held[3]:  # nothing to charge: what it held ends with its lease
            _log.warning("a held release of an unanswered admission was given up; its holds "
                         "end with their lease", operation=operation, reason=why)  # fmt: skip
            return
        self.lost += 1
        self.on_lost(operation)
        _log.error("a held store call was given up; its usage is not charged",
                   operation=operation, reason=why)  # fmt: skip
