"""nginx talking to Redis over TLS (rediss://): a real TLS-only redis-server with a password
and a certificate from a test CA. With that CA in `lua_ssl_trusted_certificate` the free
plan's flow runs as over plain TCP; without it the handshake fails and the plan fails closed,
the error log saying what to set."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from controller.contract.keys import KeySchema
from controller.gateway.keys import KeyStore
from tests.gateway.conftest import write_limits
from tests.gateway.fake_upstream import FakeUpstream, ServerThread
from tests.nginx.conftest import PREFIX, SECRET, chat_body
from tests.nginx.nginx_server import NginxServer
from tests.support.redis import RedisServer
from tests.support.tls import TlsFiles, make_tls_files


@pytest.fixture
def tls(tmp_path: Path) -> TlsFiles:
    return make_tls_files(tmp_path / "tls")


@pytest.fixture
def redis_tls(tmp_path: Path, tls: TlsFiles, policy_dir: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path / "redis", password="tls-pw", tls=tls).start()
    with server.client() as db:
        write_limits(db, PREFIX, policy_dir)
    yield server
    server.stop()


def start_nginx(
    prefix: Path, export_dir: Path, upstream: ServerThread, redis: RedisServer, trusted: str
) -> NginxServer:
    env = {
        "PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"),
        "GOVERNOR_REDIS__URL": redis.url,
        "GOVERNOR_GATEWAY__API_KEY_SECRET": SECRET,
    }
    server_conf = f"lua_ssl_trusted_certificate {trusted};\n"
    return NginxServer(prefix, export_dir, upstream.port, env, server_conf).start()


def test_rediss_with_the_ca_runs_the_free_plan(
    tmp_path: Path,
    export_dir: Path,
    upstream: tuple[FakeUpstream, ServerThread],
    redis_tls: RedisServer,
    tls: TlsFiles,
) -> None:
    assert redis_tls.url.startswith("rediss://")
    with redis_tls.client() as db:
        key = KeyStore(db, KeySchema(PREFIX), SECRET).create("acme", "free")[0]
    nginx = start_nginx(tmp_path / "nginx", export_dir, upstream[1], redis_tls, str(tls.ca_file))
    try:
        with httpx.Client(timeout=30.0) as http:
            codes = [
                http.post(f"{nginx.url}/v1/chat/completions", json=chat_body(),
                          headers={"authorization": f"Bearer {key}"}).status_code
                for _ in range(11)
            ]  # fmt: skip
        assert codes == [200] * 10 + [429]
        assert nginx.problems() == []
    finally:
        nginx.stop()


def test_rediss_without_the_ca_fails_closed_and_says_why(
    tmp_path: Path,
    export_dir: Path,
    upstream: tuple[FakeUpstream, ServerThread],
    redis_tls: RedisServer,
) -> None:
    with redis_tls.client() as db:
        key = KeyStore(db, KeySchema(PREFIX), SECRET).create("acme", "free")[0]
    system = "/etc/ssl/certs/ca-certificates.crt"  # does not hold the test CA
    nginx = start_nginx(tmp_path / "nginx", export_dir, upstream[1], redis_tls, system)
    try:
        with httpx.Client(timeout=30.0) as http:
            answer = http.post(f"{nginx.url}/v1/chat/completions", json=chat_body(),
                               headers={"authorization": f"Bearer {key}"})  # fmt: skip
        assert answer.status_code == 503
        log = nginx.log_tail(20000)
        assert "certificate verify error" in log  # nginx's own line
        assert "cannot reach Redis: TLS: " in log  # the module's, naming the directive
        assert "lua_ssl_trusted_certificate" in log
        assert "tls-pw" not in log
    finally:
        nginx.stop()
