"""The upstream hop: forward a request to the model server and stream its answer back."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import nullcontext
from typing import Any

import httpx
from starlette.background import BackgroundTask
from starlette.requests import Request
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from controller.gateway.responses import Answers
from controller.gateway.tracing import Tracing

# RFC 9110 §7.6.1 hop-by-hop fields, plus what this hop sets itself. The client's credential
# is the gateway's business: it never reaches the upstream.
_HOP_BY_HOP = frozenset(
    {
        "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te",
        "trailer", "transfer-encoding", "upgrade", "host", "content-length",
    }
)  # fmt: skip
_REQUEST_DROPPED = _HOP_BY_HOP | {"authorization", "x-api-key", "accept-encoding"}
_RESPONSE_DROPPED = _HOP_BY_HOP | {"date", "server"}  # the gateway's server sets its own


class UpstreamProxy:
    """An ASGI app that sends every request on to `upstream` (the server root, without /v1)."""

    def __init__(
        self,
        upstream: str,
        client: httpx.AsyncClient,
        answers: Answers,
        api_key: str | None = None,
        tracing: Tracing | None = None,
    ) -> None:
        self.upstream = upstream.rstrip("/")
        self.client = client
        self.answers = answers
        self.api_key = api_key
        self.tracing = tracing

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        request = Request(scope, receive)
        body = await request.body()
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _REQUEST_DROPPED}
        # Identity encoding: the gateway reads `usage` from the bytes it passes through.
        headers["accept-encoding"] = "identity"
        if self.api_key is not None:
            headers["authorization"] = f"Bearer {self.api_key}"
        url = self.upstream + scope["path"]
        if scope.get("query_string"):
            url += "?" + scope["query_string"].decode("latin-1")
        span: Any = (
            self.tracing.client_span(f"upstream {scope['method']} {scope['path']}", headers)
            if self.tracing is not None
            else nullcontext()
        )
        with span:
            upstream_request = self.client.build_request(
                scope["method"], url, headers=headers, content=body
            )
            try:
                response = await self.client.send(upstream_request, stream=True)
            except httpx.TimeoutException as exc:
                answer = self.answers.upstream_failed(f"the model server timed out ({exc!r})", 504)
                await answer(scope, receive, send)
                return
            except httpx.HTTPError as exc:
                detail = f"the model server could not be reached ({type(exc).__name__})"
                await self.answers.upstream_failed(detail)(scope, receive, send)
                return
        kept = {
            k: v for k, v in response.headers.multi_items() if k.lower() not in _RESPONSE_DROPPED
        }
        streamed = StreamingResponse(
            _relay(response),
            status_code=response.status_code,
            headers=kept,
            background=BackgroundTask(response.aclose),
        )
        await streamed(scope, receive, send)


async def _relay(response: httpx.Response) -> AsyncIterator[bytes]:
    """The upstream's bytes, chunk by chunk as they arrive; closed however the stream ends."""
    try:
        async for chunk in response.aiter_raw():
            yield chunk
    except httpx.HTTPError:
        return  # the upstream broke off mid-answer: end the response; settling sees the cut
    finally:
        await response.aclose()
