"""PNG plots of a simulation (matplotlib, Agg backend): signals, limits, latency and load."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display, safe in CI and in worker processes

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.axes import Axes

from controller.model import Address
from controller.sim.backtest import OPEN_LOOP, BacktestResult
from controller.sim.compare import BASELINE, VARIANTS, Comparison
from controller.sim.record import RunRecord, p99
from controller.sim.scorecard import UTILIZATION_MARGIN

COLORS = {"policies": "tab:blue", "static": "tab:red", "plain-aimd": "tab:green", BASELINE: "0.5"}
AZURE_CREDIT = (
    'Traffic: Azure LLM inference trace 2023 (Patel et al., "Splitwise", ISCA 2024, CC BY 4.0)'
)


def _minutes(record: RunRecord) -> np.ndarray:
    return record.times / 60.0


def _events(ax: Axes, record: RunRecord) -> None:
    for kind, start, end in record.events:
        ax.axvspan(start / 60, end / 60, color="0.9", zorder=0)
        ax.text(start / 60, 1.0, f" {kind}", transform=ax.get_xaxis_transform(), fontsize=7,
                va="top", color="0.4")  # fmt: skip


def _p99_per_tick(record: RunRecord) -> np.ndarray:
    return np.array([p99(row) for row in record.ttft])


def _limit_lines(ax: Axes, record: RunRecord, style: str) -> int:
    """Each limit that moved, as a share of its largest value in the run."""
    drawn = 0
    for address, values in sorted(record.limits.items()):
        finite = values[np.isfinite(values)]
        if len(finite) < 2 or np.all(finite == finite[0]):
            continue
        # Each limit against its own largest value in the run: the shape shows whatever
        # the scale (a baseline can be far from where an adaptive limit works).
        scale = float(np.nanmax(values)) or 1.0
        ax.step(_minutes(record), values / scale, where="post", linestyle=style,
                label=f"{record.variant}: {address}", linewidth=1.2)  # fmt: skip
        drawn += 1
        if drawn >= 6:
            break
    return drawn


def plot(comparison: Comparison, path: Path) -> Path:
    """One PNG, five panels sharing the time axis; returns its path."""
    runs = comparison.runs
    first = runs[VARIANTS[0]]
    fig, axes = plt.subplots(5, 1, figsize=(11, 15), sharex=True)
    util, limits, latency, load, tenants = axes
    for ax in axes:
        _events(ax, first)
        ax.grid(alpha=0.3)
    target = first.target
    util.axhline(target, color="k", linewidth=0.8, linestyle="--", label=f"target {target:g}")
    util.axhspan(target, target + UTILIZATION_MARGIN, color="gold", alpha=0.25,
                 label="target + 5%")  # fmt: skip
    for name in (*VARIANTS, BASELINE):
        record = runs[name]
        util.plot(_minutes(record), record.utilization, color=COLORS[name], label=name,
                  linewidth=1.0 if name != BASELINE else 0.8)  # fmt: skip
        latency.plot(_minutes(record), _p99_per_tick(record), color=COLORS[name], label=name,
                     linewidth=1.0)  # fmt: skip
        if name != BASELINE:
            load.plot(_minutes(record), record.goodput / 1000, color=COLORS[name],
                      label=f"{name} goodput")  # fmt: skip
    util.set_ylabel("GPU utilization (DCGM)")
    util.set_ylim(0, 1.05)
    util.legend(loc="upper right", fontsize=7, ncol=3)
    drawn = sum(
        _limit_lines(limits, runs[name], style)
        for name, style in ((VARIANTS[0], "-"), (VARIANTS[2], "--"))
    )
    limits.set_ylabel("limit / its run maximum")
    if drawn:
        limits.legend(loc="lower left", fontsize=6)
    else:
        limits.text(0.5, 0.5, "no limit moved", transform=limits.transAxes, ha="center")
    latency.axhline(first.slo_seconds, color="k", linestyle=":", linewidth=0.8, label="SLO")
    latency.set_yscale("log")
    latency.set_ylabel("p99 TTFT per tick (s)")
    latency.legend(loc="upper right", fontsize=7, ncol=3)
    load.plot(_minutes(first), first.offered / 1000, color="k", linewidth=0.8, label="offered")
    load.plot(_minutes(first), first.oracle / 1000, color="k", linestyle="--", linewidth=0.8,
              label="oracle")  # fmt: skip
    load.axhline(first.capacity / 1000, color="0.3", linestyle=":", label="capacity")
    load.set_ylabel("work (k tokens/s)")
    load.legend(loc="upper right", fontsize=7, ncol=3)
    _tenant_panel(tenants, comparison)
    tenants.set_xlabel("simulated minutes")
    scenario = comparison.scenario
    fig.suptitle(f"governor simulate {scenario.name} — policies: {comparison.policies}"
                 f" — seed {scenario.seed}", fontsize=11)  # fmt: skip
    if scenario.trace is not None:
        fig.text(0.5, 0.005, AZURE_CREDIT, ha="center", fontsize=7, color="0.3")
    fig.tight_layout(rect=(0, 0.01, 1, 0.98))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def _tenant_panel(ax: Axes, comparison: Comparison) -> None:
    """The runaway (or else the busiest) tenant's admitted work, per variant."""
    first = comparison.runs[VARIANTS[0]]
    index = first.runaway[0] if first.runaway else int(first.tenant_admitted.sum(axis=0).argmax())
    name = first.tenants[index].name
    tick = first.tick_seconds
    ax.plot(_minutes(first), first.tenant_offered[:, index] / tick / 1000, color="k",
            linewidth=0.8, label=f"{name} offered")  # fmt: skip
    for variant in VARIANTS:
        record = comparison.runs[variant]
        ax.plot(_minutes(record), record.tenant_admitted[:, index] / tick / 1000,
                color=COLORS[variant], label=f"{name} admitted ({variant})")  # fmt: skip
    ax.set_ylabel(f"{'runaway' if first.runaway else 'busiest'} tenant (k tokens/s)")
    ax.legend(loc="upper right", fontsize=7)


