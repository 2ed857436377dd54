"""Vectors scanned from the answer bytes read exactly as a full JSON parse reads them."""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np

from controller.model import Validity, VectorSample
from controller.signals.decode import decode_vector, parse_body, vector_from_body


def answer(series: list[dict[str, Any]], result_type: str = "vector", **extra: Any) -> bytes:
    data = {"resultType": result_type, "result": series}
    # Prometheus' own compact encoding: no spaces after separators.
    return json.dumps({"status": "success", "data": data, **extra}, separators=(",", ":")).encode()


def one(labels: dict[str, str], value: str) -> dict[str, Any]:
    return {"metric": labels, "value": [1_700_000_000.5, value]}


def both(body: bytes, label: str = "tenant") -> tuple[VectorSample | None, object]:
    full = decode_vector(parse_body(body)["data"]["result"], label, 1.0, Validity.OK, "")
    return vector_from_body(body, label, 1.0, Validity.OK, ""), full


def test_a_plain_vector_reads_the_same_as_the_full_parse() -> None:
    body = answer(
        [
            one({"tenant": "acme", "zone": "b"}, "0.5"),
            one({"a": "}{", "tenant": 'we"ird\\id', "z": '"tenant":"x"'}, "NaN"),
            one({"tenant": "ünï"}, "+Inf"),
            one({"tenant": "t3"}, "-1e-05"),
        ]
    )
    fast, full = both(body)
    assert isinstance(fast, VectorSample)
    assert isinstance(full, VectorSample)
    assert fast.keys == full.keys == ("acme", 'we"ird\\id', "ünï", "t3")
    assert np.array_equal(fast.values, full.values, equal_nan=True)
    assert math.isinf(fast.values[2])
    assert math.isnan(fast.values[1])
    assert np.array_equal(fast.timestamps, full.timestamps)


def test_answers_the_scan_cannot_read_exactly_go_to_the_full_parse() -> None:
    without_label = answer([one({"tenant": "a"}, "1"), one({"zone": "b"}, "2")])
    twice = answer([one({"tenant": "a", "x": "1"}, "1"), one({"tenant": "a", "x": "2"}, "2")])
    matrix = answer([{"metric": {"tenant": "a"}, "values": [[1, "1"]]}], "matrix")
    empty = answer([])
    for body in (without_label, twice, matrix, empty):
        assert vector_from_body(body, "tenant", 1.0, Validity.OK, "") is None
    # The full parse still reads what can be read and says what is wrong with the rest.
    _, full = both(without_label)
    assert isinstance(full, VectorSample)
    assert full.keys == ("a",)
    assert "1 series without label 'tenant' dropped" in full.detail
