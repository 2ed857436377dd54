"""A local OpenAI-compatible model server for the gateway tests, and uvicorn in a thread.

The fake answers chat, completions and embeddings with real `usage` figures it computes
from the request, streams SSE when asked, and records what reached it. Test knobs travel as
request headers (the gateway forwards them): `x-fake-status` answers that status,
`x-fake-usage: none` leaves usage out, `x-fake-tokens: N` generates N tokens (at most
max_tokens; per prompt of a completions batch), `x-fake-hold: 1` holds a stream after its first
chunk (a Responses answer: before it starts; a stored response's read: before it is answered)
until the test releases it, `x-fake-delay: S`
waits S seconds before answering (a model generating), `x-fake-pad: N` adds N bytes of
logprobs to a non-streamed answer, `x-fake-cut: N` sends only the first N bytes of a
non-streamed answer (a body cut off mid-way), `x-fake-ignore-stream: 1` answers a stream
request with one JSON document, `x-fake-linger: S` keeps a streamed Responses answer open S
seconds after its last event (`response.completed`) before ending it, and `x-fake-stall: N`
stops a streamed Responses answer after its event N (from 0) until the test releases it;
`x-fake-size: N` makes a conversation create's answer exactly N bytes (`padded`).
Responses are kept (unless `store: false`) as a model server keeps them: a request naming one
as `previous_response_id` is billed its input and output again as input, and one naming a
response it does not hold is refused 400, as OpenAI and vLLM refuse it. A `conversation` the
test put in `conversations` is billed as input too and named in the answer (404 otherwise).
The Conversations API (`/v1/conversations`, its items) is served as OpenAI documents it: a
conversation made with items holds their tokens (⌈JSON characters ÷ 10⌉ each batch), items
added later add theirs, and a Responses turn in it leaves it holding the turn's total; the
id of a new conversation is drawn from its body (`conversation_id`), so two gateways sent it
get the same one; `x-fake-space: NAME` keeps a request's conversations apart from those of
requests without it or with another name (two gateways compared see the same answers).
A kept response is read, deleted, its input listed and (run with `background: true`, answered
`queued` without usage and completed at once after; `x-fake-bg-status: S` answers it with
status S instead, still without usage, as a server that failed or cancelled it at once does;
streamed, its events come as any stream's)
cancelled at `/v1/responses/{id}`, `.../input_items`, `.../cancel` (each space's apart, as
conversations are).
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import anyio
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from tests.support.redis import free_port

WORDS = ("alpha ", "beta ", "gamma ", "delta ", "epsilon ")
_HOLD_TIMEOUT_SECONDS = 30.0


@dataclass
class Seen:
    """One request as the upstream received it."""

    path: str
    headers: dict[str, str]
    body: dict[str, Any] | None


@dataclass
class FakeUpstream:
    """State shared between the server thread and the test."""

    seen: list[Seen] = field(default_factory=list)
    jwks: dict[str, Any] = field(default_factory=lambda: {"keys": []})
    jwks_fetches: int = 0  # how often /jwks was read
    release: threading.Event = field(default_factory=threading.Event)
    completion_tokens: int = 5  # what a completion "generates" (capped by max_tokens)
    # Responses kept for a later `previous_response_id`: id → its input + output tokens.
    stored: dict[str, int] = field(default_factory=dict)
    # Conversations (the Conversations API's `conv_…`): id → their tokens, and their items.
    conversations: dict[str, int] = field(default_factory=dict)
    conversation_items: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    conversation_metadata: dict[str, Any] = field(default_factory=dict)
    # The kept responses' whole objects (as retrieved) and their input items.
    responses: dict[str, dict[str, Any]] = field(default_factory=dict)
    response_inputs: dict[str, list[dict[str, Any]]] = field(default_factory=dict)

    def app(self) -> Starlette:
        return Starlette(
            routes=[
                Route("/v1/chat/completions", self._completion, methods=["POST"]),
                Route("/v1/completions", self._completion, methods=["POST"]),
                Route("/v1/embeddings", self._embedding, methods=["POST"]),
                Route("/v1/models", self._models, methods=["GET"]),
                # Model work on a route Governor does not meter (vLLM serves it): recorded,
                # so a test sees whether a gateway let it through.
                Route("/v1/responses", self._response, methods=["POST"]),
                Route("/v1/responses/{rid}", self._kept, methods=["GET", "DELETE"]),
                Route("/v1/responses/{rid}/input_items", self._input_items, methods=["GET"]),
                Route("/v1/responses/{rid}/cancel", self._cancel, methods=["POST"]),
                Route("/v1/conversations", self._conversation_create, methods=["POST"]),
                Route(
                    "/v1/conversations/{cid}", self._conversation, methods=["GET", "POST", "DELETE"]
                ),
                Route("/v1/conversations/{cid}/items", self._items, methods=["GET", "POST"]),
                Route("/v1/conversations/{cid}/items/{iid}", self._item, methods=["GET", "DELETE"]),
                Route("/jwks", self._jwks, methods=["GET"]),
            ]
        )

    def last(self) -> Seen:
        return self.seen[-1]

    async def _record(self, request: Request) -> dict[str, Any]:
        body = json.loads(await request.body())
        self.seen.append(Seen(request.url.path, dict(request.headers), body))
        return dict(body)

    async def _completion(self, request: Request) -> Response:
        body = await self._record(request)
        failed = _failure(request)
        if failed is not None:
            return failed
        await anyio.sleep(float(request.headers.get("x-fake-delay", "0")))
        prompt = 7 + len(json.dumps(body.get("messages") or body.get("prompt"))) // 10
        # As vLLM reads the cap: a completions request has no max_completion_tokens.
        chat = request.url.path == "/v1/chat/completions"
        cap = body.get("max_completion_tokens") if chat else None
        limit = cap or body.get("max_tokens") or 10_000
        wanted = int(request.headers.get("x-fake-tokens", self.completion_tokens))
        # A completions batch (a list of texts) is answered prompt by prompt, as vLLM does.
        prompts = body.get("prompt") if not chat else None
        batch = 1  # a text, or a list of token ids, is one prompt
        if isinstance(prompts, list) and all(isinstance(item, str | list) for item in prompts):
            batch = max(1, len(prompts))
        completion = min(wanted, int(limit)) * batch
        usage = {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
        }
        if request.headers.get("x-fake-usage") == "none":
            usage = {}
        model = body["model"]
        if body.get("stream") and request.headers.get("x-fake-ignore-stream") != "1":
            wants_usage = bool((body.get("stream_options") or {}).get("include_usage"))
            hold = request.headers.get("x-fake-hold") == "1"
            finish = _finish(completion, limit)
            events = self._events(model, completion, usage if wants_usage else {}, hold, finish)
            return StreamingResponse(events, media_type="text/event-stream")
        text = "".join(WORDS[i % len(WORDS)] for i in range(completion))
        answer: dict[str, Any] = {
            "id": "cmpl-fake",
            "object": "chat.completion",
            "model": model,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": text},
                    "finish_reason": _finish(completion, limit),
                }
            ],
        }
        if usage:
            answer["usage"] = usage
        pad = int(request.headers.get("x-fake-pad", "0"))  # an answer of more bytes (logprobs)
        if pad:
            answer["choices"][0]["logprobs"] = {"content": "x" * pad}
        cut = request.headers.get("x-fake-cut")
        if cut is not None:  # what a client sees of a body the server broke off
            whole = json.dumps(answer).encode()
            return Response(whole[: int(cut)], media_type="application/json",
                            headers={"x-upstream": "fake"})  # fmt: skip
        return JSONResponse(answer, headers={"x-upstream": "fake"})

    async def _events(
        self, model: str, completion: int, usage: dict[str, int], hold: bool, finish: str
    ) -> AsyncIterator[bytes]:
        for i in range(completion):
            # As OpenAI and vLLM stream: `finish_reason` null until the last choice chunk
            # (LiteLLM >= 1.100 raises on a stream that ends without one).
            last = finish if i == completion - 1 else None
            choice = {
                "index": 0,
                "delta": {"content": WORDS[i % len(WORDS)]},
                "finish_reason": last,
            }
            chunk = {"id": "chunk", "model": model, "choices": [choice]}
            yield f"data: {json.dumps(chunk)}\n\n".encode()
            if i == 0 and hold:
                await anyio.to_thread.run_sync(self.release.wait, _HOLD_TIMEOUT_SECONDS)
        if usage:
            yield f"data: {json.dumps({'id': 'chunk', 'choices': [], 'usage': usage})}\n\n".encode()
        yield b"data: [DONE]\n\n"

    async def _stall(self, now: bool) -> None:
        """A model that stops sending mid-answer: nothing more until the test releases it."""
        if now:
            await anyio.to_thread.run_sync(self.release.wait, _HOLD_TIMEOUT_SECONDS)

    def _earlier(self, body: dict[str, Any], space: str) -> int | Response:
        """The tokens of the earlier response and the conversation a request names (read back
        and billed as input), or the model server's refusal of one it does not hold."""
        tokens = 0
        previous = body.get("previous_response_id")
        if previous is not None:
            if previous not in self.stored:
                message = f"Previous response with id '{previous}' not found."
                return JSONResponse({"error": {"message": message, "param": "previous_response_id",
                                               "type": "invalid_request_error"}}, 400)  # fmt: skip
            tokens += self.stored[previous]
        conversation = _conversation(body)
        if conversation is not None:
            if space + conversation not in self.conversations:
                message = f"Conversation with id '{conversation}' not found."
                return JSONResponse({"error": {"message": message, "param": "conversation",
                                               "type": "invalid_request_error"}}, 404)  # fmt: skip
            tokens += self.conversations[space + conversation]
        return tokens

    async def _response(self, request: Request) -> Response:
        """OpenAI's Responses API as vLLM serves it: `usage` with input/output tokens, and a
        stream of typed events ending with `response.completed` (which holds the usage)."""
        body = await self._record(request)
        failed = _failure(request)
        if failed is not None:
            return failed
        if request.headers.get("x-fake-hold") == "1":  # a model still generating
            await anyio.to_thread.run_sync(self.release.wait, _HOLD_TIMEOUT_SECONDS)
        prompt = 7 + len(json.dumps(body.get("input"))) // 10
        earlier = self._earlier(body, _space(request))
        if isinstance(earlier, Response):
            return earlier
        prompt += earlier
        conversation = _conversation(body)
        limit = body.get("max_output_tokens") or 10_000
        completion = min(int(request.headers.get("x-fake-tokens", self.completion_tokens)), limit)
        text = "".join(WORDS[i % len(WORDS)] for i in range(completion))
        usage = {"input_tokens": prompt, "output_tokens": completion,
                 "total_tokens": prompt + completion}  # fmt: skip
        identity = response_id(body, completion)
        answer: dict[str, Any] = {
            "id": identity, "object": "response", "model": body["model"],
            "status": "completed",
            "output": [{"type": "message", "id": "msg-fake", "role": "assistant",
                        "status": "completed",
                        "content": [{"type": "output_text", "text": text, "annotations": []}]}],
            "usage": usage,
        }  # fmt: skip
        if conversation is not None:  # this turn's items join the conversation
            self.conversations[_space(request) + conversation] = prompt + completion
            answer["conversation"] = {"id": conversation}
        if body.get("store") is not False:
            self._keep(_space(request) + identity, body, answer)
        if body.get("background") is True and not body.get("stream"):
            # Answered at once; generated (here: done) after. Streamed, its events come.
            status = request.headers.get("x-fake-bg-status", "queued")
            queued = {**answer, "status": status, "output": [], "usage": None}
            return JSONResponse(queued, headers={"x-upstream": "fake"})
        if not body.get("stream"):
            return JSONResponse(answer, headers={"x-upstream": "fake"})
        linger = float(request.headers.get("x-fake-linger", "0"))

        async def events() -> AsyncIterator[bytes]:
            # As OpenAI and vLLM stream it: created, the item and its part added, the deltas,
            # then completed (the SDK builds its snapshot from these, in this order).
            item = {**answer["output"][0], "status": "in_progress", "content": []}
            part = {"type": "output_text", "text": "", "annotations": []}
            place = {"item_id": "msg-fake", "output_index": 0}
            started = {**answer, "status": "in_progress", "output": [], "usage": None}
            steps: list[dict[str, Any]] = [
                {"type": "response.created", "response": started},
                {"type": "response.output_item.added", "output_index": 0, "item": item},
                {"type": "response.content_part.added", **place, "content_index": 0,
                 "part": part},
                *({"type": "response.output_text.delta", **place, "content_index": 0,
                   "delta": WORDS[i % len(WORDS)]} for i in range(completion)),
                {"type": "response.completed", "response": answer},
            ]  # fmt: skip
            stall = int(request.headers.get("x-fake-stall", "-1"))
            for number, step in enumerate(steps):
                step["sequence_number"] = number
                yield f"event: {step['type']}\ndata: {json.dumps(step)}\n\n".encode()
                await self._stall(number == stall)
            # A server that ends the body a moment after its last event: a client acting on
            # `response.completed` has its answer before any gateway sees the stream end.
            await anyio.sleep(linger)

        return StreamingResponse(events(), media_type="text/event-stream")

    def _keep(self, held: str, body: dict[str, Any], answer: dict[str, Any]) -> None:
        """Keep a response for a later `previous_response_id` and for its own routes (under
        its space: `held`)."""
        self.stored[answer["id"]] = answer["usage"]["total_tokens"]
        self.responses[held] = answer
        self.response_inputs[held] = _input_items(body.get("input"), answer["id"])

    def _kept_response(self, request: Request) -> tuple[str, Response | None]:
        """Where the response a path names is kept, and the model server's 404 when it
        holds none."""
        identity = request.path_params["rid"]
        if _space(request) + identity in self.responses:
            return _space(request) + identity, None
        message = f"Response with id '{identity}' not found."
        error = {"message": message, "type": "invalid_request_error", "param": None, "code": None}
        return identity, JSONResponse({"error": error}, 404)

    async def _kept(self, request: Request) -> Response:
        await self._seen(request)
        identity, missing = self._kept_response(request)
        if missing is not None:
            return missing
        if request.headers.get("x-fake-hold") == "1":  # a read the test holds until released
            await anyio.to_thread.run_sync(self.release.wait, _HOLD_TIMEOUT_SECONDS)
        if request.method == "DELETE":
            del self.responses[identity]
            kept = identity.rpartition("|")[2]
            self.stored.pop(kept, None)
            return JSONResponse({"id": kept, "object": "response", "deleted": True})
        return JSONResponse(self.responses[identity])

    async def _input_items(self, request: Request) -> Response:
        await self._seen(request)
        identity, missing = self._kept_response(request)
        if missing is not None:
            return missing
        data = self.response_inputs.get(identity, [])
        return JSONResponse({"object": "list", "data": data, "has_more": False,
                             "first_id": data[0]["id"] if data else None,
                             "last_id": data[-1]["id"] if data else None})  # fmt: skip

    async def _cancel(self, request: Request) -> Response:
        await self._seen(request)
        identity, missing = self._kept_response(request)
        if missing is not None:
            return missing
        self.responses[identity] = {**self.responses[identity], "status": "cancelled"}
        return JSONResponse(self.responses[identity])

    async def _seen(self, request: Request) -> dict[str, Any] | None:
        """Record a Conversations API request; its body, when it has one."""
        raw = await request.body()
        body = json.loads(raw) if raw else None
        self.seen.append(Seen(request.url.path, dict(request.headers), body))
        return body if isinstance(body, dict) else None

    def _add_items(self, held: str, items: list[dict[str, Any]]) -> list[dict[str, Any]]:
        conversation = held.rpartition("|")[2]
        kept = self.conversation_items.setdefault(held, [])
        added = [{"id": f"msg_{conversation[5:13]}{len(kept) + i}", "status": "completed", **item}
                 for i, item in enumerate(items)]  # fmt: skip
        kept.extend(added)
        if items:
            self.conversations[held] = self.conversations.get(held, 0) + (
                -(-len(json.dumps(items)) // 10)
            )
        return added

    def _conversation_object(self, held: str) -> dict[str, Any]:
        conversation = held.rpartition("|")[2]
        metadata = self.conversation_metadata.get(held, {})
        return {"id": conversation, "object": "conversation", "created_at": 1700000000,
                "metadata": metadata}  # fmt: skip

    async def _conversation_create(self, request: Request) -> Response:
        body = await self._seen(request) or {}
        failed = _failure(request)
        if failed is not None:
            return failed
        held = _space(request) + conversation_id(body)
        self.conversations[held] = 0
        self.conversation_items[held] = []
        self.conversation_metadata[held] = body.get("metadata") or {}
        self._add_items(held, list(body.get("items") or []))
        made = self._conversation_object(held)
        size = request.headers.get("x-fake-size")
        return JSONResponse(made if size is None else padded(made, int(size)))

    def _missing(self, held: str) -> Response | None:
        if held in self.conversations:
            return None
        conversation = held.rpartition("|")[2]
        message = f"Conversation with id '{conversation}' not found."
        return JSONResponse({"error": {"message": message, "type": "invalid_request_error",
                                       "param": None, "code": None}}, 404)  # fmt: skip

    async def _conversation(self, request: Request) -> Response:
        body = await self._seen(request)
        conversation = request.path_params["cid"]
        held = _space(request) + conversation
        missing = self._missing(held)
        if missing is not None:
            return missing
        if request.method == "DELETE":
            del self.conversations[held]
            return JSONResponse({"id": conversation, "object": "conversation.deleted",
                                 "deleted": True})  # fmt: skip
        if request.method == "POST":
            self.conversation_metadata[held] = (body or {}).get("metadata") or {}
        return JSONResponse(self._conversation_object(held))

    async def _items(self, request: Request) -> Response:
        body = await self._seen(request)
        held = _space(request) + request.path_params["cid"]
        missing = self._missing(held)
        if missing is not None:
            return missing
        if request.method == "POST":
            data = self._add_items(held, list((body or {}).get("items") or []))
        else:
            data = list(self.conversation_items.get(held, []))
        return JSONResponse({"object": "list", "data": data, "has_more": False,
                             "first_id": data[0]["id"] if data else None,
                             "last_id": data[-1]["id"] if data else None})  # fmt: skip

    async def _item(self, request: Request) -> Response:
        await self._seen(request)
        held, item = _space(request) + request.path_params["cid"], request.path_params["iid"]
        missing = self._missing(held)
        if missing is not None:
            return missing
        items = self.conversation_items.get(held, [])
        found = [each for each in items if each["id"] == item]
        if not found:
            return JSONResponse({"error": {"message": f"Item '{item}' not found."}}, 404)
        if request.method == "DELETE":
            items.remove(found[0])
            return JSONResponse(self._conversation_object(held))
        return JSONResponse(found[0])

    async def _embedding(self, request: Request) -> Response:
        body = await self._record(request)
        failed = _failure(request)
        if failed is not None:
            return failed
        prompt = 3 + len(json.dumps(body.get("input"))) // 10
        return JSONResponse(
            {
                "object": "list",
                "data": [{"object": "embedding", "index": 0, "embedding": [0.1, 0.2]}],
                "model": body["model"],
                "usage": {"prompt_tokens": prompt, "total_tokens": prompt},
            }
        )

    async def _models(self, request: Request) -> Response:
        self.seen.append(Seen(request.url.path, dict(request.headers), None))
        return JSONResponse({"object": "list", "data": [{"id": "gpt-3.5-turbo"}]})

    async def _jwks(self, _request: Request) -> Response:
        self.jwks_fetches += 1
        return JSONResponse(self.jwks)


def _space(request: Request) -> str:
    """The prefix of the fake's keys for a request's conversations (`x-fake-space`)."""
    space = request.headers.get("x-fake-space")
    return f"{space}|" if space else ""


def conversation_id(body: Any) -> str:
    """The id the fake gives a conversation made with `body`."""
    seed = json.dumps(body, sort_keys=True).encode()
    return "conv_" + hashlib.sha256(seed).hexdigest()[:32]


def _conversation(body: dict[str, Any]) -> Any:
    """The conversation a Responses request names: its id, or an object holding it."""
    named = body.get("conversation")
    return named.get("id") if isinstance(named, dict) else named


def response_id(body: Any, completion: int) -> str:
    """The id the fake gives the answer to a Responses `body` that generated `completion`
    tokens: the same for the same request, so two gateways sent it get the same answer."""
    seed = json.dumps([body, completion], sort_keys=True).encode()
    return "resp_" + hashlib.sha256(seed).hexdigest()[:32]


def _input_items(given: Any, identity: str) -> list[dict[str, Any]]:
    """A Responses request's input as the model server lists it (`input_items`)."""
    if isinstance(given, str):
        content = [{"type": "input_text", "text": given}]
        given = [{"type": "message", "role": "user", "content": content}]
    items = [item for item in given or () if isinstance(item, dict)]
    return [{"id": f"msg_{identity[5:13]}{i}", "status": "completed", **item}
            for i, item in enumerate(items)]  # fmt: skip


def padded(answer: dict[str, Any], size: int) -> dict[str, Any]:
    """`answer` with a field that makes the fake's JSON body exactly `size` bytes long (its
    JSONResponse renders compact JSON, non-ASCII as is)."""

    def rendered(value: dict[str, Any]) -> int:
        return len(json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode())

    base = rendered({**answer, "pad": ""})
    return {**answer, "pad": "x" * (size - base)}


def _failure(request: Request) -> Response | None:
    status = request.headers.get("x-fake-status")
    if status is None:
        return None
    return JSONResponse({"error": {"message": "fake failure"}}, status_code=int(status))


class ServerThread:
    """An ASGI app served by uvicorn on a free loopback port, in a thread of the test."""

    def __init__(self, app: Any) -> None:
        self.port = free_port()
        config = uvicorn.Config(
            app, host="127.0.0.1", port=self.port, log_level="warning", ws="none",
            lifespan="on", proxy_headers=False,
        )  # fmt: skip
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> ServerThread:
        self.thread.start()
        deadline = time.monotonic() + 15.0
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"uvicorn on port {self.port} did not start")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30.0)


def _finish(completion: int, limit: int) -> str:
    """Why generation stopped: at max_tokens ("length"), else the model's own end ("stop")."""
    return "length" if completion >= int(limit) else "stop"
