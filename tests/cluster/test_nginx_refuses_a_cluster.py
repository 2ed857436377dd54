"""The nginx/Kong Lua module refuses a Redis Cluster, saying why, with the real nginx: a
`redis+cluster://` URL stops nginx at start; a plain URL naming a Cluster node fails every
request closed (503) and logs the reason, at start and per request."""

from __future__ import annotations

import os
from pathlib import Path

import httpx
import pytest
from typer.testing import CliRunner

from controller.cli import app
from controller.gateway.keys import new_key
from tests.nginx.nginx_server import NginxServer
from tests.support.redis import free_port
from tests.support.redis_cluster import RedisClusterServers

pytestmark = pytest.mark.integration

REFUSAL = "the nginx/Kong module does not support Redis Cluster"


def exported(directory: Path) -> Path:
    result = CliRunner().invoke(app, ["gateway", "export-lua", str(directory)])
    assert result.exit_code == 0, result.output
    return directory


def nginx_env(url: str) -> dict[str, str]:
    return {
        "PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"),
        "GOVERNOR_REDIS__URL": url,
        "GOVERNOR_GATEWAY__API_KEY_SECRET": "nginx-secret",
    }


def test_a_cluster_url_stops_nginx_at_start(tmp_path: Path, cluster: RedisClusterServers) -> None:
    server = NginxServer(
        tmp_path / "nginx", exported(tmp_path / "scripts"), free_port(), nginx_env(cluster.url)
    )
    with pytest.raises(RuntimeError, match="nginx did not start") as refused:
        server.start()
    assert REFUSAL in str(refused.value)
    assert "redis+cluster://" in str(refused.value)


def test_a_cluster_node_behind_a_plain_url_fails_every_request_closed(
    tmp_path: Path, cluster: RedisClusterServers
) -> None:
    server = NginxServer(
        tmp_path / "nginx",
        exported(tmp_path / "scripts"),
        free_port(),
        nginx_env(cluster.first_url),
    ).start()
    try:
        answer = httpx.post(
            f"{server.url}/v1/chat/completions",
            headers={"authorization": f"Bearer {new_key()[1]}"},  # well formed, never stored
            json={"model": "gpt-3.5-turbo", "messages": [{"role": "user", "content": "hi"}]},
            timeout=30.0,
        )
        log = server.error_log.read_text()
    finally:
        server.stop()
    assert answer.status_code == 503
    port = cluster.nodes[0].port
    assert f"cannot reach Redis at start: Redis at 127.0.0.1:{port} is a Cluster node" in log
    assert f"cannot reach Redis: Redis at 127.0.0.1:{port} is a Cluster node: {REFUSAL}" in log
    assert server.problems() == []
    with cluster.client() as client:  # nothing was written on the node, or anywhere
        assert client.dbsize() == 0
