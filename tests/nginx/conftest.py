"""Fixtures for the nginx tests: a real nginx running deploy/nginx/ against a real Redis and the
fake model server, and `governor gateway`'s app on a second Redis to compare answers with."""

from __future__ import annotations

import itertools
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from typer.testing import CliRunner

from controller.changes import diff
from controller.cli import app
from controller.contract.keys import KeySchema
from controller.gateway.keys import KeyStore
from controller.model import Address
from controller.sinks.redis import RedisSink
from tests.gateway.conftest import PLANS_YAML, Gateway, start_gateway, write_limits
from tests.gateway.conftest import held as held  # the fixture, for nginx's tests too
from tests.gateway.fake_upstream import FakeUpstream, ServerThread
from tests.nginx.nginx_server import NginxServer
from tests.support.redis import RedisServer

SECRET = "test-secret"  # the API key secret of both gateways (start_gateway's)
PREFIX = "governor"
UNKNOWN_KEY = "gov_0123456789abcdef_" + "x" * 43  # shaped like a key, stored nowhere
_SETTLE_TIMEOUT_SECONDS = 10.0
_VERSION_EPOCHS = itertools.count(1)

# Test-only locations: the module's key names, client ids and request estimates, computed by
# the real Lua code inside the running nginx, for comparison with Python's.
PROBES = """
location = /_probe/keys {
    content_by_lua_block {
        local cjson = require 'cjson.safe'
        local keys = require 'governor.keys'
        local args = ngx.req.get_uri_args()
        local names = keys.new(args.prefix)
        local ip = keys.ip_id(args.ip) or ''
        ngx.say(cjson.encode({ip = ip,
            admit = names:admit_keys(args.tenant, args.user or '', ip),
            settle = names:settle_keys(args.tenant, args.user or '', ip),
            response = names:response(args.tenant, args.response or '') or cjson.null,
            conversation = names:conversation(args.tenant, args.response or '') or cjson.null,
            background = names:background(args.tenant, args.response or '') or cjson.null,
            charge = names:charge_keys(args.tenant, args.user or '', ip, 'r1.background')}))
    }
}
location = /_probe/final_usage {
    content_by_lua_block {
        local cjson = require 'cjson.safe'
        local conversations = require 'governor.conversations'
        ngx.req.read_body()
        local record = ngx.req.get_uri_args().record
        local charged = record and conversations.background_charge(record)
        local done, used = conversations.finished(ngx.req.get_body_data() or '', ngx.var.arg_id,
            charged)
        ngx.say(cjson.encode({finished = done, usage = used or cjson.null,
            running = conversations.running(ngx.req.get_body_data() or '', ngx.var.arg_id),
            charged = charged and conversations.background_record(charged) or cjson.null}))
    }
}
location = /_probe/request {
    content_by_lua_block {
        local cjson = require 'cjson.safe'
        local openai = require 'governor.openai'
        ngx.req.read_body()
        local request, problem = openai.parse(ngx.var.arg_kind, ngx.req.get_body_data() or '',
            tonumber(ngx.var.arg_default))
        if not request then
            ngx.say(cjson.encode({error = problem}))
            return
        end
        if request:streaming() then
            request:ask_for_stream_usage()
        end
        ngx.say(cjson.encode({tokens = request:worst_case_tokens(),
            prompt = request.prompt_tokens, body = request.raw,
            previous = request:previous_response_id() or cjson.null,
            conversation = request:conversation_id() or cjson.null,
            stored = request:stored()}))
    }
}
location = /_probe/conversation {
    content_by_lua_block {
        local cjson = require 'cjson.safe'
        local conversations = require 'governor.conversations'
        ngx.req.read_body()
        local args = ngx.req.get_uri_args()
        local call = conversations.route(args.method, args.path)
        local tokens, problem = conversations.added_tokens(ngx.req.get_body_data() or '')
        ngx.say(cjson.encode({route = call or cjson.null, tokens = tokens or cjson.null,
            problem = problem or cjson.null}))
    }
}
location = /_probe/limits {
    content_by_lua_block {
        local cjson = require 'cjson.safe'
        local limits = require 'governor.limits'
        ngx.req.read_body()
        local asked = cjson.decode(ngx.req.get_body_data())
        local found = limits.resolve(asked.version, asked.levels, asked.plan_owner, asked.model)
        ngx.say(cjson.encode({letters = found.letters, limits = found.limits,
            shed = found.shed or cjson.null}))
    }
}
location = /_probe/meter {
    content_by_lua_block {
        local cjson = require 'cjson.safe'
        local openai = require 'governor.openai'
        ngx.req.read_body()
        local answer, size = ngx.req.get_body_data() or '', tonumber(ngx.var.arg_size)
        local meter = openai.meter(ngx.var.arg_streaming == '1', 99, tonumber(ngx.var.arg_ceiling),
            ngx.var.arg_background == '1')
        for i = 1, #answer, size do
            meter:feed(answer:sub(i, i + size - 1))
        end
        local usage = meter:finish()
        ngx.say(cjson.encode({prompt = usage.prompt, completion = usage.completion,
            response_id = meter.response_id or cjson.null,
            conversation_id = meter.conversation_id or cjson.null}))
    }
}
location = /_probe/config {
    content_by_lua_block {
        local cjson = require 'cjson.safe'
        local config = require 'governor.config'
        local settings = config.load({export_dir = ngx.req.get_uri_args().export_dir,
            redis = {host = '127.0.0.1', port = 6379}})
        ngx.say(cjson.encode({retries = settings.redis.retries,
            retry_backoff_seconds = settings.redis.retry_backoff_seconds,
            timeout_ms = settings.redis.timeout_ms}))
    }
}
location = /_probe/waits {
    content_by_lua_block {
        local cjson = require 'cjson.safe'
        local gateway = require 'governor.gateway'
        local args = ngx.req.get_uri_args()
        local pauses = gateway.pauses(tonumber(args.seconds))
        -- (an empty table is encoded as an object: none is left out)
        ngx.say(cjson.encode({pauses = #pauses > 0 and pauses or nil,
            share = gateway.tenant_share(tonumber(args.waiters))}))
    }
}
location = /_probe/strip {
    content_by_lua_block {
        local openai = require 'governor.openai'
        ngx.req.read_body()
        local stream, size = ngx.req.get_body_data() or '', tonumber(ngx.var.arg_size)
        local strip, passed = openai.usage_filter(), {}
        for i = 1, #stream, size do
            passed[#passed + 1] = strip:feed(stream:sub(i, i + size - 1), i + size > #stream)
        end
        ngx.print(table.concat(passed))
    }
}
"""


