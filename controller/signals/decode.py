"""Turn one Prometheus query answer into a snapshot sample, marking whole-query problems.

A vector answer is read straight from the response bytes into arrays (`vector_from_body`):
no object per series, so 100k series take tens of milliseconds and no transient hundreds
of megabytes. Any other shape goes through a full JSON parse. NaN and ±Inf stay in vector
arrays as they are (the engine masks them); a scalar that is not finite is NOT_FINITE.

A label value that is not a valid key (`valid_label`) is dropped with its series here, where
readings are decoded: it never reaches the engine, the journal or a log line raw.
"""

from __future__ import annotations

import math
import re
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

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
# What follows the last series' value in a whole answer: the series, the result list and
# `data` closed, then the answer's other keys (`warnings`, `infos`) or its end. A connection
# closed mid-answer without a Content-Length ends the body early and unnoticed by HTTP: a
# cut between two series still scans as a shorter vector, so the end is checked.
_LAST_VALUE = re.compile(rb'"value":\[[^,\]]*,"[^"]*"\]\}\]\}(.*)\Z', re.DOTALL)

# A label value Governor keys limits and journal events by (docs/signals.md): 1 to 256
# printable characters. Control characters (newline, ESC, ...) and other unprintable ones
# would forge log lines and terminal output; very long values bloat every tick's state.
MAX_LABEL_LENGTH = 256


def valid_label(value: str) -> bool:
    """Whether `value` may key a signal reading (the one rule, used wherever one is read)."""
    return 0 < len(value) <= MAX_LABEL_LENGTH and value.isprintable()


def _all_valid(values: list[str]) -> bool:
    # C-speed checks of the whole list first: at 100k tenants nearly always all valid.
    return (
        bool(values)
        and max(map(len, values)) <= MAX_LABEL_LENGTH
        and all(map(str.isprintable, values))
        and all(values)
    )


@dataclass
class DroppedLabels:
    """Label values dropped as invalid: all counted, each noted at most once per `every`
    seconds (a hostile tenant name would otherwise be logged every tick)."""

    every: float = 3600.0
    limit: int = 10_000  # values remembered; past it the memory restarts (notes repeat)
    total: int = 0
    _noted: dict[str, float] = field(default_factory=dict)

    def add(self, values: Iterable[str], now: float) -> list[str]:
        """Count `values`; those to note now (not noted within `every`)."""
        due = []
        for value in values:
            self.total += 1
            # Remembered by a digest-sized prefix and length: 10k hostile names of 10k
            # characters each would otherwise be 100 MB.
            key = f"{len(value)}:{value[:64]}"
            if now - self._noted.get(key, -math.inf) >= self.every:
                if len(self._noted) >= self.limit:
                    self._noted.clear()
                self._noted[key] = now
                due.append(value)
        return due


def _plain_ascii(body: bytes, keys: list[bytes]) -> bool:
    """Whether every label value is valid, seen from the raw answer at C speed: JSON escapes
    every control character but DEL, so an ASCII answer without a backslash or DEL holds
    printable label values only; then only their lengths are left to check."""
    return (
        body.isascii()
        and b"\\" not in body
        and b"\x7f" not in body
        and max(map(len, keys)) <= MAX_LABEL_LENGTH
        and all(keys)
    )


def _valid_only(
    keys: list[str], values: list[Any], dropped: list[str] | None
) -> tuple[list[str], list[Any]]:
    """The series whose label value is valid; the others' values go to `dropped`."""
    if _all_valid(keys):
        return keys, values
    kept = [i for i, key in enumerate(keys) if valid_label(key)]
    if dropped is not None:
        dropped.extend(key for key in keys if not valid_label(key))
    return [keys[i] for i in kept], [values[i] for i in kept]


def _dropped_note(count: int, label: str) -> str:
    return f"{count} series with an invalid {label!r} label value dropped" if count else ""


def _no_valid_series(label: str, invalid: int) -> VectorSample:
    """EMPTY: no series, or (`invalid` > 0) none with a valid label value."""
    empty = np.empty(0, dtype=np.float64)
    why = "; ".join(filter(None, ["query returned no series", _dropped_note(invalid, label)]))
    return VectorSample(label, (), empty, empty.copy(), Validity.EMPTY, why)


