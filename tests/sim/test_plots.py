"""The simulation's picture, read from the figure object (not its pixels): units on every
axis and one unit per axis, legends off the data, the policies' events and a tenant's cut
marked, captions that say what the run did, a title that names what was compared."""

from __future__ import annotations

import copy
import dataclasses
import re
from collections.abc import Iterator
from pathlib import Path
from typing import get_args

import matplotlib.pyplot as plt
import numpy as np
import pytest
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from controller.model import Address
from controller.sim.backtest import BacktestResult, Write
from controller.sim.compare import Comparison, compare
from controller.sim.plots import (
    CAPTION,
    LINES_PER_PANEL,
    MARK,
    UNITS,
    WINDOWS,
    Mark,
    backtest_figure,
    condensed,
    figure,
    plot,
)
from controller.sim.scenario import Event, load_scenario
from controller.sim.variants import AIMD, POLICIES
from tests.sim.conftest import POLICIES as SHIPPED

# A small fleet: ent-2 runs away long enough for tenant-cost-anomaly (`for: 5m`) to cut it,
# then every enterprise tenant surges, so the global limits move as well.
CUT = """
name: cut
description: Tenant ent-2 runs away, then every enterprise tenant surges.
duration: 10m
tick: 15s
seed: 5
pools:
  - {name: inference, gpus: 4, batch_slots: 8, capacity_tokens_per_second: 20000}
tenants:
  - {name: ent, count: 6, plan: enterprise, model: gpt-4, rate: 1.0, ips: 2}
  - {name: paid, count: 3, plan: paid, model: gpt-3.5-turbo, rate: 0.02}
events:
  - {kind: runaway, at: 1m, duration: 9m, factor: 8, tenants: [ent-2]}
  - {kind: burst, at: 8m, duration: 2m, factor: 3, tenants: [ent]}
"""
UNIT = re.compile(r"\(([^()]+)\)$")


@pytest.fixture(scope="module")
def comparison(tmp_path_factory: pytest.TempPathFactory) -> Comparison:
    path = tmp_path_factory.mktemp("plots") / "cut.yaml"
    path.write_text(CUT)
    return compare(load_scenario(str(path)), SHIPPED, workers=0)


@pytest.fixture
def fig(comparison: Comparison) -> Iterator[Figure]:
    drawn = figure(comparison)
    drawn.canvas.draw()  # lays the text out: the extents below are the saved picture's
    yield drawn
    plt.close(drawn)


def _captions(ax: Axes) -> list[str]:
    return [t.get_text() for t in ax.texts if t.get_gid() == CAPTION]


def _axis(fig: Figure, ylabel_start: str) -> Axes:
    found = [ax for ax in fig.axes if ax.get_ylabel().startswith(ylabel_start)]
    assert len(found) == 1, [ax.get_ylabel() for ax in fig.axes]
    return found[0]


def _moved(comparison: Comparison, variant: str) -> set[str]:
    record = comparison.runs[variant]
    moved = set()
    for name, values in record.limits.items():
        base = record.baselines[name]
        filled = np.where(np.isnan(values), base, values)
        if np.any(filled != base) or np.any(filled != filled[0]):
            moved.add(name)
    return moved


def test_every_axis_has_a_unit_and_never_two(comparison: Comparison, fig: Figure) -> None:
    units = {}
    for ax in fig.axes:
        found = UNIT.search(ax.get_ylabel())
        assert found, f"no unit on {ax.get_ylabel()!r}"
        units[ax] = found.group(1)
    limits = [ax for ax in fig.axes if ax.get_ylabel().startswith("limit (")]
    # One limits axis per unit: requests in flight and tokens/min never share one.
    assert len({units[ax] for ax in limits}) == len(limits)
    assert {"concurrent requests", "tokens/min"} <= {units[ax] for ax in limits}
    drawn: dict[str, Axes] = {}
    per_unit: dict[str, int] = {}
    for ax in limits:
        for line in ax.get_lines():
            label = str(line.get_label())
            if ": " in label and "/" in label:
                address = Address.parse(label.split(": ", 1)[1])
                assert UNITS[address.limit] == units[ax], (label, units[ax])
                drawn[str(address)] = ax
                per_unit[units[ax]] = per_unit.get(units[ax], 0) + 1
    # Every limit that moved in a run is drawn, the tenant's cut as well as the fleet's, up
    # to LINES_PER_PANEL per unit (the fair shares move a limit per tenant held).
    moved = {
        (variant, name) for variant in (POLICIES, AIMD) for name in _moved(comparison, variant)
    }
    assert set(drawn) <= {name for _, name in moved}
    for unit, count in per_unit.items():
        in_unit = [n for _, n in moved if UNITS[Address.parse(n).limit] == unit]
        assert count == min(len(in_unit), LINES_PER_PANEL), unit
    fleet = {n for _, n in moved if not n.startswith(("tenant/", "user/"))}
    assert fleet <= set(drawn)  # the fleet's limits come first, every variant's
    assert "tenant/ent-2/tokens_per_minute" in drawn
    assert _axis(fig, "GPU utilization").get_ylabel().endswith("(%)")
    assert _axis(fig, "p99 time to first token").get_ylabel().endswith("(s)")
    assert _axis(fig, "work").get_ylabel().endswith("(tokens/min)")


