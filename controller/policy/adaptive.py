"""AdaptiveLimit: move one limit so that a signal tracks its setpoint (AIMD or gradient).

Pure. The control law acts once per new sample of its signal (the sample's own timestamp
says which is new), never again on a sample that predates its last cut plus the signal's
window (that sample cannot show the cut yet), optionally on a filtered signal, and always
steps from the value in force (back-calculation: nothing the resolver held back winds up).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from controller.durations import format_duration
from controller.model import Proposal, SignalReading, Snapshot
from controller.policy.baselines import Baselines
from controller.policy.capacity import Capacity, estimate
from controller.policy.conditions import Event, recovered
from controller.policy.documents import (
    AdaptiveLimit,
    AdaptiveLimitSpec,
    CapacitySpec,
    FilterSpec,
    QueueSpec,
)
from controller.policy.inputs import ScalarInput, scalar_input
from controller.policy.queueing import Fill, Wait, next_wait, queue_allowance
from controller.policy.schedule import in_windows
from controller.policy.text import fmt_number, fmt_time


@dataclass(frozen=True, slots=True)
class AdaptiveState:
    """The controller's memory between ticks."""

    value: float | None = None  # its last proposal
    invalid_since: float | None = None  # since when its signal is untrustworthy
    sample_at: float | None = None  # the timestamp of the last sample it acted on
    interval: float | None = None  # the time between its last two samples (the scrape)
    cut_at: float | None = None  # when it last proposed a cut
    level: float | None = None  # the filtered signal (None: start over from the next sample)
    variance: float | None = None  # of a sample around the filtered signal (the noise)
    how: str = ""  # its last step, quoted while no new sample comes
    capacity: float | None = None  # the serving capacity estimated (`capacity:`)
    capacity_variance: float | None = None  # of a sample around it (the estimate's noise)
    wait: float | None = None  # the queue's wait (`capacity.queue`), when it follows a latency
    fill: Fill | None = None  # the share of the pool's capacity filled (None: all of it)
    # `on_stale.then` (min, baseline) applies since a tick before: its transition was made.
    fell_back: bool = False


@dataclass(frozen=True, slots=True)
class AdaptiveResult:
    proposal: Proposal | None
    state: AdaptiveState
    notes: tuple[str, ...] = ()
    # A hold on a bad signal beginning ("stale-hold"), falling back ("stale-fallback") or
    # ending ("stale-recovered", "stale-ended"), and why in words: the journal's only line
    # about a limit that stands still (no write) or moves for no reason of the resolver's.
    event: Event = ""
    why: str = ""
    readings: tuple[SignalReading, ...] = ()


def evaluate_adaptive(
    policy: AdaptiveLimit,
    snapshot: Snapshot,
    state: AdaptiveState,
    now: float,
    baselines: Baselines,
    in_force: float | None,
) -> AdaptiveResult:
    """One control step for one AdaptiveLimit."""
    spec = policy.spec
    if spec.schedule is not None and not in_windows(
        spec.schedule.windows, spec.schedule.timezone, now
    ):
        return _unscheduled(policy, state, now)
    signal = scalar_input(spec.signal_name, spec.signal, snapshot, None, now)
    if not signal.valid:
        return _on_invalid(policy, state, now, signal)
    if state.invalid_since is None:
        return _control(policy, snapshot, state, now, baselines, in_force, signal)
    # The first usable sample after a hold ends it: said once (the step taken on it has its
    # own reason, journalled if it moves the limit).
    resumed = replace(state, invalid_since=None, fell_back=False)
    result = _control(policy, snapshot, resumed, now, baselines, in_force, signal)
    why = recovered(spec.signal_name, state.invalid_since, now, "control resumes")
    return replace(result, event="stale-recovered", why=why, readings=(signal.reading(),))


