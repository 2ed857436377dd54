"""Behind a trusted proxy (GOVERNOR_GATEWAY__TRUST_FORWARDED_FOR), the ip level counts the
address the proxy appended to X-Forwarded-For, never one the client wrote before it, and an
X-Forwarded-For that ends in no address is refused 400, not served without an ip level
(nginx did) nor answered 500 (the Python gateway did): real nginx, real `governor gateway`,
each on its own Redis."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.gateway.conftest import start_gateway, write_limits
from tests.gateway.fake_upstream import FakeUpstream, ServerThread
from tests.nginx.conftest import PREFIX, SECRET, Side, chat_body, set_limit
from tests.nginx.nginx_server import NginxServer
from tests.support.redis import RedisServer

pytestmark = pytest.mark.integration

PROXY_SAW = "203.0.113.9"  # the address the trusted proxy appends, last
REFUSAL = (
    "X-Forwarded-For must end in the client's IPv4 or IPv6 address, as the proxy in front "
    "of the gateway appends it; its last entry is not one"
)


@pytest.fixture
def sides(
    tmp_path: Path,
    export_dir: Path,
    upstream: tuple[FakeUpstream, ServerThread],
    redis_nginx: RedisServer,
    redis_python: RedisServer,
    policy_dir: Path,
) -> Iterator[list[Side]]:
    """Both gateways trusting X-Forwarded-For, each on a flushed Redis where one client
    address may send 2 requests a minute."""
    env = {
        "PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"),
        "GOVERNOR_REDIS__URL": redis_nginx.url,
        "GOVERNOR_GATEWAY__API_KEY_SECRET": SECRET,
    }
    nginx = NginxServer(tmp_path / "nginx", export_dir, upstream[1].port, env,
                        init_options="trust_forwarded_for = true").start()  # fmt: skip
    python = start_gateway(
        redis_python.url, upstream[1].url, retry_after_jitter=0.0, trust_forwarded_for=True
    )
    accept = {"accept": "application/problem+json"}
    try:
        with (
            redis_python.client() as python_db,
            redis_nginx.client() as nginx_db,
            httpx.Client(timeout=30.0, headers=accept) as http,
        ):
            found = [
                Side("python", python.url, python_db, http),
                Side("nginx", nginx.url, nginx_db, http),
            ]
            for side in found:
                side.db.flushall()
                write_limits(side.db, PREFIX, policy_dir)
                set_limit(side, "ip/requests_per_minute", 2)
            yield found
        assert nginx.problems() == []
    finally:
        python.stop()
        nginx.stop()


def _send(side: Side, key: str, *forwarded: str) -> httpx.Response:
    headers = [("authorization", f"Bearer {key}"), *(("x-forwarded-for", f) for f in forwarded)]
    return side.http.post(f"{side.url}/v1/chat/completions", json=chat_body(), headers=headers)


def test_addresses_the_client_writes_before_the_proxys_count_nothing(sides: list[Side]) -> None:
    for side in sides:
        key = side.key("acme", "paid")
        for _ in range(2):
            assert _send(side, key, PROXY_SAW).status_code == 200, side.name
        # The same client, claiming other addresses in front of the one the proxy appended:
        # in one line, and in a line of its own before the proxy's.
        for claimed in (
            f"198.51.100.1, {PROXY_SAW}",
            f"198.51.100.2,{PROXY_SAW}",
            f"198.51.100.4, {PROXY_SAW}:4711",  # a proxy that appends the port too
        ):
            answer = _send(side, key, claimed)
            assert answer.status_code == 429, (side.name, claimed, answer.text)
            assert "ip/requests_per_minute" in answer.json()["detail"], side.name
        answer = _send(side, key, "198.51.100.3", PROXY_SAW)
        assert answer.status_code == 429, (side.name, answer.text)
        assert not side.db.keys(f"{PREFIX}:enforce:ip:198.51.100.*"), side.name


@pytest.mark.parametrize("forwarded", ["garbage", f"{PROXY_SAW}, garbage", f"{PROXY_SAW},", ","])
def test_an_x_forwarded_for_ending_in_no_address_is_a_bad_request(
    sides: list[Side], upstream: tuple[FakeUpstream, ServerThread], forwarded: str
) -> None:
    fake = upstream[0]
    for side in sides:
        key = side.key("acme", "paid")
        seen = len(fake.seen)
        for _ in range(3):  # past the 2 a minute: each is refused, none served without the ip level
            answer = _send(side, key, forwarded)
            assert answer.status_code == 400, (side.name, answer.status_code, answer.text[:300])
            assert answer.headers["content-type"] == "application/problem+json", side.name
            assert answer.json()["detail"] == REFUSAL, side.name
        assert len(fake.seen) == seen, f"{side.name} sent it on to the model server"


def test_an_ipv6_client_counts_by_its_64_with_or_without_a_port(sides: list[Side]) -> None:
    for side in sides:
        key = side.key("acme", "paid")
        for forwarded in ("[2001:db8:0:1::5]:443", "2001:db8:0:1::6"):
            assert _send(side, key, forwarded).status_code == 200, side.name
        answer = _send(side, key, "198.51.100.1, [2001:db8:0:1::7]")
        assert answer.status_code == 429, (side.name, answer.text[:300])
        assert side.db.keys(f"{PREFIX}:enforce:ip:2001%3A0db8%3A0000%3A0001%3A%3A"), side.name
