"""Turn one Prometheus query answer into a snapshot sample, marking whole-query problems.

A vector answer is read straight from the response bytes into arrays (`vector_from_body`):
no object per series, so 100k series take tens of milliseconds and no transient hundreds
of megabytes. Any other shape goes through a full JSON parse. NaN and ±Inf stay in vector
arrays as they are (the engine masks them); a scalar that is not finite is NOT_FINITE.
"""

from __future__ import annotations

import math
import re
import sys
from collections.abc import Sequence
from typing import Any

import numpy as np
import orjson

from controller.model import ScalarSample, Validity, VectorSample

# data.result of a parsed answer: a list of {"metric": {...}, "value": [ts, "v"]} (vector),
# {"metric", "values"} (matrix), or [ts, "v"] (scalar and string results).
RawResult = Sequence[Any]


# In Prometheus' JSON a quote inside a string is always escaped, so an unescaped `"value":[`
# or `"<label>":"` can only be a key. Each series is `{"metric":{...},"value":[t,"v"]}`.
_SERIES = b'{"metric":{'
_VALUE = re.compile(rb'"value":\[[^,\]]*,"([^"]*)"\]')
_VECTOR = b'"resultType":"vector"'


class ResultShapeError(ValueError):
    """A result that no signal can read (a range vector, text, or the wrong cardinality)."""


def parse_body(body: bytes) -> dict[str, Any]:
    """A whole Prometheus answer as JSON (ValueError when it is not JSON)."""
    parsed: dict[str, Any] = orjson.loads(body)
    return parsed


def vector_from_body(
    body: bytes, label: str, timestamp: float, validity: Validity, detail: str
) -> VectorSample | None:
    """The vector of a successful answer keyed by `label`, scanned from the bytes; None
    when the answer is not a plain vector whose every series has the label once (then the
    caller parses it fully, which also explains what is wrong)."""
    if _VECTOR not in body:
        return None
    series = body.count(_SERIES)
    name = re.escape(orjson.dumps(label))
    keys = re.findall(name + rb':"((?:[^"\\]|\\.)*)"', body)
    values = _VALUE.findall(body)
    if not series or len(keys) != series or len(values) != series:
        return None
    # Interned: label values repeat every tick, and the engine's state keeps them as keys;
    # one string per value for the whole process instead of a new one each tick.
    intern = sys.intern
    if b"\\" in body:  # an escaped character in some label value: decode those exactly
        texts = [intern(orjson.loads(b'"' + k + b'"') if b"\\" in k else k.decode()) for k in keys]
    else:
        texts = [intern(k.decode()) for k in keys]
    if len(set(texts)) != len(texts):
        return None  # several series per label value: the full path says how to aggregate
    try:
        numbers = np.array(values).astype(np.float64)  # numpy reads "NaN" and "+Inf" too
    except ValueError:
        return None
    return VectorSample(
        label=label,
        keys=tuple(texts),
        values=numbers,
        timestamps=np.full(series, timestamp, dtype=np.float64),
        validity=validity,
        detail=detail,
    )


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
