"""The journal's writer: each event to structlog and XADDed to a capped Redis stream, buffered
(bounded) while Redis is away, fenced so a deposed leader's events are marked."""

from __future__ import annotations

import time
from collections import Counter, deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager

import redis
import redis.cluster
import structlog
from redis.exceptions import RedisClusterException

from controller.clients.paging import batches
from controller.clients.redis import check_contract, location, wrapped
from controller.contract.fence import Fence
from controller.contract.keys import KeySchema
from controller.errors import SinkError
from controller.journal.events import JournalEvent, gap_event, stream_fields
from controller.settings import JournalSettings

_FIRST_BACKOFF_SECONDS = 0.5
_MAX_BACKOFF_SECONDS = 30.0
EVENTS_PER_APPEND = 128


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
        """Hold the events emitted inside and send them together at the end (a
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
            fields = stream_fields(event, {**data, "kind": kind})
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
        """Send every buffered event, in order, pipelined; True when none is left."""
        if self.client is None or not self._buffer:
            return True
        batch = [fields for _, fields, _ in self._buffer]
        if self._unreported_drops:
            gap = gap_event(self._unreported_drops)
            batch.insert(0, stream_fields(gap, gap.to_dict()))
        try:
            # `wrapped`: the server and the repair of a refusal (OOM, READONLY, NOPERM).
            with wrapped(self.client, f"append {len(batch)} events to the journal"):
                stale = self._send(batch)
        except SinkError as exc:
            self._retry_at = self._clock() + self._backoff
            self._backoff = min(self._backoff * 2, _MAX_BACKOFF_SECONDS)
            unavailable = isinstance(exc.__cause__, (redis.RedisError, RedisClusterException))
            self._log.warning(
                "journal.redis_unavailable" if unavailable else "journal.refused",
                pending=len(self._buffer),
                error=str(exc),
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
        """XADD the batch in order, by script calls of a bounded size (each atomic with its
        fence check); True when any was marked stale because this replica's fence no
        longer holds."""
        assert self._append is not None
        assert self.client is not None
        # Another key contract's Redis: its keys mean something else there, the stream too.
        check_contract(self.client.get(self.keys.contract), self.keys, location(self.client))
        # The fence this replica holds now; if it learned it lost (None), the one its events
        # were emitted under: either way a deposed writer's check fails.
        fence = (self.fence() if self.fence is not None else None) or self._emitted_under
        keys = [self.keys.journal] if fence is None else [self.keys.journal, fence.key]
        head = [str(self.settings.stream_max_length), fence.token if fence else ""]
        # A few hundred events per script call, pipelined in order: one call with a tick's
        # 10k events would hold Redis (and every admission) for its whole length (#18).
        calls = []
        for part in batches(batch, EVENTS_PER_APPEND):
            args = list(head)
            for fields in part:
                args += (fields["kind"], fields["address"], fields["data"])
            calls.append(args)
        if isinstance(self.client, redis.cluster.RedisCluster):
            # A cluster pipeline does not load scripts on NOSCRIPT: one call each (all go to
            # the stream's one slot, in order).
            stale = [bool(self._append(keys=keys, args=args)) for args in calls]
            return any(stale)  # every call sent first: any() alone would stop at a stale one
        pipe = self.client.pipeline(transaction=False)
        for args in calls:
            self._append(keys=keys, args=args, client=pipe)
        return any(pipe.execute())
