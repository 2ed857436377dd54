"""Gateway-side baselines of the scorecard: a fixed knob, no limit, a Gradient2 limiter."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol

from controller.model import Address, FloatArray, LimitKind, Scope

GLOBAL_CONCURRENCY = Address(Scope.GLOBAL, LimitKind.CONCURRENT_REQUESTS)


class Gate(Protocol):
    """What the simulated gateway enforces instead of (or on top of) the limits in Redis."""

    def limits(self, written: Mapping[Address, float]) -> dict[Address, float]:
        """The limits in force given those the controller wrote."""
        ...

    def observe(self, ttft: FloatArray, inflight: int) -> bool:
        """One step's latency samples and requests in flight; True if the limits changed."""
        ...


@dataclass
class FixedKnob:
    """The best-static-limit sweep: one address held at one value for the whole run."""

    address: Address
    value: float

    def limits(self, written: Mapping[Address, float]) -> dict[Address, float]:
        return {**written, self.address: self.value}

    def observe(self, ttft: FloatArray, inflight: int) -> bool:
        return False


@dataclass
class NoLimit:
    """No limit at all: the gateway admits every request (plans and budgets included)."""

    def limits(self, written: Mapping[Address, float]) -> dict[Address, float]:
        return {}

    def observe(self, ttft: FloatArray, inflight: int) -> bool:
        return False


@dataclass
class Gradient2:
    """A global concurrency limit adapted as Netflix concurrency-limits' Gradient2Limit does
    (its later versions: rttTolerance 1.5, long-RTT decay 0.95), behind its WindowedLimit
    (a window closes after ≥ 1 s and ≥ `window_samples` samples, and hands on their mean):

        gradient = clamp(rtt_tolerance · long RTT / short RTT, 0.5, 1)
        limit    = (1 − smoothing) · limit + smoothing · (gradient · limit + queue size)

    the short RTT the window's mean, the long RTT an exponential average over `long_window`
    samples (×0.95 when it exceeds twice the short one), no change while fewer than half the
    limit are in flight. Its RTT is the latency the gateway sees first, TTFT. Defaults are
    the library's, except the maximum: its 200 would bind below this fleet's concurrency, and
    an adaptive peer must find the limit itself. Plans and the Limits stay in force beside it."""

    limit: float = 20.0
    min_limit: float = 20.0
    max_limit: float = 100_000.0
    smoothing: float = 0.2
    queue_size: float = 4.0
    rtt_tolerance: float = 1.5
    long_window: int = 600
    warmup: int = 10  # the library averages its first samples plainly
    window_samples: int = 10
    long_rtt: float = math.nan
    _samples: int = field(default=0, repr=False)
    _window: list[float] = field(default_factory=list, repr=False)

    def limits(self, written: Mapping[Address, float]) -> dict[Address, float]:
        return {**written, GLOBAL_CONCURRENCY: float(math.floor(self.limit))}

    def observe(self, ttft: FloatArray, inflight: int) -> bool:
        """Called once a step (1 s by default): closes the window when it holds enough."""
        self._window.extend(ttft.tolist())
        if len(self._window) < self.window_samples:
            return False
        short = sum(self._window) / len(self._window)
        self._update_long(len(self._window), short)
        self._window.clear()
        if self.long_rtt / short > 2:
            self.long_rtt *= 0.95
        if inflight < self.limit / 2:
            return False  # application-limited: the latency says nothing about the limit
        gradient = max(0.5, min(1.0, self.rtt_tolerance * self.long_rtt / short))
        new = (1 - self.smoothing) * self.limit + self.smoothing * (
            gradient * self.limit + self.queue_size
        )
        new = max(self.min_limit, min(self.max_limit, new))
        changed = math.floor(new) != math.floor(self.limit)
        self.limit = new
        return changed

    def _update_long(self, count: int, mean: float) -> None:
        if self._samples < self.warmup:  # a plain mean over the first samples
            previous = 0.0 if math.isnan(self.long_rtt) else self.long_rtt * self._samples
            self._samples += count
            self.long_rtt = (previous + mean * count) / self._samples
            return
        # then an exponential average; n samples at once weigh 1 − (1 − α)^n
        alpha = 2.0 / (self.long_window + 1)
        self.long_rtt += (mean - self.long_rtt) * (1.0 - (1.0 - alpha) ** count)
