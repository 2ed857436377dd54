"""The middleware mounted in someone else's Starlette app: its own handler answers, Governor
admits, sees the (possibly rewritten) body, adds headers and settles from the usage."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
import redis
from pydantic import SecretStr
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from controller.contract.keys import KeySchema
from controller.gateway.app import GatewayRuntime
from controller.gateway.asgi import STATE_KEY, GovernorMiddleware
from controller.gateway.auth import Principal
from controller.gateway.keys import KeyStore
from controller.settings import GatewaySettings, RedisSettings, Settings
from tests.gateway.conftest import budget_remaining, write_limits
from tests.gateway.fake_upstream import ServerThread
from tests.support.redis import RedisServer


def own_app(runtime: GatewayRuntime, seen: list[dict[str, object]]) -> Starlette:
    async def complete(request: Request) -> Response:
        body = json.loads(await request.body())
        principal = request.scope["state"][STATE_KEY]
        assert isinstance(principal, Principal)
        seen.append({"body": body, "tenant": principal.tenant})
        usage = {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}
        return JSONResponse({"choices": [], "usage": usage})

    @asynccontextmanager
    async def lifespan(_app: Starlette) -> AsyncIterator[None]:
        async with runtime.running():
            yield

    return Starlette(
        routes=[Route("/v1/chat/completions", complete, methods=["POST"])],
        middleware=[Middleware(GovernorMiddleware, enforcement=runtime.enforcement)],
        lifespan=lifespan,
    )


def test_a_starlette_app_gets_governors_enforcement_by_mounting_the_middleware(
    db: redis.Redis[str], redis_server: RedisServer, policy_dir: Path
) -> None:
    write_limits(db, "governor", policy_dir)
    settings = Settings(
        redis=RedisSettings(url=SecretStr(redis_server.url)),
        gateway=GatewaySettings(default_max_tokens=20),
    )
    runtime = GatewayRuntime.from_settings(settings)
    seen: list[dict[str, object]] = []
    server = ServerThread(own_app(runtime, seen)).start()
    key = KeyStore(db, KeySchema("governor"), None).create("acme", "free")[0]
    body = {"model": "gpt-3.5-turbo", "messages": [{"role": "user", "content": "hi"}]}
    try:
        with httpx.Client(headers={"authorization": f"Bearer {key}"}) as client:
            first = client.post(f"{server.url}/v1/chat/completions", json=body)
            second = client.post(f"{server.url}/v1/chat/completions", json=body)
            forbidden = client.post(
                f"{server.url}/v1/chat/completions", json={**body, "model": "gpt-4"}
            )
    finally:
        server.stop()

    assert (first.status_code, second.status_code, forbidden.status_code) == (200, 200, 403)
    assert seen[0] == {"body": {**body, "max_tokens": 20}, "tenant": "acme"}
    assert first.headers["x-ratelimit-remaining-requests"] == "9"
    assert budget_remaining(second) == 1000 - 7 - (5 + 20)  # the first settled at 7 tokens
    assert len(seen) == 2
