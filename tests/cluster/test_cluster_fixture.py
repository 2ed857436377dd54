"""The test cluster itself: 3 masters serve every slot, keys spread over them."""

from __future__ import annotations

from tests.support.redis_cluster import RedisClusterServers, master_of


def test_three_masters_serve_every_slot_and_keys_spread(cluster: RedisClusterServers) -> None:
    with cluster.client() as client:
        info = client.cluster_info()
        assert info["cluster_state"] == "ok"
        assert int(info["cluster_slots_assigned"]) == 16384
        assert int(info["cluster_known_nodes"]) == 6
        for i in range(30):
            client.set(f"k{i}", str(i))
        assert client.get("k7") == "7"
    owners = {master_of(cluster, f"k{i}").port for i in range(30)}
    assert len(owners) == 3
