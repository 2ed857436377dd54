"""What a tick tells operators: its metrics, readiness and the log lines said once, with what
it must remember between ticks to say each thing once (warming signals, unwritten
engagements, fallbacks, unsupported limits, journal drops, slow ticks, flapping limits)."""

from __future__ import annotations

import math
import time
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass

import structlog

from controller.changes import Change
from controller.control.overrides import ControlState
from controller.control.reconciler import TickReport
from controller.control.reload import ReloadOutcome
from controller.control.telemetry import FlapDetector, Health, Metrics, repeat_due
from controller.durations import format_duration
from controller.errors import GovernorError
from controller.journal.writer import Journal
from controller.model import Address, Sample, ScalarSample, Scope, Snapshot, Validity
from controller.policy.baselines import Baselines
from controller.policy.documents import AdaptiveLimit, SignalRange
from controller.policy.engine import Evaluation
from controller.policy.policyset import PolicySet, SignalUse
from controller.policy.resolver import Resolution
from controller.policy.text import fmt_time

# What an operator reads when a signal cannot be used and its sample says nothing more.
_INVALID = {
    Validity.EMPTY: "the query returned no series: check its metric names and labels against "
    "what Prometheus holds (`governor signals` shows each query's answer)",
    Validity.NOT_FINITE: "the query returned NaN or ±Inf (a division by zero?)",
    Validity.ERROR: "the query failed",
    Validity.MISSING: "no series for this label value",
    Validity.PARTIAL: "Prometheus answered with warnings: some data was unavailable",
}


def out_of_range(sample: Sample | None, bounds: SignalRange | None) -> str | None:
    """Why a signal's answer is no reading by its declared range (a scalar outside it, or a
    vector with no value inside), or None. A vector with some values inside is read: the
    engine masks the others, each `out_of_range` in its label value's reason."""
    if sample is None or bounds is None or sample.validity is not Validity.OK:
        return None
    if isinstance(sample, ScalarSample):
        if not bounds.excludes(sample.value):
            return None
        what = f"value {sample.value:g} is"
    else:
        if not len(sample.values) or not bounds.outside(sample.values).all():
            return None
        what = f"every value ({sample.values[0]:g}, …) is"
    return (
        f"{what} outside the signal's range {bounds.describe()}: not a reading but a fault "
        "(a unit mistaken? DCGM's utilisation runs 0–100 where a ratio runs 0–1)"
    )


def why_invalid(sample: Sample | None, stale_after: float, now: float) -> tuple[str, str]:
    """The validity of a signal that cannot be used and why, in words: never an empty
    reason (a `detail=''` every tick tells an on-call engineer nothing)."""
    if sample is None:
        return "missing", "not fetched: no answer for this query this tick"
    said = sample.detail
    taken = data_time(sample)
    if sample.validity is Validity.OK and taken is not None:  # too old
        age = format_duration(round(max(now - taken, 0.0)))
        stale = (
            f"the sample of {fmt_time(taken)} is {age} old, older than "
            f"stale_after {format_duration(stale_after)}"
        )
        return str(Validity.STALE), "; ".join(filter(None, [stale, said]))
    return str(sample.validity), said or _INVALID.get(sample.validity, str(sample.validity))


def data_time(sample: Sample) -> float | None:
    """The time of the data behind a sample (a vector's newest; its values share the age of
    their query), or None for a vector without values (`absent: zero`: nothing is old)."""
    if isinstance(sample, ScalarSample):
        return sample.timestamp
    return float(sample.timestamps.max()) if len(sample.timestamps) else None


def is_stale(sample: Sample, stale_after: float, now: float) -> bool:
    """Whether a sample's data is older than `stale_after` (NaN, unknown, counts as old).
    For a vector as for a scalar: a per-label signal whose pipeline stopped is as stale as
    the engine finds each of its values, and the alert and readiness must say so."""
    taken = data_time(sample)
    return taken is not None and not now - taken <= stale_after


