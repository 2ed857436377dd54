"""Scenario files and trace replay: the shipped scenarios load, errors are located, the
Azure trace is read as published and split over tenants by the documented Zipf rule."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest

from controller.sim.scenario import REPO_ROOT, ScenarioError, load_scenario, scenario_names
from controller.sim.trace import peak_minute_rate, read_trace, zipf_shares
from controller.sim.traffic import build_world
from tests.sim.conftest import AZURE_CONV


def test_the_shipped_scenarios_load() -> None:
    names = scenario_names()
    assert {
        "burst-5x", "runaway-tenant", "ddos", "diurnal", "azure-conv-3x", "demo",
        "capacity-lost", "mixed-burst", "slow-scrape", "burst-5x-small", "burst-5x-large",
    } <= set(names)  # fmt: skip
    for name in names:
        scenario = load_scenario(name)
        assert scenario.ticks > 0
        assert scenario.name == name


def test_errors_name_file_line_column_and_field(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "name: bad\npools:\n  - {name: p, capacity_tokens_per_second: -5}\n"
        "tenants:\n  - {name: a, plan: free, rate: 1, colour: red}\n"
    )
    with pytest.raises(ScenarioError) as caught:
        load_scenario(str(bad))
    text = str(caught.value)
    assert f"{bad}:3:" in text
    assert "capacity_tokens_per_second" in text
    assert f"{bad}:5:" in text
    assert "colour" in text
    with pytest.raises(ScenarioError, match="no scenario 'nope'"):
        load_scenario("nope")


def test_the_azure_conversation_trace_and_the_pool_sized_for_it() -> None:
    trace = read_trace(AZURE_CONV)
    rows = gzip.decompress(AZURE_CONV.read_bytes()).decode().strip().count("\n")  # after header
    assert len(trace.offsets) == rows
    assert np.all(np.diff(trace.offsets) >= 0)
    assert trace.offsets[0] == 0
    assert 3400 < trace.span < 3600  # about an hour
    # The scenario's capacity is the rule in its header: busiest minute at 1× / 0.8.
    scenario = load_scenario("azure-conv-3x")
    assert scenario.pools[0].capacity_tokens_per_second == round(peak_minute_rate(trace) / 0.8)
    assert scenario.duration == pytest.approx(trace.span / 3, abs=1.0)


def test_a_trace_row_outside_the_schema_is_named(tmp_path: Path) -> None:
    path = tmp_path / "t.csv"
    path.write_text(
        "TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:15:46.68,374,44\nx,1,2\n"
    )
    with pytest.raises(ScenarioError, match=r"t\.csv:3:"):
        read_trace(path)
    path.write_text("time,prompt,output\n")
    with pytest.raises(ScenarioError, match="TIMESTAMP,ContextTokens,GeneratedTokens"):
        read_trace(path)


def test_zipf_split_of_the_replayed_requests() -> None:
    shares = zipf_shares(20, 1.0)
    assert shares.sum() == pytest.approx(1.0)
    assert shares[0] / shares[1] == pytest.approx(2.0)
    assert shares[0] / shares[9] == pytest.approx(10.0)
    scenario = load_scenario("azure-conv-3x")
    world = build_world(scenario, read_trace(AZURE_CONV), scenario.seed)
    counts = np.bincount(world.trace_tenants - world.trace_tenants.min(), minlength=20)
    observed = counts / counts.sum()
    assert np.allclose(observed, shares, atol=0.01)
    # The split depends on the seed only: the same again, another with another seed.
    again = build_world(scenario, read_trace(AZURE_CONV), scenario.seed)
    assert np.array_equal(world.trace_tenants, again.trace_tenants)


@pytest.mark.parametrize("path", sorted((REPO_ROOT / "benchmarks" / "probes").glob("*.yaml")))
def test_the_probe_scenarios_load_and_build(path: Path) -> None:
    # The probes the closing notes quote must stay runnable as the scenario schema moves.
    scenario = load_scenario(str(path))
    assert scenario.name == path.stem
    world = build_world(scenario, None, scenario.seed)
    assert scenario.ticks > 0
    assert len(world.tenants) > 0
