"""The life of one condition: pending (`for:`), active (until `until:`), cooling down, stale.

`step` is pure and has no side effects: it takes the last state and this tick's facts and
returns the next state. The engine runs it once per policy, or once per label value.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

from controller.durations import format_duration
from controller.policy.documents import OnStale


@dataclass(frozen=True, slots=True)
class ConditionState:
    """What the engine remembers about one condition between ticks (all times unix seconds)."""

    pending_since: float | None = None  # `when` has held continuously since then
    active_since: float | None = None  # the policy's actions apply since then
    released_at: float | None = None  # the last release, for `cooldown:`
    invalid_since: float | None = None  # signals have been untrustworthy since then

    @property
    def active(self) -> bool:
        return self.active_since is not None


IDLE = ConditionState()

# `stale-recovered`: a hold (or fallback) on bad signals ended: they are usable again. An
# AdaptiveLimit's only: `stale-fallback`, its `on_stale.then` (min, baseline) applies;
# `stale-ended`, its schedule closed during a hold or fallback.
Event = Literal[
    "",
    "engaged",
    "released",
    "stale-hold",
    "stale-released",
    "stale-engaged",
    "stale-recovered",
    "stale-fallback",
    "stale-ended",
]


def recovered(names: str, since: float, now: float, resumes: str) -> str:
    """Why a hold on bad signals ended, in words (a `stale-recovered` transition's detail),
    for a ThrottlePolicy and an AdaptiveLimit alike."""
    return f"{names} usable again after {format_duration(now - since)} unusable: {resumes}"


@dataclass(frozen=True, slots=True)
class Rules:
    """The timing rules of one policy, in seconds."""

    hold: float  # the `for:` duration
    cooldown: float
    on_stale: OnStale


def step(
    state: ConditionState,
    *,
    valid: bool,
    when: bool,
    until: bool | None,
    now: float,
    rules: Rules,
) -> tuple[ConditionState, Event]:
    """Advance one condition by one tick.

    `until` is the release condition's value (None: release when `when` stops holding).
    Invalid signals freeze the decision for `on_stale.hold_for`, then apply `on_stale.then`.
    """
    if not valid:
        return _step_invalid(state, now, rules.on_stale)
    state = replace(state, invalid_since=None) if state.invalid_since is not None else state
    if state.active:
        release = until if until is not None else not when
        if release:
            return ConditionState(released_at=now), "released"
        return state, ""
    if not when:
        return (
            replace(state, pending_since=None) if state.pending_since is not None else state
        ), ""
    pending_since = state.pending_since if state.pending_since is not None else now
    cooled = state.released_at is None or now - state.released_at >= rules.cooldown
    if now - pending_since >= rules.hold and cooled:
        return ConditionState(active_since=now, released_at=state.released_at), "engaged"
    return replace(state, pending_since=pending_since), ""


def _step_invalid(
    state: ConditionState, now: float, on_stale: OnStale
) -> tuple[ConditionState, Event]:
    invalid_since = state.invalid_since if state.invalid_since is not None else now
    # Conditions must be seen to hold with trustworthy data: `for:` starts again afterwards.
    held = replace(state, invalid_since=invalid_since, pending_since=None)
    if now - invalid_since < on_stale.hold_for:
        return held, "stale-hold" if state.active else ""
    if on_stale.then == "baseline" and state.active:
        return ConditionState(released_at=now, invalid_since=invalid_since), "stale-released"
    if on_stale.then == "min" and not state.active:
        return replace(held, active_since=now), "stale-engaged"
    return held, ""
