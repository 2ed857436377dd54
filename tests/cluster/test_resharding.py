"""A slot the gateway uses, resharded under it (real Cluster, real MIGRATE): while the
tenant's keys are split between the two nodes every admission of that tenant is refused by
Redis (TRYAGAIN: a script needs all its keys on one node) until redis-py gives up ("TTL
exhausted."), and the gateway fails closed; the error now says what is going on instead of
"is the server up". Once the slot has moved, admissions go on at the new node, and nothing
held for the refused ones is left behind."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest

from controller.changes import diff
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
from tests.support.redis_cluster import RedisClusterServers, master_of

V2 = KeySchema(sharded=True)


@pytest.fixture
def own_cluster(tmp_path: Path) -> Iterator[RedisClusterServers]:
    """Three masters of this test's own (the fewest redis-cli forms): a slot moves."""
    servers = RedisClusterServers(tmp_path / "cluster", masters=3).start()
    yield servers
    servers.stop()


async def admit(url: str, request_id: str) -> str:
    client = connect_async(url, RedisSettings(socket_timeout_seconds=1.0))
    catalog = PlanCatalog.fixed(client, "governor", {"free": PlanInfo()}, "v")
    admission = Admission(client, "governor", PriceTable.from_settings(PricesSettings()), catalog)
    try:
        result = await admission.admit(
            AdmissionRequest("acme", "free", None, None, None, 10, request_id)
        )
        if result.reservation is not None:
            await admission.settle(result.reservation, "acme", 10, None)
        return result.outcome
    finally:
        await aclose(client)


def test_a_tenant_slot_half_migrated_fails_closed_saying_so(
    own_cluster: RedisClusterServers,
) -> None:
    client = connect(own_cluster.url, RedisSettings())
    limits = {Address.parse("tenant/acme/concurrent_requests"): 5.0}
    RedisSink(client, V2).apply(diff(limits, {}))
    close(client)
    assert asyncio.run(admit(own_cluster.url, "r1")) == "allow"  # its state keys exist now

    state = EnforcementKeys(V2).tenant_level("acme").state
    source = master_of(own_cluster, state)
    target = next(node for node in own_cluster.nodes if node is not source)
    with source.client() as src, target.client() as dst, own_cluster.client() as cluster:
        slot = cluster.keyslot(state)
        src_id, dst_id = src.execute_command("CLUSTER MYID"), dst.execute_command("CLUSTER MYID")
        dst.execute_command("CLUSTER SETSLOT", slot, "IMPORTING", src_id)
        src.execute_command("CLUSTER SETSLOT", slot, "MIGRATING", dst_id)
        src.execute_command("MIGRATE", "127.0.0.1", target.port, "", 0, 5000, "KEYS", state)

        with pytest.raises(EnforcementError) as refused:
            asyncio.run(admit(own_cluster.url, "r2"))
        assert "TTL exhausted" in str(refused.value)
        assert "resharded" in str(refused.value)  # not "is the server up"

        for key in src.execute_command("CLUSTER GETKEYSINSLOT", slot, 1000):
            src.execute_command("MIGRATE", "127.0.0.1", target.port, "", 0, 5000, "KEYS", key)
        for node in own_cluster.nodes:
            with node.client() as each:
                each.execute_command("CLUSTER SETSLOT", slot, "NODE", dst_id)

        assert asyncio.run(admit(own_cluster.url, "r3")) == "allow"
        assert cluster.hget(state, "c|concurrent_requests") == "0"  # nothing left held
        assert not [f for f in cluster.hkeys(state) if f.startswith("x|")]
