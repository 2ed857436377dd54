"""The oracle's capacity: the highest constant load whose p99 TTFT meets the SLO, measured on
the simulator's own pool model (not a formula) and cached (docs/simulator.md)."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from controller.model import FloatArray
from controller.sim import pool as pool_module
from controller.sim import queue as queue_module
from controller.sim.pool import PoolModel
from controller.sim.scenario import REPO_ROOT, Pool
from controller.sim.traffic import SimTenant, World, _lognormal

PROBE_SECONDS = 900.0  # simulated seconds of constant load per probe
WARMUP_SECONDS = 60.0  # left out of the probe's p99: the queue starts empty
SEARCH_STEPS = 12  # bisection steps over the load: 1.5 / 2^12 ≈ 0.0004 of capacity
HIGHEST_LOAD = 1.5
SAMPLE = 20_000  # request sizes drawn for the probes (fixed seed: the same for every run)
# The pool model's and this probe's source, hashed into the cache key: a cached answer of
# another model is not this one's, and no hand-bumped version can be forgotten.
MODEL_SOURCE = hashlib.sha256(
    b"".join(Path(module.__file__ or "").read_bytes() for module in (pool_module, queue_module))
    + Path(__file__).read_bytes()
).hexdigest()
CACHE_ENV = "GOVERNOR_SIM_CACHE"


def cache_dir() -> Path:
    """Where measured oracles are kept: $GOVERNOR_SIM_CACHE, else .cache/sim-oracle in the
    repository (ignored by git; deleting it only costs a re-measurement)."""
    return Path(os.environ.get(CACHE_ENV) or REPO_ROOT / ".cache" / "sim-oracle")


def size_sample(world: World, tenants: Sequence[SimTenant]) -> tuple[FloatArray, FloatArray]:
    """Prompt and output sizes of the well-behaved traffic a pool serves, each tenant drawn
    in proportion to its usual rate (trace tenants: the recorded sizes)."""
    rng = np.random.default_rng(0)
    chosen = [t for t in tenants if t.role != "attacker" and t.rate > 0] or list(tenants)
    weights = np.array([max(t.rate, 1e-12) for t in chosen])
    picks = rng.choice(len(chosen), SAMPLE, p=weights / weights.sum())
    prompt, output = np.empty(SAMPLE), np.empty(SAMPLE)
    for k, tenant in enumerate(chosen):
        mask = picks == k
        count = int(mask.sum())
        if tenant.role == "trace" and world.trace is not None:
            rows = rng.integers(0, len(world.trace.prompt), count)
            prompt[mask] = world.trace.prompt[rows]
            output[mask] = np.minimum(world.trace.output[rows], tenant.size.max_tokens)
            continue
        size = tenant.size
        prompt[mask] = _lognormal(rng, size.prompt.median, size.prompt.sigma, size.prompt.max,
                                  count)  # fmt: skip
        cap = min(size.output.max, size.max_tokens)
        output[mask] = _lognormal(rng, size.output.median, size.output.sigma, cap, count)
    return prompt, output


def probe_p99(pool: Pool, prompt: FloatArray, output: FloatArray, load: float,
              step: float) -> float:  # fmt: skip
    """p99 TTFT (a timeout counted at the timeout) of the pool under a constant Poisson load
    of `load` × capacity with these sizes."""
    rng = np.random.default_rng(1)
    model = PoolModel(pool, float(prompt.mean()), float(output.mean()))
    rate = load * pool.capacity_tokens_per_second / float((prompt + output).mean())
    seen: list[FloatArray] = []
    tag = 0
    for k in range(round(PROBE_SECONDS / step)):
        count = int(rng.poisson(rate * step))
        rows = rng.integers(0, len(prompt), count)
        arrival = k * step + np.sort(rng.random(count)) * step
        tags = np.arange(tag, tag + count, dtype=np.int64)
        tag += count
        result = model.step(k * step, step, tags, arrival, prompt[rows], output[rows])
        if k * step >= WARMUP_SECONDS:
            seen.append(result.ttft)
            seen.append(np.full(len(result.gave_up), pool.timeout_seconds))
    ttft = np.concatenate(seen) if seen else np.empty(0)
    return float(np.quantile(ttft, 0.99)) if len(ttft) else 0.0


def search(pool: Pool, prompt: FloatArray, output: FloatArray, slo: float, step: float) -> float:
    """Bisection on the load: the highest whose probe meets the SLO (0 if none does)."""
    low, high = 0.0, HIGHEST_LOAD
    if probe_p99(pool, prompt, output, high, step) <= slo:
        return high
    for _ in range(SEARCH_STEPS):
        middle = (low + high) / 2
        if probe_p99(pool, prompt, output, middle, step) <= slo:
            low = middle
        else:
            high = middle
    return low


def good_load(world: World, pool: Pool, tenants: Sequence[SimTenant], slo: float,
              step: float) -> float:  # fmt: skip
    """The oracle's share of capacity for this pool and traffic mix: from the cache when it
    holds this exact pool, mix, SLO and step, else measured now and stored."""
    prompt, output = size_sample(world, tenants)
    digest = hashlib.sha256()
    digest.update(json.dumps([MODEL_SOURCE, pool.model_dump(), slo, step]).encode())
    digest.update(prompt.tobytes())
    digest.update(output.tobytes())
    path = cache_dir() / f"{digest.hexdigest()[:24]}.json"
    try:
        return float(json.loads(path.read_text(encoding="utf-8"))["good_load"])
    except (OSError, ValueError, KeyError, TypeError):
        pass  # absent or unreadable: measure
    found = search(pool, prompt, output, slo, step)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_suffix(f".{os.getpid()}.tmp")
        temporary.write_text(json.dumps({"good_load": found, "pool": pool.name}))
        temporary.replace(path)  # atomic: parallel workers never read half a file
    except OSError:
        pass  # a read-only checkout still runs; it measures again next time
    return found
