"""`governor signals`: run the loaded policies' queries once and show what the engine would see."""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import typer
from rich.console import Console
from rich.table import Table

from controller.cli.config import load_settings
from controller.errors import PolicyError
from controller.model import Sample, ScalarSample, Snapshot, Validity, VectorSample
from controller.policy.inputs import scalar_input, vector_input
from controller.policy.loader import load_directory
from controller.policy.policyset import SignalUse
from controller.signals import PrometheusSource

app = typer.Typer(help="Run the policies' Prometheus queries once and show their values.")


@dataclass(frozen=True, slots=True)
class Row:
    """One signal of one policy, as the engine would see it now."""

    policy: str
    signal: str
    query: str
    by: str | None
    validity: str
    value: float | None  # a scalar's value
    series: int | None  # a vector's number of label values
    usable: int | None  # of those, how many the engine can use (finite and fresh)
    min: float | None
    median: float | None
    max: float | None
    age_seconds: float | None  # None: no sample time known
    stale_after: float
    detail: str


def _number(value: float) -> float | None:
    return float(value) if math.isfinite(value) else None


def _age(timestamp: float, now: float) -> float | None:
    return round(now - timestamp, 3) if math.isfinite(timestamp) and timestamp > 0 else None


def _scalar_row(use: SignalUse, snapshot: Snapshot, sample: ScalarSample, now: float) -> Row:
    seen = scalar_input(use.name, use.spec, snapshot, use.key.by, now)
    return Row(
        use.policy, use.name, use.key.query, use.key.by, seen.validity.value,
        _number(sample.value), None, None, None, None, None,
        _age(sample.timestamp, now), use.spec.stale_after, sample.detail,
    )  # fmt: skip


def _vector_row(use: SignalUse, sample: VectorSample, now: float) -> Row:
    seen = vector_input(use.name, use.spec, sample, sample.keys, now)
    usable = int(seen.valid.sum())
    finite = sample.values[np.isfinite(sample.values)]
    oldest = float(sample.timestamps.min()) if len(sample.timestamps) else math.nan
    validity = seen.whole
    if validity is Validity.OK and sample.keys and not usable:
        validity = (
            Validity.STALE
            if (_age(oldest, now) or math.inf) > use.spec.stale_after
            else (Validity.NOT_FINITE)
        )
    low, middle, high = (
        float(f(finite)) if len(finite) else None for f in (np.min, np.median, np.max)
    )
    return Row(
        use.policy, use.name, use.key.query, use.key.by, validity.value,
        None, len(sample.keys), usable, low, middle, high,
        _age(oldest, now), use.spec.stale_after, sample.detail,
    )  # fmt: skip


def rows(uses: list[SignalUse], snapshot: Snapshot, now: float) -> list[Row]:
    """One row per signal use, judged like the engine (including stale_after)."""
    out = []
    for use in uses:
        sample: Sample = snapshot.samples[use.key]
        if isinstance(sample, VectorSample):
            out.append(_vector_row(use, sample, now))
        else:
            out.append(_scalar_row(use, snapshot, sample, now))
    return out


def _uses(directory: Path, policy: str | None) -> list[SignalUse]:
    try:
        policy_set = load_directory(directory)
    except PolicyError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    uses = list(policy_set.signal_uses())
    if policy is None:
        return uses
    chosen = [u for u in uses if policy in (u.policy, u.policy.split("/", 1)[1])]
    if not chosen:
        known = ", ".join(sorted({u.policy for u in uses})) or "none"
        typer.echo(f"error: no policy {policy!r} reads signals (policies: {known})", err=True)
        raise typer.Exit(2)
    return chosen


def _show(value: float | None) -> str:
    return "-" if value is None else f"{value:.6g}"


def _print_table(found: list[Row], url: str) -> None:
    table = Table(title=f"Signals from {url}", show_lines=False)
    for column in ("policy", "signal", "value", "age", "validity", "detail"):
        table.add_column(column, overflow="fold")
    for row in found:
        if row.series is None:
            value = _show(row.value)
        else:
            value = (
                f"{row.series} {row.by} values ({row.usable} usable), min {_show(row.min)} "
                f"/ median {_show(row.median)} / max {_show(row.max)}"
            )
        age = "unknown" if row.age_seconds is None else f"{row.age_seconds:.0f}s"
        style = "green" if row.validity == Validity.OK.value else "red"
        table.add_row(
            row.policy, row.signal, value, f"{age} (stale after {row.stale_after:g}s)",
            f"[{style}]{row.validity}[/{style}]", row.detail or row.query,
        )  # fmt: skip
    Console().print(table)


POLICIES = typer.Option(
    None, "--policies", help="Directory of policy files (default: GOVERNOR_CONTROLLER__POLICY_DIR)."
)


@app.callback(invoke_without_command=True)
def signals(
    policies: Path | None = POLICIES,
    policy: str | None = typer.Option(
        None, "--policy", help="Only this policy (`name` or `Kind/name`)."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """Run every query of the loaded policies once, now, and print per policy and signal the
    value (vectors: count and min/median/max), the sample age and the validity the engine
    would give it.

    Exit 0 when every signal is usable, 1 when any is not (empty, error, stale, NaN,
    partial), 2 when the policies cannot be loaded.
    """
    settings = load_settings()
    uses = _uses(policies or settings.controller.policy_dir, policy)
    now = time.time()
    with PrometheusSource(settings.prometheus) as source:
        snapshot = source.fetch([u.key for u in uses], now)
        url = source.url
    found = rows(uses, snapshot, now)
    if as_json:
        payload = {"prometheus": url, "taken_at": now}
        typer.echo(json.dumps({**payload, "signals": [asdict(r) for r in found]}, indent=2))
    else:
        _print_table(found, url)
    if any(r.validity != Validity.OK.value for r in found):
        raise typer.Exit(1)
