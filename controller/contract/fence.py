"""Fencing: a write checks atomically that its writer still holds leadership."""

from __future__ import annotations

from dataclasses import dataclass

from controller.errors import SinkError


class FencedError(SinkError):
    """This replica is not (or no longer) the leader: its write was refused."""


@dataclass(frozen=True, slots=True)
class Fence:
    """What a write checks atomically: Redis key `key` must still hold `token`."""

    key: str
    token: str
