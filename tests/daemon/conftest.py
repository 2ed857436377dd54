"""Fixtures of the end-to-end tests: a redis-server per test, one exporter and one Prometheus
scraping it every second for the session, a per-test series, and daemon processes that are
killed by PID if a test leaves them running."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from tests.daemon.harness import (
    FREE_RPM,
    Daemon,
    DaemonFactory,
    Gpu,
    daemon_env,
    limit,
    scraping,
    write_policies,
)
from tests.support.prometheus import Exporter, PrometheusServer, wait_for
from tests.support.redis import RedisServer


@pytest.fixture(scope="session")
def exporter() -> Iterator[Exporter]:
    server = Exporter().start()
    server.set("exporter_up", 1.0)
    yield server
    server.stop()


@pytest.fixture(scope="session")
def prometheus(
    tmp_path_factory: pytest.TempPathFactory, exporter: Exporter
) -> Iterator[PrometheusServer]:
    """Shared by the tests that do not kill it; each test reads its own series."""
    server = scraping(tmp_path_factory.mktemp("prometheus"), exporter)
    yield server
    server.stop()


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path / "redis").start()
    yield server
    server.stop()


@pytest.fixture
def db(redis_server: RedisServer) -> Iterator[redis.Redis[str]]:
    with redis_server.client() as client:
        yield client


@pytest.fixture
def gpu(exporter: Exporter, request: pytest.FixtureRequest) -> Gpu:
    """This test's own series (the test's name as the `case` label), idle at 0.5."""
    case = re.sub(r"[^A-Za-z0-9_]", "_", request.node.name)
    series = Gpu(exporter, case)
    series.set(0.5)
    return series


@pytest.fixture
def policy_dir(tmp_path: Path, gpu: Gpu) -> Path:
    return write_policies(tmp_path / "policies", gpu.case)


@pytest.fixture
def daemons(tmp_path: Path) -> Iterator[DaemonFactory]:
    """`daemons(name, env, *args)` starts `governor run` as a subprocess; teardown kills
    whatever is still running."""
    started: list[Daemon] = []

    def start(name: str, env: dict[str, str], *args: str) -> Daemon:
        daemon = Daemon(tmp_path / f"daemon-{name}", env, args).start()
        started.append(daemon)
        return daemon

    yield start
    for daemon in started:
        daemon.stop()


@pytest.fixture
def env(
    redis_server: RedisServer, prometheus: PrometheusServer, policy_dir: Path
) -> dict[str, str]:
    """The environment of a daemon on this test's Redis, the shared Prometheus, its policies."""
    return daemon_env(redis_server.url, prometheus.url, policy_dir)


@pytest.fixture
def ready_env(env: dict[str, str], prometheus: PrometheusServer, gpu: Gpu) -> dict[str, str]:
    """`env`, once Prometheus holds this test's GPU series (idle, 0.5): signals valid at once."""
    gpu.scraped(prometheus, 0.5)
    return env


@pytest.fixture
def daemon(db: redis.Redis[str], ready_env: dict[str, str], daemons: DaemonFactory) -> Daemon:
    """One daemon, started, its baseline written and /readyz green."""
    started = daemons("a", ready_env)
    wait_for(lambda: limit(db) == FREE_RPM, "the baseline is written")
    started.wait_for_metric("governor_ready", 1.0)
    return started
