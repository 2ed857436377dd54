"""The simulated time series: what a Prometheus scraping the simulated fleet would hold.

Series are appended at every scrape (the simulator's scrape_interval) and, before the run,
filled with history derived from each tenant's undisturbed pattern (see docs/simulator.md).
Labels are kept as a sorted tuple of pairs, `__name__` included.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

import numpy as np

from controller.model import FloatArray

Labels = tuple[tuple[str, str], ...]


def labels_of(name: str, labels: Mapping[str, str]) -> Labels:
    return tuple(sorted({**labels, "__name__": name}.items()))


@dataclass
class Series:
    """One series: sample times and values in ascending time, in growable arrays."""

    labels: Labels
    times: FloatArray = field(default_factory=lambda: np.empty(64))
    values: FloatArray = field(default_factory=lambda: np.empty(64))
    size: int = 0

    def append(self, t: float, value: float) -> None:
        if self.size == len(self.times):
            self.times = np.concatenate([self.times, np.empty(len(self.times))])
            self.values = np.concatenate([self.values, np.empty(len(self.values))])
        self.times[self.size] = t
        self.values[self.size] = value
        self.size += 1

    def extend(self, times: FloatArray, values: FloatArray) -> None:
        for t, v in zip(times.tolist(), values.tolist(), strict=True):
            self.append(t, v)

    def window(self, low: float, high: float) -> tuple[FloatArray, FloatArray]:
        """Samples with low <= t <= high: a range selector includes its left edge in
        Prometheus 2.x (Debian 12's 2.42); 3.x leaves it out, which only matters for a
        sample exactly on the edge."""
        times = self.times[: self.size]
        a = int(np.searchsorted(times, low, side="left"))
        b = int(np.searchsorted(times, high, side="right"))
        return times[a:b], self.values[a:b]

    def newest(self, at: float) -> tuple[float, float] | None:
        """The last sample at or before `at`."""
        index = int(np.searchsorted(self.times[: self.size], at, side="right")) - 1
        if index < 0:
            return None
        return float(self.times[index]), float(self.values[index])


@dataclass
class SeriesStore:
    """Every series by metric name."""

    by_name: dict[str, dict[Labels, Series]] = field(default_factory=dict)
    horizon: float = float("-inf")  # the newest sample time: data at or before it is final

    def series(self, name: str, labels: Mapping[str, str]) -> Series:
        key = labels_of(name, labels)
        family = self.by_name.setdefault(name, {})
        found = family.get(key)
        if found is None:
            found = family[key] = Series(key)
        return found

    def record(self, name: str, labels: Mapping[str, str], t: float, value: float) -> None:
        self.series(name, labels).append(t, value)
        self.horizon = max(self.horizon, t)

    def history(
        self, name: str, labels: Mapping[str, str], times: FloatArray, values: FloatArray
    ) -> None:
        """Samples before the run, in ascending time."""
        self.series(name, labels).extend(times, values)
        if len(times):
            self.horizon = max(self.horizon, float(times[-1]))

    def named(self, name: str | None) -> Iterator[Series]:
        if name is not None:
            yield from self.by_name.get(name, {}).values()
            return
        for family in self.by_name.values():
            yield from family.values()
