"""Settles and releases that could not reach Redis, kept and retried in order once it answers:
a Redis blip between admission and settle must not hand the tenant its tokens for free.

A settle stays possible until the reservation's settle record expires (its lease plus the
record grace, an hour by default): the queue keeps a call no longer than `max_age_seconds`,
and no more than `max_calls` of them (the oldest go first); what it gives up is counted."""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import structlog

StoreCall = Callable[[], Awaitable[object]]

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
    _calls: deque[tuple[float, str, StoreCall]] = field(default_factory=deque)
    _retrying: bool = False
    _task: asyncio.Task[int] | None = None

    def __len__(self) -> int:
        return len(self._calls)

    def hold(self, operation: str, call: StoreCall) -> None:
        """Keep a call that failed, to be repeated by `retry`."""
        self._calls.append((self.clock(), operation, call))
        while len(self._calls) > self.max_calls:
            _at, dropped, _call = self._calls.popleft()
            self._give_up(dropped, "the queue of store calls is full")

    def retry_soon(self) -> None:
        """Start `retry` in the background unless it runs already (from a request's path:
        the request does not wait for it)."""
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self.retry())

    async def retry(self) -> int:
        """Repeat the held calls oldest first; stop at the first that fails (Redis is still
        away). Returns how many went through. Calls past their age are given up."""
        if self._retrying:  # one pass at a time: the heartbeat and the middleware both call
            return 0
        self._retrying = True
        done = 0
        try:
            while self._calls:
                at, operation, call = self._calls[0]
                if self.clock() - at > self.max_age_seconds:
                    self._calls.popleft()
                    self._give_up(operation, "its settle record has expired")
                    continue
                try:
                    await call()
                except self.store_errors:
                    break
                self._calls.popleft()
                done += 1
        finally:
            self._retrying = False
        if done:
            _log.info("held store calls went through", calls=done, still_held=len(self._calls))
        return done

    def _give_up(self, operation: str, why: str) -> None:
        self.lost += 1
        self.on_lost(operation)
        _log.error("a held store call was given up; its usage is not charged",
                   operation=operation, reason=why)  # fmt: skip
