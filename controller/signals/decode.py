"""Turn one Prometheus query result into a snapshot sample, marking whole-query problems.

Values are decoded into numpy arrays in two list passes; no per-series objects are built,
so 100k series decode in tens of milliseconds. NaN and ±Inf stay in vector arrays as they
are (the engine masks them); a scalar that is not finite is marked NOT_FINITE.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from controller.model import ScalarSample, Validity, VectorSample

# What prometheus-api-client's custom_query returns: data.result of the JSON answer, a list
# of {"metric": {...}, "value": [ts, "v"]} (vector), {"metric", "values"} (matrix), or
# [ts, "v"] (scalar and string results).
RawResult = Sequence[Any]


class ResultShapeError(ValueError):
    """A result that no signal can read (a range vector, text, or the wrong cardinality)."""


def _is_scalar(result: RawResult) -> bool:
    return len(result) == 2 and not isinstance(result[0], dict)


def _reject_matrix(result: RawResult) -> None:
    if result and isinstance(result[0], dict) and "value" not in result[0]:
        raise ResultShapeError(
            "query returns a range vector; wrap it in a function such as rate(...) or "
            "avg_over_time(...) to get one value per series"
        )


def _scalar_value(text: object) -> float:
    try:
        return float(str(text))
    except ValueError:
        raise ResultShapeError(f"query returns text ({text!r}), not a number") from None


def _scalar_sample(value: float, timestamp: float, validity: Validity, detail: str) -> ScalarSample:
    if validity is Validity.OK and not math.isfinite(value):
        return ScalarSample(value, timestamp, Validity.NOT_FINITE, f"value is {value}")
    return ScalarSample(value, timestamp, validity, detail)


def decode_scalar(
    result: RawResult, timestamp: float, validity: Validity = Validity.OK, detail: str = ""
) -> ScalarSample:
    """One number: a scalar result or a vector of exactly one series."""
    if _is_scalar(result):
        return _scalar_sample(_scalar_value(result[1]), timestamp, validity, detail)
    _reject_matrix(result)
    if not result:
        return ScalarSample(math.nan, timestamp, Validity.EMPTY, "query returned no series")
    if len(result) > 1:
        raise ResultShapeError(
            f"query returns {len(result)} series where one number is needed; aggregate "
            "it, e.g. sum(...), max(...) or avg(...)"
        )
    return _scalar_sample(_scalar_value(result[0]["value"][1]), timestamp, validity, detail)


def decode_vector(
    result: RawResult,
    label: str,
    timestamp: float,
    validity: Validity = Validity.OK,
    detail: str = "",
) -> VectorSample | ScalarSample:
    """Values keyed by `label`; one series without that label is a global value (scalar)."""
    if _is_scalar(result):
        return decode_scalar(result, timestamp, validity, detail)
    _reject_matrix(result)
    keys = [series["metric"].get(label) for series in result]
    values = [series["value"][1] for series in result]
    dropped = 0
    if None in keys:
        kept = [i for i, key in enumerate(keys) if key is not None]
        dropped = len(keys) - len(kept)
        if not kept:
            if len(result) == 1:
                note = f"no {label!r} label: one value for every {label}"
                return decode_scalar(
                    result, timestamp, validity, "; ".join(filter(None, [detail, note]))
                )
            raise ResultShapeError(
                f"none of the {len(result)} series has the label {label!r}; "
                f"aggregate with sum by ({label}) (...)"
            )
        keys = [keys[i] for i in kept]
        values = [values[i] for i in kept]
    if not keys:
        empty = np.empty(0, dtype=np.float64)
        return VectorSample(label, (), empty, empty, Validity.EMPTY, "query returned no series")
    if len(set(keys)) != len(keys):
        raise ResultShapeError(
            f"query returns several series per {label}; aggregate with sum by ({label})"
        )
    notes = [detail] if detail else []
    if dropped:
        notes.append(f"{dropped} series without label {label!r} dropped")
    return VectorSample(
        label=label,
        keys=tuple(keys),
        values=np.array(values, dtype=np.float64),
        timestamps=np.full(len(keys), timestamp, dtype=np.float64),
        validity=validity,
        detail="; ".join(notes),
    )
