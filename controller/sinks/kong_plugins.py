"""The half both Kong sinks share: read Governor's rate-limiting instances, compare them with
the layout of the desired state, write only the instances that differ, verify, and report
drift from the ledger stored with each instance. The stores (Admin API, Kubernetes) only
list, create, update and delete instances."""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import redis
import structlog

from controller.changes import Change
from controller.contract.fence import Fence
from controller.errors import SinkError
from controller.model import Address
from controller.settings import KongSettings
from controller.sinks import ApplyResult, SinkState
from controller.sinks.fencing import check_fence
from controller.sinks.kong_layout import (
    FIELDS,
    Owner,
    Slots,
    config_differences,
    field_value,
    kong_value,
    layout,
    placed,
    plugin_config,
    sheds,
    unsupported_reason,
)


class WriteRejectedError(SinkError):
    """The store refused one instance's write; the other instances are still written."""


@dataclass(frozen=True)
class Instance:
    """One rate-limiting instance Governor owns, as read from the store."""

    owner: Owner
    ref: str  # the Kong plugin id or the object name, for messages
    config: Mapping[str, Any]
    written: Mapping[Address, float]  # the ledger stored with it: what Governor wrote
    enabled: bool = True
    version: int = 0
    handle: Any = None  # what the store needs to write it back (ids, resourceVersion)
    # Why it does not limit its owner although it exists ('' when it does): a Kong plugin on
    # a consumer that is no longer its tenant's. It carries no value (drift) and is moved to
    # the owner's entity, or removed when the owner is no longer desired or has none.
    stale: str = ""


@dataclass(frozen=True)
class Body:
    """One instance as Governor wants it."""

    owner: Owner
    config: dict[str, Any]
    written: dict[Address, float]
    version: int


@dataclass(frozen=True)
class Listing:
    """Every instance Governor owns, by owner, and what carries its mark but is not its own."""

    instances: Mapping[Owner, Instance]
    foreign: tuple[str, ...] = ()
    # Governor's own instances to remove whatever is desired: stale ones whose owner has
    # another instance (e.g. one on the tenant's consumer beside one on its former consumer).
    strays: tuple[Instance, ...] = ()


class PluginStore(Protocol):
    """Where instances live: the Kong Admin API or Kubernetes objects."""

    name: str
    location: str
    writes_password: bool  # whether config.redis.password goes into the instance itself

    @property
    def groups(self) -> bool:
        """Whether plans get their own (consumer group) instance."""
        ...

    def check(self) -> None: ...

    def listing(self) -> Listing: ...

    def resolve(self, owners: Sequence[Owner]) -> dict[Owner, str]:
        """Owners that cannot get an instance now (e.g. no consumer), with the reason."""
        ...

    def create(self, body: Body) -> None: ...

    def update(self, instance: Instance, body: Body) -> None: ...

    def delete(self, instance: Instance) -> None: ...

    def differences(self, instance: Instance, body: Body) -> list[str]:
        """Store-specific differences (scope, labels) beyond config, ledger and enabled."""
        ...

    def close(self) -> None: ...


@dataclass(frozen=True)
class _Operation:
    verb: Literal["create", "update", "delete"]
    owner: Owner
    instance: Instance | None
    body: Body | None
    why: tuple[str, ...]


@dataclass
class _Snapshot:
    listing: Listing
    actual: dict[Address, float]
    registry: Mapping[str, str] | None


@dataclass
class _Memory:
    """What this process last made the store hold (for drift on a deleted instance)."""

    owners: dict[Owner, dict[Address, float]] = field(default_factory=dict)
    # Desired, on no instance because none needs it (a plan without members): read as in
    # force. Never a limit held back for want of its entity (pending): Kong does not hold it.
    virtual: dict[Address, float] = field(default_factory=dict)

    def fill_in(
        self,
        listing: Listing,
        carriers: Mapping[Address, object],
        actual: dict[Address, float],
        written: dict[Address, float],
    ) -> None:
        """Add what the listing cannot show: the ledger of an instance gone from it, and the
        desired values no instance holds."""
        for owner, ledger in self.owners.items():
            if owner not in listing.instances:  # deleted behind Governor's back: drift
                for address, wrote in ledger.items():
                    written.setdefault(address, wrote)
        for address, value in self.virtual.items():
            if address not in carriers and address not in written:
                actual[address] = written[address] = value


# Per address, what each instance carrying it holds (None: disabled or no such field), what
# that field should hold (the value, or SHED_STAND_IN in an instance that sheds) and the
# value Governor wrote there (its ledger).
_Carriers = dict[Address, list[tuple[float | None, float, float]]]


