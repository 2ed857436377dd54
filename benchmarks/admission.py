"""Benchmark: one admission decision per request vs trivial EVALSHA and other Redis limiters.

Starts its own redis-server on a free port. Client side, one asyncio redis-py client,
unpipelined, one call per request (as a gateway calls): Governor's full decision (global +
ip + plan + tenant + user + token budget), a trivial `return 1` EVALSHA, a one-level GCRA,
the `limits` library's SlidingWindowCounter and MovingWindow, and a Kong-style fixed window
(INCR + EXPIRE in one round trip). Medians of interleaved rounds, ratios to the trivial
script (target: full decision >= 0.85x). Then exactness: how many each admits beyond the
limit in a burst across a minute boundary and under 64 concurrent clients (waits for the
next minute boundary: up to a minute). Server side: `redis-benchmark -P 16 -c 8` running
EVALSHA of the full decision, the one-level GCRA and the trivial script (target >= 40k
full decisions/s).

Run: `.venv/bin/python -m benchmarks.admission [--server-only] [--rounds N]` (`--server-only`:
only the redis-benchmark rows, N interleaved rounds of them, printed per round and as ranges)
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import hashlib
import itertools
import os
import random
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis
import redis.asyncio
from limits import RateLimitItemPerMinute
from limits.aio.storage import RedisStorage
from limits.aio.strategies import MovingWindowRateLimiter, SlidingWindowCounterRateLimiter

from controller.changes import diff
from controller.clients.scripts import ADMIT, Script
from controller.contract.catalog import PlanInfo
from controller.contract.enforcement import EnforcementKeys
from controller.contract.keys import KeySchema
from controller.gateway.admission import Admission, AdmissionRequest
from controller.gateway.catalog import PlanCatalog
from controller.gateway.limits import read_limits
from controller.gateway.prices import PriceTable
from controller.model import Address
from controller.settings import PricesSettings
from controller.sinks.redis import RedisSink
from tests.support.redis import RedisServer

ROUNDS = 7
CALLS = 2000  # per implementation per round
LIMIT = 100  # per minute, for the exactness runs
CLIENTS = 64
HUGE = 1e12  # throughput runs: every level has a limit, none says no
# The throughput runs' limits: a value at every level of the full decision, for the
# client-side tenant (t-bench) and the server-side one (t-server).
THROUGHPUT_LIMITS = {
    "global/requests_per_second": HUGE,
    "ip/requests_per_minute": HUGE,
    "plan/bench/requests_per_minute": HUGE,
    "plan/bench/tokens_per_minute": HUGE,
    "plan/bench/tokens_per_day": HUGE,
    "user/t-bench/alice/requests_per_minute": HUGE,
    "user/t-server/alice/requests_per_minute": HUGE,
}

GCRA_ONE_LEVEL = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
local period = tonumber(ARGV[2])
local interval = period / tonumber(ARGV[1])
local tat = math.max(tonumber(redis.call('GET', KEYS[1]) or '0'), now)
if tat + interval - now > period then
  return 0
end
redis.call('SET', KEYS[1], string.format('%.17g', tat + interval), 'PX',
  math.max(1, math.ceil(tat + interval - now)))
return 1
"""

Limiter = Callable[[], Awaitable[bool]]
_ids = itertools.count()


def with_sha(name: str, source: str) -> Script:
    return Script(name, source, hashlib.sha1(source.encode()).hexdigest())


TRIVIAL = with_sha("trivial", "return 1")
GCRA = with_sha("gcra", GCRA_ONE_LEVEL)


def write_limits(server: RedisServer, limits: Mapping[str, float]) -> None:
    """The limits, written the way the controller writes them."""
    with server.client() as client:
        sink = RedisSink(client, KeySchema("governor"))
        desired = {Address.parse(text): float(value) for text, value in limits.items()}
        sink.apply(diff(desired, sink.read().actual))


@dataclass
class Bench:
    """Every limiter under test, on one client."""

    client: redis.asyncio.Redis[str]
    admission: Admission
    storage: RedisStorage

    def governor(self, tenant: str, plan: str, user: str | None, ip: str | None) -> Limiter:
        async def call() -> bool:
            request = AdmissionRequest(tenant, plan, user, ip, None, 1, f"r{next(_ids)}")
            return (await self.admission.admit(request)).outcome == "allow"

        return call

    def trivial(self) -> Limiter:
        async def call() -> bool:
            return bool(await TRIVIAL.run(self.client, (), ()))

        return call

    def gcra(self, key: str, limit: float) -> Limiter:
        async def call() -> bool:
            return bool(await GCRA.run(self.client, (key,), (limit, 60000)))

        return call

    def sliding(self, key: str, limit: int) -> Limiter:
        limiter, item = SlidingWindowCounterRateLimiter(self.storage), RateLimitItemPerMinute(limit)
        return lambda: limiter.hit(item, key)

    def moving(self, key: str, limit: int) -> Limiter:
        limiter, item = MovingWindowRateLimiter(self.storage), RateLimitItemPerMinute(limit)
        return lambda: limiter.hit(item, key)

    def kong(self, key: str, limit: int) -> Limiter:
        async def call() -> bool:
            window = f"kong:{key}:{int(time.time() // 60)}"  # Kong keys periods by its clock
            pipe = self.client.pipeline(transaction=False)
            pipe.incr(window)
            pipe.expire(window, 60)
            count, _ = await pipe.execute()
            return int(count) <= limit

        return call

    def all(self, limit: float, tag: str) -> dict[str, Limiter]:
        """One of each, on fresh keys, with `limit` per minute."""
        n = int(limit)
        return {
            "governor full decision": self.governor(f"t-{tag}", tag, "alice", "10.1.2.3"),
            "one-level GCRA (Lua)": self.gcra(f"gcra:{tag}", limit),
            "limits SlidingWindowCounter": self.sliding(f"swc-{tag}", n),
            "limits MovingWindow": self.moving(f"mw-{tag}", n),
            "Kong fixed window INCR+EXPIRE": self.kong(f"kong-{tag}", n),
        }


