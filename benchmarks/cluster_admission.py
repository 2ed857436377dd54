"""Benchmark: what admission per slot on a Redis Cluster costs at the global level.

On one Redis, admit.lua checks every level in one atomic call: a request the tenant's limit
refuses takes nothing from the global limit. On a Cluster (contract 2) the shared slot's
call (global level) and the tenant's call run side by side; when the tenant's refuses, the
global hold is released, but the request's count in the global rate window is not (settle
never gives a count back). So the global level admits fewer than its limit while tenants
refuse — never more. This measures by how much: the same shuffled burst of requests from
many tenants, admitted by the same Admission class, on its own redis-server (contract 1)
and on its own 3-master cluster (contract 2), with the global limit binding.

Mixes (the global limit 600/min binds in each): `flooding tenants` (5 of 55 tenants send 300
requests each against their 20/min: most of the traffic is refused at the tenant level),
`tenant refusals` (60 tenants send 25 each against 15/min), `no tenant refusals` (loose
tenant limits: the global level alone refuses). Printed per mix: admitted on each, the
ratio cluster / single Redis (1.0: no loss), and the admissions/s of each (one asyncio
client, 32 requests in flight; this shared 2-core machine runs the three masters on the
same cores, so this is no scaling figure). A slower run lets the global window refill a
little more (10 requests/s at 600/min): the seconds are printed too.

Run: `.venv/bin/python -m benchmarks.cluster_admission [--rounds N]`
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import time
from dataclasses import dataclass

from controller.changes import Change
from controller.clients.redis import aclose, close, connect, connect_async, key_schema
from controller.contract.catalog import PlanInfo
from controller.gateway.admission import Admission, AdmissionRequest
from controller.gateway.catalog import PlanCatalog
from controller.gateway.prices import PriceTable
from controller.model import Address
from controller.settings import PricesSettings, RedisSettings
from controller.sinks.redis import RedisSink
from tests.support.redis_cluster import single_and_cluster

GLOBAL_PER_MINUTE = 600
IN_FLIGHT = 32


@dataclass(frozen=True)
class Mix:
    """Groups of tenants: (how many, their limit per minute, requests each sends)."""

    name: str
    groups: tuple[tuple[int, float, int], ...]

    def tenants(self) -> list[tuple[str, float, int]]:
        found, n = [], 0
        for count, limit, sent in self.groups:
            for _ in range(count):
                found.append((f"t{n}", limit, sent))
                n += 1
        return found


MIXES = (
    Mix("flooding tenants", ((5, 20, 300), (50, 20, 20))),
    Mix("tenant refusals", ((60, 15, 25),)),
    Mix("no tenant refusals", ((60, 1000, 25),)),
)


def write_limits(url: str, mix: Mix) -> None:
    """The global limit and each tenant's, written as the controller writes them."""
    client = connect(url, RedisSettings())
    try:
        client.flushall()
        sink = RedisSink(client, key_schema(client, "governor"))
        changes = [Change(Address.parse("global/requests_per_minute"), None, GLOBAL_PER_MINUTE)]
        changes += [
            Change(Address.parse(f"tenant/{tenant}/requests_per_minute"), None, limit)
            for tenant, limit, _ in mix.tenants()
        ]
        sink.apply(changes)
    finally:
        close(client)


async def burst(url: str, mix: Mix, seed: int) -> tuple[int, int, float]:
    """The shuffled burst through Admission: (admitted, sent, seconds)."""
    client = connect_async(url, RedisSettings())
    catalog = PlanCatalog.fixed(client, "governor", {"bench": PlanInfo()}, "bench")
    admission = Admission(client, "governor", PriceTable.from_settings(PricesSettings()), catalog)
    requests = [
        AdmissionRequest(tenant, "bench", None, None, None, 10, f"{tenant}-{n}")
        for tenant, _, sent in mix.tenants()
        for n in range(sent)
    ]
    random.Random(seed).shuffle(requests)
    gate = asyncio.Semaphore(IN_FLIGHT)

    async def one(request: AdmissionRequest) -> bool:
        async with gate:
            result = await admission.admit(request)
        if result.reservation is not None:  # done at once: only rate windows stay taken
            await admission.settle(result.reservation, request.tenant, 10, None)
        return result.outcome == "allow"

    try:
        started = time.perf_counter()
        admitted = sum(await asyncio.gather(*(one(r) for r in requests)))
        return admitted, len(requests), time.perf_counter() - started
    finally:
        await aclose(client)


def measure(url: str, mix: Mix, rounds: int) -> tuple[float, float, float]:
    """Medians over `rounds` of: admitted, admissions/s, seconds."""
    admitted, rates, times = [], [], []
    for seed in range(rounds):
        write_limits(url, mix)
        count, sent, seconds = asyncio.run(burst(url, mix, seed))
        admitted.append(count)
        rates.append(sent / seconds)
        times.append(seconds)
    return statistics.median(admitted), statistics.median(rates), statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    rounds = parser.parse_args().rounds
    with single_and_cluster() as (single, cluster):
        print(
            f"global limit {GLOBAL_PER_MINUTE}/min, requests shuffled, {IN_FLIGHT} in "
            f"flight; medians of {rounds} rounds; admitted (seconds the burst took)"
        )
        print(f"{'mix':<20} {'single Redis':>13} {'cluster':>13} {'ratio':>6}"
              f" {'single/s':>9} {'cluster/s':>10}")  # fmt: skip
        for mix in MIXES:
            one, one_rate, one_s = measure(single.url, mix, rounds)
            many, many_rate, many_s = measure(cluster.url, mix, rounds)
            print(
                f"{mix.name:<20} {one:>6.0f} ({one_s:>4.1f}) {many:>6.0f} ({many_s:>4.1f}) "
                f"{many / one:>6.2f} {one_rate:>9.0f} {many_rate:>10.0f}"
            )


if __name__ == "__main__":
    main()
