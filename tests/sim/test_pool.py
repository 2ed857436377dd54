"""The vLLM-like pool: preemption when the KV cache overflows (and the re-run), DCGM's busy
share with a single request, the prefill/decode cost ratio's effect on TTFT and decode time,
and the vllm:* series it exports, read back through the PromQL evaluator."""

from __future__ import annotations

import numpy as np
import pytest

from controller.sim.exporter import record_vllm
from controller.sim.pool import TTFT_BUCKETS, PoolModel, StepResult
from controller.sim.promql import Evaluator, Point
from controller.sim.scenario import Pool
from controller.sim.series import SeriesStore, labels_of


def _pool(**fields: float) -> Pool:
    base = {"gpus": 1, "batch_slots": 64, "capacity_tokens_per_second": 2000.0}
    return Pool.model_validate({**base, **fields})


def _run(
    model: PoolModel,
    prompt: list[float],
    output: list[float],
    seconds: int,
    arrive: float = 0.0,
) -> list[StepResult]:
    """All the requests arrive at `arrive`; then the pool runs `seconds` 1-second steps."""
    n = len(prompt)
    results = []
    for k in range(seconds):
        now = float(k)
        first = arrive == now
        tags = np.arange(n, dtype=np.int64) if first else np.empty(0, dtype=np.int64)
        arrivals = np.full(n, arrive) if first else np.empty(0)
        sizes = (np.array(prompt), np.array(output)) if first else (np.empty(0), np.empty(0))
        results.append(model.step(now, 1.0, tags, arrivals, *sizes))
    return results


def _times(results: list[StepResult], kind: str) -> dict[int, float]:
    out: dict[int, float] = {}
    for r in results:
        tags, values = (r.first, r.ttft) if kind == "ttft" else (r.finished, r.finished_at)
        for tag, value in zip(tags.tolist(), values.tolist(), strict=True):
            assert tag not in out, f"tag {tag} resolved twice ({kind})"
            out[tag] = value
    return out


def test_kv_overflow_preempts_the_newest_which_reruns_and_finishes() -> None:
    # Room for both prompts (2 × 1,001 ≤ 3,000), not for both outputs as well.
    model = PoolModel(_pool(kv_cache_tokens=3000), 1000.0, 1000.0)
    results = _run(model, [1000.0, 1000.0], [1500.0, 1500.0], 240)
    assert model.counters.preemptions >= 1
    ttft, done = _times(results, "ttft"), _times(results, "end")
    # Each request has one TTFT (a preempted one keeps its first), and both finish.
    assert sorted(ttft) == [0, 1]
    assert sorted(done) == [0, 1]
    # The newest (tag 1) was the one preempted: it finishes after the oldest, which ran on.
    assert done[1] > done[0]
    # Every output token was generated once...
    assert model.counters.generation_tokens == pytest.approx(3000.0)
    # ... but the GPU did more than both requests need (2 × 1,500 decode tokens, 2 × 1,000
    # prompt tokens at a tenth of one): the preempted one prefilled its prompt and its output
    # so far again (recompute).
    used = sum(r.utilization for r in results) * model.power
    assert used > 3000.0 + 2000.0 / 10 + 1000.0 / 10
    assert model.in_flight == 0


def test_kv_usage_never_exceeds_the_cache_and_falls_to_zero_when_done() -> None:
    model = PoolModel(_pool(kv_cache_tokens=3000), 1000.0, 1000.0)
    usage = []
    for k in range(240):
        arriving = k == 0
        tags = np.arange(3, dtype=np.int64) if arriving else np.empty(0, dtype=np.int64)
        sizes = np.full(3, 1000.0) if arriving else np.empty(0)
        model.step(float(k), 1.0, tags, np.zeros(len(tags)), sizes, sizes)
        usage.append(model.kv_usage)
    assert max(usage) <= 1.0
    assert max(usage) > 0.9  # the cache was the limit
    assert usage[-1] == 0.0


def test_dcgm_reads_busy_with_a_single_running_request() -> None:
    model = PoolModel(_pool(capacity_tokens_per_second=20000.0), 1000.0, 200.0)
    results = _run(model, [500.0], [400.0], 6)
    decoding = results[1:5]  # 400 tokens at ≤ 50/s: decoding through seconds 1–5
    assert all(r.busy == pytest.approx(1.0) for r in decoding)
    # ... whereas the compute it uses is a sliver of the GPU's.
    assert all(r.utilization < 0.05 for r in decoding)
    idle = PoolModel(_pool(), 1000.0, 200.0)
    assert _run(idle, [], [], 2)[-1].busy == 0.0


