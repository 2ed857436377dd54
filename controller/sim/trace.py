"""Replay of a request trace (the Azure LLM inference schema, BurstGPT, Mooncake or any
CSV/JSON lines with the same columns: trace_formats): a window of it, time-scaled, and
spread over synthetic tenants by a Zipf rule.

Credit for the shipped traces: Patel, Choukse, Zhang, Shah, Goiri, Maleki, Bianchini,
"Splitwise: Efficient generative LLM inference using phase splitting", ISCA 2024 (CC BY 4.0);
they ship gzipped in controller/data/azure-llm-inference-2023/, with that credit beside them.
"""

from __future__ import annotations

import csv
import gzip
import io
import itertools
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import IO

import numpy as np
import numpy.typing as npt

from controller.durations import format_duration
from controller.model import FloatArray
from controller.sim.scenario import ScenarioError, resolve_data_file
from controller.sim.trace_formats import Rows, TimeUnit, reader_for

IntArray = npt.NDArray[np.int64]
# A scenario's `trace.file` naming a trace shipped in the package instead of a path.
SHIPPED_PREFIX = "shipped:"
SHIPPED_DIR = "azure-llm-inference-2023"
SHIPPED = {
    "azure-code-2023": "AzureLLMInferenceTrace_code.csv.gz",
    "azure-conv-2023": "AzureLLMInferenceTrace_conv.csv.gz",
}


@dataclass(frozen=True)
class TraceData:
    """Arrivals in seconds from the first request, with their token counts."""

    offsets: FloatArray
    prompt: FloatArray
    output: FloatArray
    source: str

    @property
    def span(self) -> float:
        return float(self.offsets[-1]) if len(self.offsets) else 0.0

    def window(self, start: float, length: float | None = None) -> TraceData:
        """The requests from `start` seconds into the trace for `length` seconds (None: to
        its end), their offsets from the window's start; refused when it holds none."""
        if start == 0.0 and length is None:
            return self
        end = np.inf if length is None else start + length
        low, high = np.searchsorted(self.offsets, [start, end], side="left")
        if high <= low:
            span = "the rest" if length is None else format_duration(round(length))
            raise ScenarioError(
                f"{self.source}: no request from {format_duration(round(start))} for {span} "
                f"of the trace, which spans {format_duration(round(self.span))}; start the "
                "window earlier"
            )
        kept = slice(int(low), int(high))
        return TraceData(
            offsets=self.offsets[kept] - start,
            prompt=self.prompt[kept],
            output=self.output[kept],
            source=self.source,
        )


def read_trace(path: Path, unit: TimeUnit | None = None) -> TraceData:
    """Read a trace, CSV or JSON lines (gzipped if it ends in .gz); raise ScenarioError
    naming the line that cannot be read, or the file. `unit`: numeric times' unit (default:
    the format's, trace_formats)."""
    try:
        with path.open("rb") as raw:
            return _read(raw, str(path), gzipped=path.suffix == ".gz", unit=unit)
    except OSError as exc:
        raise ScenarioError(
            f"{path}: cannot read the trace ({exc}); pass a readable CSV with --trace or fix "
            "`trace.file`"
        ) from None


def shipped_trace(name: str) -> TraceData:
    """A trace shipped in the package (`azure-conv-2023`), read with importlib.resources so
    that an installed wheel has it as much as a clone."""
    if name not in SHIPPED:
        known = ", ".join(SHIPPED_PREFIX + n for n in SHIPPED)
        raise ScenarioError(
            f"no shipped trace {name!r}: name one of {known}, or give a CSV file's path"
        )
    resource = resources.files("controller.data").joinpath(SHIPPED_DIR, SHIPPED[name])
    with resource.open("rb") as raw:
        return _read(raw, SHIPPED_PREFIX + name, gzipped=True, unit=None)


def open_trace(
    text: str, scenario_file: Path | None = None, unit: TimeUnit | None = None
) -> TraceData:
    """The trace a scenario's `trace.file` or --trace names: `shipped:<name>`, else a path
    (resolved as resolve_data_file does)."""
    if text.startswith(SHIPPED_PREFIX):
        return shipped_trace(text.removeprefix(SHIPPED_PREFIX))
    return read_trace(resolve_data_file(text, scenario_file), unit)


def _read(raw: IO[bytes], source: str, *, gzipped: bool, unit: TimeUnit | None) -> TraceData:
    # A damaged archive or bytes that are not UTF-8 are refused like a bad row: named.
    try:
        binary: IO[bytes] | gzip.GzipFile = gzip.GzipFile(fileobj=raw) if gzipped else raw
        with io.TextIOWrapper(binary, encoding="utf-8-sig", newline="") as handle:
            first = handle.readline()
            lines = itertools.chain([first], handle)
            return _sorted(reader_for(first)(lines, source, unit), source)
    except (OSError, EOFError, UnicodeDecodeError, csv.Error) as exc:
        raise ScenarioError(f"{source}: not a readable trace ({exc})") from None


def _sorted(rows: Rows, source: str) -> TraceData:
    """The requests in arrival order, their offsets from the first."""
    if not rows.times:
        raise ScenarioError(f"{source}: the trace holds no requests")
    order = np.argsort(np.array(rows.times), kind="stable")
    stamps = np.array(rows.times)[order]
    return TraceData(
        offsets=stamps - stamps[0],
        prompt=np.array(rows.prompt)[order],
        output=np.array(rows.output)[order],
        source=source,
    )


# A replay longer than this needs its window named (--duration): a run's CPU time grows
# with its ticks, and a month of trace would run for hours unasked.
LONGEST_UNASKED_SECONDS = 86400.0


def replay_window(
    trace: TraceData, path: Path, speed: float, start: float, duration: float | None
) -> TraceData:
    """The window of `trace` a `--trace` replay runs: from `start` for `duration` seconds
    of the run (at `speed`), else to its end if that is at most a day of simulated time."""
    if duration is not None:
        return trace.window(start, duration * speed)
    window = trace.window(start)
    if window.span / speed > LONGEST_UNASKED_SECONDS:
        raise ScenarioError(
            f"{path}: from {format_duration(start)} the trace spans "
            f"{format_duration(round(window.span / speed))} at {speed:g}×, more than a day of "
            "simulated time (hours of CPU): pass --duration (e.g. --duration 1h) and --start "
            "(e.g. --start 3d) to replay a window of it"
        )
    return window


def trace_name(path: Path) -> str:
    """A trace file's name without its format's suffixes (`moon.jsonl.gz` → `moon`)."""
    name = path.name
    for suffix in (".gz", ".csv", ".jsonl", ".json"):
        name = name.removesuffix(suffix)
    return name or path.name


def zipf_shares(tenants: int, exponent: float) -> FloatArray:
    """Tenant k's share of the requests, ∝ 1/(k+1)^exponent (0: an even split)."""
    weights = 1.0 / np.arange(1, tenants + 1, dtype=np.float64) ** exponent
    shares: FloatArray = weights / weights.sum()
    return shares


def assign_tenants(count: int, shares: FloatArray, rng: np.random.Generator) -> IntArray:
    """Each request's tenant, drawn independently with the given shares (seeded)."""
    drawn: IntArray = rng.choice(len(shares), size=count, p=shares).astype(np.int64)
    return drawn


def peak_minute_rate(trace: TraceData, speed: float = 1.0) -> float:
    """The busiest minute's work (prompt + output tokens) per second, replayed at `speed`."""
    minutes = np.floor(trace.offsets / speed / 60.0).astype(np.int64)
    per_minute = np.bincount(minutes, weights=trace.prompt + trace.output)
    return float(per_minute.max()) / 60.0
