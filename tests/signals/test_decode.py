"""Vectors scanned from the answer bytes read exactly as a full JSON parse reads them."""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np

from controller.model import Validity, VectorSample
from controller.signals.decode import (
    DroppedLabels,
    decode_vector,
    parse_body,
    valid_label,
    vector_from_body,
)


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


HOSTILE = {
    "newline": 'evil\n{"event":"limit.changed","forged":true}',
    "escape": "\x1b[2J\x1b[31mred",
    "long": "x" * 10_000,
    "empty-ish": "\u200b",  # a zero-width space: not printable
}


def test_invalid_label_values_are_dropped_by_both_decoders_and_collected() -> None:
    longest = "ok-" + "y" * 253  # 256 characters: the longest allowed
    hostile = [one({"tenant": v}, "2") for v in HOSTILE.values()]
    body = answer([one({"tenant": "acme"}, "1"), *hostile, one({"tenant": longest}, "3")])
    fast_dropped: list[str] = []
    full_dropped: list[str] = []
    fast = vector_from_body(body, "tenant", 1.0, Validity.OK, "", fast_dropped)
    full = decode_vector(
        parse_body(body)["data"]["result"], "tenant", 1.0, Validity.OK, "", full_dropped
    )
    for sample in (fast, full):
        assert isinstance(sample, VectorSample)
        assert sample.keys == ("acme", "ok-" + "y" * 253)
        assert sample.values.tolist() == [1.0, 3.0]
        assert sample.validity is Validity.OK
        assert "4 series with an invalid 'tenant' label value dropped" in sample.detail
    assert fast_dropped == full_dropped == list(HOSTILE.values())
    assert [valid_label(v) for v in HOSTILE.values()] == [False] * 4
    assert valid_label("acme")
    assert valid_label("ünï")


def test_a_vector_of_invalid_label_values_only_is_empty() -> None:
    body = answer([one({"tenant": v}, "1") for v in HOSTILE.values()])
    dropped: list[str] = []
    sample = vector_from_body(body, "tenant", 1.0, Validity.OK, "", dropped)
    assert isinstance(sample, VectorSample)
    assert sample.keys == ()
    assert sample.validity is Validity.EMPTY
    assert "4 series with an invalid 'tenant' label value dropped" in sample.detail
    assert len(dropped) == 4


def test_each_dropped_value_is_counted_and_noted_once_per_period() -> None:
    notes = DroppedLabels(every=3600.0)
    first = notes.add([HOSTILE["escape"], HOSTILE["long"]], now=1000.0)
    again = notes.add([HOSTILE["escape"], HOSTILE["long"], HOSTILE["newline"]], now=1060.0)
    later = notes.add([HOSTILE["escape"]], now=1000.0 + 3600.0)
    assert first == [HOSTILE["escape"], HOSTILE["long"]]
    assert again == [HOSTILE["newline"]]
    assert later == [HOSTILE["escape"]]
    assert notes.total == 6


def test_a_whole_answer_is_scanned_with_its_warnings_and_infos_a_cut_one_is_not() -> None:
    series = [one({"tenant": f"t{i}"}, str(i)) for i in range(3)]
    for extra in (
        {},
        {"warnings": ["w ]}"]},
        {"infos": ["i"]},
        {"warnings": ["w"], "infos": ["i"]},
    ):
        scanned = vector_from_body(
            answer(series, "vector", **extra), "tenant", 1.0, Validity.OK, ""
        )
        assert scanned is not None  # the fast path, not the full parse
        assert scanned.keys == ("t0", "t1", "t2")
    whole = answer(series, warnings=["w"])
    # Cut between two series (a connection closed early, no Content-Length), or inside the
    # answer's tail: left to the full parse, which fails on it, never a shorter vector.
    for cut in (whole[: whole.index(b',{"metric":{"tenant":"t2"')], whole[:-1], whole[:-6]):
        assert vector_from_body(cut, "tenant", 1.0, Validity.OK, "") is None