@pytest.fixture(scope="session")
def redis_nginx(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("redis-nginx")).start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def redis_python(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("redis-python")).start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def upstream() -> Iterator[tuple[FakeUpstream, ServerThread]]:
    fake = FakeUpstream()
    server = ServerThread(fake.app()).start()
    yield fake, server
    server.stop()


@pytest.fixture(scope="session")
def policy_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The gateway tests' plans: free (10/min, 1,000 tokens/day, gpt-3.5-turbo), paid
    (degrades at 50 %), enterprise (credits)."""
    directory = tmp_path_factory.mktemp("policies")
    (directory / "plans.yaml").write_text(PLANS_YAML)
    return directory


@pytest.fixture(scope="session")
def export_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`governor gateway export-lua DIR`, with Retry-After jitter off so answers compare."""
    directory = tmp_path_factory.mktemp("export") / "scripts"
    env = {"GOVERNOR_GATEWAY__RETRY_AFTER_JITTER": "0"}
    result = CliRunner().invoke(app, ["gateway", "export-lua", str(directory)], env=env)
    assert result.exit_code == 0, result.output
    return directory


@pytest.fixture(scope="session")
def nginx_session(
    tmp_path_factory: pytest.TempPathFactory,
    redis_nginx: RedisServer,
    upstream: tuple[FakeUpstream, ServerThread],
    export_dir: Path,
) -> Iterator[NginxServer]:
    env = {
        "PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"),
        "GOVERNOR_REDIS__URL": redis_nginx.url,
        "GOVERNOR_GATEWAY__API_KEY_SECRET": SECRET,
    }
    server = NginxServer(
        tmp_path_factory.mktemp("nginx"), export_dir, upstream[1].port, env, PROBES
    ).start()
    yield server
    server.stop()


