"""AdaptiveLimit: move one limit so that a signal tracks its setpoint (AIMD or gradient).

Pure. The controller continues from its own last output (then the value in force, the baseline,
`bounds.max`); see `_start_value` for how it avoids wind-up.
"""

from __future__ import annotations

from dataclasses import dataclass

from controller.durations import format_duration
from controller.model import Proposal, Snapshot
from controller.policy.baselines import Baselines
from controller.policy.documents import AdaptiveLimit, AdaptiveLimitSpec
from controller.policy.inputs import scalar_input
from controller.policy.schedule import in_windows
from controller.policy.text import fmt_number


@dataclass(frozen=True, slots=True)
class AdaptiveState:
    """The controller's memory: its last output and since when its signal is untrustworthy."""

    value: float | None = None
    invalid_since: float | None = None


@dataclass(frozen=True, slots=True)
class AdaptiveResult:
    proposal: Proposal | None
    state: AdaptiveState
    notes: tuple[str, ...] = ()


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
        return AdaptiveResult(None, AdaptiveState())
    signal = scalar_input(spec.signal_name, spec.signal, snapshot, None, now)
    if not signal.valid:
        return _on_invalid(policy, state, now, signal.validity.value)
    value, how = _next_value(
        spec, _start_value(spec, state, baselines, in_force, signal.value), signal.value
    )
    value = min(max(value, spec.bounds.min), spec.bounds.max)
    reason = (
        f"{spec.signal_name}={fmt_number(signal.value)} vs setpoint {fmt_number(spec.setpoint)}: "
        f"{how} → {fmt_number(value)} (bounds {fmt_number(spec.bounds.min)}–"
        f"{fmt_number(spec.bounds.max)})"
    )
    proposal = Proposal(spec.target, value, policy.ref, reason, (signal.reading(),))
    return AdaptiveResult(proposal, AdaptiveState(value=value))


def _start_value(
    spec: AdaptiveLimitSpec,
    state: AdaptiveState,
    baselines: Baselines,
    in_force: float | None,
    signal: float,
) -> float:
    """Where this step starts. Increases continue the controller's own trajectory (a loosen
    stabilization window may hold the enforced value back meanwhile); decreases start from
    the lower of that and the value in force, so a held-back or overridden limit never makes
    the controller react late (anti-windup)."""
    current = next(
        (v for v in (state.value, in_force, baselines.value(spec.target)) if v is not None),
        spec.bounds.max,
    )
    if in_force is not None and signal > spec.setpoint:
        current = min(current, in_force)
    return min(max(current, spec.bounds.min), spec.bounds.max)


def _next_value(spec: AdaptiveLimitSpec, current: float, signal: float) -> tuple[float, str]:
    if spec.algorithm == "aimd" and spec.aimd is not None:
        aimd = spec.aimd
        if signal > spec.setpoint + aimd.tolerance:
            return current * aimd.decrease_factor, f"above: × {fmt_number(aimd.decrease_factor)}"
        if signal < spec.setpoint - aimd.tolerance:
            return current + aimd.increase, f"below: + {fmt_number(aimd.increase)}"
        return current, f"within ±{fmt_number(aimd.tolerance)}: hold"
    gradient = spec.gradient
    assert gradient is not None  # the document validator fills the default
    if abs(signal - spec.setpoint) <= gradient.tolerance:
        return current, f"within ±{fmt_number(gradient.tolerance)}: hold"
    ratio = spec.setpoint / signal if signal > 0 else 1.0 + gradient.max_step
    ratio = min(max(ratio, 1.0 - gradient.max_step), 1.0 + gradient.max_step)
    factor = 1.0 + gradient.smoothing * (ratio - 1.0)
    return current * factor, f"gradient × {fmt_number(factor)}"


def _on_invalid(
    policy: AdaptiveLimit, state: AdaptiveState, now: float, why: str
) -> AdaptiveResult:
    spec = policy.spec
    since = state.invalid_since if state.invalid_since is not None else now
    waited = now - since
    held = AdaptiveState(value=state.value, invalid_since=since)
    prefix = f"{spec.signal_name} is {why} for {format_duration(waited)}"
    if waited < spec.on_stale.hold_for or spec.on_stale.then == "hold":
        if state.value is None:
            return AdaptiveResult(None, held, (f"{policy.ref}: {prefix}; nothing to hold yet",))
        reason = f"{prefix}: holding {fmt_number(state.value)} (on_stale: hold_for " + (
            f"{format_duration(spec.on_stale.hold_for)}, then {spec.on_stale.then})"
        )
        return AdaptiveResult(Proposal(spec.target, state.value, policy.ref, reason), held)
    if spec.on_stale.then == "min":
        reason = f"{prefix}: falling back to bounds.min {fmt_number(spec.bounds.min)}"
        return AdaptiveResult(
            Proposal(spec.target, spec.bounds.min, policy.ref, reason),
            AdaptiveState(value=spec.bounds.min, invalid_since=since),
        )
    # `then: baseline`: no proposal, so the resolver falls back to the baseline.
    return AdaptiveResult(None, AdaptiveState(invalid_since=since))
