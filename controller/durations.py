"""Durations as people write them (`250ms`, `90s`, `1h30m`): the one grammar of policy files,
scenarios and the command line, its JSON-schema pattern, and the way back to text."""

from __future__ import annotations

import math
import re

# Longest unit first where one is the start of another (`ms` before `m`).
UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
# No window, hold, cooldown or TTL lasts a year; past that a duration is a typo.
MAX_DURATION_SECONDS = 366 * 86400.0
_NUMBER = r"[0-9]+(?:\.[0-9]+)?"  # ASCII digits, as JSON schema's regexes read them
_UNITS = "|".join(UNIT_SECONDS)
_PART = re.compile(rf"({_NUMBER})({_UNITS})")
# The whole text: one or more parts; JSON schema's pattern, so editors check what we parse.
DURATION_PATTERN = rf"^\s*(?:{_NUMBER}(?:{_UNITS}))+\s*$"
_WHOLE = re.compile(DURATION_PATTERN)
_BARE = re.compile(rf"^\s*{_NUMBER}\s*$")
FORMS = (
    f"write a number and a unit ({', '.join(UNIT_SECONDS)}), parts added up, e.g. 250ms, 30s, "
    "2m, 1h30m (a YAML number, unquoted, is seconds)"
)


def parse_duration(value: object) -> float:
    """`90s`, `2m`, `1h30m`, `0s` (or a bare number of seconds) → seconds, at most 366 days.
    Raises ValueError naming the value and the forms accepted."""
    seconds = _seconds(value)
    if not math.isfinite(seconds) or seconds > MAX_DURATION_SECONDS:
        raise ValueError(f"{value!r} is not a duration of at most 366d")
    return seconds


def _seconds(value: object) -> float:
    if isinstance(value, int | float) and not isinstance(value, bool):
        if value < 0:
            raise ValueError(f"{value!r} is not a duration: a duration cannot be negative")
        return float(value)
    if isinstance(value, str) and _negative(value):
        # `--ttl -1h` has a number and a unit: "write a number and a unit" would not say
        # that the sign is what is wrong.
        shown = value.strip()[1:].strip()
        shown += "" if _WHOLE.match(shown) else "s"
        raise ValueError(
            f"{value!r} is not a duration: a duration cannot be negative; write {shown}"
        )
    if isinstance(value, str) and _BARE.match(value):
        # Text (a command line, a quoted YAML string) names its unit: "5" is 5 what?
        shown = value.strip()
        raise ValueError(f"{value!r} is not a duration: give its unit, e.g. {shown}s or {shown}m")
    if not isinstance(value, str) or not _WHOLE.match(value):
        raise ValueError(f"{value!r} is not a duration: {FORMS}")
    return sum(float(n) * UNIT_SECONDS[unit] for n, unit in _PART.findall(value))


def _negative(text: str) -> bool:
    """Whether `text` is a duration (or a bare number) with a minus sign before it."""
    body = text.strip()
    return body.startswith("-") and bool(_WHOLE.match(body[1:]) or _BARE.match(body[1:]))


def format_duration(seconds: float) -> str:
    """Seconds → the shortest `1h30m`-style text (the inverse of parse_duration)."""
    if seconds == 0:
        return "0s"
    out, rest = [], seconds
    for unit in ("d", "h", "m", "s"):
        size = UNIT_SECONDS[unit]
        count = int(rest // size)
        if count:
            out.append(f"{count}{unit}")
            rest -= count * size
    if rest > 1e-9:
        out.append(f"{round(rest * 1000)}ms")
    return "".join(out)
