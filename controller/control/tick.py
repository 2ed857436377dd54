"""One control-loop tick: policies → signals → engine → resolver → sink → journal, with
leadership and readiness around it. Nothing in a tick may crash the daemon."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Protocol

import structlog
from structlog.contextvars import bound_contextvars

from controller.changes import Change
from controller.control.journaling import TickEvents
from controller.control.leader import Elector
from controller.control.overrides import ControlState, ControlStore, ReloadConfirmation
from controller.control.process import collections
from controller.control.reconciler import TickReport
from controller.control.reload import PolicyWatcher, unsettled_news
from controller.control.reporting import TickReporter
from controller.control.takeover import reseeded
from controller.control.writing import LeaderWrites
from controller.errors import GovernorError
from controller.model import SignalKey, Snapshot, Validity
from controller.policy.baselines import Baselines
from controller.policy.decide import decide
from controller.policy.engine import EngineState, Evaluation
from controller.policy.resolver import Resolution, ResolverState


class SignalSource(Protocol):
    def fetch(self, keys: Iterable[SignalKey], now: float) -> Snapshot: ...


@dataclass(frozen=True)
class Collaborators:
    """What a tick reads from and writes to."""

    watcher: PolicyWatcher
    source: SignalSource
    control: ControlStore  # overrides, the freeze, tenants' plans, reload confirmations
    elector: Elector
    writes: LeaderWrites  # the sinks and the plan catalog, written by the leader only


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
    """The control loop's state between ticks and the tick itself (called by the scheduler);
    built by controller.control.compose."""

    def __init__(
        self,
        parts: Collaborators,
        reporter: TickReporter,
        events: TickEvents,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.parts = parts
        self.reporter = reporter
        self.events = events
        self.metrics, self.health = reporter.metrics, reporter.health
        self.clock = clock
        self.tick_id = 0
        self.engine = EngineState()
        self.resolver = ResolverState()
        self._was_leader = False
        self._last_control = ControlState({}, None, {})
        # /metrics reads readiness when scraped, as /readyz does: a stuck tick shows there too.
        health = reporter.health
        self.metrics.ready.set_function(lambda: 1.0 if health.readiness(self.clock())[0] else 0.0)
        self._log = structlog.get_logger("governor.loop")

    @property
    def dry_run(self) -> bool:
        return self.parts.writes.dry_run

    def tick(self) -> TickOutcome:
        """Run one tick; every failure is logged, counted and reflected in readiness."""
        self.tick_id += 1
        started = time.perf_counter()
        journal = self.events.journal
        with bound_contextvars(tick=self.tick_id), collections(self.tick_id):
            try:
                # The tick's events go to the stream together when it ends (one round trip).
                with journal.batch():
                    outcome = self._tick()
            except Exception as exc:  # the loop must survive anything a tick meets
                self._log.exception("tick.failed", error=str(exc))
                outcome = TickOutcome(self.tick_id, False, False, [f"tick failed: {exc}"])
            ended, elapsed = self.clock(), time.perf_counter() - started
            self.reporter.finished(outcome.ready, outcome.reasons, ended, elapsed, journal)
        return outcome

    def _tick(self) -> TickOutcome:
        parts, reasons = self.parts, list[str]()
        leader = self._leadership(reasons)
        # The journal stream is shared by the replicas: only the writer records in it (a
        # leader cut off from Redis keeps its token and buffers); a follower only logs.
        self.events.journalling = leader or parts.elector.fence() is not None
        self._reload()
        policies = parts.watcher.current
        if policies is None:  # load() at start-up guarantees a set; defensive only
            return TickOutcome(self.tick_id, False, False, ["no valid policy set"])
        now = self.clock()
        # Only the leader writes, so only it reads the sink back (during the fetch).
        state = parts.writes.read_back() if leader else None
        snapshot = parts.source.fetch(policies.signal_keys(), now)
        if snapshot.samples and all(
            s.validity is Validity.ERROR for s in snapshot.samples.values()
        ):
            reasons.append(
                f"every signal query failed (Prometheus unreachable?): limits hold, then "
                f"fall back per policy; e.g. {next(iter(snapshot.samples.values())).detail}"
            )
        unusable = self.reporter.signals(policies, snapshot, now)
        control = self._read_control(reasons)
        baselines = Baselines(policies, control.tenants)
        evaluation, resolution = decide(
            policies,
            snapshot,
            self.engine,
            self.resolver,
            now,
            baselines,
            control.overrides,
            frozen=control.frozen,
        )
        previous, self.engine, self.resolver = self.engine, evaluation.state, resolution.state
        self.events.transitions(
            policies, evaluation.transitions, previous, self.tick_id, self.reporter.invalid
        )
        self.reporter.evaluated(policies, evaluation, unusable, self.clock())
        self.reporter.limits(policies, resolution, control)
        outcome = TickOutcome(self.tick_id, leader, True, reasons, (), evaluation, resolution)
        if state is not None:  # the leader
            parts.writes.catalog(policies, reasons)
            report = parts.writes.limits(policies, resolution, self.tick_id, state, reasons)
            if report is not None:
                outcome.report, outcome.changes = report, report.changes
                self.reporter.written(report, baselines, now)
        self.reporter.flapping(now)
        outcome.ready = not outcome.reasons
        return outcome

    def _reload(self) -> None:
        outcome = self.parts.watcher.poll(self._reload_confirmation)
        if unsettled_news(outcome.unsettled):
            self._log.warning(
                "policy.unsettled",
                directory=str(self.parts.watcher.directory),
                polls=outcome.unsettled,
                detail="the policy files changed between every two reads; no change is "
                "loaded until two reads in a row agree (is something rewriting them on each "
                "poll?); the set in force stays",
            )
        if not outcome.changed:
            return
        if outcome.rejected:
            self.reporter.reload_rejected(outcome)
            self.events.rejected(outcome, self.tick_id, self.parts.watcher.directory)
            return
        assert outcome.policies is not None
        self.reporter.policy_version(outcome.policies.version)
        self.events.reloaded(outcome, self.tick_id)

    def _reload_confirmation(self, version: str) -> ReloadConfirmation | None:
        """The reload confirmation in Redis; none while it cannot be read (fail closed)."""
        try:
            return self.parts.control.reload_confirmation()
        except GovernorError as exc:
            self._log.warning("policy.confirmation_unreadable", version=version, error=str(exc))
            return None

    def _leadership(self, reasons: list[str]) -> bool:
        elector = self.parts.elector
        leader = elector.ensure()
        self.reporter.leader(leader)
        if elector.problem is not None:
            self.reporter.redis_failed("leader")
            reasons.append(f"cannot take or renew the leader lock: {elector.problem}")
        if leader and not self._was_leader:
            # A new leader continues pacing from what is enforced, not from scratch.
            try:
                state = self.parts.writes.reconciler.sink.read()
                self.resolver = reseeded(self.resolver, state.actual, self.clock())
            except GovernorError as exc:
                reasons.append(f"cannot read the sink: {exc}")
        self._was_leader = leader
        return leader

    def _read_control(self, reasons: list[str]) -> ControlState:
        try:
            self._last_control = self.parts.control.read()
        except GovernorError as exc:
            self.reporter.control_unreadable(exc)
            reasons.append(f"cannot read overrides and tenants: {exc}")
        return self._last_control
