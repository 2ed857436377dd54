"""One control-loop tick: policies → signals → engine → resolver → sink → journal, and the
bookkeeping around it (leadership, readiness, metrics). Nothing in a tick may crash the daemon."""

from __future__ import annotations

import contextvars
import ctypes
import gc
import math
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Protocol

import structlog
from structlog.contextvars import bound_contextvars

from controller.changes import Change
from controller.contract.records import signals_to_list
from controller.control.leader import Elector
from controller.control.overrides import ControlState, ControlStore, ReloadConfirmation
from controller.control.reconciler import Reconciler, TickReport
from controller.control.reload import ERROR, PolicyWatcher, ReloadOutcome
from controller.control.telemetry import FlapDetector, Health, Metrics
from controller.errors import GovernorError
from controller.journal.events import CONTROLLER, JournalEvent, Kind, runbook_link
from controller.journal.writer import Journal
from controller.model import Address, ScalarSample, Scope, SignalKey, Snapshot, Validity
from controller.policy.baselines import Baselines
from controller.policy.engine import EngineState, Evaluation, Transition, evaluate
from controller.policy.policyset import PolicySet
from controller.policy.resolver import Resolution, ResolverState, resolve
from controller.sinks import SinkState
from controller.sinks.factory import split_supported

# A tick's leftovers in reference cycles wait at most this many ticks for a full collection.
FULL_COLLECTION_TICKS = 120
# A tick longer than its interval is logged at most this often (it may be every tick).
SLOW_TICK_WARN_SECONDS = 600.0


class SignalSource(Protocol):
    def fetch(self, keys: Iterable[SignalKey], now: float) -> Snapshot: ...


@dataclass
class TickOutcome:
    """What one tick did, for `--once`, tests and logs."""

    tick: int
    leader: bool
    ready: bool
    reasons: list[str]
    changes: tuple[Change, ...] = ()
    evaluation: Evaluation | None = None
    resolution: Resolution | None = None
    report: TickReport | None = None
    errors: list[str] = field(default_factory=list)


