"""Benchmark: apply 10k changed limits out of 100k vs one raw pipelined HSET of the same 10k.

Starts its own redis-server on a free port. Prints medians over several rounds and the ratios
(target: apply ≤ 2x the raw floor). Run: `.venv/bin/python -m benchmarks.redis_apply`.
"""

from __future__ import annotations

import functools
import gc
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import redis

from controller.changes import diff
from controller.clients.redis import connect
from controller.contract.keys import KeySchema, format_value
from controller.model import Address, LimitKind, Scope
from controller.settings import RedisSettings
from controller.sinks.redis import RedisSink
from tests.support.redis import RedisServer

TENANTS = 20_000
KINDS = list(LimitKind)[:5]  # 20k tenants x 5 limits = 100k addresses
CHANGED = 10_000
ROUNDS = 9


def desired_state() -> dict[Address, float]:
    return {
        Address(Scope.TENANT, kind, tenant=f"tenant-{t:05d}"): 1000.0
        for t in range(TENANTS)
        for kind in KINDS
    }


def timed(action: Callable[[], object]) -> float:
    start = time.perf_counter()
    action()
    return time.perf_counter() - start


def raw_hset(client: redis.Redis[str], targets: list[tuple[str, str, str]]) -> None:
    """The floor: one HSET per (key, field, value) in one pipeline, no transaction."""
    pipe = client.pipeline(transaction=False)
    for key, name, value in targets:
        pipe.hset(key, name, value)
    pipe.execute()


def main() -> None:
    rng = random.Random(7)
    with tempfile.TemporaryDirectory() as tmp:
        server = RedisServer(Path(tmp)).start()
        try:
            run(server, rng)
        finally:
            server.stop()


def run(server: RedisServer, rng: random.Random) -> None:
    settings = RedisSettings()
    keys = KeySchema()
    sink = RedisSink(connect(server.url, settings), keys)
    raw = connect(server.url, settings)
    desired = desired_state()
    sink.apply(diff(desired, sink.read()))  # the 100k starting state, not timed
    # Long-lived state (100k addresses, key caches) leaves the GC's view, as a daemon would do
    # after start-up; otherwise a random gen-2 collection lands in one side of the comparison.
    gc.collect()
    gc.freeze()
    addresses = list(desired)
    ticks, applies, reads, floors = [], [], [], []
    for n in range(ROUNDS):
        picked = rng.sample(addresses, CHANGED)
        desired = dict(desired)
        for address in picked:
            desired[address] = float(2000 + n)
        # The floor: the same 10k (key, field, value) writes, one raw pipeline, nothing else.
        targets = [(*keys.owner_and_field(a), format_value(desired[a] + 0.5)) for a in picked]
        floors.append(timed(functools.partial(raw_hset, raw, targets)))
        start = time.perf_counter()
        state = sink.read()
        reads.append(time.perf_counter() - start)
        changes = diff(desired, state)
        apply_start = time.perf_counter()
        result = sink.apply(changes)
        applies.append(time.perf_counter() - apply_start)
        ticks.append(time.perf_counter() - start)
        # The floor wrote other values on purpose: every picked address really changes.
        assert len(changes) == CHANGED, len(changes)
        assert result.verified, result.mismatched
    report(floors, applies, reads, ticks)


def report(
    floors: list[float], applies: list[float], reads: list[float], ticks: list[float]
) -> None:
    floor, apply, read, tick = (statistics.median(x) for x in (floors, applies, reads, ticks))
    print(f"addresses: {TENANTS * len(KINDS)}, changed per round: {CHANGED}, rounds: {ROUNDS}")
    print(f"floor  raw pipelined HSET x{CHANGED}:            {floor * 1000:8.1f} ms")
    print(f"apply  diff'd changes: MULTI/EXEC + version + verify: {apply * 1000:8.1f} ms"
          f"  ratio {apply / floor:.2f}x (target <= 2x)")  # fmt: skip
    print(f"read   100k actual + ledger (level-triggered read): {read * 1000:8.1f} ms")
    print(f"tick   read + diff + apply + verify:               {tick * 1000:8.1f} ms"
          f"  ratio {tick / floor:.2f}x")  # fmt: skip
    sys.stdout.flush()


if __name__ == "__main__":
    main()
