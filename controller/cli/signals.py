"""`governor signals`: run the loaded policies' queries once and show what the engine would see."""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import typer
from rich.table import Table

from controller.cli._redis import console
from controller.cli.config import load_settings
from controller.errors import PolicyError
from controller.model import Sample, ScalarSample, Snapshot, Validity, VectorSample
from controller.policy.inputs import scalar_input, vector_input
from controller.policy.loader import load_directory
from controller.policy.policyset import SignalUse
from controller.signals import PrometheusSource


def register(root: typer.Typer) -> None:
    """Add the top-level `signals` command (a command, not a group: it has no subcommands)."""
    root.command("signals")(signals)


@dataclass(frozen=True, slots=True)
class LabelValue:
    """One label value of a vector signal: `tenant` acme → its number."""

    label: str
    value: float | None  # None: NaN, infinite, or no sample for this label value
    usable: bool  # the engine can use it (finite and fresh)


@dataclass(frozen=True, slots=True)
class Pick:
    """Which label values of each vector to show: the `top` largest, or those named."""

    top: int = 5
    label: str | None = None  # `--label tenant=acme`: the label name...
    wanted: tuple[str, ...] = ()  # ...and the values asked for


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
    values: tuple[LabelValue, ...] | None = None  # a vector's chosen label values


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


def _label_values(sample: VectorSample, usable: np.ndarray, pick: Pick) -> tuple[LabelValue, ...]:
    """The label values `pick` asks for: those named (an absent one as no value), else the
    `top` largest (values that are not numbers last)."""
    if pick.label is None:
        order = np.argsort(-np.nan_to_num(sample.values, nan=-np.inf), kind="stable")
        chosen = [(sample.keys[i], int(i)) for i in order[: pick.top]]
    elif pick.label == sample.label:
        index = sample.index()
        chosen = [(key, index.get(key, -1)) for key in pick.wanted]
    else:
        return ()
    return tuple(
        LabelValue(key, _number(float(sample.values[i])), bool(usable[i]))
        if i >= 0
        else LabelValue(key, None, False)
        for key, i in chosen
    )


def _vector_row(use: SignalUse, sample: VectorSample, now: float, pick: Pick) -> Row:
    seen = vector_input(use.name, use.spec, sample, sample.keys, now)
    usable = int(seen.valid.sum())
    finite = sample.values[np.isfinite(sample.values)]
    oldest = float(sample.timestamps.min()) if len(sample.timestamps) else math.nan
    validity = seen.whole
    if validity is Validity.OK and sample.keys and not usable:
        validity = (
            Validity.STALE
            if (_age(oldest, now) or math.inf) > use.spec.stale_after
            else Validity.OUT_OF_RANGE
            if seen.outside is not None and seen.outside.any()
            else Validity.NOT_FINITE
        )
    low, middle, high = (
        float(f(finite)) if len(finite) else None for f in (np.min, np.median, np.max)
    )
    return Row(
        use.policy, use.name, use.key.query, use.key.by, validity.value,
        None, len(sample.keys), usable, low, middle, high,
        _age(oldest, now), use.spec.stale_after, sample.detail,
        _label_values(sample, seen.valid, pick),
    )  # fmt: skip


def rows(
    uses: list[SignalUse], snapshot: Snapshot, now: float, pick: Pick | None = None
) -> list[Row]:
    """One row per signal use, judged like the engine (including stale_after)."""
    out = []
    for use in uses:
        sample: Sample = snapshot.samples[use.key]
        if isinstance(sample, VectorSample):
            out.append(_vector_row(use, sample, now, pick or Pick()))
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


def _vector_text(row: Row, pick: Pick) -> str:
    """A vector's summary, then one `label value` line per chosen label value."""
    lines = [
        f"{row.series} {row.by} values ({row.usable} usable), min {_show(row.min)} "
        f"/ median {_show(row.median)} / max {_show(row.max)}"
    ]
    if pick.label is not None and pick.label != row.by:
        lines.append(f"(by {row.by}, not {pick.label})")
    for found in row.values or ():
        mark = "" if found.usable else " (not usable)" if found.value is not None else " (absent)"
        lines.append(f"{row.by}={found.label}: {_show(found.value)}{mark}")
    return "\n".join(lines)


# A signal waiting for its history (a fresh install) is not a fault: shown apart, exit 0.
_STYLES = {Validity.OK.value: "green", Validity.NO_HISTORY.value: "yellow"}
_FINE = frozenset(_STYLES)


def _print_table(found: list[Row], url: str, pick: Pick) -> None:
    table = Table(title=f"Signals from {url}", show_lines=False)
    for column in ("policy", "signal", "value", "age", "validity", "detail"):
        table.add_column(column, overflow="fold")
    for row in found:
        value = _show(row.value) if row.series is None else _vector_text(row, pick)
        age = "unknown" if row.age_seconds is None else f"{row.age_seconds:.0f}s"
        style = _STYLES.get(row.validity, "red")
        table.add_row(
            row.policy, row.signal, value, f"{age} (stale after {row.stale_after:g}s)",
            f"[{style}]{row.validity}[/{style}]", row.detail or row.query,
        )  # fmt: skip
    console().print(table)


POLICIES = typer.Option(
    None, "--policies", help="Directory of policy files (default: GOVERNOR_CONTROLLER__POLICY_DIR)."
)


def _pick(top: int, labels: list[str]) -> Pick:
    """`--top N` and `--label NAME=VALUE` (repeatable, one label name)."""
    pairs = [text.partition("=") for text in labels]
    if any(not name or not sep or not value for name, sep, value in pairs):
        raise typer.BadParameter("give NAME=VALUE, e.g. --label tenant=acme", param_hint="--label")
    names = {name for name, _, _ in pairs}
    if len(names) > 1:
        raise typer.BadParameter(
            f"one label name at a time, not {sorted(names)}", param_hint="--label"
        )
    return Pick(top, next(iter(names), None), tuple(dict.fromkeys(v for _, _, v in pairs)))


def signals(
    policies: Path | None = POLICIES,
    policy: str | None = typer.Option(
        None, "--policy", help="Only this policy (`name` or `Kind/name`)."
    ),
    top: int = typer.Option(
        5, "--top", min=0, help="Per vector, show the N label values with the largest values."
    ),
    label: list[str] = typer.Option(
        [], "--label", help="Per vector, show these label values instead: NAME=VALUE, repeat."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """Run the policies' Prometheus queries once and show what the engine would see.

    Per policy and signal: the value (vectors: count, min/median/max, and the top N label
    values or those given with --label, e.g. --label tenant=acme), the sample age and the
    validity the engine would give it.

    Exit 0 when every signal is usable or waiting for its history (`no_history`: a fresh
    install), 1 when any is not (empty, error, stale, NaN, partial), 2 when the policies
    cannot be loaded.
    """
    pick = _pick(top, label)
    settings = load_settings()
    uses = _uses(policies or settings.controller.policy_dir, policy)
    now = time.time()
    with PrometheusSource(settings.prometheus) as source:
        snapshot = source.fetch([u.key for u in uses], now)
        url = source.url
    found = rows(uses, snapshot, now, pick)
    if as_json:
        payload = {"prometheus": url, "taken_at": now}
        typer.echo(json.dumps({**payload, "signals": [asdict(r) for r in found]}, indent=2))
    else:
        _print_table(found, url, pick)
    if any(r.validity not in _FINE for r in found):
        raise typer.Exit(1)
