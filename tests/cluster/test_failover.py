"""A master killed during traffic on a real Cluster (3 masters, 3 replicas): its replica is
promoted, admissions go on there (NOSCRIPT handled: a replica has no scripts), nothing is
over-admitted, and the controller's next tick writes back what the new master lacks."""

from __future__ import annotations

import asyncio
import signal
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from controller.changes import Change, diff
from controller.clients.redis import aclose, close, connect, connect_async
from controller.clients.scripts import EnforcementError
from controller.contract.catalog import PlanInfo
from controller.contract.enforcement import EnforcementKeys
from controller.contract.keys import KeySchema
from controller.gateway.admission import Admission, AdmissionRequest
from controller.gateway.catalog import PlanCatalog
from controller.gateway.prices import PriceTable
from controller.model import Address
from controller.settings import PricesSettings, RedisSettings
from controller.sinks.redis import RedisSink
from tests.support.process import stop_pid
from tests.support.redis_cluster import ClusterNodeServer, RedisClusterServers, master_of

V2 = KeySchema(sharded=True)
PER_MINUTE = 30  # acme's limit: a burst of 30, then one every 2 s
LIMIT = Address.parse("tenant/acme/requests_per_minute")
TRAFFIC_SECONDS = 14.0
KILL_AFTER_SECONDS = 2.0


@pytest.fixture
def own_cluster(tmp_path: Path) -> Iterator[RedisClusterServers]:
    """A cluster of this test's own: it loses a master."""
    servers = RedisClusterServers(tmp_path / "cluster", masters=3, replicas=1).start()
    yield servers
    servers.stop()


def desired() -> dict[Address, float]:
    return {LIMIT: PER_MINUTE, Address.parse("global/requests_per_second"): 1000}


async def traffic(url: str, kill: asyncio.Future[float]) -> tuple[Counter[str], list[float]]:
    """acme's requests every 20 ms for TRAFFIC_SECONDS; outcomes, and when decisions
    (allow or refuse, not errors) came after the kill."""
    client = connect_async(url, RedisSettings(socket_timeout_seconds=1.0))
    catalog = PlanCatalog.fixed(client, "governor", {"free": PlanInfo()}, "v")
    admission = Admission(client, "governor", PriceTable.from_settings(PricesSettings()), catalog)
    seen: Counter[str] = Counter()
    after: list[float] = []
    started = time.monotonic()
    n = 0
    try:
        while time.monotonic() - started < TRAFFIC_SECONDS:
            n += 1
            try:
                result = await admission.admit(
                    AdmissionRequest("acme", "free", None, None, None, 10, f"r{n}")
                )
            except EnforcementError:  # the failover's store errors: the gateway fails closed
                seen["error"] += 1
            else:
                seen[result.outcome] += 1
                if kill.done():
                    after.append(time.monotonic() - started)
                if result.reservation is not None:
                    await admission.settle(result.reservation, "acme", 10, None)
            await asyncio.sleep(0.02)
    finally:
        await aclose(client)
    return seen, after


def test_a_master_dies_during_traffic(own_cluster: RedisClusterServers) -> None:
    client = connect(own_cluster.url, RedisSettings())
    sink = RedisSink(client, V2)
    first = sink.apply(diff(desired(), {})).version
    state = EnforcementKeys(V2).tenant_level("acme").state
    doomed = master_of(own_cluster, state)
    replica = next(n for n in own_cluster.nodes if n is not doomed and _replica_of(n, doomed))
    with replica.client() as direct:
        direct.script_flush()  # as a replica has them: none (SCRIPT LOAD is not replicated)
    close(client)

    async def run() -> tuple[Counter[str], list[float], float]:
        kill: asyncio.Future[float] = asyncio.get_running_loop().create_future()

        async def killer() -> None:
            await asyncio.sleep(KILL_AFTER_SECONDS)
            assert doomed.pid is not None
            pid, doomed.pid = doomed.pid, None
            await asyncio.to_thread(stop_pid, pid, signal.SIGKILL, doomed._wait)
            kill.set_result(time.monotonic())

        started = time.monotonic()
        (seen, after), _ = await asyncio.gather(traffic(own_cluster.url, kill), killer())
        return seen, after, time.monotonic() - started

    seen, after, elapsed = asyncio.run(run())
    # Never more than the limit lets through: the burst, then one per 2 s (+1: the edge).
    assert seen["allow"] <= PER_MINUTE + elapsed * PER_MINUTE / 60 + 1
    assert seen["allow"] >= PER_MINUTE  # the burst went through before the kill
    assert seen["rate_limited"] > 0
    assert after, f"no decision after the failover: {seen}"  # promoted, scripts loaded
    with replica.client() as direct:
        assert direct.info("replication")["role"] == "master"
    # The next tick: a new master that lacked the last write (simulated: the field gone)
    # gets it back, under a version above any before.
    client = connect(own_cluster.url, RedisSettings())
    try:
        with replica.client() as direct:
            direct.hdel(V2.owner(LIMIT), "requests_per_minute")
        sink = RedisSink(client, V2)
        changes = diff(desired(), sink.read().actual)
        assert changes == [Change(LIMIT, None, PER_MINUTE)]
        again = sink.apply(changes)
        assert again.version > first
        assert sink.stored(LIMIT) == PER_MINUTE
    finally:
        close(client)


def _replica_of(node: ClusterNodeServer, master: ClusterNodeServer) -> bool:
    with node.client() as direct:
        info = direct.info("replication")
    return info.get("role") == "slave" and int(info.get("master_port", 0)) == master.port
