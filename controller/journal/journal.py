"""The decision journal: one structured event per change, on stdout and in a capped Redis stream."""

from __future__ import annotations

import json
import math
import time
import uuid
from collections import Counter, deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import redis
import structlog

from controller.changes import Change, Drift
from controller.clients.redis import wrapped
from controller.contract.fence import Fence
from controller.contract.keys import KeySchema
from controller.contract.records import signals_to_list
from controller.model import Address, Decision
from controller.settings import JournalSettings

CONTROLLER = "controller"
# The stream field that marks an event appended by a replica whose fence was stale.
STALE_LEADER = "stale_leader"
_FIRST_BACKOFF_SECONDS = 0.5
_MAX_BACKOFF_SECONDS = 30.0


class Kind:
    """Event names (the `event` of the log line, `kind` in the stream)."""

    LIMIT_CHANGED = "limit.changed"
    LIMIT_DRIFT = "limit.drift"
    VERIFY_FAILED = "limit.verify_failed"
    OVERRIDE_SET = "override.set"
    OVERRIDE_CLEARED = "override.cleared"
    FREEZE_SET = "freeze.set"
    FREEZE_CLEARED = "freeze.cleared"
    TENANT_SET = "tenant.set"
    KEY_CREATED = "key.created"  # an API key made (details: key id, tenant, plan, user)
    KEY_REVOKED = "key.revoked"
    GAP = "journal.gap"
    POLICY_TRANSITION = "policy.transition"  # a policy engaged or released (per label value)
    POLICY_RELOADED = "policy.reloaded"
    POLICY_REJECTED = "policy.rejected"  # a changed policy directory was invalid or refused
    POLICY_CONFIRMED = "policy.confirmed"  # a person confirmed a reload that removes limits
    UNREADABLE = "journal.unreadable"  # a stream entry Governor did not write (shown, not fatal)