class Controller:
    """The control loop's state between ticks and the tick itself (called by the scheduler)."""

    def __init__(
        self,
        *,
        watcher: PolicyWatcher,
        source: SignalSource,
        reconciler: Reconciler,
        control: ControlStore,
        journal: Journal,
        elector: Elector,
        metrics: Metrics,
        health: Health,
        dry_run: bool = False,
        runbook_base_url: str = "",
        clock: Callable[[], float] = time.time,
        publish: Callable[[PolicySet], None] | None = None,
        extra_reconcilers: Sequence[Reconciler] = (),
    ) -> None:
        self.watcher = watcher
        self.source = source
        self.reconciler = reconciler  # the primary sink (Redis): read back, seeds the resolver
        self.extra_reconcilers = tuple(extra_reconcilers)
        self._unsupported_reported: set[tuple[str, Address]] = set()
        self.control = control
        self.journal = journal
        self.elector = elector
        self.metrics = metrics
        self.health = health
        self.dry_run = dry_run
        self.runbook_base_url = runbook_base_url
        self.clock = clock
        # Publishes what gateways need from the policies (the plan catalog), once per version.
        self.publish = publish
        self._published: str | None = None
        self.tick_id = 0
        self.engine = EngineState()
        self.resolver = ResolverState()
        self.flaps = FlapDetector()
        self._was_leader = False
        self._journalling = False
        self._last_control = ControlState({}, None, {})
        self._slow_warned: float | None = None  # monotonic time of the last tick.slow
        # Reads the primary sink back while the signal queries are in flight (see _tick).
        self._reader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="governor-read")
        self._fallback_since: dict[str, float] = {}
        self._dropped_counted = 0  # journal drops already added to their counter
        # (policy, signal) waiting for enough history (`history:`): noted once, not each tick.
        self._warming: set[tuple[str, str]] = set()
        self._unwritten: set[tuple[str, str]] = set()  # engagements writing nothing, logged
        # Per policy with signals: (last time one of its signals was usable, its stale_after).
        self._usable: dict[str, tuple[float, float]] = {}
        # /metrics reads readiness when scraped, as /readyz does: a stuck tick shows there too.
        metrics.ready.set_function(lambda: 1.0 if health.readiness(self.clock())[0] else 0.0)
        self._log = structlog.get_logger("governor.loop")
        _tune_malloc()

    def tick(self) -> TickOutcome:
        """Run one tick; every failure is logged, counted and reflected in readiness."""
        self.tick_id += 1
        started = time.perf_counter()
        with bound_contextvars(tick=self.tick_id), _collections(self.tick_id):
            try:
                # The tick's events go to the stream together when it ends (one round trip).
                with self.journal.batch():
                    outcome = self._tick()
            except Exception as exc:  # the loop must survive anything a tick meets
                self._log.exception("tick.failed", error=str(exc))
                outcome = TickOutcome(self.tick_id, False, False, [f"tick failed: {exc}"])
            ended = self.clock()
            self.health.update(outcome.ready, outcome.reasons, ended, self._usable)
            if outcome.ready:
                self.metrics.last_success.set(ended)
            self.metrics.ticks.labels("ok" if outcome.ready else "degraded").inc()
            elapsed = time.perf_counter() - started
            self.metrics.tick_seconds.observe(elapsed)
            self._warn_if_slow(elapsed)
            self.metrics.journal_pending.set(self.journal.pending)
            self._count_dropped()
        return outcome

    def _count_dropped(self) -> None:
        """Add the journal's drops since the last tick to their counter (the journal keeps
        a running total; a counter only goes up)."""
        dropped = self.journal.dropped
        if dropped > self._dropped_counted:
            self.metrics.journal_dropped.inc(dropped - self._dropped_counted)
        self._dropped_counted = dropped

    def _warn_if_slow(self, elapsed: float) -> None:
        """Say so when ticks outlast their interval: the scheduler then coalesces them, so
        limits move less often than configured. At most once per SLOW_TICK_WARN_SECONDS."""
        interval = self.health.tick_seconds
        if elapsed <= interval:
            return
        now = time.monotonic()
        if self._slow_warned is not None and now - self._slow_warned < SLOW_TICK_WARN_SECONDS:
            return
        self._slow_warned = now
        self._log.warning(
            "tick.slow",
            seconds=round(elapsed, 3),
            interval_seconds=interval,
            hint="ticks run back to back and missed ones are skipped; set "
            "GOVERNOR_CONTROLLER__TICK_SECONDS above the tick time "
            "(governor_tick_duration_seconds)",
        )

    def _tick(self) -> TickOutcome:
        reasons: list[str] = []
        leader = self._leadership(reasons)
        # The journal stream is shared by the replicas: only the writer records in it (a
        # leader cut off from Redis keeps its token and buffers); a follower only logs.
        self._journalling = leader or self.elector.fence() is not None
        self._reload()
        policies = self.watcher.current
        if policies is None:  # load() at start-up guarantees a set; defensive only
            return TickOutcome(self.tick_id, False, False, ["no valid policy set"])
        now = self.clock()
        # What the sink holds does not depend on the signals: read it back in a thread while
        # the queries are in flight (the fetch mostly waits on Prometheus; at 100k tenants
        # the read-back is a seventh of a tick). A failed read fails the write, as before.
        # Only the leader writes, so only it reads back.
        state = (
            self._reader.submit(contextvars.copy_context().run, self.reconciler.sink.read)
            if leader
            else None
        )
        snapshot = self.source.fetch(policies.signal_keys(), now)
        if snapshot.samples and all(
            s.validity is Validity.ERROR for s in snapshot.samples.values()
        ):
            reasons.append(
                f"every signal query failed (Prometheus unreachable?): limits hold, then "
                f"fall back per policy; e.g. {next(iter(snapshot.samples.values())).detail}"
            )
        unusable = self._report_signals(policies, snapshot, now)
        control = self._read_control(reasons)
        baselines = Baselines(policies, control.tenants)
        # The limits in force matter to AdaptiveLimits only: not built for every limit else.
        in_force = self.resolver.in_force() if policies.adaptives else None
        evaluation = evaluate(policies, snapshot, self.engine, now, baselines, in_force)
        resolution = resolve(
            policies,
            baselines,
            evaluation.proposals,
            control.overrides,
            self.resolver,
            now,
            frozen=control.frozen,
        )
        previous, self.engine, self.resolver = self.engine, evaluation.state, resolution.state
        self._journal_transitions(policies, _news(evaluation.transitions, previous))
        for note in evaluation.notes:
            self._log.warning("policy.note", note=note)
        self._report_activity(policies, evaluation, unusable)
        self._report_unwritten(evaluation.unwritten)
        self._report_limits(policies, resolution, control)
        outcome = TickOutcome(self.tick_id, leader, True, reasons, (), evaluation, resolution)
        if state is not None:  # the leader
            self._publish(policies, reasons)
            self._write(policies, resolution, baselines, outcome, now, state)
        self._report_flaps(now)
        outcome.ready = not outcome.reasons
        return outcome

    # --- policies ---------------------------------------------------------------------------

    def _reload(self) -> None:
        outcome: ReloadOutcome = self.watcher.poll(self._reload_confirmation)
        if not outcome.changed:
            return
        if outcome.rejected:
            self._reload_rejected(outcome)
            return
        assert outcome.policies is not None
        self.metrics.policy_version.clear()
        self.metrics.policy_version.labels(outcome.policies.version).set(1)
        if outcome.previous_version is not None:
            self._emit(
                JournalEvent(
                    kind=Kind.POLICY_RELOADED,
                    actor=CONTROLLER,
                    tick=self.tick_id,
                    reason=f"policy set {outcome.previous_version} → {outcome.policies.version}",
                    policy_version=outcome.policies.version,
                    details={
                        "documents": [d.ref for d in outcome.policies.documents],
                        **_confirmed_by(outcome),
                    },
                )
            )

    def _reload_rejected(self, outcome: ReloadOutcome) -> None:
        """Count, log and journal a change that was not taken; the set in force keeps acting."""
        self.metrics.reload_failures.labels(outcome.reason or "invalid").inc()
        for error in outcome.errors:
            self._log.error("policy.reload_rejected", error=str(error), reason=outcome.reason)
        keeps = f"version {outcome.previous_version} keeps running"
        removal = outcome.removal
        details: dict[str, object] = {
            "errors": [str(e) for e in outcome.errors[:20]],
            "reason": outcome.reason,
        }
        if removal is not None:
            details.update(
                version=removal.version,
                removed=list(removal.removed[:100]),
                limits_in_force=removal.total,
                confirm=f"governor policy confirm-reload {removal.version} --reason '...'",
            )
        why = (
            removal.explain(self.watcher.directory)
            if removal is not None
            else _REJECTED.get(outcome.reason or "", "the changed policy files are invalid")
        )
        self._emit(
            JournalEvent(
                kind=Kind.POLICY_REJECTED,
                actor=CONTROLLER,
                tick=self.tick_id,
                reason=f"{why}; {keeps}",
                policy_version=outcome.previous_version,
                details=details,
            )
        )

    def _reload_confirmation(self, version: str) -> ReloadConfirmation | None:
        """The reload confirmation in Redis; none while it cannot be read (fail closed)."""
        try:
            return self.control.reload_confirmation()
        except GovernorError as exc:
            self._log.warning("policy.confirmation_unreadable", version=version, error=str(exc))
            return None

    # --- leadership and people's input -------------------------------------------------------

    def _leadership(self, reasons: list[str]) -> bool:
        leader = self.elector.ensure()
        self.metrics.leader.set(1 if leader else 0)
        if leader and not self._was_leader:
            # A new leader continues pacing from what is enforced, not from scratch.
            try:
                state = self.reconciler.sink.read()
                self.resolver = _reseeded(self.resolver, state.actual, self.clock())
            except GovernorError as exc:
                reasons.append(f"cannot read the sink: {exc}")
        self._was_leader = leader
        return leader

    def _publish(self, policies: PolicySet, reasons: list[str]) -> None:
        # A dry run writes nothing: its plans would replace what every gateway enforces.
        if self.publish is None or self.dry_run or self._published == policies.version:
            return
        try:
            self.publish(policies)
        except GovernorError as exc:
            self.metrics.redis_errors.labels("catalog").inc()
            reasons.append(f"cannot publish the plan catalog: {exc}")
            return
        self._published = policies.version

    def _read_control(self, reasons: list[str]) -> ControlState:
        try:
            self._last_control = self.control.read()
        except GovernorError as exc:
            self.metrics.redis_errors.labels("control").inc()
            reasons.append(f"cannot read overrides and tenants: {exc}")
            self._log.warning("control.unavailable", error=str(exc))
        return self._last_control

    # --- writing -----------------------------------------------------------------------------

    def _write(
        self,
        policies: PolicySet,
        resolution: Resolution,
        baselines: Baselines,
        outcome: TickOutcome,
        now: float,
        state: Future[SinkState],
    ) -> None:
        runbooks = {d.ref: d.metadata.runbook for d in policies.documents if d.metadata.runbook}
        for extra in self.extra_reconcilers:
            # Every further sink (Kong, Kubernetes...) gets the limits it can hold and its
            # own drift report; a failing one never stops the primary sink.
            kept, skipped = split_supported(extra.sink, resolution.desired)
            self._report_unsupported(extra.name, skipped)
            try:
                extra.tick(
                    kept,
                    tick=self.tick_id,
                    policy_version=policies.version,
                    dry_run=self.dry_run,
                    runbooks=runbooks,
                )
            except GovernorError as exc:
                self.metrics.sink_errors.inc()
                self._log.error("sink.apply_failed", sink=extra.name, error=str(exc))
                outcome.reasons.append(f"cannot write limits to {extra.name}: {exc}")
        try:
            report = self.reconciler.tick(
                resolution.desired,
                tick=self.tick_id,
                policy_version=policies.version,
                dry_run=self.dry_run,
                runbooks=runbooks,
                state=state.result(),
            )
        except GovernorError as exc:
            self.metrics.sink_errors.inc()
            self.metrics.redis_errors.labels("sink").inc()
            self._log.error("sink.apply_failed", error=str(exc))
            outcome.reasons.append(f"cannot write limits: {exc}")
            return
        outcome.report, outcome.changes = report, report.changes
        if report.drift:
            self.metrics.drift.inc(len(report.drift))
        if report.result is None:
            return
        # Counted per label set, then added once each: thousands of changes per tick.
        changes: Counter[tuple[str, str]] = Counter()
        turns: Counter[str] = Counter()
        for change in report.result.applied:
            scope = change.address.scope.value
            changes[scope, _direction(change)] += 1
            # A limit added or removed moves from or back to what it inherits: a turn too.
            inherited = baselines.value(change.address)
            old = change.old if change.old is not None else inherited
            new = change.new if change.new is not None else inherited
            if self.flaps.observe(change.address, old, new, now):
                turns[scope] += 1
        for (scope, direction), count in changes.items():
            self.metrics.changes.labels(scope, direction).inc(count)
        for scope, count in turns.items():
            self.metrics.direction_changes.labels(scope).inc(count)

    def _report_unsupported(self, sink: str, skipped: Mapping[Address, str]) -> None:
        """Log each limit a sink cannot hold once, not every tick."""
        for address, reason in skipped.items():
            if (sink, address) not in self._unsupported_reported:
                self._unsupported_reported.add((sink, address))
                self._log.warning(
                    "sink.unsupported_limit", sink=sink, address=str(address), reason=reason
                )

    def _report_flaps(self, now: float) -> None:
        """Refreshed every tick, so the gauge falls back once limits stop turning."""
        flapping = self.flaps.flapping(now)
        for scope in Scope:
            self.metrics.flapping.labels(scope.value).set(
                sum(1 for a in flapping if a.scope is scope)
            )

    def _report_limits(
        self, policies: PolicySet, resolution: Resolution, control: ControlState
    ) -> None:
        self.metrics.frozen.set(1 if control.frozen else 0)
        floors = policies.limits.spec.floors
        self.metrics.limit.clear()
        self.metrics.at_floor.clear()
        for address, decision in resolution.desired.items():
            if address.scope not in (Scope.GLOBAL, Scope.IP, Scope.PLAN):
                continue
            self.metrics.limit.labels(str(address)).set(decision.value)
            if address in floors:
                at_floor = decision.value <= floors[address]
                self.metrics.at_floor.labels(str(address)).set(1 if at_floor else 0)

    # --- reporting ---------------------------------------------------------------------------

    def _emit(self, event: JournalEvent) -> None:
        """Journal the event if this replica writes; a follower logs it (no duplicate in the
        shared stream, and the new leader's engine, warm from evaluating, does not repeat it)."""
        if self._journalling:
            self.journal.emit(event)
        else:
            self._log.info(event.kind, journalled=False, reason=event.reason, policy=event.policy)

    def _journal_transitions(self, policies: PolicySet, transitions: Iterable[Transition]) -> None:
        runbooks = {d.ref: d.metadata.runbook for d in policies.documents}
        for t in transitions:
            self._emit(
                JournalEvent(
                    kind=Kind.POLICY_TRANSITION,
                    actor=CONTROLLER,
                    reason=f"{t.policy} {t.event}" + (f" for {t.key}" if t.key else ""),
                    tick=self.tick_id,
                    policy=t.policy,
                    policy_version=policies.version,
                    signals=tuple(signals_to_list(t.signals)),
                    runbook=runbook_link(runbooks.get(t.policy), self.runbook_base_url),
                    dry_run=self.dry_run,
                    details={"event": t.event, "key": t.key},
                )
            )

    def _report_signals(self, policies: PolicySet, snapshot: Snapshot, now: float) -> set[str]:
        """Log and count the signals that cannot be trusted; the policies with any such."""
        bad: dict[str, int] = {}
        usable: dict[str, tuple[float, float]] = {}
        warming: set[tuple[str, str]] = set()
        for use in policies.signal_uses():
            sample = snapshot.samples.get(use.key)
            if sample is not None and sample.validity is Validity.NO_HISTORY:
                # A fresh install, not a fault: Prometheus answered; said once, not counted.
                warming.add((use.policy, use.name))
                self._note_warming(use.policy, use.name, sample.detail)
                continue
            broken = sample is None or sample.validity is not Validity.OK
            if isinstance(sample, ScalarSample):
                broken = broken or not now - sample.timestamp <= use.spec.stale_after
            # A policy's signals are as usable as the most lenient of them allows.
            seen, stale_after = usable.get(use.policy, (-math.inf, 0.0))
            usable[use.policy] = (seen if broken else now, max(stale_after, use.spec.stale_after))
            if broken:
                bad[use.policy] = bad.get(use.policy, 0) + 1
                detail = sample.detail if sample is not None else "not fetched"
                self._log.warning(
                    "signal.invalid", policy=use.policy, signal=use.name, detail=detail
                )
        for document in (*policies.throttles, *policies.adaptives):
            self.metrics.signals_invalid.labels(document.ref).set(bad.get(document.ref, 0))
        self._warming = warming
        self._remember_usable(usable, now)
        return set(bad)

    def _report_unwritten(self, unwritten: Mapping[tuple[str, str], str]) -> None:
        """An engagement that writes no limit is an error: on-call is told the policy acts
        while nothing is enforced. Logged and counted once per engagement, not every tick."""
        for (policy, key), why in unwritten.items():
            if (policy, key) in self._unwritten:
                continue
            self.metrics.unwritten.labels(policy).inc()
            self._log.error(
                "policy.engagement_unwritten",
                policy=policy,
                key=key,
                reason=why,
                hint="the policy is active but no limit is written; give the tenant a plan "
                "with that limit (`governor tenants set`, or its API keys' plan) or use `set:`",
            )
        self._unwritten = set(unwritten)

    def _note_warming(self, policy: str, signal: str, detail: str) -> None:
        """Log a signal waiting for its history once, when it starts waiting."""
        if (policy, signal) not in self._warming:
            self._log.info("signal.no_history", policy=policy, signal=signal, detail=detail)

    def _remember_usable(self, usable: Mapping[str, tuple[float, float]], now: float) -> None:
        """When each policy last had a usable signal, for readiness. A policy never seen with
        one counts from its first tick (a start or a reload is not already stale)."""
        remembered = {}
        for policy, (seen, stale_after) in usable.items():
            if seen == -math.inf:
                seen = self._usable.get(policy, (now, 0.0))[0]
            remembered[policy] = (seen, stale_after)
        self._usable = remembered

    def _report_activity(
        self, policies: PolicySet, evaluation: Evaluation, unusable: set[str]
    ) -> None:
        now = self.clock()
        for document in (*policies.throttles, *policies.adaptives):
            ref = document.ref
            self.metrics.active.labels(ref).set(len(evaluation.active.get(ref, ())))
            # Exported at 0 from the policy's first tick: increase()/rate() see the first event.
            self.metrics.unwritten.labels(ref)
            self.metrics.fallback_seconds.labels(ref)
            # Once `then: baseline` has released it, the engine forgets the condition; the
            # policy still acts on its fallback for as long as its signals stay bad.
            stale = ref in unusable or _in_fallback(ref, evaluation)
            self.metrics.fallback.labels(ref).set(1 if stale else 0)
            if stale:
                since = self._fallback_since.setdefault(ref, now)
                self.metrics.fallback_seconds.labels(ref).inc(max(0.0, now - since))
                self._fallback_since[ref] = now
            else:
                self._fallback_since.pop(ref, None)
        for adaptive in policies.adaptives:
            reading = next(
                (
                    p.signals[0]
                    for p in evaluation.proposals
                    if p.policy == adaptive.ref and p.signals
                ),
                None,
            )
            over = 0.0
            if reading is not None and reading.value == reading.value:
                over = (
                    max(0.0, reading.value / adaptive.spec.setpoint - 1.0)
                    if adaptive.spec.setpoint
                    else 0.0
                )
            self.metrics.overshoot.labels(adaptive.ref).set(over)