def test_legends_never_cover_the_data(fig: Figure) -> None:
    renderer = fig.canvas.get_renderer()  # type: ignore[attr-defined]
    frames = [ax.get_window_extent(renderer) for ax in fig.axes]
    legends = [legend for ax in fig.axes if (legend := ax.get_legend()) is not None]
    assert len(legends) == len(fig.axes)
    legends += fig.legends  # the disturbance windows'
    for legend in legends:
        box = legend.get_window_extent(renderer)
        assert not any(box.overlaps(frame) for frame in frames), legend


def test_the_disturbances_are_told_apart_and_named(comparison: Comparison, fig: Figure) -> None:
    (legend,) = fig.legends
    labels = [t.get_text() for t in legend.get_texts()]
    assert labels[0].startswith("runaway: ent-2 ×8 (10:01–10:10)")
    assert labels[1].startswith("burst: ent ×3 (10:08–10:10)")
    handles = [h for h in legend.legend_handles if isinstance(h, Patch)]
    assert len(handles) == 2
    assert {h.get_hatch() for h in handles} == {WINDOWS["runaway"].hatch, WINDOWS["burst"].hatch}
    assert len({tuple(h.get_facecolor()[:3]) for h in handles}) == 2


def test_the_tenant_cut_is_marked_with_the_tenant_named(
    comparison: Comparison, fig: Figure
) -> None:
    record = comparison.runs[POLICIES]
    cuts = [c for c in record.changes if c.address == "tenant/ent-2/tokens_per_minute" and c.new]
    assert cuts, "the scenario should make tenant-cost-anomaly cut ent-2"
    minute = cuts[0].tick * record.tick_seconds / 60
    tenant = _axis(fig, "runaway tenant ent-2")
    for ax in (tenant, _axis(fig, "limit (tokens/min)")):
        marks = [line for line in ax.get_lines() if line.get_gid() == MARK]
        assert minute in [float(np.asarray(m.get_xdata())[0]) for m in marks]
        texts = [t.get_text() for t in ax.texts]
        assert any("engaged ent-2" in t and "cut ent-2" in t for t in texts), texts
    (listed,) = [c for ax in fig.axes for c in _captions(ax) if "Events of the policies" in c]
    assert "tenant-cost-anomaly engaged for ent-2, ent-2 cut to 100k tokens/min" in listed
    # Only the tenant's own events on its panel: the schedule's is on the limits panels.
    assert not any("business-hours" in t.get_text() for t in tenant.texts)


def test_each_panel_has_a_verdict_taken_from_the_run(comparison: Comparison, fig: Figure) -> None:
    for ax in fig.axes:
        assert len(_captions(ax)) == 1, ax.get_ylabel()
    cards = comparison.cards
    (util,) = _captions(_axis(fig, "GPU utilization"))
    assert f"on {cards[POLICIES].utilization_within:.0%} of" in util
    (latency,) = _captions(_axis(fig, "p99 time to first token"))
    assert "2 s SLO" in latency
    assert f"p99 {cards[POLICIES].p99_ttft:.2f} s" in latency
    (work,) = _captions(_axis(fig, "work"))
    assert work.startswith("Goodput: ")
    assert "Oracle: " in work
    assert f"reached {cards[POLICIES].goodput_ratio:.0%} of the oracle" in work
    (tenant,) = _captions(_axis(fig, "runaway tenant ent-2"))
    assert f"cut it {cards[POLICIES].throttle_ticks} ticks" in tenant


def test_the_verdict_follows_the_data(comparison: Comparison) -> None:
    """Push the policies' p99 TTFT over the SLO in two known stretches: the caption names
    exactly those times."""
    changed = copy.deepcopy(comparison)
    ttft = changed.runs[POLICIES].ttft
    slow = ttft.shape[1] - 1  # the slowest bin: far above any SLO
    ttft[:] = 0
    ttft[:, 100] = 100  # ~25 ms: under the SLO
    ttft[4:6, slow] = 100
    ttft[20, slow] = 100
    drawn = figure(changed)
    (latency,) = _captions(_axis(drawn, "p99 time to first token"))
    plt.close(drawn)
    assert "under the 2 s SLO except 10:01–10:01:30, 10:05–10:05:15 (" in latency