class ResultShapeError(ValueError):
    """A result that no signal can read (a range vector, text, or the wrong cardinality)."""


def _complete(body: bytes) -> bool:
    """Whether a vector answer ends as a whole one does (not cut short between two series):
    only its tail after the last value is parsed, not the whole 100k-series body."""
    end = _LAST_VALUE.match(body, body.rfind(b'"value":['))
    if end is None:
        return False
    rest = end.group(1).rstrip()
    if rest == b"}":
        return True
    try:
        return rest.startswith(b",") and isinstance(orjson.loads(b"{" + rest[1:]), dict)
    except orjson.JSONDecodeError:
        return False


def parse_body(body: bytes) -> dict[str, Any]:
    """A whole Prometheus answer as JSON (ValueError when it is not JSON)."""
    parsed: dict[str, Any] = orjson.loads(body)
    return parsed


def vector_from_body(
    body: bytes,
    label: str,
    timestamp: float,
    validity: Validity,
    detail: str,
    dropped: list[str] | None = None,
) -> VectorSample | None:
    """The vector of a successful answer keyed by `label`, scanned from the bytes; None
    when the answer is not a plain vector whose every series has the label once (then the
    caller parses it fully, which also explains what is wrong). Series with an invalid
    label value are left out, their values added to `dropped`."""
    if _VECTOR not in body:
        return None
    series = body.count(_SERIES)
    name = re.escape(orjson.dumps(label))
    keys = re.findall(name + rb':"((?:[^"\\]|\\.)*)"', body)
    values = _VALUE.findall(body)
    if not series or len(keys) != series or len(values) != series or not _complete(body):
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
    if not _plain_ascii(body, keys):
        texts, values = _valid_only(texts, values, dropped)
    if not texts:
        return _no_valid_series(label, series)
    try:
        numbers = np.array(values).astype(np.float64)  # numpy reads "NaN" and "+Inf" too
    except ValueError:
        return None
    note = _dropped_note(series - len(texts), label)
    return VectorSample(
        label=label,
        keys=tuple(texts),
        values=numbers,
        timestamps=np.full(len(texts), timestamp, dtype=np.float64),
        validity=validity,
        detail="; ".join(filter(None, [detail, note])),
    )


def _is_scalar(result: RawResult) -> bool:
    return len(result) == 2 and not isinstance(result[0], dict)


def _reject_matrix(result: RawResult) -> None:
    # Any series may be a native histogram (`histogram` in place of `value`), not only the
    # first: a query mixing classic and native series answers both.
    if any(isinstance(s, dict) and ("histogram" in s or "histograms" in s) for s in result):
        raise ResultShapeError(
            "query returns native histograms, not numbers; read one number from each with "
            "histogram_quantile(...), histogram_count(...), histogram_sum(...) or "
            "histogram_fraction(...)"
        )
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
    dropped: list[str] | None = None,
) -> VectorSample | ScalarSample:
    """Values keyed by `label`; one series without that label is a global value (scalar).
    Series with an invalid label value are left out, their values added to `dropped`."""
    if _is_scalar(result):
        return decode_scalar(result, timestamp, validity, detail)
    _reject_matrix(result)
    keys = [series["metric"].get(label) for series in result]
    values = [series["value"][1] for series in result]
    unlabelled = 0
    if None in keys:
        kept = [i for i, key in enumerate(keys) if key is not None]
        unlabelled = len(keys) - len(kept)
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
    named = len(keys)
    keys, values = _valid_only(cast("list[str]", keys), values, dropped)
    if not keys:
        return _no_valid_series(label, named)
    if len(set(keys)) != len(keys):
        raise ResultShapeError(
            f"query returns several series per {label}; aggregate with sum by ({label})"
        )
    notes = [detail] if detail else []
    if unlabelled:
        notes.append(f"{unlabelled} series without label {label!r} dropped")
    notes.append(_dropped_note(named - len(keys), label))
    return VectorSample(
        label=label,
        keys=tuple(keys),
        values=np.array(values, dtype=np.float64),
        timestamps=np.full(len(keys), timestamp, dtype=np.float64),
        validity=validity,
        detail="; ".join(filter(None, notes)),
    )