@dataclass(frozen=True)
class JournalEvent:
    """One journal entry. `old`/`new` None: the limit did not exist / was removed."""

    kind: str
    actor: str
    reason: str
    address: str | None = None
    old: float | None = None
    new: float | None = None
    tick: int | None = None
    policy: str | None = None
    policy_version: str | None = None
    source: str | None = None
    signals: tuple[Mapping[str, Any], ...] = ()
    runbook: str | None = None
    dry_run: bool = False
    details: Mapping[str, Any] = field(default_factory=dict)
    at: float = field(default_factory=time.time)
    event_id: str = field(default_factory=lambda: uuid.uuid4().hex)

    def to_dict(self) -> dict[str, Any]:
        # By hand, in field order: dataclasses.asdict deep-copies every value generically,
        # which at thousands of events per tick cost more than writing them to Redis.
        return {
            "kind": self.kind,
            "actor": self.actor,
            "reason": self.reason,
            "address": self.address,
            "old": self.old,
            "new": self.new,
            "tick": self.tick,
            "policy": self.policy,
            "policy_version": self.policy_version,
            "source": self.source,
            "signals": [dict(s) for s in self.signals],
            "runbook": self.runbook,
            "dry_run": self.dry_run,
            "details": dict(self.details),
            "at": self.at,
            "event_id": self.event_id,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> JournalEvent:
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        known["signals"] = tuple(known.get("signals") or ())
        return cls(**known)


@dataclass(frozen=True)
class JournalEntry:
    """An event as stored in the stream, with its stream id (`<ms>-<seq>`). `stale_leader`:
    the replica that appended it no longer held the leader fence (a deposed leader waking
    up), so it is not a decision that was in force."""

    id: str
    event: JournalEvent
    stale_leader: bool = False


# Append a batch of events, each (kind, address, data); with a fence key, check atomically
# that this replica still holds it, and mark every event of a writer that does not.
_APPEND = """
local stale = 0
if #KEYS == 2 and redis.call('GET', KEYS[2]) ~= ARGV[2] then stale = 1 end
for i = 3, #ARGV, 3 do
  if stale == 1 then
    redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[1], '*', 'kind', ARGV[i],
      'address', ARGV[i + 1], 'data', ARGV[i + 2], 'stale_leader', '1')
  else
    redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[1], '*', 'kind', ARGV[i],
      'address', ARGV[i + 1], 'data', ARGV[i + 2])
  end
end
return stale
"""


class Journal:
    """Emits events to structlog and XADDs them, buffering (bounded) while Redis is away.

    Events reach the stream in emission order. Each emit is sent at once, except inside
    `batch()`, whose events are sent together when it ends. When the buffer is full the
    oldest event is dropped from the buffer (it is still on stdout); drops are counted,
    logged, and recorded in the stream as one `journal.gap` event when Redis returns.

    A batch (a tick) logs its first `log_events_per_tick` events one line each and counts
    the rest in one `journal.summary` line when it ends: at 100k tenants a tick journals
    10k changes, and their log lines were a tenth of the tick. The stream still gets every
    event. An event that may not reach the stream is always logged in full: the cap holds
    only while the stream is writable, and a failed write logs the events it held back.

    Like a limit write, a flush checks the leader fence (`fence`, set by the daemon) in the
    same atomic step as its XADDs: a deposed leader's late events are stored marked
    `stale_leader`, never as decisions in force.
    """

    def __init__(
        self,
        client: redis.Redis[str] | None,
        keys: KeySchema,
        settings: JournalSettings,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.client = client
        self.keys = keys
        self.settings = settings
        self.dropped = 0  # events lost from the buffer since start
        self._unreported_drops = 0
        # Events already encoded for the stream (encoded once, in emit): (event, fields,
        # whether its log line was written).
        self._buffer: deque[tuple[JournalEvent, dict[str, str], bool]] = deque()
        self._clock = clock
        self._retry_at = 0.0
        self._backoff = _FIRST_BACKOFF_SECONDS
        self._batching = 0  # nesting depth of batch()
        self._kinds: Counter[str] = Counter()  # this batch's events by kind
        self._unlogged = 0  # this batch's events not logged one line each
        self._log = structlog.get_logger("governor.journal")
        # Set by the daemon: the leader's fence, checked atomically by every flush.
        self.fence: Callable[[], Fence | None] | None = None
        # The fence of the last event emitted while this replica had one.
        self._emitted_under: Fence | None = None
        self._append = client.register_script(_APPEND) if client is not None else None

    @property
    def pending(self) -> int:
        """Events waiting for Redis."""
        return len(self._buffer)

    @contextmanager
    def batch(self) -> Iterator[None]:
        """Hold the events emitted inside and send them in one transaction at the end (a
        tick's thousands of events: one round trip instead of one each). Nothing is lost
        meanwhile: a buffer about to overflow is sent early, and what Redis refuses stays
        buffered for the next flush, as outside a batch."""
        self._batching += 1
        try:
            yield
        finally:
            self._batching -= 1
            if not self._batching:
                self._summarize()
                self.flush()

    def emit(self, event: JournalEvent) -> None:
        """Log the event now (within a batch's cap); send it to the stream now or, if Redis
        is away, later."""
        data = event.to_dict()
        kind = data.pop("kind")
        if self.client is None:
            self._log.info(kind, **data)
            return
        if self.fence is not None:
            self._emitted_under = self.fence() or self._emitted_under
        try:
            fields = _stream_fields(event, {**data, "kind": kind})
        except (TypeError, ValueError) as exc:
            # One event the stream cannot hold (NaN, an odd type) must never wedge the buffer
            # and hold back every later event: it stays in its log line only.
            self._log.info(kind, **data)
            self.dropped += 1
            self._log.error(
                "journal.unencodable", event_id=event.event_id, kind=kind, error=str(exc)
            )
            return
        logged = self._logs(kind)
        if logged:
            self._log.info(kind, **data)
        full = len(self._buffer) >= self.settings.buffer_max_events
        if full and self._batching and self._clock() >= self._retry_at:
            full = not self.flush()  # a batch larger than the buffer: send what is held
        if full:
            lost, _, lost_logged = self._buffer.popleft()
            if not lost_logged:  # defensive: a failed flush has logged what it held
                self._log_in_full(lost)
            self.dropped += 1
            self._unreported_drops += 1
            self._log.error(
                "journal.buffer_overflow",
                dropped_event_id=lost.event_id,
                dropped_kind=lost.kind,
                dropped_total=self.dropped,
                buffer_max_events=self.settings.buffer_max_events,
            )
        self._buffer.append((event, fields, logged))
        if not self._batching and self._clock() >= self._retry_at:
            self.flush()

    def _logs(self, kind: str) -> bool:
        """Whether this event gets a log line of its own: always outside a batch and while
        the stream is not writable, else the batch's first `log_events_per_tick`."""
        if not self._batching:
            return True
        self._kinds[kind] += 1
        if self._retry_at or self._kinds.total() <= self.settings.log_events_per_tick:
            return True
        self._unlogged += 1
        return False

    def _summarize(self) -> None:
        """One line for a batch whose events were not all logged; none otherwise (small
        ticks log exactly as before)."""
        if self._unlogged:
            self._log.info(
                "journal.summary",
                events=self._kinds.total(),
                by_kind=dict(self._kinds),
                not_logged=self._unlogged,
                hint="the journal stream holds every event (governor audit tail); "
                "GOVERNOR_JOURNAL__LOG_EVENTS_PER_TICK logs more one line each",
            )
        self._kinds.clear()
        self._unlogged = 0

    def _log_in_full(self, event: JournalEvent) -> None:
        data = event.to_dict()
        self._log.info(data.pop("kind"), **data)

    def flush(self) -> bool:
        """Send every buffered event, in order, in one transaction; True when none is left."""
        if self.client is None or not self._buffer:
            return True
        batch = [fields for _, fields, _ in self._buffer]
        if self._unreported_drops:
            gap = _gap_event(self._unreported_drops)
            batch.insert(0, _stream_fields(gap, gap.to_dict()))
        try:
            stale = self._send(batch)
        except redis.RedisError as exc:
            self._retry_at = self._clock() + self._backoff
            self._backoff = min(self._backoff * 2, _MAX_BACKOFF_SECONDS)
            self._log.warning(
                "journal.redis_unavailable", pending=len(self._buffer), error=str(exc)
            )
            # They may never reach the stream: every event held back from the log is logged.
            if any(not logged for _, _, logged in self._buffer):
                for event, _, logged in self._buffer:
                    if not logged:
                        self._log_in_full(event)
                self._buffer = deque((e, f, True) for e, f, _ in self._buffer)
            return False
        if stale:
            self._log.error(
                "journal.stale_leader",
                events=len(batch),
                detail="this replica no longer holds the leader lock: its events are "
                "stored marked stale_leader (governor audit tail shows them as such)",
            )
        self._buffer.clear()
        self._unreported_drops = 0
        self._retry_at = 0.0
        self._backoff = _FIRST_BACKOFF_SECONDS
        return True

    def _send(self, batch: Sequence[Mapping[str, str]]) -> bool:
        """XADD the batch in one script call (atomic, in order); True when it was marked
        stale because this replica's fence no longer holds."""
        assert self._append is not None
        # The fence this replica holds now; if it learned it lost (None), the one its events
        # were emitted under: either way a deposed writer's check fails.
        fence = (self.fence() if self.fence is not None else None) or self._emitted_under
        keys = [self.keys.journal] if fence is None else [self.keys.journal, fence.key]
        args = [str(self.settings.stream_max_length), fence.token if fence else ""]
        for fields in batch:
            args += (fields["kind"], fields["address"], fields["data"])
        return bool(self._append(keys=keys, args=args))


def _gap_event(count: int) -> JournalEvent:
    return JournalEvent(
        kind=Kind.GAP,
        actor=CONTROLLER,
        reason=f"{count} events were dropped while Redis was unreachable (buffer full); "
        "they are in the controller's stdout log",
        details={"dropped": count},
    )


def _stream_fields(event: JournalEvent, data: Mapping[str, Any]) -> dict[str, str]:
    """The stream entry of `event`, whose `to_dict()` is `data` (computed once by the caller)."""
    return {
        "kind": event.kind,
        "address": event.address or "",
        "data": json.dumps(data, sort_keys=True, allow_nan=False),
    }


def _entry(entry_id: str, fields: Mapping[str, str]) -> JournalEntry:
    try:
        event = _event(json.loads(fields["data"]))
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        # One entry written by hand made `audit tail` and `explain` fail outright: show it
        # as what it is instead (the CLI escapes its text like any other).
        event = JournalEvent(
            Kind.UNREADABLE,
            actor="?",
            reason=f"not an event Governor writes ({type(exc).__name__}): {dict(fields)!r:.200}",
            at=int(entry_id.partition("-")[0]) / 1000 if entry_id[:1].isdigit() else 0.0,
        )
    return JournalEntry(entry_id, event, fields.get(STALE_LEADER) == "1")


def _event(data: Mapping[str, Any]) -> JournalEvent:
    """A stored event; TypeError when a field the readers format has the wrong type."""
    event = JournalEvent.from_dict(data)
    texts = (event.kind, event.actor, event.reason)
    numbers = (event.at, *(v for v in (event.old, event.new) if v is not None))
    if (
        not all(isinstance(t, str) for t in texts)
        or not all(isinstance(n, int | float) and not isinstance(n, bool) for n in numbers)
        or not isinstance(event.details, Mapping)
    ):
        raise TypeError("a field of the wrong type")
    return event


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
                    found.append(_entry(entry_id, fields))
            high = "(" + page[-1][0]
    return list(reversed(found[:count]))


def _matches(value: str, wanted: str | None, exact: bool) -> bool:
    if wanted is None:
        return True
    return value == wanted if exact else value.startswith(wanted)


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
                    yield _entry(entry_id, fields)


def runbook_link(runbook: str | None, base_url: str) -> str | None:
    """An absolute runbook URL: relative paths are joined to the configured base."""
    if not runbook or "://" in runbook:
        return runbook
    return base_url.rstrip("/") + "/" + runbook.lstrip("/")


def change_events(
    changes: Sequence[Change],
    decisions: Mapping[Address, Decision],
    *,
    tick: int | None,
    policy_version: str | None,
    dry_run: bool,
    runbooks: Mapping[str, str] | None = None,
    runbook_base_url: str = "",
) -> Iterator[JournalEvent]:
    """One `limit.changed` event per change, with the decision (policy, signals) behind it;
    made one at a time (the first tick journals every limit: 100k events never coexist)."""
    for change in changes:
        decision = decisions.get(change.address)
        policy = decision.policy if decision else None
        runbook = (runbooks or {}).get(policy or "")
        yield JournalEvent(
            kind=Kind.LIMIT_CHANGED,
            actor=CONTROLLER,
            reason=decision.reason if decision else "no longer in the desired state",
            address=str(change.address),
            old=None if change.old is None or math.isnan(change.old) else change.old,
            new=change.new,
            tick=tick,
            policy=policy,
            policy_version=policy_version,
            source=str(decision.source) if decision else None,
            signals=tuple(signals_to_list(decision.signals)) if decision else (),
            runbook=runbook_link(runbook, runbook_base_url),
            dry_run=dry_run,
        )


def drift_events(drift: Sequence[Drift], *, tick: int | None) -> list[JournalEvent]:
    """One `limit.drift` event per limit someone else edited (old: ours, new: found)."""
    return [
        JournalEvent(
            kind=Kind.LIMIT_DRIFT,
            actor=CONTROLLER,
            reason="the stored value differs from what Governor last wrote (edited by hand?); "
            "it is reconciled to the desired value",
            address=str(d.address),
            old=d.written,
            new=None if d.actual is None or math.isnan(d.actual) else d.actual,
            tick=tick,
            details={"not_a_number": d.actual is not None and math.isnan(d.actual)},
        )
        for d in drift
    ]
