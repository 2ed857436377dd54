"""Capacity seeking for an AdaptiveLimit: the serving capacity estimated online from the
throughput admitted and the utilization it causes (the utilization law, U = X / C). Pure."""

from __future__ import annotations

from dataclasses import dataclass

from controller.model import Snapshot
from controller.policy.documents import CapacitySpec
from controller.policy.inputs import scalar_input
from controller.policy.text import fmt_number


@dataclass(frozen=True, slots=True)
class Capacity:
    """The estimate after one sample, and how the sample was used (for the reason)."""

    value: float | None
    how: str


def estimate(
    spec: CapacitySpec, previous: float | None, utilization: float, snapshot: Snapshot, now: float
) -> Capacity:
    """Fold one sample of the utilization, with the throughput of the same span, into the
    estimate: only unsaturated, loaded samples say what the capacity is (at saturation the
    throughput is the queue's, not the pool's; near zero load the ratio is noise)."""
    name = spec.throughput.name or "throughput"
    throughput = scalar_input(name, spec.throughput, snapshot, None, now)
    if not throughput.valid:
        return Capacity(previous, f"{name} is {throughput.validity.value}: capacity not updated")
    shown = f"{name}={fmt_number(throughput.value)}"
    if utilization >= spec.saturated:
        return Capacity(previous, f"{shown}, saturated: capacity not updated")
    if utilization < spec.min_signal:
        return Capacity(previous, f"{shown}, too little load: capacity not updated")
    sample = throughput.value / utilization
    value = sample if previous is None else previous + spec.smoothing * (sample - previous)
    return Capacity(value, f"{shown} ÷ {fmt_number(utilization)} = {fmt_number(sample)}")
