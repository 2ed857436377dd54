"""The one duration grammar (controller/durations.py): what it accepts, how it refuses, its
way back to text, and the JSON-schema pattern editors check policy files with."""

from __future__ import annotations

import jsonschema
import pytest
from hypothesis import given
from hypothesis import strategies as st

from controller.durations import (
    DURATION_PATTERN,
    MAX_DURATION_SECONDS,
    format_duration,
    parse_duration,
)
from controller.policy.documents import json_schema


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("250ms", 0.25),
        ("90s", 90.0),
        ("2m", 120.0),
        ("1h30m", 5400.0),
        ("1.5h", 5400.0),
        ("1d2h3m4s5ms", 93784.005),
        (" 0s ", 0.0),
        ("366d", MAX_DURATION_SECONDS),
        (45, 45.0),
        (0.5, 0.5),
    ],
)
def test_durations_are_numbers_with_units_or_seconds(text: object, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize(
    ("value", "says"),
    [
        ("two minutes", "'two minutes' is not a duration: write a number and a unit"),
        ("90", "'90' is not a duration: give its unit, e.g. 90s or 90m"),
        ("1w", "'1w' is not a duration"),
        ("-5m", "'-5m' is not a duration: a duration cannot be negative; write 5m"),
        (" -1h30m", "' -1h30m' is not a duration: a duration cannot be negative; write 1h30m"),
        ("-90", "'-90' is not a duration: a duration cannot be negative; write 90s"),
        ("-soon", "'-soon' is not a duration: write a number and a unit"),  # not a sign
        ("5 m", "'5 m' is not a duration"),
        ("1e3s", "'1e3s' is not a duration"),
        ("", "'' is not a duration"),
        (True, "True is not a duration"),
        ([1], "[1] is not a duration"),
        (-5, "-5 is not a duration: a duration cannot be negative"),
        ("367d", "'367d' is not a duration of at most 366d"),
        (float("inf"), "inf is not a duration of at most 366d"),
        (float("nan"), "nan is not a duration of at most 366d"),
    ],
)
def test_a_bad_duration_names_itself_and_the_forms(value: object, says: str) -> None:
    with pytest.raises(ValueError, match="is not a duration") as err:
        parse_duration(value)
    assert says in str(err.value)


def test_a_unit_error_lists_every_form_accepted() -> None:
    with pytest.raises(ValueError, match=r"e\.g\. 250ms, 30s, 2m, 1h30m \(a YAML number, unquoted"):
        parse_duration("soon")


@given(st.integers(0, int(MAX_DURATION_SECONDS * 1000)))
def test_formatting_is_the_inverse_of_parsing(milliseconds: int) -> None:
    seconds = milliseconds / 1000
    assert parse_duration(format_duration(seconds)) == pytest.approx(seconds, abs=1e-6)


@given(st.one_of(st.text("0123456789.smhdw \t-", max_size=8), st.integers(-9, 10**9)))
def test_the_schema_accepts_what_the_parser_accepts(value: str | int) -> None:
    # Every Duration field of the published policy schema carries the same anyOf.
    schema = json_schema()["$defs"]["SignalSpec"]["properties"]["stale_after"]
    try:
        parse_duration(value)
        parsed = True
    except ValueError as exc:
        parsed = False
        too_long = "of at most 366d" in str(exc)
    valid = jsonschema.Draft202012Validator(schema).is_valid(value)
    # The pattern cannot count to 366 days; everything else the two agree on.
    assert valid == parsed or (valid and too_long)


def test_the_schema_pattern_is_the_grammar() -> None:
    schema = json_schema()["$defs"]["SignalSpec"]["properties"]["stale_after"]
    assert {"type": "string", "pattern": DURATION_PATTERN} in schema["anyOf"]
