"""Fixtures: one real redis-server per session (flushed per test), sinks and journals on it."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import redis

from controller.clients.redis import connect
from controller.contract.keys import KeySchema
from controller.control.overrides import ControlStore
from controller.journal.writer import Journal
from controller.settings import JournalSettings, RedisSettings
from controller.sinks.redis import RedisSink
from tests.support.redis import RedisServer


@pytest.fixture
def keys() -> KeySchema:
    return KeySchema("governor")


@pytest.fixture
def client(db: redis.Redis[str], redis_server: RedisServer) -> Iterator[redis.Redis[str]]:
    """A client made like Governor makes its own (closed after the test)."""
    with connect(redis_server.url, RedisSettings(), retries=0) as made:
        yield made


@pytest.fixture
def sink(client: redis.Redis[str], keys: KeySchema) -> RedisSink:
    return RedisSink(client, keys)


@pytest.fixture
def control(client: redis.Redis[str], keys: KeySchema) -> ControlStore:
    return ControlStore(client, keys)


@pytest.fixture
def journal(client: redis.Redis[str], keys: KeySchema) -> Journal:
    return Journal(client, keys, JournalSettings(stream_max_length=1000, buffer_max_events=50))
