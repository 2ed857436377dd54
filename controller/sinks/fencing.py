"""The leader fence checked on Governor's own Redis by a sink that keeps its limits elsewhere."""

from __future__ import annotations

from collections.abc import Callable

import redis

from controller.clients.redis import wrapped
from controller.contract.fence import Fence, FencedError


def check_fence(
    fence: Callable[[], Fence | None] | None, client: redis.Redis[str] | None, what: str
) -> None:
    """Refuse to write when this replica no longer holds the leader fence.

    Kong, Kubernetes and a further Redis share no transaction with Governor's Redis, so
    unlike the primary Redis sink this is a check just before writing, not an atomic one:
    it narrows a deposed leader's window.
    """
    current = fence() if fence is not None else None
    if current is None or client is None:
        return
    with wrapped(client, "check the leader fence"):
        holder = client.get(current.key)
    if holder != current.token:
        raise FencedError(
            f"not writing {what}: this replica no longer holds the leader lock {current.key!r}"
        )