def _unscheduled(policy: AdaptiveLimit, state: AdaptiveState, now: float) -> AdaptiveResult:
    """Outside its schedule it proposes nothing and forgets all; a hold on a bad signal that
    ends so is said: no `stale-recovered` will ever close it."""
    if state.invalid_since is None:
        return AdaptiveResult(None, AdaptiveState())
    why = (
        f"the schedule closed while {policy.spec.signal_name} was unusable for "
        f"{format_duration(now - state.invalid_since)}: the hold ends, the limit returns to its "
        "baseline"
    )
    return AdaptiveResult(None, AdaptiveState(), event="stale-ended", why=why)


def _control(
    policy: AdaptiveLimit,
    snapshot: Snapshot,
    state: AdaptiveState,
    now: float,
    baselines: Baselines,
    in_force: float | None,
    signal: ScalarInput,
) -> AdaptiveResult:
    """One control step on a usable signal."""
    spec = policy.spec
    seen, last = state.sample_at, state.value
    if last is not None and seen is not None and signal.timestamp <= seen:
        return _repeat(policy, state, last, seen, signal)
    start = _start_value(spec, state, baselines, in_force)
    interval = _interval(state, signal.timestamp)
    window = spec.signal.window if spec.signal.window is not None else (interval or 0.0)
    if state.cut_at is not None and signal.timestamp <= state.cut_at + window:
        return _dead_time(policy, state, signal, start, interval, window)
    level, variance = _filtered(spec.filter, state, signal.value)
    step = _law(spec, state, start, signal.value, level, variance, snapshot, now)
    value, how, capacity = step.value, step.how, step.capacity
    value = min(max(value, spec.bounds.min), spec.bounds.max)
    filtered = f" (filtered {fmt_number(level)})" if spec.filter is not None else ""
    reason = (
        f"{spec.signal_name}={fmt_number(signal.value)}{filtered} vs setpoint "
        f"{fmt_number(spec.setpoint)}: {how} from {fmt_number(start)} in force → "
        f"{fmt_number(value)} (bounds {fmt_number(spec.bounds.min)}–"
        f"{fmt_number(spec.bounds.max)})"
    )
    proposal = Proposal(spec.target, value, policy.ref, reason, (signal.reading(),))
    # Only the algorithm's cuts wait for a sample that can show them: a capacity estimate
    # reads the throughput and the utilization of one and the same span.
    cut_at = now if step.cut and value < start else state.cut_at
    return AdaptiveResult(
        proposal,
        AdaptiveState(
            value,
            None,
            signal.timestamp,
            interval,
            cut_at,
            level,
            variance,
            how,
            capacity.value,
            capacity.variance,
            step.wait,
            step.fill,
        ),
    )


@dataclass(frozen=True, slots=True)
class _Step:
    value: float
    how: str
    cut: bool  # the algorithm's own step (a cut waits for a sample that can show it)
    capacity: Capacity
    wait: float | None = None  # the queue's wait after this sample
    fill: Fill | None = None  # the share of the pool filled after this sample