# A tick longer than its interval is logged at most this often (it may be every tick).
SLOW_TICK_WARN_SECONDS = 600.0
# A signal that stays bad for the same reason is logged again every this many ticks (200 s at
# the default 5 s tick): a line every tick was 7,200 an hour for 10 signals of a Prometheus
# down; the gauge, readiness and `governor signals` say the state of every tick.
SIGNAL_INVALID_REPEAT = 40


@dataclass(frozen=True, slots=True)
class _Bad:
    """A signal that cannot be used, as far as its log lines are concerned."""

    validity: str
    since: float  # when it turned bad (its reason may have changed since)
    ticks: int  # the ticks in a row it has been bad for this reason


class TickReporter:
    """The tick's metrics and readiness, and the memory that keeps its reports from
    repeating every tick."""

    def __init__(self, metrics: Metrics, health: Health) -> None:
        self.metrics = metrics
        self.health = health
        self.flaps = FlapDetector()
        self._unsupported_reported: set[tuple[str, Address]] = set()
        self._slow_warned: float | None = None  # monotonic time of the last tick.slow
        self._fallback_since: dict[str, float] = {}
        self._dropped_counted = 0  # journal drops already added to their counter
        # (policy, signal) waiting for enough history (`history:`): noted once, not each tick.
        self._warming: set[tuple[str, str]] = set()
        self._unwritten: set[tuple[str, str]] = set()  # engagements writing nothing, logged
        # Per policy with signals: (last time one of its signals was usable, its stale_after).
        self._usable: dict[str, tuple[float, float]] = {}
        # (policy, signal) that cannot be used: logged when each turns bad, then reminded.
        self._bad: dict[tuple[str, str], _Bad] = {}
        # This tick's untrustworthy signals per policy, name → "validity: why", for the
        # journal's stale-* transitions (the log line alone said why).
        self.invalid: dict[str, dict[str, str]] = {}
        self._log = structlog.get_logger("governor.loop")

    # --- the tick as a whole -----------------------------------------------------------------

    def finished(
        self, ready: bool, reasons: list[str], ended: float, elapsed: float, journal: Journal
    ) -> None:
        """Readiness, the tick counters and the journal's backlog after a tick."""
        self.health.update(ready, reasons, ended, self._usable)
        if ready:
            self.metrics.last_success.set(ended)
        self.metrics.ticks.labels("ok" if ready else "degraded").inc()
        self.metrics.tick_seconds.observe(elapsed)
        self._warn_if_slow(elapsed)
        self.metrics.journal_pending.set(journal.pending)
        self._count_dropped(journal.dropped)

    def _count_dropped(self, dropped: int) -> None:
        """Add the journal's drops since the last tick to their counter (the journal keeps
        a running total; a counter only goes up)."""
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

    # --- policies, leadership, failures ------------------------------------------------------

    def policy_version(self, version: str) -> None:
        self.metrics.policy_version.clear()
        self.metrics.policy_version.labels(version).set(1)

    def reload_rejected(self, outcome: ReloadOutcome) -> None:
        """Count and log a change that was not taken (the journal event is the tick's)."""
        self.metrics.reload_failures.labels(outcome.reason or "invalid").inc()
        for error in outcome.errors:
            self._log.error("policy.reload_rejected", error=str(error), reason=outcome.reason)

    def redis_emptied(self, version: int, tick: int) -> None:
        """Redis holds nothing Governor wrote, where it held version `version` before."""
        self._log.error(
            "redis.emptied",
            tick=tick,
            last_version=version,
            detail="Redis lost every key Governor wrote (restarted without persistence, "
            "flushed or replaced): the limits and the plan catalog are written again now, "
            "but what only Redis held is gone: API keys, credit balances and their history, "
            "the tenant registry, overrides, the freeze, today's budget usage and the journal. "
            "Restore them from a backup (runbooks/GovernorRedisUnreachable.md) and run Redis "
            "with appendonly yes so a restart keeps them",
        )

    def leader(self, leader: bool) -> None:
        self.metrics.leader.set(1 if leader else 0)

    def redis_failed(self, what: str) -> None:
        """A read or write of Governor's own Redis failed (`what`: catalog, control...)."""
        self.metrics.redis_errors.labels(what).inc()

    def control_unreadable(self, exc: GovernorError) -> None:
        self.redis_failed("control")
        self._log.warning("control.unavailable", error=str(exc))

    def sink_failed(self, exc: GovernorError, sink: str | None = None) -> None:
        """A sink's write failed: `sink` names a further sink, None is the primary (Redis)."""
        self.metrics.sink_errors.inc()
        if sink is None:
            self.redis_failed("sink")
            self._log.error("sink.apply_failed", error=str(exc))
        else:
            self._log.error("sink.apply_failed", sink=sink, error=str(exc))

    def unsupported(self, sink: str, skipped: Mapping[Address, str]) -> None:
        """Log each limit a sink cannot hold once, not every tick."""
        for address, reason in skipped.items():
            if (sink, address) not in self._unsupported_reported:
                self._unsupported_reported.add((sink, address))
                self._log.warning(
                    "sink.unsupported_limit", sink=sink, address=str(address), reason=reason
                )

    # --- what was evaluated and written -------------------------------------------------------

    def signals(self, policies: PolicySet, snapshot: Snapshot, now: float) -> set[str]:
        """Log and count the signals that cannot be trusted; the policies with any such."""
        bad: dict[str, int] = {}
        self.invalid = {}
        usable: dict[str, tuple[float, float]] = {}
        warming: set[tuple[str, str]] = set()
        bad_now: dict[tuple[str, str], _Bad] = {}
        for use in policies.signal_uses():
            sample = snapshot.samples.get(use.key)
            if sample is not None and sample.validity is Validity.NO_HISTORY:
                # A fresh install, not a fault: Prometheus answered; said once, not counted.
                warming.add((use.policy, use.name))
                self._note_warming(use.policy, use.name, sample.detail)
                continue
            stale = sample is not None and is_stale(sample, use.spec.stale_after, now)
            outside = None if stale else out_of_range(sample, use.spec.valid_range)
            broken = (
                sample is None or sample.validity is not Validity.OK or stale or outside is not None
            )
            # A policy's signals are as usable as the most lenient of them allows; one that
            # only refines its decision (SignalUse.advisory) vouches for none of them.
            if not use.advisory:
                seen, stale_after = usable.get(use.policy, (-math.inf, 0.0))
                stale_after = max(stale_after, use.spec.stale_after)
                usable[use.policy] = (seen if broken else now, stale_after)
            if broken:
                bad[use.policy] = bad.get(use.policy, 0) + 1
                validity, detail = (
                    (str(Validity.OUT_OF_RANGE), outside)
                    if outside is not None
                    else why_invalid(sample, use.spec.stale_after, now)
                )
                self.invalid.setdefault(use.policy, {})[use.name] = f"{validity}: {detail}"
                bad_now[use.policy, use.name] = self._note_invalid(use, validity, detail, now)
        for document in policies.controllers:
            self.metrics.signals_invalid.labels(document.ref).set(bad.get(document.ref, 0))
        self._note_recovered(bad_now, warming, policies, now)
        self._warming = warming
        self._remember_usable(usable, now)
        return set(bad)

    def _note_invalid(self, use: SignalUse, validity: str, detail: str, now: float) -> _Bad:
        """Log a bad signal when it turns bad or its validity changes (stale → error), then
        every SIGNAL_INVALID_REPEAT ticks it stays so: not a line per tick."""
        before = self._bad.get((use.policy, use.name))
        if before is None:
            bad = _Bad(validity, now, 1)
        else:
            ticks = before.ticks + 1 if before.validity == validity else 1
            bad = _Bad(validity, before.since, ticks)
        if repeat_due(bad.ticks, 1, SIGNAL_INVALID_REPEAT):
            self._log.warning(
                "signal.invalid", policy=use.policy, signal=use.name, validity=validity,
                detail=detail, bad_for=format_duration(now - bad.since), reminder=bad.ticks > 1,
            )  # fmt: skip
        return bad

    def _note_recovered(
        self,
        bad: dict[tuple[str, str], _Bad],
        warming: set[tuple[str, str]],
        policies: PolicySet,
        now: float,
    ) -> None:
        """Log each signal usable again once, with how long it was not; remember the bad
        ones. A signal no longer read (its policy reloaded away) is forgotten unsaid, and one
        waiting for its history (not a fault, not usable either) keeps what it was."""
        read = {(use.policy, use.name) for use in policies.signal_uses()}
        for key, was in self._bad.items():
            if key in warming:
                bad.setdefault(key, was)
            elif key in read and key not in bad:
                self._log.info(
                    "signal.recovered", policy=key[0], signal=key[1], was=was.validity,
                    bad_for=format_duration(now - was.since),
                )  # fmt: skip
        self._bad = bad

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

    def evaluated(
        self, policies: PolicySet, evaluation: Evaluation, unusable: set[str], now: float
    ) -> None:
        """The engine's notes, each policy's activity and fallback, unwritten engagements."""
        for note in evaluation.notes:
            self._log.warning("policy.note", note=note)
        for document in policies.controllers:
            # Once `then: baseline` has released it, the engine forgets the condition; the
            # policy still acts on its fallback for as long as its signals stay bad.
            stale = document.ref in unusable or _in_fallback(document.ref, evaluation)
            self._activity(document.ref, len(evaluation.active.get(document.ref, ())), stale, now)
        for adaptive in policies.adaptives:
            self.metrics.overshoot.labels(adaptive.ref).set(_overshoot(adaptive, evaluation))
        self._report_unwritten(evaluation.unwritten)

    def _activity(self, ref: str, active: int, stale: bool, now: float) -> None:
        """A policy's engaged keys and whether (and since when) it acts on its fallback."""
        self.metrics.active.labels(ref).set(active)
        # Exported at 0 from the policy's first tick: increase()/rate() see the first event.
        self.metrics.unwritten.labels(ref)
        self.metrics.fallback_seconds.labels(ref)
        self.metrics.fallback.labels(ref).set(1 if stale else 0)
        if stale:
            since = self._fallback_since.setdefault(ref, now)
            self.metrics.fallback_seconds.labels(ref).inc(max(0.0, now - since))
            self._fallback_since[ref] = now
        else:
            self._fallback_since.pop(ref, None)

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

    def limits(self, policies: PolicySet, resolution: Resolution, control: ControlState) -> None:
        """The freeze and the limits in force above the tenants (per tenant: too many)."""
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

    def written(self, report: TickReport, baselines: Baselines, now: float) -> None:
        """Count the drift found and the changes applied, and the turns among them."""
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

    def flapping(self, now: float) -> None:
        """Refreshed every tick, so the gauge falls back once limits stop turning."""
        flapping = self.flaps.flapping(now)
        for scope in Scope:
            self.metrics.flapping.labels(scope.value).set(
                sum(1 for a in flapping if a.scope is scope)
            )


def _in_fallback(ref: str, evaluation: Evaluation) -> bool:
    """Whether the policy currently acts on untrustworthy signals (stale hold or fallback)."""
    conditions = evaluation.state.conditions.get(ref, {})
    if any(state.invalid_since is not None for state in conditions.values()):
        return True
    adaptive = evaluation.state.adaptives.get(ref)
    return adaptive is not None and adaptive.invalid_since is not None


def _overshoot(adaptive: AdaptiveLimit, evaluation: Evaluation) -> float:
    """How far above its setpoint the adaptive limit's signal reads (0 below it or unread)."""
    reading = next(
        (p.signals[0] for p in evaluation.proposals if p.policy == adaptive.ref and p.signals),
        None,
    )
    if reading is None or reading.value != reading.value or not adaptive.spec.setpoint:
        return 0.0
    return max(0.0, reading.value / adaptive.spec.setpoint - 1.0)


def _direction(change: Change) -> str:
    if change.old is None:
        return "add"
    if change.new is None:
        return "remove"
    return "tighten" if change.new < change.old else "loosen"
