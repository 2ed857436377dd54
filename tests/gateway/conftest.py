"""Fixtures for the gateway tests: one real redis-server per session, flushed per test."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Awaitable, Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest
import redis
import redis.asyncio
from pydantic import SecretStr

from controller.changes import diff
from controller.cli.gateway import fixed_plans
from controller.contract.catalog import PlanInfo
from controller.contract.keys import KeySchema
from controller.control.catalog import publish_catalog
from controller.gateway.admission import Admission
from controller.gateway.app import create_app
from controller.gateway.catalog import PlanCatalog
from controller.gateway.credits import CreditLedger
from controller.gateway.keys import KeyStore
from controller.gateway.prices import PriceTable
from controller.model import Address
from controller.policy.loader import load_directory
from controller.settings import GatewaySettings, PricesSettings, RedisSettings, Settings
from controller.sinks.redis import RedisSink
from tests.gateway.fake_upstream import FakeUpstream, ServerThread
from tests.support.redis import RedisServer

T = TypeVar("T")


# --- Admission harness (6A's; rebuilt by 6B after an edit of 6B's cut it off) -------------


def server_ms(client: redis.Redis[str]) -> float:
    """Redis server time in milliseconds (the clock the scripts use)."""
    seconds, micros = client.time()
    return float(seconds) * 1000.0 + float(micros) / 1000.0


@dataclass
class Gate:
    """Runs async admission code against the test Redis, one event loop per `run`."""

    url: str
    prefix: str = "governor"
    # The plans the requests name must be in the catalog: an unknown plan is refused.
    plans: Mapping[str, PlanInfo] = field(
        default_factory=lambda: {"free": PlanInfo(), "paid": PlanInfo()}
    )
    lease_seconds: float = 600.0

    def run(self, body: Callable[[Admission], Awaitable[T]]) -> T:
        async def main() -> T:
            client = redis.asyncio.Redis.from_url(self.url, decode_responses=True)
            try:
                catalog = PlanCatalog.fixed(client, self.prefix, self.plans)
                prices = PriceTable.from_settings(PricesSettings())
                admission = Admission(
                    client, self.prefix, prices, catalog, lease_seconds=self.lease_seconds
                )
                return await body(admission)
            finally:
                await client.aclose()  # type: ignore[attr-defined]

        return asyncio.run(main())


@pytest.fixture
def gate(db: redis.Redis[str], redis_server: RedisServer) -> Gate:
    """Admission on the flushed session Redis; set `plans` / `lease_seconds` before `run`."""
    return Gate(redis_server.url)


@pytest.fixture
def set_limits(db: redis.Redis[str]) -> Callable[[Mapping[str, float]], None]:
    """Make Redis hold exactly these limits (address text → value), as the controller does."""
    sink = RedisSink(db, KeySchema("governor"))

    def write(limits: Mapping[str, float]) -> None:
        desired = {Address.parse(text): float(value) for text, value in limits.items()}
        sink.apply(diff(desired, sink.read().actual))

    return write


# --- The reference gateway in front of a fake model server (6B) ---------------------------

PROBLEM = "application/problem+json"


def budget_remaining(answer: httpx.Response) -> int:
    """The `r` of the daily token budget in an answer's IETF RateLimit header."""
    found = re.search(r'tokens_per_day";r=(\d+)', answer.headers["ratelimit"])
    assert found, answer.headers["ratelimit"]
    return int(found.group(1))


PLANS_YAML = """\
apiVersion: governor/v1
kind: Plan
metadata: {name: free}
spec:
  models: [gpt-3.5-turbo]
  limits: {requests_per_minute: 10, tokens_per_day: 1000}
---
apiVersion: governor/v1
kind: Plan
metadata: {name: paid}
spec:
  models: [gpt-3.5-turbo, gpt-4]
  limits: {requests_per_minute: 600, tokens_per_day: 1000}
  degrade: {at_percent: 50, max_tokens: 8, model: gpt-3.5-turbo}
---
apiVersion: governor/v1
kind: Plan
metadata: {name: enterprise}
spec:
  limits: {requests_per_minute: 6, tokens_per_minute: 1000000}
  fail_mode: open
  credits: {min_balance_usd: 0}
---
apiVersion: governor/v1
kind: Plan
metadata: {name: metered}
spec:
  limits: {requests_per_minute: 600, tokens_per_day: 1000}
  quota_exhausted: insufficient_quota
---
apiVersion: governor/v1
kind: Limits
metadata: {name: global}
spec:
  default_plan: free
  global: {requests_per_second: 1000}
"""


