"""Replay of a request trace in the Azure LLM inference schema (`TIMESTAMP,ContextTokens,
GeneratedTokens`): time-scaled, and spread over synthetic tenants by a Zipf rule.

Credit for the shipped traces: Patel, Choukse, Zhang, Shah, Goiri, Maleki, Bianchini,
"Splitwise: Efficient generative LLM inference using phase splitting", ISCA 2024 (CC BY 4.0).
"""

from __future__ import annotations

import csv
import datetime as dt
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

from controller.model import FloatArray
from controller.sim.scenario import ScenarioError

IntArray = npt.NDArray[np.int64]
COLUMNS = ("TIMESTAMP", "ContextTokens", "GeneratedTokens")


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
    """Read a trace CSV; raise ScenarioError naming the line that is not in the schema."""
    times: list[float] = []
    prompt: list[float] = []
    output: list[float] = []
    with path.open(newline="", encoding="utf-8") as handle:
        reader = csv.reader(handle)
        header = next(reader, None)
        if header is None or tuple(h.strip() for h in header) != COLUMNS:
            raise ScenarioError(
                f"{path}:1: expected the header {','.join(COLUMNS)} (the Azure LLM inference "
                f"trace schema), found {','.join(header or [])!r}"
            )
        for number, row in enumerate(reader, start=2):
            try:
                times.append(_timestamp(row[0]))
                prompt.append(float(int(row[1])))
                output.append(float(int(row[2])))
            except (IndexError, ValueError) as exc:
                raise ScenarioError(
                    f"{path}:{number}: not `TIMESTAMP,ContextTokens,GeneratedTokens` "
                    f"({exc}): {','.join(row)!r}"
                ) from None
    if not times:
        raise ScenarioError(f"{path}: the trace holds no requests")
    order = np.argsort(np.array(times), kind="stable")
    stamps = np.array(times)[order]
    return TraceData(
        offsets=stamps - stamps[0],
        prompt=np.array(prompt)[order],
        output=np.array(output)[order],
        source=str(path),
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