def test_the_title_names_the_scenario_and_the_policy_set(
    comparison: Comparison, fig: Figure
) -> None:
    title = fig.get_suptitle()
    assert "'cut' (seed 5, 10 min): Tenant ent-2 runs away, then every enterprise" in title
    shipped = "policy set policies/ (policies: business-hours-free-tier, global-inflight-by-gpu,"
    assert shipped in title
    assert "compared with static limits (its Plans and Limits only) and plain AIMD" in title
    assert "policies: policies" not in title


def test_plot_writes_the_png(comparison: Comparison, tmp_path: Path) -> None:
    path = plot(comparison, tmp_path / "out" / "cut.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_backtest_draws_each_limit_in_its_unit() -> None:
    """The open-loop picture too: requests/s and tokens/min on separate axes, in their own
    values (not a share of their maximum), legends outside."""
    rps = Address.parse("global/requests_per_second")
    tpm = Address.parse("tenant/acme/tokens_per_minute")
    result = BacktestResult(start=0.0, end=120.0, step=30.0, times=[0.0, 30.0, 60.0, 90.0])
    result.limits = [{rps: 60.0}, {rps: 48.0, tpm: 100_000.0}, {rps: 48.0}, {rps: 60.0}]
    result.writes = [
        Write(30.0, str(rps), 60.0, 48.0, "AdaptiveLimit/a", "hot"),
        Write(30.0, str(tpm), None, 100_000.0, "ThrottlePolicy/b", "spend"),
    ]
    result.signals = {"a:util": [0.5, 0.95, 0.9, 0.6]}
    result.active = [{}, {"AdaptiveLimit/a": ("",)}, {}, {}]
    fig = backtest_figure(result)
    fig.canvas.draw()
    by_unit = {}
    for ax in fig.axes[1:]:
        found = UNIT.search(ax.get_ylabel())
        assert found, ax.get_ylabel()
        by_unit[found.group(1)] = ax
    assert set(by_unit) == {"requests/s", "tokens/min"}
    (line,) = by_unit["requests/s"].get_lines()
    assert list(np.asarray(line.get_ydata())) == [60.0, 48.0, 48.0, 60.0]
    (line,) = by_unit["tokens/min"].get_lines()
    assert np.asarray(line.get_ydata())[1] == 100_000.0
    renderer = fig.canvas.get_renderer()  # type: ignore[attr-defined]
    for ax in fig.axes:
        legend = ax.get_legend()
        assert legend is not None
        box = legend.get_window_extent(renderer)
        assert not any(box.overlaps(other.get_window_extent(renderer)) for other in fig.axes)
    plt.close(fig)


def test_many_events_of_one_kind_at_one_tick_are_counted_not_listed() -> None:
    # A fair share holding thirty tenants at once: one line beside the mark, not thirty that
    # run off the panel, and the caption names two of them.
    engaged = Mark(5, "engaged fair-share", "fair-share engaged", "tab:red", None)
    cuts = [
        Mark(5, f"cut ent-{i}", f"ent-{i} cut to 13 concurrent requests", "tab:purple", f"ent-{i}")
        for i in range(30)
    ]
    assert condensed([engaged, *cuts], short=True) == ["engaged fair-share", "cut 30 tenants"]
    assert condensed([engaged, *cuts]) == [
        "fair-share engaged",
        "ent-0 cut to 13 concurrent requests, ent-1 cut to 13 concurrent requests and 28 more cut",
    ]
    # Two of a kind are still named one by one.
    assert condensed(cuts[:2], short=True) == ["cut ent-0", "cut ent-1"]


@pytest.mark.parametrize("kind", get_args(Event.model_fields["kind"].annotation))
def test_every_kind_of_event_is_shaded_and_named(comparison: Comparison, kind: str) -> None:
    # A scenario may hold any kind of event: `governor simulate capacity-lost` once stopped
    # on a KeyError while drawing its window.
    event = Event(kind=kind, at=120.0, duration=60.0, factor=0.7, tenants=["ent-2"])
    scenario = comparison.scenario.model_copy(update={"events": [event]})
    drawn = figure(dataclasses.replace(comparison, scenario=scenario))
    try:
        (legend,) = drawn.legends
        labels = [t.get_text() for t in legend.get_texts()]
        assert len(labels) == 1, labels
        assert labels[0].endswith("(10:02–10:03)"), labels
        hatches = {h.get_hatch() for h in legend.legend_handles if isinstance(h, Patch)}
        assert hatches == {WINDOWS[kind].hatch}
    finally:
        plt.close(drawn)
