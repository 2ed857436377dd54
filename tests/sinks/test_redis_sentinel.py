"""Redis behind Sentinel (`redis+sentinel://`): a real master, a replica and a Sentinel. The
controller's sink, the CLI and the gateway's client find the master through the Sentinel;
after a failover the next write reaches the new master (nothing written before is lost,
nothing is half-applied); malformed URLs are refused naming what is wrong."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from controller.changes import diff
from controller.cli import app
from controller.clients.redis import (
    aclose,
    close,
    connect,
    connect_async,
    masked_url,
    parse_sentinel_url,
)
from controller.errors import ConfigurationError, SinkError
from controller.logging import mask_text
from controller.model import Address
from controller.settings import RedisSettings, Settings
from controller.sinks.redis import RedisSink
from tests.support.process import wait_for
from tests.support.redis import RedisServer, SentinelServer

pytestmark = pytest.mark.integration

PASSWORD = "s3ntinel-pw"
FIRST = Address.parse("plan/free/requests_per_minute")
SECOND = Address.parse("plan/free/tokens_per_day")


def _replica_in_sync(sentinel: SentinelServer) -> bool:
    with sentinel.client() as client:
        replicas = client.execute_command("SENTINEL", "REPLICAS", sentinel.service)
    return any(r.get("master-link-status") == "ok" for r in replicas)


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[tuple[RedisServer, RedisServer, SentinelServer]]:
    master = RedisServer(tmp_path / "master", password=PASSWORD).start()
    replica = RedisServer(tmp_path / "replica", password=PASSWORD, replica_of=master.port)
    replica.start()
    sentinel = SentinelServer(tmp_path / "sentinel", master.port, password=PASSWORD).start()
    try:
        wait_for(lambda: _replica_in_sync(sentinel), lambda: "the replica never synced", 30.0, 0.1)
        yield master, replica, sentinel
    finally:
        sentinel.stop()
        replica.stop()
        master.stop()


def test_writes_follow_the_master_through_a_failover(
    fleet: tuple[RedisServer, RedisServer, SentinelServer], request: pytest.FixtureRequest
) -> None:
    master, replica, sentinel = fleet
    sink = RedisSink.from_url(sentinel.url(), RedisSettings(retries=8))
    request.addfinalizer(lambda: close(sink.client))
    sink.apply(diff({FIRST: 10.0}, sink.read().actual))
    with master.client() as db:
        assert db.keys("governor:*")  # the write went to the master

    with sentinel.client() as client:
        assert client.execute_command("SENTINEL", "FAILOVER", sentinel.service)
    wait_for(lambda: sentinel.master_port_now() == replica.port, lambda: "no failover", 90.0, 0.1)

    # As the controller does every tick: diff the desired state against what Redis holds and
    # write the difference. A write that reached the old master in the moment before Sentinel
    # turned it into a replica is lost with it (replication is asynchronous); the next tick
    # sees it missing and writes it again, on the new master.
    desired = {FIRST: 10.0, SECOND: 1000.0}
    env = {"GOVERNOR_REDIS__URL": sentinel.url()}

    def shown_by_a_new_client() -> set[str]:
        shown = CliRunner().invoke(app, ["limits", "get", "--json"], env=env)
        assert shown.exit_code == 0, shown.output
        return set(json.loads(shown.stdout)["limits"])

    deadline = time.monotonic() + 90.0  # generous: a loaded CI machine fails over slowly
    while True:
        # The old master may refuse (read-only) or go away: the next tick tries again.
        with contextlib.suppress(SinkError):
            sink.apply(diff(desired, sink.read().actual))
        if shown_by_a_new_client() == {str(a) for a in desired}:
            break
        assert time.monotonic() < deadline, "the limits never reached the new master"
        time.sleep(0.2)
    with replica.client() as db:
        assert db.execute_command("ROLE")[0] == "master"  # what the CLI read is the new master

    async def role() -> object:
        client = connect_async(sentinel.url(), RedisSettings())
        try:
            return (await client.execute_command("ROLE"))[0]  # type: ignore[no-untyped-call]
        finally:
            await aclose(client)

    assert asyncio.run(role()) == "master"  # the gateway's client finds the new master too


def test_the_sentinel_url_carries_hosts_service_db_and_credentials() -> None:
    target = parse_sentinel_url(
        "redis+sentinel://app:pw%40x@s-0:26380,s-1/my-master/3?sentinel_password=sp"
    )
    assert target.sentinels == [("s-0", 26380), ("s-1", 26379)]
    assert (target.service, target.db) == ("my-master", 3)
    assert (target.username, target.password, target.sentinel_password) == ("app", "pw@x", "sp")
    url = "redis+sentinel://:pw@s-0/m/0?sentinel_password=sp"
    for masked in (masked_url(url), mask_text(f"connecting to {url} failed")):
        assert "pw" not in masked.replace("sentinel_password", "")
        assert "sp" not in masked.replace("sentinel_password", "")


@pytest.mark.parametrize(
    ("url", "why"),
    [
        ("redis+sentinel:///mymaster", "no Sentinel host"),
        ("redis+sentinel://s-0:26379", "the path must be"),
        ("redis+sentinel://s-0/mymaster/zero", "database 'zero'"),
        ("redis+sentinel://s-0:port/mymaster", "port 'port'"),
        ("redis+sentinel://s-0/mymaster?master=x", "unknown parameter master"),
    ],
)
def test_a_malformed_sentinel_url_names_the_problem_and_an_example(url: str, why: str) -> None:
    with pytest.raises(ConfigurationError, match=why) as refused:
        connect(url, RedisSettings())
    assert "redis+sentinel://:password@sentinel-0:26379" in str(refused.value)


def test_a_sentinel_url_is_a_valid_extra_sink() -> None:
    settings = Settings(controller={"sinks": ["redis", "redis+sentinel://s-0/mymaster/0"]})
    assert settings.controller.sinks[1].startswith("redis+sentinel://")