async def ping(client: redis.asyncio.Redis[str]) -> bool:
    return bool(await client.ping())


async def timed(call: Limiter, count: int) -> float:
    start = time.perf_counter()
    for _ in range(count):
        await call()
    return count / (time.perf_counter() - start)


async def throughput(bench: Bench) -> dict[str, float]:
    limiters: dict[str, Limiter] = {
        "PING": lambda: ping(bench.client),
        "trivial EVALSHA (return 1)": bench.trivial(),
        **bench.all(HUGE, "bench"),
    }
    for call in limiters.values():  # warm up: scripts loaded, connections open
        await timed(call, 200)
    gc.collect()
    gc.freeze()
    rates: dict[str, list[float]] = {name: [] for name in limiters}
    order = list(limiters)
    for round_number in range(ROUNDS):
        random.Random(round_number).shuffle(order)
        for name in order:
            rates[name].append(await timed(limiters[name], CALLS))
    return {name: statistics.median(values) for name, values in rates.items()}


async def until(ready: Callable[[float], bool]) -> None:
    while not ready(time.time() % 60):
        await asyncio.sleep(0.005)  # waiting for a clock position, not for a result


async def boundary_burst(bench: Bench) -> dict[str, int]:
    """LIMIT requests just before a minute boundary and LIMIT just after; count admitted."""
    limiters = bench.all(LIMIT, "boundary")
    admitted = dict.fromkeys(limiters, 0)
    print("waiting for the next minute boundary (up to 60 s)...", file=sys.stderr)
    await until(lambda s: 58.5 <= s < 59.0)
    for _ in range(LIMIT):
        for name, call in limiters.items():
            admitted[name] += await call()
    await until(lambda s: s < 30)
    for _ in range(LIMIT):
        for name, call in limiters.items():
            admitted[name] += await call()
    return admitted


async def concurrent(bench: Bench) -> dict[str, int]:
    """64 clients, 4 requests each, against one limit of LIMIT: count admitted."""
    limiters = bench.all(LIMIT, "concurrent")

    async def client(call: Limiter) -> int:
        return sum([await call() for _ in range(4)])

    admitted = {}
    for name, call in limiters.items():
        admitted[name] = sum(await asyncio.gather(*(client(call) for _ in range(CLIENTS))))
    return admitted


async def budget_overrun(bench: Bench) -> tuple[int, int]:
    """64 clients spending random amounts against a 20,000-token budget: (granted, refused)."""
    budget = 20_000

    async def client(seed: int) -> tuple[int, int]:
        rng, granted, refused = random.Random(seed), 0, 0
        while refused < 3:
            tokens = rng.randint(1, 600)
            request = AdmissionRequest(
                "t-budget", "budget", None, None, None, tokens, f"b{next(_ids)}"
            )
            if (await bench.admission.admit(request)).outcome == "allow":
                granted += tokens
            else:
                refused += 1
        return granted, refused

    results = await asyncio.gather(*(client(seed) for seed in range(CLIENTS)))
    return sum(g for g, _ in results) - budget, sum(r for _, r in results)


async def client_side(server: RedisServer) -> None:
    client = redis.asyncio.Redis(port=server.port, decode_responses=True)
    # Every plan the runs use is in the catalog: an unknown plan is refused (fail closed).
    plans = ("bench", "boundary", "concurrent", "budget")
    catalog = PlanCatalog.fixed(client, "governor", dict.fromkeys(plans, PlanInfo()))
    admission = Admission(client, "governor", PriceTable.from_settings(PricesSettings()), catalog)
    storage = RedisStorage(
        f"async+redis://127.0.0.1:{server.port}",
        implementation="redispy",
        connection_pool=client.connection_pool,
    )
    bench = Bench(client, admission, storage)
    try:
        rates = await throughput(bench)
        report_throughput(rates)
        burst = await boundary_burst(bench)
        crowd = await concurrent(bench)
        overrun, refused = await budget_overrun(bench)
        report_exactness(burst, crowd, overrun, refused)
    finally:
        await client.aclose()  # type: ignore[attr-defined]  # types-redis predates aclose


