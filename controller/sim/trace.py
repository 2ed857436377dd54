"""Replay of a request trace in the Azure LLM inference schema (`TIMESTAMP,ContextTokens,
GeneratedTokens`): time-scaled, and spread over synthetic tenants by a Zipf rule.

Credit for the shipped traces: Patel, Choukse, Zhang, Shah, Goiri, Maleki, Bianchini,
"Splitwise: Efficient generative LLM inference using phase splitting", ISCA 2024 (CC BY 4.0);
they ship gzipped in controller/data/azure-llm-inference-2023/, with that credit beside them.
"""

from __future__ import annotations

import csv
import datetime as dt
import gzip
import io
from collections.abc import Iterable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import IO

import numpy as np
import numpy.typing as npt

from controller.model import FloatArray
from controller.sim.scenario import ScenarioError, resolve_data_file

IntArray = npt.NDArray[np.int64]
COLUMNS = ("TIMESTAMP", "ContextTokens", "GeneratedTokens")
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


def _timestamp(text: str) -> float:
    # Seven fractional digits (the Azure files) are more than fromisoformat takes.
    head, dot, fraction = text.strip().partition(".")
    moment = dt.datetime.fromisoformat(head).replace(tzinfo=dt.UTC)
    return moment.timestamp() + (float("0." + fraction) if dot and fraction else 0.0)


def read_trace(path: Path) -> TraceData:
    """Read a trace CSV (gzipped if it ends in .gz); raise ScenarioError naming the line that
    is not in the schema, or the file that cannot be read."""
    try:
        with path.open("rb") as raw:
            return _read(raw, str(path), gzipped=path.suffix == ".gz")
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
        return _read(raw, SHIPPED_PREFIX + name, gzipped=True)


def open_trace(text: str, scenario_file: Path | None = None) -> TraceData:
    """The trace a scenario's `trace.file` or --trace names: `shipped:<name>`, else a path
    (resolved as resolve_data_file does)."""
    if text.startswith(SHIPPED_PREFIX):
        return shipped_trace(text.removeprefix(SHIPPED_PREFIX))
    return read_trace(resolve_data_file(text, scenario_file))


def _read(raw: IO[bytes], source: str, *, gzipped: bool) -> TraceData:
    # A damaged archive or bytes that are not UTF-8 are refused like a bad row: named.
    try:
        binary: IO[bytes] | gzip.GzipFile = gzip.GzipFile(fileobj=raw) if gzipped else raw
        with io.TextIOWrapper(binary, encoding="utf-8", newline="") as handle:
            return _parse(csv.reader(handle), source)
    except (OSError, EOFError, UnicodeDecodeError, csv.Error) as exc:
        raise ScenarioError(f"{source}: not a readable trace ({exc})") from None


def _parse(reader: Iterable[list[str]], source: str) -> TraceData:
    times: list[float] = []
    prompt: list[float] = []
    output: list[float] = []
    rows = iter(reader)
    header = next(rows, None)
    if header is None or tuple(h.strip() for h in header) != COLUMNS:
        raise ScenarioError(
            f"{source}:1: expected the header {','.join(COLUMNS)} (the Azure LLM inference "
            f"trace schema), found {','.join(header or [])!r}"
        )
    for number, row in enumerate(rows, start=2):
        try:
            times.append(_timestamp(row[0]))
            prompt.append(float(int(row[1])))
            output.append(float(int(row[2])))
        except (IndexError, ValueError) as exc:
            raise ScenarioError(
                f"{source}:{number}: not `TIMESTAMP,ContextTokens,GeneratedTokens` "
                f"({exc}): {','.join(row)!r}"
            ) from None
    if not times:
        raise ScenarioError(f"{source}: the trace holds no requests")
    order = np.argsort(np.array(times), kind="stable")
    stamps = np.array(times)[order]
    return TraceData(
        offsets=stamps - stamps[0],
        prompt=np.array(prompt)[order],
        output=np.array(output)[order],
        source=source,
    )


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