def _carriers(listing: Listing) -> _Carriers:
    carriers: _Carriers = defaultdict(list)
    for instance in listing.instances.values():
        shedding = sheds(instance.written.values())  # its fields hold SHED_STAND_IN
        for address, wrote in instance.written.items():
            name = FIELDS.get(address.limit)
            live = instance.enabled and not instance.stale  # a stale one limits someone else
            value = field_value(instance.config, name) if name and live else None
            carriers[address].append((value, kong_value(wrote, shedding), wrote))
    return carriers


def _carried(carriers: _Carriers) -> tuple[dict[Address, float], dict[Address, float]]:
    """Actual and written values: an address carried by several instances reads as their
    common value, or as the first that differs from the ledger (drift)."""
    actual: dict[Address, float] = {}
    written: dict[Address, float] = {}
    for address, found in carriers.items():
        written[address] = found[0][2]
        off = [value for value, expected, _ in found if not _same(value, expected)]
        if not off:
            actual[address] = found[0][2]
        elif off[0] is not None:
            actual[address] = off[0]
    return actual, written


class PluginSink:
    """A Sink over rate-limiting instances. One per process; not thread-safe."""

    def __init__(
        self,
        store: PluginStore,
        settings: KongSettings,
        *,
        registry: Callable[[], Mapping[str, str]] | None = None,
        fence_client: redis.Redis[str] | None = None,
    ) -> None:
        self.store = store
        self.settings = settings
        self.registry = registry
        # Set by the daemon like RedisSink.fence (see check_fence).
        self.fence: Callable[[], Fence | None] | None = None
        self.fence_client = fence_client
        self.unsupported: dict[Address, str] = {}  # skipped in the last apply, with why
        self.pending: dict[Address, str] = {}  # waiting for their Kong entity, with why
        self._warned: set[tuple[Address, str]] = set()
        self._memory = _Memory()
        self._snapshot: _Snapshot | None = None
        self._version = 0
        self._log = structlog.get_logger(f"governor.sinks.{store.name}")

    @property
    def name(self) -> str:
        return self.store.name

    @property
    def location(self) -> str:
        return self.store.location

    def unsupported_reason(self, address: Address) -> str | None:
        """Why this sink cannot hold `address` (None: it can). The reconciler should leave
        such addresses out of this sink's desired state; `apply` skips them and says so."""
        plans = self.registry is not None or self.store.groups
        return unsupported_reason(address, plans=plans)

    def check(self) -> None:
        self.store.check()

    def close(self) -> None:
        self.store.close()

    def read(self) -> SinkState:
        """Every limit Governor's instances carry, the ledger stored with them, the version.

        An address carried by several instances (a plan folded into its tenants) reads as
        its common value, or as the first value that differs from the ledger (drift). A
        limit waiting for its owner's entity (`pending`) is not read: no instance holds it.
        """
        listing = self.store.listing()
        registry = dict(self.registry()) if self.registry is not None else None
        carriers = _carriers(listing)
        actual, written = _carried(carriers)
        self._memory.fill_in(listing, carriers, actual, written)
        versions = [instance.version for instance in listing.instances.values()]
        self._version = max([self._version, *versions])
        self._snapshot = _Snapshot(listing, actual, registry)
        return SinkState(actual, written, self._version, listing.foreign)

    def apply(self, changes: Sequence[Change]) -> ApplyResult:
        """Make the store hold the layout of (what was read + `changes`); write only the
        instances that differ, then read back.

        Unsupported addresses are skipped (logged once, listed in `unsupported`). Those
        whose owner has no entity yet wait (logged once, listed in `pending`; returned as
        `waiting`, not applied) and are not read as in force until written. Kong and
        Kubernetes have no multi-object transaction: an apply that fails midway leaves its
        earlier writes in place and the next tick finishes the job.
        """
        snapshot = self._snapshot if self._snapshot is not None else self._refresh()
        supported = self._supported(changes)
        desired = {a: v for a, v in snapshot.actual.items() if self.unsupported_reason(a) is None}
        for change in supported:
            if change.new is None:
                desired.pop(change.address, None)
            else:
                desired[change.address] = change.new
        target = layout(desired, snapshot.registry, groups=self.store.groups)
        instances = snapshot.listing.instances
        # Every owner, not only new ones: an existing instance's entity may be gone (a Kong
        # consumer deleted or its custom_id moved); the store answers from this pass's reads.
        self._hold_back(target, self.store.resolve(list(target)))
        held = placed(target.values())
        # What waits is on no instance now: not in force, so not read back (nor verified).
        # An address another instance carries (a plan folded into a member that has its
        # consumer) is in force there, though listed in pending for the one that waits.
        waits = {address for address in self.pending if address not in held}
        applied = tuple(c for c in supported if c.address not in waits)
        waiting = tuple(c for c in supported if c.address in waits)
        # Owners enter the memory as they exist: a create that fails is no deletion (drift).
        self._memory = _Memory(
            {owner: _ledger(slots) for owner, slots in target.items() if owner in instances},
            {a: v for a, v in desired.items() if a not in held and a not in waits},
        )
        version = self._version + 1
        operations = self._operations(target, snapshot.listing, version)
        if not operations:
            return ApplyResult(version=self._version, applied=applied, waiting=waiting)
        check_fence(self.fence, self.fence_client, f"{len(operations)} {self.name} writes")
        self._run(operations)
        self._version = version
        state = self.read()
        mismatched = tuple(c for c in applied if not holds(state, c))
        return ApplyResult(version, applied, mismatched=mismatched, waiting=waiting)

    def _refresh(self) -> _Snapshot:
        self.read()
        assert self._snapshot is not None
        return self._snapshot

    def _supported(self, changes: Sequence[Change]) -> list[Change]:
        supported: list[Change] = []
        self.unsupported = {}
        for change in changes:
            reason = self.unsupported_reason(change.address)
            if reason is None:
                supported.append(change)
                continue
            self.unsupported[change.address] = reason
            self._warn_once("sink.unsupported_limit", change.address, reason)
        return supported

    def _hold_back(self, target: dict[Owner, Slots], blocked: Mapping[Owner, str]) -> None:
        """Drop owners the store cannot write yet; their addresses wait (listed in pending)."""
        self.pending = {}
        for owner, reason in blocked.items():
            for address, _ in target.pop(owner).values():
                self.pending[address] = reason
                self._warn_once("sink.limit_waiting", address, reason)

    def _warn_once(self, event: str, address: Address, reason: str) -> None:
        if (address, reason) not in self._warned:
            self._warned.add((address, reason))
            self._log.warning(event, sink=self.name, address=str(address), reason=reason)

    def _operations(
        self, target: Mapping[Owner, Slots], listing: Listing, version: int
    ) -> list[_Operation]:
        instances = listing.instances
        operations = [
            _Operation("delete", stray.owner, stray, None, (stray.stale,))
            for stray in listing.strays
        ]
        operations += [
            _Operation("delete", owner, instance, None, (instance.stale or "no longer desired",))
            for owner, instance in sorted(instances.items())
            if owner not in target
        ]
        writes: list[_Operation] = []
        for owner, slots in sorted(target.items()):
            config = plugin_config(self.settings, owner, slots, password=self.store.writes_password)
            body = Body(owner, config, _ledger(slots), version)
            instance = instances.get(owner)
            if instance is None:
                writes.append(_Operation("create", owner, None, body, ("missing",)))
                continue
            why = self._differences(instance, body)
            if why:
                writes.append(_Operation("update", owner, instance, body, tuple(why)))
        # Deletions, then moves of stale instances, then the rest: each frees the entity a
        # later write may need (Kong holds one rate-limiting plugin per consumer).
        return operations + sorted(writes, key=lambda o: o.instance is None or not o.instance.stale)

    def _differences(self, instance: Instance, body: Body) -> list[str]:
        why = [f"config.{key}" for key in config_differences(body.config, instance.config)]
        if not instance.enabled:
            why.append("disabled")
        if dict(instance.written) != body.written:
            why.append("ledger")
        return why + self.store.differences(instance, body)

    def _run(self, operations: Sequence[_Operation]) -> None:
        for operation in operations:
            self._log.info(
                "sink.write",
                sink=self.name,
                op=operation.verb,
                owner=str(operation.owner),
                why=list(operation.why),
            )
            try:
                if operation.body is None and operation.instance is not None:
                    self.store.delete(operation.instance)
                elif operation.instance is None and operation.body is not None:
                    self.store.create(operation.body)
                    self._memory.owners[operation.owner] = dict(operation.body.written)
                elif operation.instance is not None and operation.body is not None:
                    self.store.update(operation.instance, operation.body)
            except WriteRejectedError as exc:
                self._memory.owners.pop(operation.owner, None)
                self._log.warning(
                    "sink.write_rejected",
                    sink=self.name,
                    op=operation.verb,
                    owner=str(operation.owner),
                    error=str(exc),
                )


def _ledger(slots: Slots) -> dict[Address, float]:
    return dict(slots.values())


def _same(a: float | None, b: float | None) -> bool:
    return a is not None and b is not None and a == b and not math.isnan(a)


def holds(state: SinkState, change: Change) -> bool:
    """Whether `state` shows `change` as written (read back after an apply)."""
    if change.new is None:
        return change.address not in state
    return _same(state.actual.get(change.address), change.new)
