"""Redis and Prometheus URLs are judged when the settings are read: a URL that redis-py
would quietly read as localhost:6379, or a Prometheus URL without a scheme, is refused at
start naming the variable; every supported scheme still passes."""

from __future__ import annotations

import os

import pytest
from pydantic import SecretStr
from typer.testing import CliRunner

from controller.cli import app
from controller.logging import MASK
from controller.settings import ControllerSettings, PrometheusSettings, RedisSettings


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("GOVERNOR_"):
            monkeypatch.delenv(name)


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("redis://127.0.0.1:6379/abc", "database 'abc' is not a number"),
        ("redis://", "names no host"),
        ("rediss://:6380/0", "names no host"),
        ("redis://127.0.0.1:port/0", "the port is not a number"),
        # These two said "the port is not a number" of a URL whose port was 6379 or 99999.
        ("redis://:a/b@127.0.0.1:6379/0", "the password holds '/', '?' or '#' unencoded"),
        ("redis://127.0.0.1:99999/0", "the port 99999 is out of range (1-65535)"),
        ("redis://u:123/x@h:6379/0", "percent-encode them"),  # not "database 'x@h:6379/0'"
    ],
)
def test_a_malformed_redis_url_is_refused_at_start(url: str, message: str) -> None:
    result = CliRunner().invoke(app, ["config", "show"], env={"GOVERNOR_REDIS__URL": url})
    assert result.exit_code == 2
    assert result.stderr.startswith("error: GOVERNOR_REDIS__URL: ")
    assert message in result.stderr
    assert "redis://127.0.0.1:6379/0" in result.stderr  # an example of a right one


def test_the_password_of_a_refused_url_is_masked() -> None:
    result = CliRunner().invoke(
        app, ["config", "show"], env={"GOVERNOR_REDIS__URL": "redis://u:hunter2@h:6379/x"}
    )
    assert result.exit_code == 2
    assert "hunter2" not in result.output
    assert "database 'x'" in result.output


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("redis//:s3cret-PW@127.0.0.1:6379/3", f"redis//:{MASK}@127.0.0.1:6379/3"),  # no ':'
        ("redis:s3cret-PW@127.0.0.1:6379/3", f"redis:{MASK}@127.0.0.1:6379/3"),  # no '//'
        ("redis://:s3cret/PW@127.0.0.1:6379/3", f"redis://:{MASK}@127.0.0.1:6379/3"),  # base64
        ("redis://u:s3cret?PW@127.0.0.1:6379/3", f"redis://u:{MASK}@127.0.0.1:6379/3"),
    ],
)
def test_the_password_of_a_mistyped_url_is_masked(url: str, shown: str) -> None:
    for command in (["config", "show"], ["override", "list"]):
        result = CliRunner().invoke(app, command, env={"GOVERNOR_REDIS__URL": url})
        assert "s3cret" not in result.output, (command, result.output)
        assert shown in result.output, (command, result.output)
    assert result.exit_code == 2, result.output  # `override list` refuses it, naming it


def test_a_unix_socket_url_with_a_cut_password_is_refused_masked() -> None:
    # redis-py read ':s3cret' as the password and '/PW@/tmp/x.sock' as the socket path: the
    # connection error then named a piece of the password.
    url = "unix://:s3cret/PW@/tmp/x.sock?db=0"
    result = CliRunner().invoke(app, ["config", "show"], env={"GOVERNOR_REDIS__URL": url})
    assert result.exit_code == 2
    assert "s3cret" not in result.output
    assert "PW" not in result.output
    assert "percent-encode them" in result.stderr
    assert f"unix://:{MASK}@/tmp/x.sock?db=0" in result.stderr
    assert RedisSettings(url=SecretStr("unix://:s3cret%2FPW@/tmp/x.sock")).url is not None


@pytest.mark.parametrize(
    "url",
    [
        "redis://127.0.0.1:6379/0",
        "redis://h",
        "redis://:pw@h:6379/",
        "rediss://user:pw@h:6380/15",
        "unix:///var/run/redis.sock?db=2",
        "redis+sentinel://s1:26379,s2:26379/mymaster/0",
        "rediss+sentinel://:pw@s1/mymaster",
    ],
)
def test_every_supported_redis_url_still_passes(url: str) -> None:
    assert RedisSettings(url=SecretStr(url)).url is not None
    assert ControllerSettings(sinks=["redis", url]).sinks == ["redis", url]


def test_a_malformed_sink_url_is_refused() -> None:
    result = CliRunner().invoke(
        app, ["config", "show"], env={"GOVERNOR_CONTROLLER__SINKS": "redis,redis:///abc"}
    )
    assert result.exit_code == 2
    assert "GOVERNOR_CONTROLLER__SINKS" in result.stderr
    assert "names no host" in result.stderr


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("prometheus:9090", "needs an http:// or https:// scheme"),
        ("127.0.0.1:9090", "needs an http:// or https:// scheme"),
        ("ftp://prometheus:9090", "needs an http:// or https:// scheme"),
        ("http://", "names no host"),
    ],
)
def test_a_prometheus_url_without_scheme_or_host_is_refused_at_start(
    url: str, message: str
) -> None:
    result = CliRunner().invoke(app, ["config", "show"], env={"GOVERNOR_PROMETHEUS__URL": url})
    assert result.exit_code == 2
    assert result.stderr.startswith("error: GOVERNOR_PROMETHEUS__URL: ")
    assert message in result.stderr


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("http://prom.example:9090/?access_token=S3CRET", "http://prom.example:9090/"),
        ("https://u:S3CRET@prom.example/sub?token=S3CRET", "https://u:**********@prom.example/sub"),
        ("http://prom.example:9090#S3CRET", "http://prom.example:9090"),
        ("http://prom.example:port/?token=S3CRET", "http://prom.example:port/"),  # port too
    ],
)
def test_a_prometheus_url_with_a_query_is_refused_without_showing_it(url: str, shown: str) -> None:
    # The client appends /api/v1/query after the query (`/?token=T/api/v1/query&query=…`):
    # no query ever reached Prometheus, and the token was in the start-up log line, every
    # failed query's message, `governor signals` and `governor config show`.
    for command in (["config", "show"], ["backtest", "--from", "0", "--to", "60"]):
        env = {"GOVERNOR_PROMETHEUS__URL": url}
        result = CliRunner().invoke(app, command, env=env)
        assert result.exit_code == 2, result.output
        assert result.stderr.startswith("error: GOVERNOR_PROMETHEUS__URL: ")
        assert f"Prometheus URL {shown!r} is followed by a query or fragment (not shown)" in (
            result.stderr
        )
        assert "GOVERNOR_PROMETHEUS__BEARER_TOKEN or GOVERNOR_PROMETHEUS__HEADERS" in result.stderr
        assert "S3CRET" not in result.output


@pytest.mark.parametrize("url", ["http://127.0.0.1:9090", "https://u:pw@prom.example/sub/"])
def test_http_and_https_prometheus_urls_pass(url: str) -> None:
    assert PrometheusSettings(url=url).url == url