def _law(
    spec: AdaptiveLimitSpec,
    state: AdaptiveState,
    start: float,
    sample: float,
    level: float,
    variance: float | None,
    snapshot: Snapshot,
    now: float,
) -> _Step:
    """The control law on a new sample. With `capacity:`, below saturation the limit is the
    capacity estimated × the setpoint; at saturation (the estimate is too high: capacity
    was lost) the algorithm cuts from the lower of that and the value in force, until the
    samples fall below saturation and the estimate can follow. Otherwise the algorithm.
    The queue allowed beyond it (`capacity.queue`) waits the wait in use, which a sample
    above the setpoint (a queue formed) may lengthen and a latency above its objective
    shortens."""
    seek = spec.capacity
    tolerance = _tolerance(spec, variance)
    capacity = Capacity(state.capacity, "", state.capacity_variance)
    if seek is None:
        value, how = _next_value(spec, start, level, tolerance)
        return _Step(value, how, True, capacity)
    found = estimate(seek, capacity, sample, snapshot, now)
    if found.value is None:
        value, how = _next_value(spec, start, level, tolerance)
        return _Step(value, f"{how}; {found.how}", True, found, state.wait, state.fill)
    moved, queued, why = _queue(seek.queue, sample > spec.setpoint, state, snapshot, now)
    aimed = found.value * spec.setpoint * moved.fill.share + queued
    # What to remember of the wait and the fill: nothing while they are fixed.
    follows = seek.queue is not None and seek.queue.latency is not None
    memory = (moved.seconds, moved.fill) if follows else (None, None)
    if level < seek.saturated:
        share = moved.fill.share
        filled = f" × {fmt_number(share)} filled" if share < 1 else ""
        how = f"capacity ≈ {fmt_number(found.value)} ({found.how}) × setpoint{filled}{why}"
        # A change that would move the signal by less than the tolerance, or the limit by
        # less than the estimate's own noise (`filter.noise_band` deviations), holds: a
        # limit moved on every noisy estimate flaps.
        widen = spec.filter.noise_band if spec.filter is not None else 0.0
        noise = widen * found.noise(seek.smoothing) * spec.setpoint
        band = max(start * tolerance / spec.setpoint, noise)
        # No estimate loosens the limit while requests wait too long (a light-load sample
        # reads high: loosened, the limit turned up between the latency's cuts).
        if aimed > start + band and moved.slow:
            held = f"{how} = {fmt_number(aimed)}, but {moved.slow}: no loosening"
            return _Step(start, held, False, found, *memory)
        over = _overloaded(spec, level, tolerance, moved)
        idle = _binds_nothing(seek, found, min(start, aimed))
        if idle and not over and state.capacity is not None:
            # The hold keeps the last aim while this estimate still supports it (within the
            # band of it): a move the resolver is pacing finishes (held at the value in
            # force, a paced climb stopped wherever the load left it, short of the aim).
            kept, aim = _kept(state, start, aimed, band)
            return _Step(kept, f"{how} = {fmt_number(aimed)}, but {idle}: hold{aim}", False,
                         found, *memory)  # fmt: skip
        if abs(aimed - start) > band:
            return _Step(aimed, how, False, found, *memory)
        # Unless the signal itself is above the setpoint beyond its own dead band: a queue
        # is there, not noise, and a lower estimate is applied however small the step (held,
        # a pool that fills from idle stayed over its capacity at a limit estimated at light
        # load until the estimate's average came down). So is a latency above its objective
        # (held, spiky traffic kept the band wider than any step the fill asked for). Below
        # the setpoint and within the objective a limit binds nothing, so a loosening within
        # the band still holds.
        within = f"{how} = {fmt_number(aimed)}, within ±{fmt_number(band)}"
        if aimed < start and over:
            return _Step(aimed, f"{within} but {over}: applied", False, found, *memory)
        return _Step(start, f"{within}: hold", False, found, *memory)
    value, how = _next_value(spec, min(start, aimed), level, tolerance)
    return _Step(value, f"saturated ({found.how}): {how}", True, found, *memory)


def _kept(state: AdaptiveState, start: float, aimed: float, band: float) -> tuple[float, str]:
    """What a hold proposes, and how the reason names it: the last aim while it differs from
    the value in force and this estimate lies within the band of it; else the value in force
    ("")."""
    last = state.value
    if last is None or last == start or abs(aimed - last) > band:
        return start, ""
    return last, f" the last aim {fmt_number(last)} ({fmt_number(start)} in force)"


def _binds_nothing(seek: CapacitySpec, found: Capacity, limit: float) -> str:
    """Why the limit binds nothing now ("": it may): the throughput well below it."""
    admitted = found.throughput
    if admitted is None or admitted >= seek.hold_below * limit:
        return ""
    name = seek.throughput.name or "throughput"
    return f"{name} below {fmt_number(seek.hold_below)} of {fmt_number(limit)} (binds nothing)"


def _overloaded(spec: AdaptiveLimitSpec, level: float, tolerance: float, moved: Wait) -> str:
    """Why the pool is overloaded now ("": it is not): the signal above the setpoint beyond
    its dead band (a queue), or the latency above its objective (requests wait)."""
    if level > spec.setpoint + tolerance:
        return f"{spec.signal_name} above {fmt_number(spec.setpoint + tolerance)}"
    return moved.slow


