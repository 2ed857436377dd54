"""Capacity seeking for an AdaptiveLimit: the serving capacity estimated online from the
throughput admitted and the utilization it causes (the utilization law, U = X / C). Pure."""

from __future__ import annotations

import math
from dataclasses import dataclass

from controller.model import Snapshot
from controller.policy.documents import CapacitySpec
from controller.policy.inputs import scalar_input
from controller.policy.text import fmt_number


@dataclass(frozen=True, slots=True)
class Capacity:
    """The estimate after one sample, how the sample was used (for the reason), and the
    variance of a sample around the estimate (its noise)."""

    value: float | None
    how: str
    variance: float | None = None
    throughput: float | None = None  # the sample's throughput (None: not valid)

    def noise(self, smoothing: float) -> float:
        """The standard deviation of the estimate itself: an exponentially weighted average
        of weight a keeps a/(2-a) of its samples' variance."""
        if self.variance is None:
            return 0.0
        return math.sqrt(max(self.variance, 0.0) * smoothing / (2.0 - smoothing))


def estimate(
    spec: CapacitySpec, previous: Capacity, utilization: float, snapshot: Snapshot, now: float
) -> Capacity:
    """Fold one sample of the utilization, with the throughput of the same span, into the
    estimate: only unsaturated, loaded samples say what the capacity is (at saturation the
    throughput is the queue's, not the pool's; near zero load the ratio is noise)."""
    name = spec.throughput.name or "throughput"
    throughput = scalar_input(name, spec.throughput, snapshot, None, now)
    value, variance = previous.value, previous.variance
    if not throughput.valid:
        why = f"{name} is {throughput.validity.value}: capacity not updated"
        return Capacity(value, why, variance)
    shown, admitted = f"{name}={fmt_number(throughput.value)}", throughput.value
    if utilization >= spec.saturated:
        return Capacity(value, f"{shown}, saturated: capacity not updated", variance, admitted)
    if admitted <= 0:
        # Load on the pool with nothing admitted or in flight: the two series disagree (one
        # lags, or counts something else); their ratio would say the pool holds nothing.
        return Capacity(value, f"{shown} under load: capacity not updated", variance, admitted)
    if utilization < spec.min_signal:
        why = f"{shown}, too little load: capacity not updated"
        return Capacity(value, why, variance, admitted)
    sample = admitted / utilization
    how = f"{shown} ÷ {fmt_number(utilization)} = {fmt_number(sample)}"
    if value is None:
        return Capacity(sample, how, variance, admitted)
    deviation = sample - value
    squared = deviation * deviation
    # The noise is averaged over four times as many samples as the estimate, as the filter's.
    noise = squared if variance is None else variance + spec.smoothing / 4 * (squared - variance)
    return Capacity(value + spec.smoothing * deviation, how, noise, admitted)
