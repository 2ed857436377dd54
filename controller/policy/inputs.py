"""Turn snapshot samples into the arrays a condition reads, with a validity mask per value.

A value is valid only when its query succeeded, it is finite, within the signal's declared
`range` and no older than `stale_after`. Invalid values are masked out: never read as 0,
unless the signal says `absent: zero` and the value is absent (no series: an event not yet
seen), which is not the same as stale or failed.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

import numpy as np
import numpy.typing as npt

from controller.model import (
    FloatArray,
    Sample,
    ScalarSample,
    SignalReading,
    Snapshot,
    Validity,
    VectorSample,
)
from controller.policy.documents import SignalSpec

BoolArray = npt.NDArray[np.bool_]


@dataclass(frozen=True, slots=True)
class ScalarInput:
    """One scalar signal as the engine sees it."""

    name: str
    value: float
    timestamp: float
    validity: Validity

    @property
    def valid(self) -> bool:
        return self.validity is Validity.OK

    def reading(self) -> SignalReading:
        return SignalReading(self.name, self.value, self.timestamp, self.validity)


def scalar_input(
    name: str, spec: SignalSpec, snapshot: Snapshot, by: str | None, now: float
) -> ScalarInput:
    """Read one scalar signal; anything but a fresh finite number is marked invalid."""
    sample = snapshot.samples.get(spec.key(by))
    if sample is None:
        return ScalarInput(name, float("nan"), float("nan"), Validity.MISSING)
    if spec.absent == "zero" and sample.validity is Validity.EMPTY:
        return ScalarInput(name, 0.0, now, Validity.OK)
    if isinstance(sample, VectorSample):
        return ScalarInput(name, float("nan"), float("nan"), Validity.ERROR)
    validity = sample.validity
    if validity is Validity.OK and not np.isfinite(sample.value):
        validity = Validity.NOT_FINITE
    bounds = spec.valid_range
    if validity is Validity.OK and bounds is not None and bounds.excludes(sample.value):
        validity = Validity.OUT_OF_RANGE
    if validity is Validity.OK and now - sample.timestamp > spec.stale_after:
        validity = Validity.STALE
    return ScalarInput(name, sample.value, sample.timestamp, validity)


@dataclass(frozen=True, slots=True)
class VectorInput:
    """One signal aligned to the policy's label values: value, timestamp and validity each."""

    name: str
    values: FloatArray
    timestamps: FloatArray
    valid: BoolArray
    whole: Validity  # the validity of the query as a whole
    outside: BoolArray | None = None  # finite values outside the signal's range (None: none)

    def reading(self, i: int) -> SignalReading:
        validity = Validity.OK if self.valid[i] else _element_validity(self, i)
        return SignalReading(self.name, float(self.values[i]), float(self.timestamps[i]), validity)


def _element_validity(signal: VectorInput, i: int) -> Validity:
    if signal.whole is not Validity.OK:
        return signal.whole
    if np.isnan(signal.timestamps[i]):
        return Validity.MISSING
    if not np.isfinite(signal.values[i]):
        return Validity.NOT_FINITE
    if signal.outside is not None and signal.outside[i]:
        return Validity.OUT_OF_RANGE
    return Validity.STALE


def label_universe(samples: Sequence[Sample | None], extra: Sequence[str]) -> tuple[str, ...]:
    """Every label value seen in any vector, plus those the engine still tracks in its state."""
    vectors = [s for s in samples if isinstance(s, VectorSample)]
    if vectors:
        # Usually every vector has the same label values, which include every tracked one:
        # then the universe is the first vector's own keys (no 100k-entry copy each tick).
        first = vectors[0]
        if all(v.keys is first.keys or v.keys == first.keys for v in vectors[1:]):
            if len(vectors) == 1 and not extra:
                return first.keys
            index = first.index()
            if len(index) == len(first.keys) and all(k in index for k in extra):
                return first.keys
    keys: dict[str, None] = {}
    for vector in vectors:
        keys.update(dict.fromkeys(vector.keys))
    keys.update(dict.fromkeys(extra))
    return tuple(keys)


def vector_input(
    name: str,
    spec: SignalSpec,
    sample: Sample | None,
    universe: tuple[str, ...],
    now: float,
) -> VectorInput:
    """Align a sample to `universe`; a scalar sample is broadcast to every label value."""
    size = len(universe)
    if spec.absent == "zero" and sample is not None and sample.validity is Validity.EMPTY:
        sample = _absent(sample, now)
    if sample is None or sample.validity is not Validity.OK:
        whole = Validity.MISSING if sample is None else sample.validity
        nan = np.full(size, np.nan)
        return VectorInput(name, nan, nan.copy(), np.zeros(size, dtype=bool), whole)
    if isinstance(sample, ScalarSample):
        values = np.full(size, sample.value)
        timestamps = np.full(size, sample.timestamp)
    elif sample.keys is universe or sample.keys == universe:
        values, timestamps = sample.values, sample.timestamps
    else:
        values, timestamps = _align(sample, universe)
        if spec.absent == "zero":
            absent = np.isnan(timestamps)  # no series for the label value: zero, as of now
            values[absent], timestamps[absent] = 0.0, now
    with np.errstate(invalid="ignore"):
        valid = np.isfinite(values) & (now - timestamps <= spec.stale_after)
    if spec.valid_range is None:
        return VectorInput(name, values, timestamps, valid, Validity.OK)
    out = spec.valid_range.outside(values)
    return VectorInput(name, values, timestamps, valid & ~out, Validity.OK, out)


def _absent(sample: Sample, now: float) -> Sample:
    """An answer without series, for a signal with `absent: zero`: every value is 0 now."""
    if isinstance(sample, ScalarSample):
        return ScalarSample(0.0, now, Validity.OK, sample.detail)
    return replace(sample, validity=Validity.OK)  # no keys: each label value aligns to 0


def _align(sample: VectorSample, universe: tuple[str, ...]) -> tuple[FloatArray, FloatArray]:
    index = sample.index()
    positions = np.fromiter(
        (index.get(k, -1) for k in universe), dtype=np.int64, count=len(universe)
    )
    present = positions >= 0
    values = np.full(len(universe), np.nan)
    timestamps = np.full(len(universe), np.nan)
    values[present] = sample.values[positions[present]]
    timestamps[present] = sample.timestamps[positions[present]]
    return values, timestamps


def env_of(inputs: Mapping[str, VectorInput]) -> dict[str, FloatArray]:
    """The name → values mapping a compiled condition evaluates over."""
    return {name: signal.values for name, signal in inputs.items()}