@dataclass
class Side:
    """One gateway under test and the Redis behind it."""

    name: str
    url: str
    db: redis.Redis[str]
    http: httpx.Client

    def key(self, tenant: str, plan: str, user: str | None = None) -> str:
        return KeyStore(self.db, KeySchema(PREFIX), SECRET).create(tenant, plan, user)[0]

    def chat(self, key: str | None, body: Any = None, **headers: str) -> httpx.Response:
        """POST /v1/chat/completions; `body` defaults to one short message, max_tokens 5."""
        if body is None:
            body = chat_body()
        sent = dict(headers)
        if key is not None:
            sent["authorization"] = f"Bearer {key}"
        content = body if isinstance(body, bytes) else None
        payload = None if isinstance(body, bytes) else body
        return self.http.post(
            f"{self.url}/v1/chat/completions", json=payload, content=content, headers=sent
        )


def chat_body(model: str = "gpt-3.5-turbo", max_tokens: int = 5, **extra: Any) -> dict[str, Any]:
    return {
        "model": model,
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": max_tokens,
        **extra,
    }


@pytest.fixture
def nginx(nginx_session: NginxServer, redis_nginx: RedisServer, policy_dir: Path) -> Iterator[Side]:
    """The nginx side on a flushed Redis holding the plans' limits and catalog; fails the
    test if the module logged a Lua error meanwhile."""
    # These tests read problem documents; the default (OpenAI's envelope) has its own tests.
    accept = {"accept": "application/problem+json"}
    with redis_nginx.client() as db, httpx.Client(timeout=30.0, headers=accept) as http:
        db.flushall()
        write_limits(db, PREFIX, policy_dir)
        # The workers keep limits by version across tests: a flushed Redis must not count
        # its versions again from 1 under other limits (a real one never restarts from 1
        # unseen by a working gateway).
        db.incrby(f"{PREFIX}:version", next(_VERSION_EPOCHS) * 1_000_000)
        before = len(nginx_session.problems())
        yield Side("nginx", nginx_session.url, db, http)
        assert nginx_session.problems()[before:] == []


@pytest.fixture
def python_gateway(
    redis_python: RedisServer, upstream: tuple[FakeUpstream, ServerThread], policy_dir: Path
) -> Iterator[Side]:
    """`governor gateway`'s app (no jitter) on its own flushed Redis with the same plans."""
    with redis_python.client() as db:
        db.flushall()
        write_limits(db, PREFIX, policy_dir)
        gateway: Gateway = start_gateway(redis_python.url, upstream[1].url, retry_after_jitter=0.0)
        try:
            yield Side("python", gateway.url, db, gateway.http)
        finally:
            gateway.stop()


def set_limit(side: Side, address: str, value: float) -> None:
    """One limit written the way the controller writes it (RedisSink), the others kept."""
    sink = RedisSink(side.db, KeySchema("governor"))
    actual = sink.read().actual
    sink.apply(diff({**actual, Address.parse(address): value}, actual))


def tenant_state(side: Side, tenant: str) -> dict[str, str]:
    return side.db.hgetall(f"governor:{{t:{tenant}}}:enforce")


def wait_settled(side: Side, tenant: str, request_id: str) -> None:
    """Poll until the reservation's settle record is gone (a streamed call settles from a
    timer just after its last byte)."""
    deadline = time.monotonic() + _SETTLE_TIMEOUT_SECONDS
    while f"x|{request_id}" in tenant_state(side, tenant):
        assert time.monotonic() < deadline, f"reservation {request_id} was never settled"
        time.sleep(0.02)
