"""Where limits are enforced from: one small interface (`read`, `apply`, `check`), chosen by URL."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable
from urllib.parse import urlsplit

import redis

from controller.changes import Change, Drift, find_drift
from controller.contract.fence import Fence
from controller.errors import ConfigurationError, SinkError
from controller.model import Address, under_prefix
from controller.settings import RedisSettings


@dataclass(frozen=True)
class SinkState(Mapping[Address, float]):
    """What a sink holds now: a mapping address → value, plus Governor's ledger and version.

    `written` is what Governor itself last wrote; where `actual` differs, someone else
    edited the sink (drift). NaN marks a stored value that is not a number.
    """

    actual: Mapping[Address, float]
    written: Mapping[Address, float]
    version: int
    foreign: tuple[str, ...] = ()  # entries that are not a limit Governor understands

    def __getitem__(self, address: Address) -> float:
        return self.actual[address]

    def __iter__(self) -> Iterator[Address]:
        return iter(self.actual)

    def __len__(self) -> int:
        return len(self.actual)

    @property
    def drift(self) -> list[Drift]:
        return find_drift(self.actual, self.written)

    def as_json(self, prefix: str = "") -> dict[str, object]:
        """The stable `governor limits get --json` shape, limited to addresses under `prefix`."""
        limits = {str(a): _plain(v) for a, v in self.actual.items() if under_prefix(str(a), prefix)}
        return {"version": self.version, "limits": dict(sorted(limits.items()))}


def _plain(value: float) -> float | int | None:
    if math.isnan(value):
        return None
    return int(value) if value.is_integer() else value


@dataclass(frozen=True)
class ApplyResult:
    """What one apply did. `version` is the sink's version after it (unchanged: nothing written)."""

    version: int
    applied: tuple[Change, ...] = ()
    mismatched: tuple[Change, ...] = field(default=())  # read back different after writing
    # Held back, not written: the sink cannot hold them yet (a tenant without a Kong
    # consumer). Neither applied nor in force (a read does not show them); written by the
    # first apply after the sink can, which the sink tells apart (Kong: `pending`).
    waiting: tuple[Change, ...] = ()

    @property
    def verified(self) -> bool:
        return not self.mismatched


class PartialApplyError(SinkError):
    """An apply written in several transactions stopped part-way: `applied` landed, each
    with its ledger entry, the rest did not, and the version was not bumped (gateways'
    cached limits stay until the next tick writes the rest and bumps it)."""

    def __init__(self, message: str, applied: Sequence[Change]) -> None:
        super().__init__(message)
        self.applied = tuple(applied)


@runtime_checkable
class Sink(Protocol):
    """A place gateways read limits from. Implementations wrap client errors into SinkError."""

    # The leader's fence (None while not leading) that every apply checks: a deposed
    # leader's late write is refused. None (the default): writes are not fenced. Set by the
    # composition root (controller.control.compose) to the elector's `fence`.
    fence: Callable[[], Fence | None] | None

    def read(self) -> SinkState:
        """The limits stored now, with Governor's ledger (for drift) and the version."""
        ...

    def apply(self, changes: Sequence[Change]) -> ApplyResult:
        """Write exactly `changes`, atomically per consistency group, bump the version, verify.

        No changes: nothing is written. A Cluster sink may use one transaction per hash slot.
        """
        ...

    def check(self) -> None:
        """Raise SinkError when the sink cannot be used (down, auth, wrong contract)."""
        ...


def sink_from_url(
    url: str, settings: RedisSettings, fence_client: redis.Redis[str] | None = None
) -> Sink:
    """The sink for a URL, chosen by scheme (redis://, rediss://, unix://, redis+sentinel://,
    redis+cluster://); `fence_client` is Governor's own Redis, where the leader fence lives."""
    scheme = urlsplit(url).scheme
    if scheme.startswith(("redis", "unix")):
        from controller.sinks.redis import RedisSink

        return RedisSink.from_url(url, settings, fence_client)
    raise ConfigurationError(
        f"no sink for URL scheme {scheme!r}; supported: redis://, rediss://, unix://, "
        "redis+sentinel://, redis+cluster://"
    )