def plot_backtest(result: BacktestResult, path: Path) -> Path:
    """One panel per policy (its signals, shaded where it was active), then the limits it
    would have written; titled as the open-loop replay it is."""
    policies = sorted({name.split(":", 1)[0] for name in result.signals})
    fig, axes = plt.subplots(len(policies) + 1, 1, figsize=(11, 2.6 * (len(policies) + 1)),
                             sharex=True, squeeze=False)  # fmt: skip
    minutes = (np.array(result.times) - result.start) / 60.0
    for ax, policy in zip(axes[:, 0], policies, strict=False):
        for name, series in sorted(result.signals.items()):
            if name.split(":", 1)[0] == policy:
                ax.plot(minutes, series, linewidth=1.0, label=name.split(":", 1)[1])
        active = np.array(
            [any(ref.split("/", 1)[1] == policy for ref in step) for step in result.active]
        )
        for index in np.flatnonzero(active):
            ax.axvspan(minutes[index], minutes[index] + result.step / 60, color="orange",
                       alpha=0.25, linewidth=0)  # fmt: skip
        ax.set_ylabel(policy, fontsize=8)
        ax.legend(loc="upper right", fontsize=6)
        ax.grid(alpha=0.3)
    limits = axes[-1, 0]
    changed = sorted({w.address for w in result.writes})
    for address in changed[:8]:
        written = np.array([step.get(Address.parse(address), np.nan) for step in result.limits])
        scale = float(np.nanmax(written)) if np.isfinite(written).any() else 1.0
        limits.step(minutes, written / (scale or 1.0), where="post",
                    label=f"{address} (max {scale:,.6g})")  # fmt: skip
    limits.set_ylabel("limit it would write / its max")
    limits.set_xlabel("minutes since --from")
    if changed:
        limits.legend(loc="upper right", fontsize=6)
    limits.grid(alpha=0.3)
    fig.suptitle(OPEN_LOOP, fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
