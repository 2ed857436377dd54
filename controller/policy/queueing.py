"""The queue an in-flight limit allows beyond a full pool: arrivals × wait (Little's law), the
wait following a measured latency against its objective when the policy asks for it. Pure."""

from __future__ import annotations

import math
from dataclasses import dataclass

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


@dataclass(frozen=True, slots=True)
class Wait:
    """The wait the queue is sized with after one sample, and how it was found."""

    seconds: float
    how: str


def next_wait(spec: QueueSpec, wait: float | None, queued: bool, snapshot: Snapshot,
              now: float) -> Wait:  # fmt: skip
    """The wait after one sample: `spec.wait` without `latency`; with it, from the wait in
    use, shrunk in proportion while the latency is above its objective, grown while it is
    below and a queue formed (`queued`: without a queue the latency says nothing about
    one, and a wait grown then would let the next burst queue too long), else kept."""
    latency = spec.latency
    if latency is None:
        return Wait(spec.wait, "")
    current = spec.wait if wait is None else wait
    name = latency.signal.name or "latency"
    found = scalar_input(name, latency.signal, snapshot, None, now)
    if not found.valid or found.value <= 0:
        shown = found.validity.value if not found.valid else fmt_number(found.value)
        return Wait(current, f"; wait {fmt_number(current)}s kept ({name} is {shown})")
    factor = _factor(latency, found.value, queued)
    low, high = latency.wait_range
    seconds = min(max(current * factor, low), high)
    shown = f"{name}={fmt_number(found.value)}s vs {fmt_number(latency.objective)}s"
    if seconds == current:
        return Wait(current, f"; wait {fmt_number(current)}s kept ({shown})")
    return Wait(seconds, f"; wait {fmt_number(current)} → {fmt_number(seconds)}s ({shown})")


def _factor(latency: LatencySpec, measured: float, queued: bool) -> float:
    ratio = latency.objective / measured
    if ratio < 1 - BAND:
        return max(ratio, SHRINK)
    if ratio > 1 + BAND and queued:
        # Half the distance in log terms: the latency grows faster than the wait near the
        # objective (a p99 is a tail), so a full step would overshoot it.
        return min(math.sqrt(ratio), GROW)
    return 1.0


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