def _queue(
    queue: QueueSpec | None, queued: bool, state: AdaptiveState, snapshot: Snapshot, now: float
) -> tuple[Wait, float, str]:
    """The wait and the fill after this sample, the queue allowed beyond the estimate, and
    how it was found; `queued`: the sample is above the setpoint (a queue formed)."""
    if queue is None:
        return Wait(0.0, ""), 0.0, ""
    moved = next_wait(queue, state.wait, state.fill, queued, snapshot, now)
    allowed, why = queue_allowance(queue, moved.seconds, snapshot, now)
    return moved, allowed, why + moved.how


def _start_value(
    spec: AdaptiveLimitSpec, state: AdaptiveState, baselines: Baselines, in_force: float | None
) -> float:
    """Where this step starts: the value in force (back-calculation), so a step the
    resolver held back (a stabilization window, pacing, a floor, an override) never piles up
    inside the controller; before anything is in force, its last proposal or the baseline."""
    current = next(
        (v for v in (in_force, state.value, baselines.value(spec.target)) if v is not None),
        spec.bounds.max,
    )
    return min(max(current, spec.bounds.min), spec.bounds.max)


def _interval(state: AdaptiveState, timestamp: float) -> float | None:
    """The time between the last two samples: how often the signal is scraped."""
    if state.sample_at is None or timestamp <= state.sample_at:
        return state.interval
    return timestamp - state.sample_at


def _repeat(
    policy: AdaptiveLimit, state: AdaptiveState, value: float, sample_at: float, signal: ScalarInput
) -> AdaptiveResult:
    """No new sample since the last step: propose the same value again (acting on the same
    reading twice would multiply one observation into several steps)."""
    reason = (
        f"no new {signal.name} sample since {fmt_time(sample_at)}: keeping "
        f"{fmt_number(value)} ({state.how})"
    )
    proposal = Proposal(policy.spec.target, value, policy.ref, reason, (signal.reading(),))
    return AdaptiveResult(proposal, state)


def _dead_time(
    policy: AdaptiveLimit,
    state: AdaptiveState,
    signal: ScalarInput,
    start: float,
    interval: float | None,
    window: float,
) -> AdaptiveResult:
    """A new sample that covers time before the last cut took effect: hold. The filter
    starts over from the first sample that can show the cut."""
    assert state.cut_at is not None  # checked by the caller
    how = (
        f"the sample of {fmt_time(signal.timestamp)} cannot show the cut of "
        f"{fmt_time(state.cut_at)} yet (window {format_duration(window)}): hold"
    )
    reason = f"{signal.name}={fmt_number(signal.value)}: {how} {fmt_number(start)} in force"
    proposal = Proposal(policy.spec.target, start, policy.ref, reason, (signal.reading(),))
    held = replace(
        state, value=start, sample_at=signal.timestamp, interval=interval, level=None, how=how
    )
    return AdaptiveResult(proposal, held)


def _filtered(
    spec: FilterSpec | None, state: AdaptiveState, sample: float
) -> tuple[float, float | None]:
    """The exponentially weighted moving average of the samples and of their squared
    deviation from it (the noise); without a filter, the sample itself."""
    if spec is None:
        return sample, None
    if state.level is None:
        return sample, state.variance
    deviation = sample - state.level
    squared = deviation * deviation
    variance = state.variance
    if variance is None:
        return state.level + spec.smoothing * deviation, squared
    if spec.jump_band > 0 and squared > spec.jump_band * spec.jump_band * variance:
        return sample, variance  # a change of level, not noise: start over from it
    level = state.level + spec.smoothing * deviation
    # The noise is averaged over four times as many samples as the level: a noise estimate
    # as jumpy as the signal would take every other sample for a jump.
    return level, variance + spec.smoothing / 4 * (squared - variance)


