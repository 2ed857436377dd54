"""The gateway's held store calls: repeated oldest first, stopped by the first failure, given
up (and counted) when too old or pushed out of a full queue."""

from __future__ import annotations

import asyncio

from controller.gateway.pending import PendingCalls, StoreCall


class Store:
    """A store that fails while `down`, recording what went through."""

    def __init__(self) -> None:
        self.down = False
        self.done: list[str] = []

    def call(self, name: str) -> StoreCall:
        async def run() -> None:
            if self.down:
                raise ConnectionError("down")
            self.done.append(name)

        return run


def test_held_calls_go_through_in_order_once_the_store_answers() -> None:
    store, now = Store(), [0.0]
    pending = PendingCalls((ConnectionError,), clock=lambda: now[0])
    store.down = True
    for name in ("a", "b", "c"):
        pending.hold("settle", store.call(name))
    assert asyncio.run(pending.retry()) == 0  # still down: nothing lost, nothing done
    assert len(pending) == 3
    store.down = False
    assert asyncio.run(pending.retry()) == 3
    assert (store.done, len(pending), pending.lost) == (["a", "b", "c"], 0, 0)


def test_too_old_and_overflowing_calls_are_given_up_and_counted() -> None:
    store, now = Store(), [0.0]
    lost: list[str] = []
    pending = PendingCalls(
        (ConnectionError,), max_calls=2, max_age_seconds=60.0, clock=lambda: now[0]
    )
    pending.on_lost = lost.append
    pending.hold("settle", store.call("old"))
    now[0] = 30.0
    pending.hold("release", store.call("newer"))
    now[0] = 50.0
    pending.hold("settle", store.call("newest"))  # the queue holds 2: "old" goes
    assert lost == ["settle"]
    now[0] = 95.0  # "newer" is 65 s old: past its age; "newest" 45 s
    assert asyncio.run(pending.retry()) == 1
    assert store.done == ["newest"]
    assert (lost, pending.lost) == (["settle", "release"], 2)


def test_a_full_queue_gives_up_a_spare_release_before_any_charge() -> None:
    """A release of an unanswered admission charges nothing (a lease undoes it later): a full
    queue drops it first, and it is not counted as a charge lost."""
    store, now = Store(), [0.0]
    lost: list[str] = []
    pending = PendingCalls((ConnectionError,), max_calls=2, clock=lambda: now[0])
    pending.on_lost = lost.append
    pending.hold("settle", store.call("old settle"))
    now[0] = 1.0
    pending.hold("release", store.call("spare"), spare=True)
    now[0] = 2.0
    pending.hold("settle", store.call("new settle"))  # full: the spare one goes, not the oldest
    assert (lost, pending.lost) == ([], 0)
    assert asyncio.run(pending.retry()) == 2
    assert store.done == ["old settle", "new settle"]
