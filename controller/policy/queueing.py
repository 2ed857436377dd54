"""The queue an in-flight limit allows beyond a full pool: arrivals × wait (Little's law), the
wait following a measured latency against its objective when the policy asks for it; with
the wait at its shortest and the latency still above, the share of the pool filled. Pure."""

from __future__ import annotations

import math
from dataclasses import dataclass

from controller.durations import format_duration
from controller.model import Snapshot
from controller.policy.documents import LatencySpec, QueueSpec
from controller.policy.inputs import scalar_input
from controller.policy.text import fmt_number

# Per sample, a wait grows by at most a quarter (a longer queue costs every request in it, so
# it is sought slowly) and shrinks by at most a half (a missed objective is undone quickly).
GROW = 1.25
SHRINK = 0.5
# A latency within 10% of its objective holds the wait: the p99 of a minute is noisy.
BAND = 0.1
# The pool's fill moves in gentler steps than the wait (each changes every request's service,
# not only the queue's): down by at most a quarter per sample, up by at most a tenth.
FILL_SHRINK = 0.75
FILL_GROW = 1.1


@dataclass(frozen=True, slots=True)
class Fill:
    """The share of the pool's capacity filled (1: a full pool) and the time of the latency
    sample it last moved on (None: never)."""

    share: float = 1.0
    moved_on: float | None = None


@dataclass(frozen=True, slots=True)
class Wait:
    """The wait the queue is sized with after one sample, the pool's fill, and how they were
    found."""

    seconds: float
    how: str
    fill: Fill = Fill()
    slow: str = ""  # the latency above its objective beyond the band (requests wait), as said


def next_wait(spec: QueueSpec, wait: float | None, fill: Fill | None, queued: bool,
              snapshot: Snapshot, now: float) -> Wait:  # fmt: skip
    """The wait after one sample: `spec.wait` without `latency`; with it, from the wait in
    use, shrunk in proportion while the latency is above its objective, grown while it is
    below and a queue formed (`queued`: without a queue the latency says nothing about
    one, and a wait grown then would let the next burst queue too long), else kept. At the
    shortest wait a latency still far above its objective (`cut_fill_above` times) holds the
    pool below full (`fill`, down to `min_fill`), and below the objective the pool fills
    again before any queue grows; the fill moves once per latency window (the latency's
    `window`), so it never steps again on a latency that cannot show its last step."""
    latency = spec.latency
    if latency is None:
        return Wait(spec.wait, "")
    current = spec.wait if wait is None else wait
    held = fill or Fill()
    name = latency.signal.name or "latency"
    found = scalar_input(name, latency.signal, snapshot, None, now)
    if not found.valid or found.value <= 0:
        shown = found.validity.value if not found.valid else fmt_number(found.value)
        return Wait(current, f"; {_kept(current, held)} ({name} is {shown})", held)
    ratio = latency.objective / found.value
    seconds, share = _moved(latency, ratio, current, held.share, queued)
    slow = f"{name} above {fmt_number(latency.objective / (1 - BAND))}s" if ratio < 1 - BAND else ""
    shown = f"{name}={fmt_number(found.value)}s vs {fmt_number(latency.objective)}s"
    moves = []
    if seconds != current:
        moves.append(f"wait {fmt_number(current)} → {fmt_number(seconds)}s")
    if share != held.share:
        window = latency.signal.window or 0.0
        if held.moved_on is not None and found.timestamp <= held.moved_on + window:
            shown += f"; the fill's last step shows after {format_duration(window)}"
        else:
            moves.append(
                f"pool filled to {fmt_number(held.share)} → {fmt_number(share)} of capacity"
            )
            held = Fill(share, found.timestamp)
    if not moves:
        return Wait(current, f"; {_kept(current, held)} ({shown})", held, slow)
    return Wait(seconds, f"; {', '.join(moves)} ({shown})", held, slow)


def _kept(wait: float, fill: Fill) -> str:
    held = f", pool filled to {fmt_number(fill.share)} of capacity" if fill.share < 1 else ""
    return f"wait {fmt_number(wait)}s kept{held}"


def _moved(
    latency: LatencySpec, ratio: float, wait: float, fill: float, queued: bool
) -> tuple[float, float]:
    """The wait and the fill after a latency at 1/`ratio` of its objective: one axis, the
    fill below a full pool, then the wait beyond it."""
    low, high = latency.wait_range
    if ratio < 1 - BAND:
        if wait > low:
            return max(wait * max(ratio, SHRINK), low), fill
        # Only far above the objective is the pool too full for these requests.
        beyond = ratio * latency.cut_fill_above
        if beyond < 1:
            return wait, max(fill * max(math.sqrt(beyond), FILL_SHRINK), latency.min_fill)
        return wait, fill
    if ratio > 1 + BAND:
        # Half the distance in log terms: the latency grows faster than the wait near the
        # objective (a p99 is a tail), so a full step would overshoot it.
        step = min(math.sqrt(ratio), GROW)
        if fill < 1:
            return wait, min(fill * min(step, FILL_GROW), 1.0)
        if queued:
            return min(wait * step, high), fill
    return wait, fill


def queue_allowance(spec: QueueSpec, wait: float, snapshot: Snapshot,
                    now: float) -> tuple[float, str]:  # fmt: skip
    """The requests that may wait beyond a full pool (arrivals × wait, Little's law) and how
    it was found; none while the arrival rate is unknown (the safe side: no queue)."""
    name = spec.arrivals.name or "arrivals"
    arrivals = scalar_input(name, spec.arrivals, snapshot, None, now)
    if not arrivals.valid or arrivals.value < 0:
        return 0.0, f" + no queue ({name} is {arrivals.validity.value})"
    allowed = arrivals.value * wait
    shown = f"{name}={fmt_number(arrivals.value)}/s × {fmt_number(wait)}s"
    return allowed, f" + a queue of {fmt_number(allowed)} ({shown})"
