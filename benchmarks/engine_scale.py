"""Engine + resolver time per tick for the tenant cost-anomaly policy at 1k/10k/100k tenants.

Run: `.venv/bin/python benchmarks/engine_scale.py`. Prints the time per tick and per tenant,
and, as a baseline measured in the same run, the cost of touching every tenant once in plain
Python (a dict lookup and a float comparison), so the ratio says how far the engine is from
the cheapest loop that could possibly decide anything per tenant. Target: 100k tenants in
≤ 0.5 s per tick on a 2-core machine.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import numpy as np

from controller.model import SignalKey, Snapshot, VectorSample
from controller.policy.baselines import Baselines
from controller.policy.documents import DocumentFile
from controller.policy.engine import EngineState, evaluate
from controller.policy.policyset import PolicySet
from controller.policy.resolver import ResolverState, resolve

ROOT = Path(__file__).resolve().parent.parent
ANOMALOUS_SHARE = 0.01  # 1% of tenants overspend: the engine must act on them
TICKS = 16  # `for: 5m` at 30 s ticks: the anomalous tenants engage from tick 10


def _policies() -> PolicySet:
    import yaml

    docs = []
    for name in ("plans.yaml", "limits.yaml", "tenant-cost-anomaly.yaml"):
        for raw in yaml.safe_load_all((ROOT / "policies" / name).read_text()):
            if raw:
                docs.append(DocumentFile.model_validate({"document": raw}).document)
    return PolicySet.from_documents(docs, "bench")


def _keys(policies: PolicySet) -> dict[str, SignalKey]:
    """The shipped policy's signal name → the query result it reads."""
    return {use.name: use.key for use in policies.signal_uses()}


def _snapshot(
    keys: dict[str, SignalKey],
    tenants: tuple[str, ...],
    now: float,
    rng: np.random.Generator,
    hot: np.ndarray,
) -> Snapshot:
    usual = rng.uniform(0.02, 1.0, len(tenants))
    spend = usual * rng.uniform(0.8, 1.2, len(tenants))
    spend[hot] *= 5.0
    stamps = np.full(len(tenants), now)
    return Snapshot(
        now,
        {
            keys["spend"]: VectorSample("tenant", tenants, spend, stamps),
            keys["usual"]: VectorSample("tenant", tenants, usual, stamps.copy()),
            # Nobody is refused yet: the release condition reads it once tenants are cut.
            keys["refused"]: VectorSample("tenant", tenants, np.zeros(len(tenants)), stamps),
        },
    )


def _floor(key: SignalKey, tenants: tuple[str, ...], snapshot: Snapshot) -> float:
    """Plain Python touching each tenant once: the cheapest per-tenant decision loop."""
    sample = snapshot.samples[key]
    assert isinstance(sample, VectorSample)
    values = dict(zip(tenants, sample.values.tolist(), strict=True))
    start = time.perf_counter()
    flagged = sum(1 for t in tenants if values[t] > 1.0)
    elapsed = time.perf_counter() - start
    assert flagged >= 0
    return elapsed


def measure(count: int) -> tuple[float, float, float, int]:
    """Median tick time before and after the anomalous tenants engage, floor, proposals."""
    policies = _policies()
    keys = _keys(policies)
    tenants = tuple(f"tenant-{i:06d}" for i in range(count))
    registry = {t: ("paid" if i % 3 else "enterprise") for i, t in enumerate(tenants)}
    baselines = Baselines(policies, registry)
    rng = np.random.default_rng(7)
    hot = rng.random(count) < ANOMALOUS_SHARE
    engine, resolver = EngineState(), ResolverState()
    times, floors, proposals = [], [], 0
    for tick in range(TICKS):
        now = 1_700_000_000.0 + tick * 30.0
        snapshot = _snapshot(keys, tenants, now, rng, hot)
        start = time.perf_counter()
        evaluation = evaluate(policies, snapshot, engine, now, baselines, resolver.in_force())
        resolution = resolve(policies, baselines, evaluation.proposals, {}, resolver, now)
        times.append(time.perf_counter() - start)
        floors.append(_floor(keys["spend"], tenants, snapshot))
        engine, resolver = evaluation.state, resolution.state
        proposals = len(evaluation.proposals)
    return (
        statistics.median(times[:10]),
        statistics.median(times[10:]),
        statistics.median(floors),
        proposals,
    )


def main() -> None:
    print(
        f"tenant-cost-anomaly, {ANOMALOUS_SHARE:.0%} of tenants anomalous; median tick while "
        "pending (ticks 0-9) and once they are throttled (ticks 10-15)"
    )
    print(
        f"{'tenants':>8} {'pending':>10} {'throttling':>11} {'per tenant':>11} "
        f"{'floor loop':>11} {'ratio':>7} {'proposals':>10}"
    )
    for count in (1_000, 10_000, 100_000):
        pending, acting, floor, proposals = measure(count)
        print(
            f"{count:>8} {pending * 1000:>8.1f}ms {acting * 1000:>9.1f}ms "
            f"{acting / count * 1e6:>9.2f}µs {floor * 1000:>9.1f}ms {acting / floor:>6.1f}× "
            f"{proposals:>10}"
        )
    print("target: 100k tenants ≤ 500 ms per tick")


if __name__ == "__main__":
    main()