@contextmanager
def _collections(tick: int) -> Iterator[None]:
    """Keep the cyclic garbage collector out of a tick, then freeze what the tick left.

    A tick rebuilds per-tenant state (at 100k tenants, a million objects), and the collector
    left on walks all of it several times per tick: at 20k tenants a fifth of the tick. That
    state holds no reference cycles; reference counting frees it, frozen or not. Whatever a
    tick leaves in cycles is reclaimed by a full collection every FULL_COLLECTION_TICKS.
    Then the memory freed is handed back to the system (glibc keeps it otherwise)."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()
        if tick % FULL_COLLECTION_TICKS == 0:
            gc.unfreeze()
            gc.collect()
        gc.freeze()
        _trim()


def _trim() -> None:
    """glibc's malloc_trim(0): without it the freed pages of a tick's peak stay resident."""
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


def _libc() -> ctypes.CDLL | None:
    # The process' own symbols include libc's on Linux: no `ldconfig` run at import time.
    try:
        libc = ctypes.CDLL(None)
    except OSError:
        return None
    return libc if hasattr(libc, "malloc_trim") else None  # glibc only (not musl, macOS)


_LIBC = _libc()
# glibc's mallopt parameters (malloc.h) and the values _tune_malloc sets.
_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_BYTES = -3, 128 * 1024
_M_ARENA_MAX, _ARENA_MAX = -8, 1


def _tune_malloc() -> None:
    """Keep a tick's large buffers out of glibc's heaps, which trimming cannot shrink once
    fragmented. By default glibc raises its mmap threshold to the largest block freed (up
    to 32 MB), so a tick's big buffers (responses, per-tenant tables) are carved from the
    heap after the first tick; and each thread (the read-back, the signal queries) gets
    heaps of its own. At 100k tenants that left ~180 MB free but mapped after a few ticks
    and RSS grew from 280 to 340 MB. A fixed threshold and one arena keep it near 280 MB,
    the tick no slower within the noise (docs/operations.md, Scale)."""
    if _LIBC is not None and hasattr(_LIBC, "mallopt"):
        _LIBC.mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_BYTES)
        _LIBC.mallopt(_M_ARENA_MAX, _ARENA_MAX)


def _news(transitions: Iterable[Transition], previous: EngineState) -> list[Transition]:
    """The transitions worth a journal event: the engine reports `stale-hold` on every tick
    of a hold; only its first tick (the condition was trustworthy before) is news."""
    out = []
    for t in transitions:
        before = previous.conditions.get(t.policy, {}).get(t.key)
        if t.event == "stale-hold" and before is not None and before.invalid_since is not None:
            continue
        out.append(t)
    return out


def _in_fallback(ref: str, evaluation: Evaluation) -> bool:
    """Whether the policy currently acts on untrustworthy signals (stale hold or fallback)."""
    conditions = evaluation.state.conditions.get(ref, {})
    if any(state.invalid_since is not None for state in conditions.values()):
        return True
    adaptive = evaluation.state.adaptives.get(ref)
    return adaptive is not None and adaptive.invalid_since is not None


def _reseeded(
    previous: ResolverState, enforced: Mapping[Address, float], now: float
) -> ResolverState:
    """The resolver state of a replica that becomes leader: what the sink holds, continued
    from this replica's own memory (it resolved every tick while following) where that
    memory ends at the value enforced, so stabilization windows and the behaviour of the
    policy that won carry on instead of starting over from the Limits default."""
    seeded = ResolverState.seeded(enforced, now)
    memory = dict(seeded.memory)
    for address, fresh in seeded.memory.items():
        known = previous.memory.get(address)
        if known is None:
            continue
        if known.last == fresh.last:
            memory[address] = known
        else:  # another leader moved it: its value, but the same policy's behaviour
            memory[address] = replace(fresh, policy=known.policy)
    return ResolverState(memory)


def _direction(change: Change) -> str:
    if change.old is None:
        return "add"
    if change.new is None:
        return "remove"
    return "tighten" if change.new < change.old else "loosen"


_REJECTED = {ERROR: "the policy reload failed (see the errors)"}


def _confirmed_by(outcome: ReloadOutcome) -> dict[str, object]:
    """Who let a reload that removes many limits in, for its journal event."""
    confirmation = outcome.confirmation
    if confirmation is None:
        return {}
    return {"confirmed_by": confirmation.actor, "confirmation_reason": confirmation.reason}