@pytest.fixture(scope="session")
def policy_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Plans for the gateway tests: free (10/min, 1,000 tokens/day), paid (degrades at
    50 %), enterprise (fails open, charged in credits)."""
    directory = tmp_path_factory.mktemp("policies")
    (directory / "plans.yaml").write_text(PLANS_YAML)
    return directory


@pytest.fixture(scope="session")
def upstream() -> Iterator[tuple[FakeUpstream, str]]:
    fake = FakeUpstream()
    server = ServerThread(fake.app()).start()
    yield fake, server.url
    server.stop()


@pytest.fixture
def held(upstream: tuple[FakeUpstream, object]) -> Iterator[FakeUpstream]:
    """The fake model server holding its answers until the test sets `release`; set again
    afterwards, so no stream of it is left hanging."""
    upstream[0].release.clear()
    yield upstream[0]
    upstream[0].release.set()


def write_limits(client: redis.Redis[str], prefix: str, policy_dir: Path) -> None:
    """Limits and the plan catalog, written the way the controller writes them."""
    policies = load_directory(policy_dir)
    sink = RedisSink(client, KeySchema(prefix))
    sink.apply(diff(dict(policies.baseline_addresses()), sink.read().actual))
    publish_catalog(client, policies, prefix=prefix)


@dataclass
class Gateway:
    """`governor gateway`'s app on a free port, with a plain client for Redis."""

    url: str
    redis_url: str
    settings: Settings
    server: ServerThread
    http: httpx.Client

    def key(self, tenant: str, plan: str, user: str | None = None) -> str:
        with redis.Redis.from_url(self.redis_url, decode_responses=True) as client:
            secret = self.settings.gateway.api_key_secret
            store = KeyStore(
                client,
                KeySchema(self.settings.redis.key_prefix),
                secret.get_secret_value() if secret else None,
            )
            return store.create(tenant, plan, user)[0]

    def chat(
        self,
        key: str,
        model: str = "gpt-3.5-turbo",
        headers: dict[str, str] | None = None,
        **body: Any,
    ) -> httpx.Response:
        payload = {"model": model, "messages": [{"role": "user", "content": "hi"}], **body}
        payload.setdefault("max_tokens", 5)  # the default (1024) is above the free budget
        sent = {"authorization": f"Bearer {key}", **(headers or {})}
        return self.http.post(f"{self.url}/v1/chat/completions", json=payload, headers=sent)

    def metrics(self) -> str:
        return self.http.get(f"{self.url}/metrics").text

    def stop(self) -> None:
        self.http.close()
        self.server.stop()


@contextmanager
def gateway_on_own_redis(
    directory: Path, upstream_url: str, policies: Path, globex_usd: float = 0.0, **gateway: Any
) -> Iterator[tuple[RedisServer, Gateway]]:
    """A gateway on a Redis of its own holding the plans' limits (and `globex_usd` of credits
    for globex), for a test that stops that Redis; both stopped at the end."""
    server = RedisServer(directory).start()
    started = None
    try:
        with server.client() as client:
            write_limits(client, "governor", policies)
            if globex_usd:
                CreditLedger(client, "governor").top_up("globex", globex_usd, reason="test",
                                                        actor="pytest")  # fmt: skip
        started = start_gateway(server.url, upstream_url, **gateway)
        yield server, started
    finally:
        if started is not None:
            started.stop()
        server.stop()


def start_gateway(
    redis_url: str,
    upstream_url: str,
    policies: Path | None = None,
    redis_options: Mapping[str, Any] | None = None,
    **gateway: Any,
) -> Gateway:
    """`redis_options`: RedisSettings fields besides the URL (socket timeout 1 s unless set)."""
    options = {"socket_timeout_seconds": 1.0, **(redis_options or {})}
    settings = Settings(
        redis=RedisSettings(url=SecretStr(redis_url), **options),
        gateway=GatewaySettings(**{"api_key_secret": SecretStr("test-secret"), **gateway}),
    )
    plans = None if policies is None else fixed_plans(policies)
    server = ServerThread(create_app(settings, upstream_url, plans)).start()
    # These tests read problem documents; the default (OpenAI's envelope) has its own tests.
    http = httpx.Client(timeout=30.0, headers={"accept": PROBLEM})
    return Gateway(server.url, redis_url, settings, server, http)


MakeGateway = Callable[..., Gateway]


@pytest.fixture
def make_gateway(
    db: redis.Redis[str],
    redis_server: RedisServer,
    upstream: tuple[FakeUpstream, str],
    policy_dir: Path,
) -> Iterator[MakeGateway]:
    """Start gateways on the session Redis (flushed, limits from `policy_dir` written) with
    the given gateway settings; `upstream_url` overrides the fake. Stopped after the test."""
    write_limits(db, "governor", policy_dir)
    started: list[Gateway] = []

    def make(upstream_url: str | None = None, **gateway: Any) -> Gateway:
        started.append(start_gateway(redis_server.url, upstream_url or upstream[1], **gateway))
        return started[-1]

    yield make
    for each in started:
        each.stop()


@pytest.fixture
def gateway(make_gateway: MakeGateway) -> Gateway:
    """A gateway with default settings in front of the fake model server."""
    return make_gateway()
