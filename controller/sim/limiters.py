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

    the short RTT the window's mean, the long RTT a plain mean over the first 10 windows then an
    exponential average over `long_window` windows (one sample a window, as WindowedLimit
    calls the limit once a window; ×0.95 after the gradient when it exceeds twice the short
    one), no change while the window's largest in-flight count is below half the limit. Its
    RTT is the latency the gateway sees first, TTFT. Defaults are the library's, except the
    maximum: its 200 would bind below this fleet's concurrency, and an adaptive peer must find
    the limit itself. The Plans stay in force beside it, not the Limits' global limits."""

    limit: float = 20.0
    min_limit: float = 20.0
    max_limit: float = 100_000.0
    smoothing: float = 0.2
    queue_size: float = 4.0
    rtt_tolerance: float = 1.5
    long_window: int = 600  # in windows: the library's delegate hears one sample a window
    warmup: int = 10  # windows averaged plainly before the exponential average starts
    window_samples: int = 10
    long_rtt: float = math.nan
    _windows: int = field(default=0, repr=False)
    _window: list[float] = field(default_factory=list, repr=False)
    _max_inflight: int = field(default=0, repr=False)

    def limits(self, written: Mapping[Address, float]) -> dict[Address, float]:
        return {**written, GLOBAL_CONCURRENCY: float(math.floor(self.limit))}

    def observe(self, ttft: FloatArray, inflight: int) -> bool:
        """Called once a step (1 s by default): closes the window when it holds enough, and
        hands its mean RTT and its largest in-flight count on as one sample (WindowedLimit)."""
        self._window.extend(ttft.tolist())
        self._max_inflight = max(self._max_inflight, inflight)
        if len(self._window) < self.window_samples:
            return False
        short = sum(self._window) / len(self._window)
        peak = self._max_inflight
        self._window.clear()
        self._max_inflight = 0
        return self._update(short, peak)

    def _update(self, short: float, inflight: int) -> bool:
        """One window's sample, as Gradient2Limit's update: the gradient reads the long RTT
        with this sample in it, before the decay that applies to the next windows."""
        long = self._add_long(short)
        if long / short > 2:
            self.long_rtt *= 0.95  # latency back to normal after long overload: catch up
        if inflight < self.limit / 2:
            return False  # application-limited: the latency says nothing about the limit
        gradient = max(0.5, min(1.0, self.rtt_tolerance * long / short))
        new = (1 - self.smoothing) * self.limit + self.smoothing * (
            gradient * self.limit + self.queue_size
        )
        new = max(self.min_limit, min(self.max_limit, new))
        changed = math.floor(new) != math.floor(self.limit)
        self.limit = new
        return changed

    def _add_long(self, sample: float) -> float:
        """The long RTT with one more window's sample: a plain mean over the first `warmup`
        windows, then an exponential average over `long_window` windows."""
        if self._windows < self.warmup:
            previous = 0.0 if math.isnan(self.long_rtt) else self.long_rtt * self._windows
            self._windows += 1
            self.long_rtt = (previous + sample) / self._windows
        else:
            self.long_rtt += (sample - self.long_rtt) * 2.0 / (self.long_window + 1)
        return self.long_rtt
