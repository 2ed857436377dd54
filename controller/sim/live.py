"""The live view of a running simulation (the demo): signals, limits, the latest journal
events. On a terminal a rich table redrawn each tick; elsewhere (CI, a pipe) one plain line
per simulated minute."""

from __future__ import annotations

import math
import time
from types import TracebackType

import numpy as np
from rich.console import Console, Group
from rich.live import Live
from rich.table import Table

from controller.journal.reader import read_events
from controller.sim.record import p99
from controller.sim.run import TickView


def _clock(seconds: float) -> str:
    return f"{int(seconds // 60):02d}:{int(seconds % 60):02d}"


def _signals(view: TickView) -> Table:
    record, tick = view.record, view.tick
    table = Table(title="signals (as the engine saw them)", expand=True)
    table.add_column("signal")
    table.add_column("value", justify="right")
    table.add_row("GPU utilization (this tick)", f"{record.utilization[tick]:.2f}")
    table.add_row("p99 TTFT (this tick)", f"{p99(record.ttft[tick]):.2f}s")
    table.add_row(
        "offered / admitted work",
        f"{record.offered[tick] / 1000:.1f}k / {record.admitted[tick] / 1000:.1f}k tok/s",
    )
    vectors: dict[str, list[tuple[float, str]]] = {}
    for name, values in sorted(record.signals.items()):
        value = float(values[tick])
        if math.isnan(value):
            continue
        if "[" in name:
            head, _, key = name.partition("[")
            vectors.setdefault(head, []).append((value, key.rstrip("]")))
        else:
            table.add_row(name, f"{value:.3g}")
    for head, found in sorted(vectors.items()):
        top = sorted(found, reverse=True)[:2]
        table.add_row(f"{head} (top)", ", ".join(f"{k}={v:.3g}" for v, k in top))
    return table


def _limits(view: TickView) -> Table:
    record, tick = view.record, view.tick
    table = Table(title="limits in Redis (moved from baseline first)", expand=True)
    for column in ("address", "value", "baseline"):
        table.add_column(column, justify="left" if column == "address" else "right")
    rows = []
    for address, values in record.limits.items():
        value = float(values[tick])
        if math.isnan(value):
            continue
        base = record.baselines.get(address, math.nan)
        moved = not (np.isfinite(base) and value == base)
        if moved or address.startswith("global/"):
            rows.append((not moved, address, value, base))
    for _, address, value, base in sorted(rows)[:8]:
        style = "bold yellow" if np.isfinite(base) and value != base else ""
        table.add_row(address, f"{value:,.6g}", f"{base:,.6g}", style=style)
    return table


def _journal(view: TickView) -> Table:
    table = Table(title="latest journal events (Redis stream)", expand=True)
    for column in ("tick", "event", "address", "change", "policy"):
        table.add_column(column)
    for entry in read_events(view.client, view.keys, count=6):
        event = entry.event
        change = "" if event.address is None else f"{_num(event.old)} → {_num(event.new)}"
        detail = event.address or event.reason[:48]
        table.add_row(str(event.tick or ""), event.kind, detail, change, event.policy or "")
    return table


def _num(value: float | None) -> str:
    return "none" if value is None else f"{value:,.6g}"


class LiveView:
    """Call with each TickView; `pace` wall seconds per tick keep the demo watchable."""

    def __init__(self, title: str, total_seconds: float, pace: float, console: Console) -> None:
        self.title = title
        self.total = total_seconds
        self.pace = pace
        self.console = console
        self._live: Live | None = None
        self._last_line = -60.0

    def __enter__(self) -> LiveView:
        if self.console.is_terminal:
            self._live = Live(console=self.console, refresh_per_second=8, transient=False)
            self._live.__enter__()
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        if self._live is not None:
            self._live.__exit__(kind, error, trace)

    def __call__(self, view: TickView) -> None:
        if self._live is not None:
            heading = (
                f"[bold]{self.title}[/bold]  simulated {_clock(view.elapsed)} / "
                f"{_clock(self.total)}  tick {view.tick + 1}"
            )
            self._live.update(Group(heading, _signals(view), _limits(view), _journal(view)))
        elif view.elapsed - self._last_line >= 60.0:
            self._last_line = view.elapsed
            self.console.print(self._line(view), highlight=False)
        if self.pace > 0:
            time.sleep(self.pace)

    def _line(self, view: TickView) -> str:
        record, tick = view.record, view.tick
        moved = [
            f"{a}={float(v[tick]):,.6g}"
            for a, v in sorted(record.limits.items())
            if np.isfinite(v[tick])
            and np.isfinite(record.baselines.get(a, math.nan))
            and v[tick] != record.baselines[a]
        ]
        return (
            f"[{_clock(view.elapsed)}] utilization {record.utilization[tick]:.2f}  "
            f"p99 TTFT {p99(record.ttft[tick]):.2f}s  "
            f"limits off baseline: {', '.join(moved[:4]) or 'none'}"
        )
