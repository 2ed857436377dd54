"""Reconcile ticks the way the reconciler runs them (read, diff, apply), for sink tests."""

from __future__ import annotations

from collections.abc import Mapping

from controller.changes import Change, diff
from controller.model import Address
from controller.sinks import Sink


class Registry(dict[str, str]):
    """The tenant registry (tenant → plan) as the Kong sinks ask it: a callable."""

    def __call__(self) -> Mapping[str, str]:
        return dict(self)


def converge(sink: Sink, desired: Mapping[Address, float], ticks: int = 4) -> list[Change]:
    """Reconcile until a tick changes nothing but what waits (`ApplyResult.waiting`, e.g. a
    tenant without a Kong consumer: never read as in force, so in every tick's diff); every
    change made, in order. Fails when a write does not read back, or when the sink does not
    settle within `ticks`."""
    made: list[Change] = []
    for _ in range(ticks):
        changes = diff(desired, sink.read())
        result = sink.apply(changes)
        assert result.verified, result.mismatched
        done = [change for change in changes if change not in result.waiting]
        if not done:
            return made
        made.extend(done)
    raise AssertionError(f"no convergence in {ticks} ticks: {made}")
