"""Benchmark: the controller's writes at 100k limits, one Redis (contract 1) vs a 3-master
Redis Cluster (contract 2).

Starts its own redis-server and its own cluster. Per backend, through the same RedisSink:
the full first write (100k changes from empty), a 10% diff (10k changed limits) and the
read back of everything. Medians of the rounds; ratios cluster / one Redis (above 1: the
cluster takes longer). On this shared 2-core machine the three masters and the client share
the same cores, so this is the cost of the per-slot groups (one script per slot, 16,384
ledger hashes read back), not a scaling figure.

Run: `.venv/bin/python -m benchmarks.cluster_apply [--rounds N]`
"""

from __future__ import annotations

import argparse
import random
import statistics
from functools import partial

from benchmarks.redis_apply import CHANGED, KINDS, TENANTS, desired_state, timed
from controller.changes import Change, diff
from controller.clients.redis import close, connect, key_schema
from controller.settings import RedisSettings
from controller.sinks.redis import RedisSink
from tests.support.redis_cluster import single_and_cluster


def measure(url: str, rounds: int) -> dict[str, float]:
    """Medians of: the full write, a 10% diff, a read back (seconds)."""
    client = connect(url, RedisSettings(socket_timeout_seconds=60.0))
    sink = RedisSink(client, key_schema(client, "governor"))
    desired = desired_state()
    rng = random.Random(7)
    times: dict[str, list[float]] = {"full write": [], "10% diff": [], "read back": []}
    try:
        for n in range(rounds):
            client.flushall()
            sink = RedisSink(client, key_schema(client, "governor"))
            times["full write"].append(timed(partial(sink.apply, diff(desired, {}))))
            picked = rng.sample(sorted(desired, key=str), CHANGED)
            changes = [Change(a, desired[a], 2000.0 + n) for a in picked]
            times["10% diff"].append(timed(partial(sink.apply, changes)))
            times["read back"].append(timed(sink.read))
    finally:
        close(client)
    return {name: statistics.median(values) for name, values in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    rounds = parser.parse_args().rounds
    with single_and_cluster() as (single, cluster):
        one = measure(single.url, rounds)
        many = measure(cluster.url, rounds)
    print(f"addresses: {TENANTS * len(KINDS)}, changed in the diff: {CHANGED}, "
          f"medians of {rounds} rounds")  # fmt: skip
    print(f"{'step':<12} {'one Redis':>10} {'cluster':>10} {'ratio':>6}")
    for name in one:
        print(f"{name:<12} {one[name]:>9.2f}s {many[name]:>9.2f}s {many[name] / one[name]:>6.2f}")


if __name__ == "__main__":
    main()