def report_throughput(rates: dict[str, float]) -> None:
    trivial = rates["trivial EVALSHA (return 1)"]
    print(f"\nclient side: one asyncio redis-py client, unpipelined, median of {ROUNDS} rounds")
    print(f"{'implementation':34} {'calls/s':>9} {'vs trivial':>11} {'vs PING':>8}")
    for name, rate in rates.items():
        print(f"{name:34} {rate:9.0f} {rate / trivial:10.2f}x {rate / rates['PING']:7.2f}x")
    full = rates["governor full decision"] / trivial
    print(f"full decision / trivial EVALSHA = {full:.2f} (target >= 0.85)")


def report_exactness(
    burst: dict[str, int], crowd: dict[str, int], overrun: int, refused: int
) -> None:
    print(f"\nexactness, limit {LIMIT}/minute (admitted beyond the limit)")
    print(f"{'implementation':34} {'boundary burst':>15} {'64 concurrent':>14}")
    for name in burst:
        print(f"{name:34} {burst[name] - LIMIT:+15d} {crowd[name] - LIMIT:+14d}")
    print(
        f"token budget, 64 concurrent clients: overrun {max(overrun, 0)} tokens "
        f"(granted {overrun:+d} vs the budget, {refused} refusals)"
    )


def redis_benchmark(port: int, *command: str | float) -> float:
    out = subprocess.run(
        ["redis-benchmark", "-p", str(port), "-n", "200000", "-P", "16", "-c", "8", "-q",
         "-r", "1000000000000", *map(str, command)],
        check=True, capture_output=True, text=True,
    ).stdout  # fmt: skip
    found = re.findall(r"([\d.]+) requests per second", out.replace("\r", "\n"))
    if not found:
        raise RuntimeError(f"redis-benchmark printed no rate:\n{out}")
    return float(found[-1])


def server_side(
    server: RedisServer, keys: tuple[str, ...], args: list[Any], rounds: int = 1
) -> None:
    with server.client() as client:
        for script in (TRIVIAL, GCRA, ADMIT):
            client.execute_command("SCRIPT LOAD", script.source)
    commands: dict[str, tuple[str | float, ...]] = {
        "trivial (return 1)": ("EVALSHA", TRIVIAL.sha, 0),
        "one-level GCRA": ("EVALSHA", GCRA.sha, 1, "gcra:server", HUGE, 60000),
        "full decision (admit.lua)": ("EVALSHA", ADMIT.sha, len(keys), *keys, *args),
    }
    rates: dict[str, list[float]] = {name: [] for name in commands}
    print("\nserver side: redis-benchmark -n 200000 -P 16 -c 8")
    print(f"{'round':5} " + " ".join(f"{name:>26}" for name in commands))
    for round_number in range(rounds):
        # Interleaved, in this order each round: the rows see the same machine.
        for name, command in commands.items():
            rates[name].append(redis_benchmark(server.port, *command))
        print(f"{round_number + 1:5} " + " ".join(f"{rates[n][-1]:26.0f}" for n in commands))
    print(f"{'script':34} {'calls/s (median)':>17} {'range':>17} {'vs trivial':>11}")
    trivial = statistics.median(rates["trivial (return 1)"])
    for name, values in rates.items():
        rate, span = statistics.median(values), f"{min(values):.0f}-{max(values):.0f}"
        print(f"{name:34} {rate:17.0f} {span:>17} {rate / trivial:10.2f}x")
    full = statistics.median(rates["full decision (admit.lua)"])
    print(f"full decisions/s = {full:.0f} (target >= 40000)")


def full_decision_call(client: redis.Redis[str]) -> tuple[tuple[str, ...], list[Any]]:
    """admit.lua's keys and arguments for the benchmark tenant, its limits resolved as a
    gateway resolves them (read from `client`); `__rand_int__` makes ids."""
    keys = EnforcementKeys.for_prefix("governor")
    limits = read_limits(client, keys, "t-server", "bench", "alice", True, "")
    args, fixed, tail = limits.argv("s__rand_int__", 1, ("600000", "3600000", ""), ())
    return keys.admit_keys("t-server", "alice", "10.1.2.3"), [*args, *fixed, *tail]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--server-only", action="store_true",
                        help="only the redis-benchmark rows")  # fmt: skip
    parser.add_argument("--rounds", type=int, default=1, help="server-side rounds")
    options = parser.parse_args()
    # Other work on the machine slows every row alike; the ratios are the figures to read.
    print("load average at start: {:.2f} {:.2f} {:.2f}".format(*os.getloadavg()))
    with tempfile.TemporaryDirectory() as tmp:
        server = RedisServer(Path(tmp)).start()
        try:
            write_limits(
                server,
                {
                    **THROUGHPUT_LIMITS,
                    "plan/boundary/requests_per_minute": LIMIT,
                    "plan/concurrent/requests_per_minute": LIMIT,
                    "plan/budget/tokens_per_day": 20_000,
                },
            )
            if not options.server_only:
                asyncio.run(client_side(server))
            with server.client() as client:
                call = full_decision_call(client)
            server_side(server, *call, rounds=options.rounds)
        finally:
            server.stop()


if __name__ == "__main__":
    main()
