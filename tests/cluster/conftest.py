"""A real Redis Cluster of the tests' own (3 masters, 1 replica each), one per session."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.support.redis_cluster import RedisClusterServers


@pytest.fixture(scope="session")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisClusterServers]:
    servers = RedisClusterServers(tmp_path_factory.mktemp("cluster"), masters=3, replicas=1)
    servers.start()
    yield servers
    servers.stop()


@pytest.fixture
def cluster(redis_cluster: RedisClusterServers) -> RedisClusterServers:
    """The session's cluster, emptied."""
    redis_cluster.flush()
    return redis_cluster
