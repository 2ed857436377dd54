"""Redis over TLS (rediss://) with a password, as managed Redis services run it: a real
redis-server serving TLS only, with a certificate from a test CA. The controller's sink, the
CLI and the gateway's client connect with GOVERNOR_REDIS__CA_FILE; without the CA every one
of them refuses, naming the setting that fixes it."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator

import pytest
from typer.testing import CliRunner

from controller.changes import diff
from controller.cli import app
from controller.clients.redis import connect_async
from controller.errors import SinkError
from controller.model import Address
from controller.settings import RedisSettings
from controller.sinks.redis import RedisSink
from tests.cluster.test_gateway_store_errors import serve_and_ask
from tests.support.redis import RedisServer
from tests.support.tls import TlsFiles, make_tls_files

LIMIT = Address.parse("plan/free/requests_per_minute")


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> TlsFiles:
    return make_tls_files(tmp_path_factory.mktemp("tls"))


@pytest.fixture(scope="module")
def secured(tmp_path_factory: pytest.TempPathFactory, tls: TlsFiles) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("redis-tls"), password="s3cret-pw", tls=tls)
    server.start()
    yield server
    server.stop()


def test_the_sink_writes_and_reads_limits_over_tls(secured: RedisServer, tls: TlsFiles) -> None:
    assert secured.url.startswith("rediss://")
    sink = RedisSink.from_url(secured.url, RedisSettings(ca_file=tls.ca_file))
    sink.apply(diff({LIMIT: 10.0}, sink.read().actual))
    assert sink.read().actual == {LIMIT: 10.0}


def test_the_cli_reads_over_tls_with_the_ca_file(secured: RedisServer, tls: TlsFiles) -> None:
    # Written here, not left by the test above: pytest-xdist may run them on two workers,
    # each with a Redis of its own.
    sink = RedisSink.from_url(secured.url, RedisSettings(ca_file=tls.ca_file))
    sink.apply(diff({LIMIT: 10.0}, sink.read().actual))
    env = {"GOVERNOR_REDIS__URL": secured.url, "GOVERNOR_REDIS__CA_FILE": str(tls.ca_file)}
    result = CliRunner().invoke(app, ["limits", "get", "--json"], env=env)
    assert result.exit_code == 0, result.output
    assert str(LIMIT) in json.loads(result.stdout)["limits"]


def test_the_gateway_client_talks_tls_too(secured: RedisServer, tls: TlsFiles) -> None:
    async def script_answer(settings: RedisSettings) -> object:
        client = connect_async(secured.url, settings)
        try:
            return await client.eval("return 'over tls'", 0)  # type: ignore[no-untyped-call]
        finally:
            await client.aclose()  # type: ignore[attr-defined]

    assert asyncio.run(script_answer(RedisSettings(ca_file=tls.ca_file))) == "over tls"


def test_without_the_ca_the_sink_refuses_naming_the_setting(secured: RedisServer) -> None:
    sink = RedisSink.from_url(secured.url, RedisSettings(retries=0))  # system CAs only
    with pytest.raises(SinkError, match="GOVERNOR_REDIS__CA_FILE") as refused:
        sink.read()
    assert "certificate verify failed" in str(refused.value)
    assert "s3cret-pw" not in str(refused.value)


def test_without_the_ca_the_cli_exits_1_naming_the_setting(secured: RedisServer) -> None:
    result = CliRunner().invoke(app, ["limits", "get"], env={"GOVERNOR_REDIS__URL": secured.url})
    assert result.exit_code == 1
    assert "GOVERNOR_REDIS__CA_FILE" in result.stderr
    assert "s3cret-pw" not in result.output


def test_without_the_ca_the_gateway_fails_closed_and_logs_the_setting(
    secured: RedisServer,
) -> None:
    status, lines = serve_and_ask(secured.url, "gov_0123456789abcdef_" + "a" * 43)
    assert status == 503  # nothing can vouch for the key: closed, whatever the plan
    event = "limit store unreachable during authentication"
    refused = [x for x in lines if x.get("event") == event]
    assert refused
    assert "certificate verify failed" in refused[0]["error"]
    assert "GOVERNOR_REDIS__CA_FILE" in refused[0]["error"]  # as the controller and nginx say
    beats = [x for x in lines if x.get("event", "").startswith("heartbeat failed")]
    assert all("GOVERNOR_REDIS__CA_FILE" in x["error"] for x in beats)
    assert not any("s3cret-pw" in json.dumps(x) for x in lines)