def _tolerance(spec: AdaptiveLimitSpec, variance: float | None) -> float:
    """The dead band: the algorithm's tolerance, widened to `noise_band` standard deviations
    of the filtered signal's noise (an EWMA of weight a keeps a/(2-a) of white noise's
    variance), so noise alone does not move the limit."""
    tolerance = spec.aimd.tolerance if spec.aimd is not None else 0.0
    if spec.algorithm == "gradient" and spec.gradient is not None:
        tolerance = spec.gradient.tolerance
    if spec.filter is None or variance is None:
        return tolerance
    alpha = spec.filter.smoothing
    noise = math.sqrt(max(variance, 0.0) * alpha / (2.0 - alpha))
    return max(tolerance, spec.filter.noise_band * noise)


def _next_value(
    spec: AdaptiveLimitSpec, current: float, signal: float, tolerance: float
) -> tuple[float, str]:
    if spec.algorithm == "aimd" and spec.aimd is not None:
        aimd = spec.aimd
        if signal > spec.setpoint + tolerance:
            return current * aimd.decrease_factor, f"above: × {fmt_number(aimd.decrease_factor)}"
        if signal < spec.setpoint - tolerance:
            return current + aimd.increase, f"below: + {fmt_number(aimd.increase)}"
        return current, f"within ±{fmt_number(tolerance)}: hold"
    gradient = spec.gradient
    assert gradient is not None  # the document validator fills the default
    if abs(signal - spec.setpoint) <= tolerance:
        return current, f"within ±{fmt_number(tolerance)}: hold"
    ratio = spec.setpoint / signal if signal > 0 else 1.0 + gradient.max_step
    ratio = min(max(ratio, 1.0 - gradient.max_step), 1.0 + gradient.max_step)
    factor = 1.0 + gradient.smoothing * (ratio - 1.0)
    return current * factor, f"gradient × {fmt_number(factor)}"


def _on_invalid(
    policy: AdaptiveLimit, state: AdaptiveState, now: float, signal: ScalarInput
) -> AdaptiveResult:
    spec = policy.spec
    since = state.invalid_since if state.invalid_since is not None else now
    waited = now - since
    held = replace(state, invalid_since=since, fell_back=False)
    prefix = f"{spec.signal_name} is {signal.validity.value} for {format_duration(waited)}"
    rule = (
        f"(on_stale: hold_for {format_duration(spec.on_stale.hold_for)}, then {spec.on_stale.then})"
    )
    began = state.invalid_since is not None
    if waited < spec.on_stale.hold_for or spec.on_stale.then == "hold":
        if state.value is None:
            why = f"{prefix}; nothing to hold yet"
            # A warning too (no proposal will say it), when the hold begins only.
            notes = () if began else (f"{policy.ref}: {why}",)
            result = AdaptiveResult(None, held, notes)
        else:
            why = f"{prefix}: holding {fmt_number(state.value)} {rule}"
            result = AdaptiveResult(Proposal(spec.target, state.value, policy.ref, why), held)
        return _marked(result, "stale-hold", why, signal, said=began)
    fallen = AdaptiveState(invalid_since=since, fell_back=True)
    if spec.on_stale.then == "min":
        why = f"{prefix}: falling back to bounds.min {fmt_number(spec.bounds.min)} {rule}"
        proposal = Proposal(spec.target, spec.bounds.min, policy.ref, why)
        result = AdaptiveResult(proposal, replace(fallen, value=spec.bounds.min))
    else:
        # `then: baseline`: no proposal, so the resolver falls back to the baseline.
        why = f"{prefix}: falling back to the baseline {rule}"
        result = AdaptiveResult(None, fallen)
    # The resolver's reason for the limit's change names no signal: this transition does.
    return _marked(result, "stale-fallback", why, signal, said=state.fell_back)


def _marked(
    result: AdaptiveResult, event: Event, why: str, signal: ScalarInput, *, said: bool
) -> AdaptiveResult:
    """`result`, marked as `event` on its first tick only (`said`: a tick before was): every
    tick of a hold or a fallback proposes (and says) the same, and a journal event or a
    warning per tick is a flood."""
    if said:
        return result
    return replace(result, event=event, why=why, readings=(signal.reading(),))
