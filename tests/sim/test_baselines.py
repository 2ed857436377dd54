"""The scorecard's baselines and its oracle: each on the same arrivals as the policies, on the
policies' own knob, the Gradient2 arithmetic, the oracle measured on the pool and cached, and
the no-overload baseline of a scenario without events."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest

from controller.model import Address
from controller.policy.loader import load_directory
from controller.sim import oracle
from controller.sim.compare import BASELINE, run_variant, static_grid
from controller.sim.limiters import GLOBAL_CONCURRENCY, Gradient2
from controller.sim.oracle import CACHE_ENV, good_load, probe_p99, size_sample
from controller.sim.record import RunRecord
from controller.sim.reference import StaticSearch, merit, no_overload
from controller.sim.scenario import load_scenario
from controller.sim.traffic import build_world, size_means
from controller.sim.variants import (
    AIMD,
    GRADIENT,
    NO_LIMIT,
    POLICIES,
    STATIC,
    plain_aimd,
    policy_knob,
)
from tests.sim.conftest import POLICIES as SHIPPED

KNOB = Address.parse("global/concurrent_requests")


def test_the_knob_is_the_policies_own() -> None:
    knob = policy_knob(load_directory(SHIPPED), load_scenario("burst-5x").plain_aimd)
    # policies/global-inflight-by-gpu.yaml: aimd increase 4, ×0.8, bounds 8–100000 (safety
    # rails: its capacity estimate sets the value; plain AIMD has only the rails), setpoint 1.0
    # (a full pool: the queue the SLO allows is its own `capacity.queue` term).
    assert knob.target == KNOB
    assert (knob.increase, knob.decrease_factor, knob.low, knob.high) == (4, 0.8, 8, 100000)
    assert knob.setpoint == 1.0
    assert knob.source == "AdaptiveLimit/global-inflight-by-gpu"
    # Its tolerance band (0.05) is one of its gains: plain AIMD keeps it.
    assert knob.tolerance == 0.05
    aimd = plain_aimd(load_directory(SHIPPED), knob, 1.1).adaptives[0].spec.aimd
    assert aimd is not None
    assert (aimd.increase, aimd.decrease_factor, aimd.tolerance) == (4, 0.8, 0.05)


def test_the_static_search_range_is_set_by_the_pool_not_the_policy_bounds() -> None:
    # The knob is the in-flight limit: the search goes from 0.1× to 2× of what the pool holds
    # at once (its KV cache at the mean request: 16,384 tokens × 32 GPUs ÷ ~1,438 ≈ 365 for
    # burst-5x, 3× that on 96 GPUs), nowhere near the policy's rails (8–100,000).
    for name, held in (("burst-5x", 365.0), ("burst-5x-large", 1094.0)):
        scenario = load_scenario(name)
        world = build_world(scenario, None, scenario.seed)
        grid, resolution = static_grid(scenario, SHIPPED, world)
        assert resolution == 1.0
        assert grid[0] == pytest.approx(0.1 * held, abs=1.5)
        assert grid[-1] == pytest.approx(2 * held, abs=4)
    # Batch slots bind first when requests are small (ddos: ~361 tokens; 32 GPUs × 16 slots).
    ddos = load_scenario("ddos")
    grid, _ = static_grid(ddos, SHIPPED, build_world(ddos, None, ddos.seed))
    assert grid[-1] == pytest.approx(2 * 512, abs=4)


def test_the_static_search_refines_to_one_request_per_second(short_scenario: Path) -> None:
    scenario = load_scenario(str(short_scenario))
    grid, resolution = static_grid(scenario, SHIPPED, build_world(scenario, None, scenario.seed))
    runs: list[float] = []

    def evaluate(values: Sequence[float]) -> list[RunRecord]:
        runs.extend(values)
        return [run_variant(scenario, SHIPPED, STATIC, None, value=v) for v in values]

    search = StaticSearch(evaluate, resolution)
    found = search.best(grid)
    assert found.knob_value is not None
    # Each value is run once, whole numbers of req/s, and a modest number of runs in all.
    assert len(runs) == len(set(runs)) <= len(grid) + 8
    assert all(v == round(v) for v in runs)
    # Nothing tried did better, and the values on either side of the best one, at most
    # 2 req/s away, were tried (or it sits on the edge, and says so).
    assert all(merit(found) >= merit(r) for r in search.seen.values())
    value = found.knob_value
    beside = [v for v in runs if 0 < abs(v - value) <= 2 * resolution]
    assert len(beside) >= 1
    assert found.knob_edge == (value in (grid[0], grid[-1]))
    assert set(grid) <= set(runs)
    assert len(runs) > len(grid)  # refined beyond the coarse grid


def test_gradient2_grows_without_queueing_and_cuts_with_it() -> None:
    limiter = Gradient2()
    flat = np.full(10, 0.1)
    limiter.observe(flat, inflight=20)  # the first window: the long RTT is its mean
    assert limiter.long_rtt == pytest.approx(0.1)
    # No queueing (gradient 1): 0.8·L + 0.2·(L + 4) = L + 0.8 per window.
    assert limiter.limit == pytest.approx(20.8)
    limiter.observe(np.full(5, 0.1), inflight=20)  # half a window: nothing decided yet
    assert limiter.limit == pytest.approx(20.8)
    limiter.observe(np.full(5, 0.1), inflight=20)
    assert limiter.limit == pytest.approx(21.6)
    # Latency 4× the long RTT: the long RTT takes this window as its 3rd sample of the
    # warm-up (a plain mean of windows: (0.1 + 0.1 + 0.4) / 3 = 0.2), and the gradient reads
    # it before the ×0.95 decay: 1.5 × 0.2 / 0.4 = 0.75: 0.8·L + 0.2·(0.75·L + 4).
    before = limiter.limit
    limiter.observe(np.full(10, 0.4), inflight=100)
    assert limiter.limit == pytest.approx(0.95 * before + 0.8)
    assert limiter.long_rtt == pytest.approx(0.2)  # 0.2 / 0.4 ≤ 2: no decay
    # Application-limited (fewer than half the limit in flight): the limit stays.
    held = limiter.limit
    limiter.observe(np.full(10, 0.1), inflight=1)
    assert limiter.limit == held
    assert limiter.limits({})[GLOBAL_CONCURRENCY] == float(int(held))


def test_gradient2_takes_one_sample_a_window_as_the_library_does() -> None:
    # A window of 1,000 requests weighs as much as one of 10 in the long RTT: one sample.
    many, few = Gradient2(), Gradient2()
    for limiter, size in ((many, 1000), (few, 10)):
        for _ in range(12):  # past the 10-window warm-up
            limiter.observe(np.full(size, 0.1), inflight=1)
        limiter.observe(np.full(size, 0.5), inflight=1)
    alpha = 2 / 601
    assert many.long_rtt == pytest.approx(0.1 + alpha * 0.4)
    assert few.long_rtt == pytest.approx(many.long_rtt)
    # In flight: the window's largest count, not the last step's.
    limiter = Gradient2()
    limiter.observe(np.full(5, 0.1), inflight=40)  # half a window at 40 in flight
    limiter.observe(np.full(5, 0.1), inflight=1)  # the window closes at 1 in flight
    assert limiter.limit == pytest.approx(20.8)  # not application-limited: it grew
    # The gradient reads the long RTT before its decay: after a long slow spell the short
    # RTT drops to a third of it; the gradient is clamped at 1 and the decay comes after.
    slow = Gradient2()
    for _ in range(10):
        slow.observe(np.full(10, 0.3), inflight=1)
    limit = slow.limit
    slow.observe(np.full(10, 0.1), inflight=100)
    assert slow.long_rtt == pytest.approx((0.3 + 2 / 601 * (0.1 - 0.3)) * 0.95)
    assert slow.limit == pytest.approx(limit + 0.8)


def test_every_baseline_sees_the_same_arrivals(short_scenario: Path) -> None:
    scenario = load_scenario(str(short_scenario))
    runs = {
        name: run_variant(scenario, SHIPPED, name, None, value=value)
        for name, value in (
            (POLICIES, None),
            (STATIC, 10.0),
            (AIMD, None),
            (GRADIENT, None),
            (NO_LIMIT, None),
        )
    }
    offered = runs[POLICIES].offered
    for name, record in runs.items():
        assert np.array_equal(record.offered, offered), name
    # No limit: nothing is refused for rate or shed, whatever the load.
    free = runs[NO_LIMIT]
    assert free.outcomes["rate_limited"].sum() == 0
    assert free.outcomes["shed"].sum() == 0
    # The static knob at 10 requests in flight: never more than 10 at once, so fewer than
    # 10 a second are admitted (each takes longer than a second to answer).
    static = runs[STATIC]
    assert static.knob_value == 10.0
    allowed = static.outcomes["allow"].sum()
    assert allowed <= 10 * scenario.duration + 10
    assert static.outcomes["rate_limited"].sum() > 0
    # AIMD writes the policies' knob, within the policy's bounds (8–100000), and moves it.
    written = runs[AIMD].limits[str(KNOB)]
    assert np.nanmin(written) >= 8
    assert np.nanmax(written) <= 100000
    assert len(np.unique(written[np.isfinite(written)])) > 2
    # Gradient is a peer, not capped by the Limits document's global rate: no global limit
    # is written beside its own concurrency limit (the static run has the Limits' 300 in
    # flight in Redis, under the gate's fixed value).
    gradient = runs[GRADIENT].limits
    assert not any(k.startswith("global/") and np.isfinite(v).any() for k, v in gradient.items())
    assert np.nanmax(runs[STATIC].limits[str(KNOB)]) == 300
    # Its limit lives in the gate, not Redis; its direction changes are flaps all the same
    # (the same FlapDetector), while a fixed static knob never turns.
    assert runs[GRADIENT].flaps > 0
    assert len(runs[GRADIENT].flap_times) == runs[GRADIENT].flaps
    assert runs[STATIC].flaps == 0


def test_the_oracle_is_measured_on_the_pool_and_cached(
    short_scenario: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    scenario = load_scenario(str(short_scenario))
    world = build_world(scenario, None, scenario.seed)
    pool = scenario.pools[0]
    slo = scenario.slo.ttft_seconds
    found = good_load(world, pool, world.tenants, slo, scenario.step)
    assert 0.5 < found < 1.5
    # It is the edge on this very pool model: within the SLO there, above it a bit higher
    # (5 points: near the edge a 900 s probe of this small pool, ~120 requests above its
    # p99, moves by a few tenths of a second from one load to the next).
    prompt, output = size_sample(world, world.tenants)
    assert probe_p99(pool, prompt, output, found, scenario.step) <= slo
    assert probe_p99(pool, prompt, output, found + 0.05, scenario.step) > slo
    # Cached: the next call reads the file (a changed file is what it returns).
    files = list((tmp_path / "cache").glob("*.json"))
    assert len(files) == 1
    files[0].write_text(json.dumps({"good_load": 0.123}))
    assert good_load(world, pool, world.tenants, slo, scenario.step) == 0.123
    # Keyed by the pool model's own source, not a hand-bumped version: another model's
    # answer is not read.
    monkeypatch.setattr(oracle, "MODEL_SOURCE", "another pool model")
    assert good_load(world, pool, world.tenants, slo, scenario.step) == pytest.approx(found)
    # Another SLO is another measurement.
    assert good_load(world, pool, world.tenants, slo / 4, scenario.step) < found


def test_the_no_overload_baseline_of_a_scenario_without_events() -> None:
    diurnal = load_scenario("diurnal")
    quiet = no_overload(diurnal)
    capacity = diurnal.pools[0].capacity_tokens_per_second
    peak = 0.0
    for group in quiet.tenants:
        prompt, output = size_means(group.size)
        swing = 1 + (group.diurnal.amplitude if group.pattern == "diurnal" else 0)
        peak += group.count * group.rate * swing * (prompt + output)
    assert peak == pytest.approx(0.5 * capacity)
    assert quiet.tenants[0].rate < diurnal.tenants[0].rate
    # With events: the same world without them, nothing scaled.
    burst = load_scenario("burst-5x")
    assert no_overload(burst).events == []
    assert no_overload(burst).tenants == burst.tenants


def test_the_baseline_run_is_not_overloaded(short_scenario: Path) -> None:
    scenario = load_scenario(str(short_scenario))
    baseline = run_variant(scenario, SHIPPED, BASELINE, None)
    assert baseline.utilization.max() < scenario.target_utilization + 0.05
    assert baseline.timed_out.sum() == 0


def test_a_node_down_takes_its_capacity_away(short_scenario: Path, tmp_path: Path) -> None:
    # The short fleet at ~50% load loses half its GPUs from minute 2 to minute 5.
    text = short_scenario.read_text().replace(
        "  - {kind: burst, at: 1m, duration: 5m, factor: 4, tenants: [ent]}",
        "  - {kind: capacity, at: 2m, duration: 3m, factor: 0.5}",
    )
    path = tmp_path / "down.yaml"
    path.write_text(text)
    scenario = load_scenario(str(path))
    record = run_variant(scenario, SHIPPED, NO_LIMIT, None)
    before, during = record.utilization[1:8], record.utilization[9:20]
    # The same demand on half the GPUs: their busy share doubles, to the pool's saturation
    # (about 90% of its compute: slots and cache turn over once an engine step).
    assert before.mean() < 0.7
    assert during.mean() > 0.85
    # The oracle serves at most its good share of what is up.
    capacity = scenario.pools[0].capacity_tokens_per_second
    assert record.oracle[9:20].max() <= 0.5 * capacity * 1.5
    assert record.oracle[9:20].max() < record.oracle[1:8].max()


CUT_TOKENS = """
apiVersion: governor/v1
kind: AdaptiveLimit
metadata: {name: cut-enterprise-tokens, description: cut below any request's size}
spec:
  target: plan/enterprise/tokens_per_minute
  signal: {name: fleet_gpu_util, query: 'avg(DCGM_FI_DEV_GPU_UTIL) / 100', stale_after: 60s}
  setpoint: 0.01
  algorithm: aimd
  aimd: {increase: 1, decrease_factor: 0.01}
  bounds: {min: 10, max: 400000}
  behavior: {tighten: {stabilization: 0s}, loosen: {stabilization: 0s}}
"""


def test_a_request_too_large_for_a_policy_cut_limit_is_a_miss(
    short_scenario: Path, tmp_path: Path
) -> None:
    # A policy cuts the enterprise plan's tokens per minute below any request's size: its
    # requests are refused as too_large, by a limit below its baseline: control, not the
    # contract, so they stay in the attainment's denominator (as misses).
    policies = tmp_path / "policies"
    policies.mkdir()
    for name in ("plans.yaml", "limits.yaml"):
        (policies / name).write_text((SHIPPED / name).read_text())
    (policies / "cut.yaml").write_text(CUT_TOKENS)
    scenario = load_scenario(str(short_scenario))
    cut = run_variant(scenario, policies, POLICIES, None)
    free = run_variant(scenario, policies, NO_LIMIT, None)
    assert np.nanmin(cut.limits["plan/enterprise/tokens_per_minute"]) == 10
    assert cut.outcomes["too_large"].sum() > 100
    # Every request the tenants offered is counted, as without any limit.
    assert cut.tenant_requests.sum() == free.tenant_requests.sum()
    assert cut.tenant_good_requests.sum() < cut.tenant_requests.sum() / 2
