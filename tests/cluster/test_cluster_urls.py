"""`redis+cluster://` and `rediss+cluster://` URLs: parsed, masked, connected (sync for the
controller and the CLI, asyncio for the gateway), scripts routed by slot with NOSCRIPT
handled, and the CLI's credit commands working end to end on a real cluster."""

from __future__ import annotations

import asyncio
import os
import uuid

import pytest
import redis.asyncio.cluster
from pydantic import SecretStr
from redis.asyncio.connection import SSLConnection
from typer.testing import CliRunner

from controller.cli import app
from controller.clients.redis import (
    aclose,
    close,
    connect,
    connect_async,
    is_cluster,
    location,
    parse_cluster_url,
)
from controller.clients.scripts import TOP_UP
from controller.contract.enforcement import EnforcementKeys
from controller.errors import ConfigurationError
from controller.logging import MASK
from controller.settings import RedisSettings, Settings
from tests.support.redis_cluster import RedisClusterServers


def test_a_cluster_url_names_its_nodes_login_and_database_0_only() -> None:
    target = parse_cluster_url("redis+cluster://gov:s%40cret@10.0.0.1:7000,10.0.0.2,node-3:7002/0")
    assert target.nodes == [("10.0.0.1", 7000), ("10.0.0.2", 6379), ("node-3", 7002)]
    assert (target.username, target.password) == ("gov", "s@cret")
    assert parse_cluster_url("rediss+cluster://a:1").nodes == [("a", 1)]
    for bad, why in [
        ("redis+cluster://:pw@a:1,b:2/3", "database 0 only"),
        ("redis+cluster:///0", "no node"),
        ("redis+cluster://a:x/0", "is not a number"),
        ("redis+cluster://a:1/0?ssl=1", "no parameters"),
    ]:
        with pytest.raises(ConfigurationError, match=why) as refused:
            parse_cluster_url(bad)
        assert "pw" not in str(refused.value)  # the password is masked in the message
    assert Settings(redis=RedisSettings(url=SecretStr("redis+cluster://a:1,b:2/0")))


def test_a_cluster_url_is_masked_in_the_cli_output(cluster: RedisClusterServers) -> None:
    url = cluster.url.replace("redis+cluster://", "redis+cluster://:hunter2@")
    shown = CliRunner().invoke(
        app, ["config", "show"], env={**os.environ, "GOVERNOR_REDIS__URL": url}
    )
    assert shown.exit_code == 0, shown.output
    assert "hunter2" not in shown.output
    assert MASK in shown.output


def test_rediss_cluster_sets_tls_on_every_node_connection() -> None:
    settings = RedisSettings(verify_tls=False)
    client = connect_async("rediss+cluster://:pw@127.0.0.1:7000/0", settings)
    kwargs = client.connection_kwargs  # type: ignore[attr-defined]
    assert kwargs["connection_class"] is SSLConnection
    assert kwargs["password"] == "pw"
    assert is_cluster(client)


def test_the_sync_client_reaches_every_slot(cluster: RedisClusterServers) -> None:
    client = connect(cluster.url, RedisSettings())
    try:
        assert is_cluster(client)
        for i in range(30):  # keys on all three masters
            client.set(f"k{i}", str(i))
        assert [client.get(f"k{i}") for i in range(30)] == [str(i) for i in range(30)]
        with cluster.client() as check:
            masters = sorted(f"127.0.0.1:{node.port}" for node in check.get_primaries())
        assert len(masters) == 3
        assert location(client) == "cluster " + ",".join(masters)
    finally:
        close(client)


def test_scripts_run_on_the_node_of_their_slot_after_a_script_flush(
    cluster: RedisClusterServers,
) -> None:
    keys = EnforcementKeys.for_prefix("governor")
    tenants = [f"tenant{i}" for i in range(12)]  # spread over the masters

    async def top_up_each() -> list[int]:
        client = connect_async(cluster.url, RedisSettings())
        try:
            balances = []
            for tenant in tenants:
                booking = keys.credit_booking(tenant, uuid.uuid4().hex)
                script_keys = (keys.credits(tenant), keys.credit_history(tenant), booking)
                args = (5, "top-up", "test", "pytest", 100, 60_000)
                balances.append(await TOP_UP.run(client, script_keys, args))
            return balances
        finally:
            await aclose(client)

    for node in cluster.nodes:  # every node has forgotten every script: EVALSHA misses
        with node.client() as direct:
            direct.script_flush()
    assert asyncio.run(top_up_each()) == [5] * len(tenants)
    assert asyncio.run(top_up_each()) == [10] * len(tenants)  # loaded now, EVALSHA hits
    with cluster.client() as check:
        assert {check.hget(keys.credits(t), "balance") for t in tenants} == {"10"}
        assert check.xlen(keys.credit_history("tenant3")) == 2


def test_credit_commands_work_on_a_cluster(cluster: RedisClusterServers) -> None:
    env = {**os.environ, "GOVERNOR_REDIS__URL": cluster.url}
    runner = CliRunner()
    topped = runner.invoke(app, ["credits", "top-up", "acme", "5", "--reason", "test"], env=env)
    assert topped.exit_code == 0, topped.output
    shown = runner.invoke(app, ["credits", "show", "acme", "--json"], env=env)
    assert shown.exit_code == 0, shown.output
    assert '"balance_usd": 5.0' in shown.output.replace(" 5,", " 5.0,")
    for node in cluster.nodes:
        with node.client() as direct:
            direct.script_flush()
    again = runner.invoke(app, ["credits", "top-up", "acme", "1", "--reason", "test"], env=env)
    assert again.exit_code == 0, again.output
    assert "balance 6.000000 USD" in again.output


def test_an_async_client_is_a_cluster_client() -> None:
    client = connect_async("redis+cluster://127.0.0.1:7000/0", RedisSettings())
    assert isinstance(client, redis.asyncio.cluster.RedisCluster)
