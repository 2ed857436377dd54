"""What a simulated pool exports to Prometheus under vLLM's own metric names (docs/simulator.md).

Names and the TTFT buckets are vLLM V1's (vllm/v1/metrics/loggers.py); labels are vLLM's
`model_name` and `engine` plus the simulator's `pool`. `vllm:gpu_cache_usage_perc` is the
pre-V1 name of `vllm:kv_cache_usage_perc`, exported beside it as vLLM did while deprecating it.
"""

from __future__ import annotations

import numpy as np

from controller.model import FloatArray
from controller.sim.pool import TTFT_BUCKETS, PoolModel
from controller.sim.series import SeriesStore

GAUGES = (
    "vllm:num_requests_running",
    "vllm:num_requests_waiting",
    "vllm:kv_cache_usage_perc",
    "vllm:gpu_cache_usage_perc",
)
COUNTERS = (
    "vllm:prompt_tokens_total",
    "vllm:generation_tokens_total",
    "vllm:num_preemptions_total",
)
TTFT = "vllm:time_to_first_token_seconds"


def pool_labels(pool: PoolModel) -> dict[str, str]:
    spec = pool.spec
    return {"pool": spec.name, "model_name": spec.models[0] if spec.models else spec.name,
            "engine": "0"}  # fmt: skip


def gauges(pool: PoolModel) -> dict[str, float]:
    kv = pool.kv_usage
    return {
        "vllm:num_requests_running": float(pool.running.shape[1]),
        "vllm:num_requests_waiting": float(pool.waiting.shape[1]),
        "vllm:kv_cache_usage_perc": kv,
        "vllm:gpu_cache_usage_perc": kv,
    }


def record_vllm(store: SeriesStore, pool: PoolModel, at: float) -> None:
    """Append one scrape of the pool's vLLM series at `at`."""
    labels = pool_labels(pool)
    for name, value in gauges(pool).items():
        store.record(name, labels, at, value)
    c = pool.counters
    counters = (c.prompt_tokens, c.generation_tokens, c.preemptions)
    for name, value in zip(COUNTERS, counters, strict=True):
        store.record(name, labels, at, value)
    cumulative = c.ttft_counts.cumsum().tolist()
    edges = [repr(float(edge)) for edge in TTFT_BUCKETS] + ["+Inf"]
    for le, count in zip(edges, cumulative, strict=True):
        store.record(f"{TTFT}_bucket", {**labels, "le": le}, at, count)
    store.record(f"{TTFT}_sum", labels, at, c.ttft_sum)
    store.record(f"{TTFT}_count", labels, at, cumulative[-1])


def usual_running(pool: PoolModel, requests: FloatArray) -> FloatArray:
    """Requests running at these request rates (Little's law: rate × time in the batch at an
    idle pool's decode speed), for the history before a run."""
    seconds = pool.mean_output / pool.spec.decode_tokens_per_second
    return requests * (seconds + pool.mean_prompt / pool.spec.prefill_tokens_per_second)


def usual_series(pool: PoolModel, requests: FloatArray) -> dict[str, FloatArray]:
    """The vLLM gauges a pool would have shown at these request rates (requests/s per
    history sample): nothing waiting, the running requests holding their prompt and half
    their output on average."""
    running = np.minimum(usual_running(pool, requests), pool.max_seqs)
    kv = np.minimum(running * (pool.mean_prompt + pool.mean_output / 2) / pool.kv_capacity, 1.0)
    return {
        "vllm:num_requests_running": running,
        "vllm:num_requests_waiting": np.zeros_like(running),
        "vllm:kv_cache_usage_perc": kv,
        "vllm:gpu_cache_usage_perc": kv,
    }
