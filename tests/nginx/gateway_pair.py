"""nginx and `governor gateway` started side by side, each on a new Redis of its own prepared
the same way, torn down together (nginx's error log checked for problems at the end)."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import redis

from tests.gateway.conftest import PROBLEM, Gateway, start_gateway
from tests.gateway.fake_upstream import FakeUpstream, ServerThread
from tests.nginx.conftest import SECRET, Side
from tests.nginx.nginx_server import NginxServer
from tests.support.redis import RedisServer


@dataclass
class PairOptions:
    """What differs between the pairs a test starts: how each Redis is prepared before the
    gateways start, nginx's extra environment and init options, the Python gateway's."""

    prepare: Callable[[redis.Redis[str]], None] | None = None
    nginx_env: Mapping[str, str] = field(default_factory=dict)
    init_options: str = ""
    redis_options: Mapping[str, Any] | None = None
    timeout: float = 5.0  # the test's own HTTP client
    gateway: Mapping[str, Any] = field(default_factory=dict)  # GatewaySettings fields (Python)
    read_timeout: str | None = None  # nginx's proxy_read_timeout (None: the shipped 600s)


@dataclass
class Pair:
    """nginx and `governor gateway`, each on a Redis of its own."""

    nginx: Side
    python: Side
    server: NginxServer
    gateway: Gateway

    @property
    def sides(self) -> tuple[Side, Side]:
        return (self.python, self.nginx)


@contextmanager
def gateway_pair(
    root: Path, export_dir: Path, upstream: tuple[FakeUpstream, ServerThread],
    options: PairOptions,
) -> Iterator[Pair]:  # fmt: skip
    """A new nginx and a new Python gateway under `root`, each on a new Redis prepared by
    `options.prepare` before it starts."""
    stores = [RedisServer(root / name).start() for name in ("redis-nginx", "redis-python")]
    started: list[NginxServer] = []
    try:
        for store in stores:
            if options.prepare is not None:
                with store.client() as db:
                    options.prepare(db)
        env = {"PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"),
               "GOVERNOR_REDIS__URL": stores[0].url,
               "GOVERNOR_GATEWAY__API_KEY_SECRET": SECRET, **options.nginx_env}  # fmt: skip
        nginx = NginxServer(root / "nginx", export_dir, upstream[1].port, env,
                            init_options=options.init_options,
                            read_timeout=options.read_timeout)  # fmt: skip
        started.append(nginx.start())
        python = start_gateway(stores[1].url, upstream[1].url, retry_after_jitter=0.0,
                               redis_options=options.redis_options,
                               **options.gateway)  # fmt: skip
        with (
            stores[0].client() as ndb,
            stores[1].client() as pdb,
            httpx.Client(timeout=options.timeout, headers={"accept": PROBLEM}) as http,
        ):
            try:
                sides = (
                    Side("nginx", nginx.url, ndb, http),
                    Side("python", python.url, pdb, python.http),
                )
                yield Pair(*sides, nginx, python)
            finally:
                python.stop()
        assert nginx.problems() == []
    finally:
        for server in started:
            server.stop()
        for store in stores:
            store.stop()
