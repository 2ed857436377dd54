"""The request traces a replay reads: a CSV or JSON-lines file whose columns carry each
request's arrival time and its prompt and output tokens under a name the public traces use
(the Azure LLM inference traces 2023 and 2024, BurstGPT, Mooncake), one row per request."""

from __future__ import annotations

import csv
import datetime as dt
import json
import math
import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

from controller.sim.scenario import ScenarioError

TimeUnit = Literal["s", "ms"]
_SCALE: dict[TimeUnit, float] = {"s": 1.0, "ms": 0.001}

# Column names, compared lower-cased with everything but letters and digits dropped
# ("Request tokens", "request_tokens" and "RequestTokens" are one name).
_TIME = ("timestamp", "time", "arrivaltime", "arrivaltimestamp", "arrival")
_PROMPT = (
    "contexttokens",  # Azure LLM inference 2023 / 2024
    "requesttokens",  # BurstGPT
    "inputlength",  # Mooncake
    "inputtokens",
    "prompttokens",
    "promptlength",
    "numprompttokens",
)
_OUTPUT = (
    "generatedtokens",  # Azure
    "responsetokens",  # BurstGPT
    "outputlength",  # Mooncake
    "outputtokens",
    "completiontokens",
    "generationtokens",
    "numoutputtokens",
)
ROLES = (("arrival time", _TIME), ("prompt tokens", _PROMPT), ("output tokens", _OUTPUT))
FORMATS = (
    "Azure LLM inference 2023/2024 (CSV TIMESTAMP,ContextTokens,GeneratedTokens; ISO times), "
    "BurstGPT (CSV Timestamp,…,Request tokens,Response tokens; seconds), Mooncake (JSON "
    "lines timestamp,input_length,output_length; milliseconds)"
)
# An ISO 8601 time with more fractional digits than datetime takes (the Azure files have 7).
_ISO = re.compile(r"(?P<head>[^.]+?)(?:\.(?P<fraction>\d+))?(?P<zone>Z|[+-]\d\d:?\d\d)?")


@dataclass(frozen=True)
class Rows:
    """The requests read, in file order: arrival in seconds (any origin), token counts."""

    times: list[float]
    prompt: list[float]
    output: list[float]


def _normal(name: str) -> str:
    return "".join(c for c in name.lower() if c.isalnum())


def _names(found: Sequence[str], where: str) -> tuple[str, str, str]:
    """The time, prompt and output column among `found` (their names as written)."""
    by_normal = {_normal(name): name for name in reversed(found)}  # the first of duplicates
    chosen: list[str] = []
    missing: list[str] = []
    for role, aliases in ROLES:
        name = next((by_normal[a] for a in aliases if a in by_normal), None)
        if name is None:
            missing.append(f"the {role} (one of {', '.join(aliases)})")
        else:
            chosen.append(name)
    if missing:
        raise ScenarioError(
            f"{where}: no column for {'; '.join(missing)} among {list(found)!r} (names "
            f"compared without case, spaces or underscores); the formats read: {FORMATS}"
        )
    return chosen[0], chosen[1], chosen[2]


def _timestamp(text: str) -> float:
    """Seconds since the epoch of an ISO 8601 time (UTC when it names no zone)."""
    match = _ISO.fullmatch(text.strip())
    if match is None:
        raise ValueError(f"not a time: {text!r}")
    zone = match["zone"] or ""
    moment = dt.datetime.fromisoformat(match["head"] + ("+00:00" if zone == "Z" else zone))
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=dt.UTC)
    fraction = match["fraction"]
    return moment.timestamp() + (float("0." + fraction) if fraction else 0.0)


def _number(value: object) -> float | None:
    """`value` as a number if it is one (a JSON number or a numeric string), else None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return None
    return None


def _time(value: object, scale: float) -> float:
    """An arrival time in seconds: a number in the trace's unit, or an ISO 8601 time."""
    number = _number(value)
    seconds = number * scale if number is not None else None
    if seconds is None:
        if not isinstance(value, str):
            raise ValueError(f"not a time: {value!r}")
        seconds = _timestamp(value)
    if not math.isfinite(seconds):
        raise ValueError(f"not a finite time: {value!r}")
    return seconds


def _tokens(value: object) -> float:
    count = _number(value)
    if count is None or not math.isfinite(count) or count < 0:
        raise ValueError(f"not a token count (a number ≥ 0): {value!r}")
    return float(round(count))


class _Collector:
    """Rows appended one request at a time; a bad one is refused naming its line."""

    def __init__(self, source: str, scale: float) -> None:
        self.source, self.scale = source, scale
        self.rows = Rows([], [], [])

    def add(self, line: int, values: tuple[object, object, object], shown: str) -> None:
        try:
            time, prompt, output = (
                _time(values[0], self.scale),
                _tokens(values[1]),
                _tokens(values[2]),
            )
        except ValueError as exc:
            raise ScenarioError(f"{self.source}:{line}: {exc}: {shown}") from None
        self.rows.times.append(time)
        self.rows.prompt.append(prompt)
        self.rows.output.append(output)


def read_csv(lines: Iterable[str], source: str, unit: TimeUnit | None) -> Rows:
    """A CSV whose header names the columns; numeric times in seconds unless `unit`."""
    reader = csv.reader(lines)
    header = next(reader, None)
    if not header:
        raise ScenarioError(f"{source}:1: no header; the formats read: {FORMATS}")
    names = [h.strip() for h in header]
    columns = [names.index(name) for name in _names(names, f"{source}:1")]
    collected = _Collector(source, _SCALE[unit or "s"])
    for number, row in enumerate(reader, start=2):
        if not row:
            continue
        try:
            values = (row[columns[0]], row[columns[1]], row[columns[2]])
        except IndexError:
            raise ScenarioError(
                f"{source}:{number}: {len(row)} fields where the header has {len(names)}: "
                f"{','.join(row)!r}"
            ) from None
        collected.add(number, values, repr(",".join(row)))
    return collected.rows


def read_json_lines(lines: Iterable[str], source: str, unit: TimeUnit | None) -> Rows:
    """One JSON object per line; numeric times in milliseconds (Mooncake's) unless `unit`."""
    collected = _Collector(source, _SCALE[unit or "ms"])
    keys: tuple[str, str, str] | None = None
    for number, line in _numbered(lines):
        record = _object(line, f"{source}:{number}")
        keys = keys or _names(list(record), f"{source}:{number}")
        values = tuple(record.get(key) for key in keys)
        collected.add(number, (values[0], values[1], values[2]), line.strip()[:200])
    return collected.rows


def _numbered(lines: Iterable[str]) -> Iterator[tuple[int, str]]:
    return ((n, line) for n, line in enumerate(lines, start=1) if line.strip())


def _object(line: str, where: str) -> Mapping[str, object]:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as exc:
        raise ScenarioError(f"{where}: not JSON ({exc}): {line.strip()[:200]!r}") from None
    if not isinstance(record, dict):
        raise ScenarioError(f"{where}: not a JSON object: {line.strip()[:200]!r}")
    return record


Reader = Callable[[Iterable[str], str, TimeUnit | None], Rows]


def reader_for(first_line: str) -> Reader:
    """JSON lines when the first line holds an object, else CSV."""
    return read_json_lines if first_line.lstrip().startswith("{") else read_csv
