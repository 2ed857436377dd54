"""The gateway logs what a store error says (which server, what to do), not just its type:
during authentication (Redis gone) and at admission (a key replaced by hand)."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import httpx

from controller.contract.keys import KeySchema
from controller.gateway.keys import KeyStore
from tests.gateway.test_gateway_cli import start_process
from tests.support.redis import RedisServer, free_port
from tests.support.redis_cluster import RedisClusterServers

POLICIES = Path(__file__).resolve().parents[2] / "policies"
SECRET = "store-error-secret"


def serve_and_ask(
    redis_url: str, key: str, before: Callable[[], None] | None = None
) -> tuple[int, list[dict[str, str]]]:
    """Start `governor gateway` on `redis_url`, send one chat call with `key` (after calling
    `before`, if given), stop it; its answer's status and its log lines."""
    env = {
        **os.environ,
        "GOVERNOR_REDIS__URL": redis_url,
        "GOVERNOR_GATEWAY__API_KEY_SECRET": SECRET,
        "GOVERNOR_REDIS__SOCKET_TIMEOUT_SECONDS": "1",
    }
    port = free_port()
    process = start_process(
        env, port, "--upstream", "http://127.0.0.1:9", "--policies", str(POLICIES)
    )
    try:
        if before is not None:
            before()
        answer = httpx.post(
            f"http://127.0.0.1:{port}/v1/chat/completions",
            headers={"authorization": f"Bearer {key}"},
            json={"model": "gpt-3.5-turbo", "messages": [{"role": "user", "content": "hi"}]},
            timeout=30.0,
        )
    finally:
        process.terminate()
        _, stderr = process.communicate(timeout=30)
    lines = [json.loads(line) for line in stderr.splitlines() if line.startswith("{")]
    return answer.status_code, lines


def test_an_error_during_authentication_is_logged_with_its_message(tmp_path: Path) -> None:
    server = RedisServer(tmp_path / "redis").start()
    try:
        with server.client() as client:
            key, _ = KeyStore(client, KeySchema(), SECRET).create("acme", "free")
        status, lines = serve_and_ask(server.url, key, server.stop)  # never seen: not cached
    finally:
        server.stop()
    assert status == 503
    [line] = [x for x in lines if x["event"] == "limit store unreachable during authentication"]
    assert line["error"].startswith("ConnectionError: ")
    assert str(server.port) in line["error"]  # where: the server it could not reach


def test_an_admission_error_on_a_cluster_is_logged_with_its_message(
    cluster: RedisClusterServers,
) -> None:
    schema = KeySchema(sharded=True)
    with cluster.client() as client:
        key, _ = KeyStore(client, schema, SECRET).create("acme", "free")  # type: ignore[arg-type]
        client.rpush(schema.version, "not a version")  # a key replaced by hand: WRONGTYPE
    status, lines = serve_and_ask(cluster.url, key)
    assert status == 503  # free fails closed
    [line] = [x for x in lines if x["event"] == "limit store unreachable"]
    assert line["error"].startswith("EnforcementError: reading the limits failed: WRONGTYPE")
    assert "delete it and Governor rewrites it" in line["error"]  # the hint: what to do


def test_a_refused_login_is_logged_with_where_the_password_goes(tmp_path: Path) -> None:
    server = RedisServer(tmp_path / "redis", password="s3cret-pw").start()
    try:
        no_password = server.url.replace(":s3cret-pw@", "")
        status, lines = serve_and_ask(no_password, "gov_0123456789abcdef_" + "a" * 43)
    finally:
        server.stop()
    assert status == 503  # fails closed
    [line] = [x for x in lines if x["event"] == "limit store unreachable during authentication"]
    assert line["error"].startswith("AuthenticationError: ")
    assert "GOVERNOR_REDIS__PASSWORD" in line["error"]
