"""Fixtures shared by every test directory: one real redis-server per session."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import redis

from tests.support.redis import RedisServer


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """A redis-server of the tests' own on a free port (never the machine's 6379)."""
    server = RedisServer(tmp_path_factory.mktemp("redis")).start()
    yield server
    server.stop()


@pytest.fixture
def db(redis_server: RedisServer) -> Iterator[redis.Redis[str]]:
    """A plain client on an empty server (for assertions, hand edits and writing limits)."""
    with redis_server.client() as client:
        client.flushall()
        yield client