def test_a_cheaper_prefill_lowers_ttft_and_slows_decode_under_load() -> None:
    """40 requests at once on one GPU whose compute binds (a cache for them all): with prefill
    20× cheaper than decode (rather than 2×), prompts clear sooner but the same GPU-seconds
    hold fewer decode tokens, so the decode after the first token takes longer."""
    prompt, output = [1000.0] * 40, [200.0] * 40
    outcome = {}
    for ratio in (2.0, 20.0):
        model = PoolModel(_pool(prefill_decode_ratio=ratio, kv_cache_tokens=100_000), 1000.0, 100.0)
        results = _run(model, prompt, output, 200)
        ttft, done = _times(results, "ttft"), _times(results, "end")
        assert len(done) == 40
        decode = [done[t] - ttft[t] for t in done]
        outcome[ratio] = (float(np.mean(list(ttft.values()))), float(np.mean(decode)))
    assert outcome[20.0][0] < outcome[2.0][0] / 2
    assert outcome[20.0][1] > outcome[2.0][1] * 2


def test_a_client_without_a_first_token_gives_up_at_the_timeout() -> None:
    # One slot: the second request waits behind a long one and gives up at 5 s.
    model = PoolModel(_pool(batch_slots=1, timeout_seconds=5.0), 1000.0, 200.0)
    results = _run(model, [100.0, 100.0], [10000.0, 10.0], 10)
    gave_up = {
        t: at
        for r in results
        for t, at in zip(r.gave_up.tolist(), r.gave_up_at.tolist(), strict=True)
    }
    assert gave_up == {1: pytest.approx(5.0)}
    assert 1 not in _times(results, "ttft")


def test_requests_of_zero_tokens_still_get_a_first_token_and_finish() -> None:
    """A trace row of 0 prompt or 0 output tokens (BurstGPT's failures) is a request that ran:
    at least one token each, as vLLM prefills at least one and yields at least one."""
    model = PoolModel(_pool(), 1000.0, 200.0)
    results = _run(model, [0.0, 0.0, 300.0], [0.0, 50.0, 0.0], 10)
    ttft, done = _times(results, "ttft"), _times(results, "end")
    assert sorted(ttft) == sorted(done) == [0, 1, 2]
    assert all(0.0 < t < 1.0 for t in ttft.values())
    assert model.in_flight == 0


def test_vllm_series_are_exported_and_consistent() -> None:
    """Every second some requests arrive; at each scrape the exported gauges, read back
    through PromQL, count exactly the requests admitted and not yet resolved, and the
    counters and the TTFT histogram add up to what the pool resolved."""
    rng = np.random.default_rng(5)
    model = PoolModel(_pool(kv_cache_tokens=6000, timeout_seconds=20.0), 800.0, 150.0)
    store = SeriesStore()
    evaluator = Evaluator(store)
    admitted, resolved, firsts, prompts = 0, 0, [], 0.0
    sizes: dict[int, float] = {}
    for k in range(120):
        count = int(rng.poisson(3.0))
        tags = np.arange(admitted, admitted + count, dtype=np.int64)
        prompt = rng.uniform(100, 1500, count)
        sizes.update(zip(tags.tolist(), prompt.tolist(), strict=True))
        result = model.step(float(k), 1.0, tags, k + np.sort(rng.random(count)), prompt,
                            rng.uniform(10, 300, count))  # fmt: skip
        admitted += count
        resolved += len(result.finished) + len(result.gave_up)
        resolved -= len(np.intersect1d(result.finished, result.gave_up))
        firsts.extend(result.ttft.tolist())
        prompts += sum(sizes[t] for t in result.first.tolist())
        if k % 15 == 14:
            at = 1e9 + k
            record_vllm(store, model, at)
            (point,) = _points(evaluator, "sum(vllm:num_requests_running) + "
                               "sum(vllm:num_requests_waiting)", at)  # fmt: skip
            assert point == admitted - resolved
            assert _one(evaluator, "vllm:kv_cache_usage_perc", at) == pytest.approx(model.kv_usage)
            assert _one(evaluator, "vllm:gpu_cache_usage_perc", at) == pytest.approx(model.kv_usage)
            count_ttft = _one(evaluator, "vllm:time_to_first_token_seconds_count", at)
            assert count_ttft == len(firsts)
            total = _one(evaluator, "vllm:time_to_first_token_seconds_sum", at)
            assert total == pytest.approx(sum(firsts))
            within = _one(evaluator, 'vllm:time_to_first_token_seconds_bucket{le="1.0"}', at)
            assert within == sum(1 for t in firsts if t <= 1.0)
            assert _one(evaluator, "vllm:prompt_tokens_total", at) == pytest.approx(prompts)
    assert admitted > 300
    assert resolved > 200
    assert model.counters.preemptions > 0
    labels = {"pool": "inference", "model_name": "inference", "engine": "0"}
    assert {s.labels for s in store.named("vllm:num_requests_running")} == {
        labels_of("vllm:num_requests_running", labels)
    }
    buckets = store.named("vllm:time_to_first_token_seconds_bucket")
    assert len(list(buckets)) == len(TTFT_BUCKETS) + 1


def _points(evaluator: Evaluator, query: str, at: float) -> list[float]:
    value, _ = evaluator.instant(query, at)
    assert isinstance(value, list)
    return [p.value for p in value if isinstance(p, Point)]


def _one(evaluator: Evaluator, query: str, at: float) -> float:
    (value,) = _points(evaluator, query, at)
    return value
