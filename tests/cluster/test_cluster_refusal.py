"""A Cluster node behind a plain redis:// URL is refused at start (exit 2, naming
redis+cluster://); MOVED and CROSSSLOT replies carry the same hint when met later."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import redis
from pydantic import SecretStr
from typer.testing import CliRunner

from controller.cli import app
from controller.clients.redis import connect, wrapped
from controller.contract.keys import KeySchema
from controller.errors import ConfigurationError, SinkError
from controller.gateway.app import create_app
from controller.model import Address
from controller.settings import GatewaySettings, RedisSettings, Settings
from controller.sinks.redis import RedisSink
from tests.support.redis import free_port
from tests.support.redis_cluster import RedisClusterServers, master_of

POLICIES = Path(__file__).resolve().parents[2] / "policies"


def env_for(url: str) -> dict[str, str]:
    return {**os.environ, "GOVERNOR_REDIS__URL": url, "GOVERNOR_GATEWAY__API_KEY_SECRET": "s"}


@pytest.mark.parametrize(
    "command",
    [
        ["limits", "get"],
        ["tenants", "set", "acme", "free"],
        ["keys", "create", "--tenant", "acme", "--plan", "free"],
        [
            "override",
            "set",
            "tenant/acme/requests_per_minute",
            "5",
            "--ttl",
            "10m",
            "--reason",
            "x",
        ],
    ],
)
def test_cli_commands_refuse_a_cluster_node_with_exit_2(
    cluster: RedisClusterServers, command: list[str]
) -> None:
    result = CliRunner().invoke(app, command, env=env_for(cluster.first_url))
    assert result.exit_code == 2, result.output
    assert "is a Cluster node" in result.stderr
    assert "redis+cluster://" in result.stderr
    with cluster.client() as client:  # nothing was written anywhere, not half an action
        assert client.dbsize() == 0


def run_once_and_gateway(
    env: dict[str, str],
) -> tuple[subprocess.CompletedProcess[str], subprocess.CompletedProcess[str]]:
    """`governor run --once` and `governor gateway` started with `env`, each to its exit."""
    run = subprocess.run(
        [sys.executable, "-m", "controller", "run", "--once"],
        env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    gateway = subprocess.run(
        [sys.executable, "-m", "controller", "gateway", "--port", str(free_port()),
         "--upstream", "http://127.0.0.1:9"],
        env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    return run, gateway


def test_run_once_and_the_gateway_refuse_a_cluster_node_with_exit_2(
    cluster: RedisClusterServers,
) -> None:
    env = {**env_for(cluster.first_url), "GOVERNOR_CONTROLLER__POLICY_DIR": str(POLICIES)}
    run, gateway = run_once_and_gateway(env)
    assert run.returncode == 2, run.stderr
    assert "redis+cluster://" in run.stderr
    assert gateway.returncode == 2, gateway.stderr
    assert "is a Cluster node" in gateway.stderr
    assert "redis+cluster://" in gateway.stderr


def test_sink_check_and_create_app_refuse_a_cluster_node(cluster: RedisClusterServers) -> None:
    settings = RedisSettings(url=SecretStr(cluster.first_url))
    sink = RedisSink(connect(cluster.first_url, settings), KeySchema())
    with pytest.raises(ConfigurationError, match=r"redis\+cluster://"):
        sink.check()
    with pytest.raises(ConfigurationError, match=r"redis\+cluster://"):
        RedisSink.from_url(cluster.first_url, settings)
    gateway_settings = Settings(
        redis=settings, gateway=GatewaySettings(api_key_secret=SecretStr("s"))
    )
    with pytest.raises(ConfigurationError, match="is a Cluster node"):
        create_app(gateway_settings, "http://127.0.0.1:9")


def test_moved_and_crossslot_replies_carry_the_cluster_hint(cluster: RedisClusterServers) -> None:
    keys = KeySchema()
    first = cluster.nodes[0]
    # A tenant whose limits hash is served by another node than the one the URL names.
    tenant = next(
        f"t{i}"
        for i in range(1000)
        if master_of(cluster, keys.owner(Address.parse(f"tenant/t{i}/requests_per_minute")))
        is not first
    )
    client = connect(cluster.first_url, RedisSettings())
    sink = RedisSink(client, keys)
    with pytest.raises(SinkError) as moved:
        sink.stored(Address.parse(f"tenant/{tenant}/requests_per_minute"))
    assert "MOVED" in str(moved.value)
    assert "redis+cluster://" in str(moved.value)
    with pytest.raises(SinkError) as crossslot, wrapped(client, "read two keys"):
        client.mget(["{a}x", "{b}y"])
    assert "CROSSSLOT" in str(crossslot.value)
    assert "redis+cluster://" in str(crossslot.value)
    client.close()


def test_a_plain_redis_is_not_refused(redis_server: object, db: redis.Redis[str]) -> None:
    url = redis_server.url  # type: ignore[attr-defined]
    result = CliRunner().invoke(app, ["limits", "get"], env=env_for(url))
    assert result.exit_code == 0, result.output


def _cluster_url_of(redis_server: object) -> str:
    """A redis+cluster:// URL naming a plain (non-Cluster) redis-server."""
    port = redis_server.port  # type: ignore[attr-defined]
    return f"redis+cluster://127.0.0.1:{port}/0"


@pytest.mark.parametrize(
    "command",
    [
        ["limits", "get"],
        ["tenants", "set", "acme", "free"],
        ["keys", "create", "--tenant", "acme", "--plan", "free"],
    ],
)
def test_cli_commands_refuse_a_cluster_url_naming_a_plain_redis_with_exit_2(
    redis_server: object, db: redis.Redis[str], command: list[str]
) -> None:
    result = CliRunner().invoke(app, command, env=env_for(_cluster_url_of(redis_server)))
    assert result.exit_code == 2, result.output
    assert "is not a Cluster node" in result.stderr
    assert "redis://" in result.stderr
    assert db.dbsize() == 0  # nothing written


def test_run_once_and_the_gateway_refuse_a_cluster_url_naming_a_plain_redis(
    redis_server: object, db: redis.Redis[str]
) -> None:
    url = _cluster_url_of(redis_server)
    env = {**env_for(url), "GOVERNOR_CONTROLLER__POLICY_DIR": str(POLICIES)}
    run, gateway = run_once_and_gateway(env)
    assert run.returncode == 2, run.stderr
    assert "is not a Cluster node" in run.stderr
    # Before, the gateway started, answered /healthz 200 and failed every admission.
    assert gateway.returncode == 2, gateway.stderr
    assert "is not a Cluster node" in gateway.stderr
    settings = RedisSettings(url=SecretStr(url))
    with pytest.raises(ConfigurationError, match="is not a Cluster node"):
        RedisSink.from_url(url, settings)
    assert db.dbsize() == 0
