"""Real OpenAI-compatible clients against `governor gateway` (a real Redis holding the
controller's limits, the fake model server): plans made for what each client must meet."""

from __future__ import annotations

import gc
import re
import shutil
import subprocess
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import httpx
import pytest
import redis

from controller.changes import diff
from controller.contract.keys import KeySchema
from controller.model import Address
from controller.sinks.redis import RedisSink
from tests.gateway.conftest import Gateway, start_gateway, write_limits
from tests.gateway.fake_upstream import FakeUpstream, ServerThread
from tests.support.redis import RedisServer


@pytest.fixture(autouse=True)
def _collect_clients() -> Iterator[None]:
    """Collect the clients a test left open while its own warning filters hold (these
    modules ignore ResourceWarning): collected later, a keep-alive socket's warning fails
    whichever test then runs on this worker."""
    yield
    gc.collect()


T = TypeVar("T")


def at_once(call: Callable[[], T], times: int = 8) -> list[T]:
    """`times` calls released together from as many threads: a burst past the plan's 4 per
    second on any machine (calls made one after another may each take longer than the
    250 ms the quota refills in on a loaded machine, and then none is refused). The first
    error is raised."""
    gate = threading.Barrier(times)

    def released() -> T:
        gate.wait()
        return call()

    with ThreadPoolExecutor(times) as pool:
        futures = [pool.submit(released) for _ in range(times)]
        return [future.result() for future in futures]


SAMPLE = re.compile(r"^gateway_requests_total\{(.*)\} (\S+)$", re.M)
LABEL = re.compile(r'(\w+)="([^"]*)"')
NODE_DIR = Path(__file__).parent / "node"
# free: a small model, 4 requests a second (a burst of 4, then one each 250 ms: a 429 that
# a client retries within the second), 1,000 tokens a day; metered: the same, but a spent
# budget is OpenAI's 429 insufficient_quota.
PLANS_YAML = """\
apiVersion: governor/v1
kind: Plan
metadata: {name: free}
spec:
  models: [gpt-3.5-turbo]
  limits: {requests_per_second: 4, tokens_per_day: 1000}
---
apiVersion: governor/v1
kind: Plan
metadata: {name: metered}
spec:
  limits: {requests_per_second: 4, tokens_per_day: 1000}
  quota_exhausted: insufficient_quota
---
apiVersion: governor/v1
kind: Limits
metadata: {name: global}
spec:
  default_plan: free
  global: {requests_per_second: 1000}
"""
# A spent day: what is left (< 6) cannot hold a short prompt and one token, yet the prompt
# fits the day's limit: 402 (or 429 insufficient_quota) until midnight, not 400.
SPENT_BUDGET = 40


@pytest.fixture(scope="session")
def client_policies(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("client-policies")
    (directory / "plans.yaml").write_text(PLANS_YAML)
    return directory


@pytest.fixture(scope="session")
def model_server() -> Iterator[tuple[FakeUpstream, str]]:
    fake = FakeUpstream()
    server = ServerThread(fake.app()).start()
    yield fake, server.url
    server.stop()


@dataclass
class World:
    """A gateway for the clients, its Redis, and ways to put tenants in a given state."""

    gateway: Gateway
    db: redis.Redis[str]

    @property
    def base_url(self) -> str:
        return f"{self.gateway.url}/v1"

    def key(self, tenant: str, plan: str = "free") -> str:
        return self.gateway.key(tenant, plan)

    def spent(self, tenant: str, plan: str = "free") -> str:
        """A key whose tenant has spent its day (a real request through the gateway)."""
        key = self.key(tenant, plan)
        sink = RedisSink(self.db, KeySchema("governor"))
        desired = dict(sink.read().actual)
        desired[Address.parse(f"tenant/{tenant}/tokens_per_day")] = float(SPENT_BUDGET)
        sink.apply(diff(desired, sink.read().actual))
        body = {"model": "gpt-3.5-turbo", "messages": [{"role": "user", "content": "hi"}],
                "max_tokens": 30}  # fmt: skip
        headers = {"authorization": f"Bearer {key}", "x-fake-tokens": "30"}
        answer = httpx.post(f"{self.base_url}/chat/completions", json=body, headers=headers)
        assert answer.status_code == 200, answer.text
        return key

    def outcomes(self, tenant: str, outcome: str) -> float:
        """How many requests of `tenant` the gateway answered with `outcome` (its metrics)."""
        total = 0.0
        for labels, value in SAMPLE.findall(self.gateway.metrics()):
            found = dict(LABEL.findall(labels))
            if found.get("tenant") == tenant and found.get("outcome") == outcome:
                total += float(value)
        return total


@pytest.fixture
def world(
    redis_server: RedisServer,
    db: redis.Redis[str],
    model_server: tuple[FakeUpstream, str],
    client_policies: Path,
) -> Iterator[World]:
    """A fresh gateway on the flushed session Redis with the clients' plans."""
    write_limits(db, "governor", client_policies)
    gateway = start_gateway(redis_server.url, model_server[1])
    try:
        yield World(gateway, db)
    finally:
        gateway.stop()


@pytest.fixture(scope="session")
def node_sdk() -> Path:
    """The OpenAI Node SDK installed from the committed package-lock.json (npm ci), once."""
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None or npm is None:
        pytest.fail("node and npm are needed for the OpenAI Node SDK test: install Node.js 20+")
    installed = NODE_DIR / "node_modules" / "openai" / "package.json"
    if not installed.exists():
        done = subprocess.run(
            [npm, "ci", "--no-audit", "--no-fund"],
            cwd=NODE_DIR,
            capture_output=True,
            text=True,
            timeout=600,
            check=False,
        )
        if done.returncode != 0:
            pytest.fail(f"npm ci in {NODE_DIR} failed: {done.stderr.strip()[-500:]}")
    return NODE_DIR
