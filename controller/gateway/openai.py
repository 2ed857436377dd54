"""The OpenAI wire format: what a request may spend at most, what its response says it spent.

Worst-case rule (documented in docs/gateway.md): prompt estimate + max_tokens × n × prompts
(a completions batch is answered prompt by prompt), where the prompt estimate is
⌈characters / 4⌉ of every text the model reads plus 4 tokens per chat message, and a
completion request without max_tokens gets the configured default written in (lowered at
admission to what the limits and the budget still hold: `least_tokens`). A Responses request
naming `previous_response_id` adds the earlier conversation the model server reads back
(`add_earlier`: what the gateway recorded when that response settled, or a conservative
default).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

RequestKind = Literal["chat", "completion", "embedding", "response"]
# What a Responses request may name for the model server to read back from its own store.
EarlierKind = Literal["response", "conversation"]
ROUTES: dict[str, RequestKind] = {
    "/v1/chat/completions": "chat",
    "/v1/completions": "completion",
    "/v1/embeddings": "embedding",
    "/v1/responses": "response",  # OpenAI's Responses API (the SDK's `client.responses`; vLLM)
}
# Where each route reads its output cap. A completions request has no
# `max_completion_tokens` (OpenAI's legacy API, vLLM's CompletionRequest): a model server
# ignores it and generates up to `max_tokens`, or to its own default without one.
MAX_TOKENS_NAMES: dict[RequestKind, tuple[str, ...]] = {
    "chat": ("max_completion_tokens", "max_tokens"),
    "completion": ("max_tokens",),
    "embedding": (),
    "response": ("max_output_tokens",),
}
CHARS_PER_TOKEN = 4
MESSAGE_OVERHEAD_TOKENS = 4
_MAX_BUFFERED_RESPONSE = 32 * 1024 * 1024
# A response in one of these has generated all it will: its usage is final.
FINAL_STATUSES = frozenset(("completed", "incomplete", "failed", "cancelled"))
_EXACT_COUNT = 2**53  # the largest count a double (the nginx module's number) holds exactly


class RequestError(ValueError):
    """A body the gateway cannot account for; the message is shown to the client (400)."""


def not_utf8(offset: int) -> str:
    """The refusal of a body that is no UTF-8, naming the first bad byte (counted from 0)."""
    return f"the request body is not UTF-8 (byte {offset} is not): send JSON encoded in UTF-8"


def named_twice(name: str) -> str:
    """The refusal of a body whose top level names a member twice."""
    return (
        f"the request body names `{name}` twice: send each member once (which "
        "one a model server reads differs, so the one checked here may not be the one it runs)"
    )


class _Members(dict[str, Any]):
    """A decoded JSON object that remembers the first member it met a second time. The
    gateway checks the last `model`, `max_tokens` or `n` (as json and cjson keep it); a model
    server that reads the first would run what no check saw: a model the plan forbids, an
    output cap beyond the reservation."""

    twice: str | None = None

    @classmethod
    def of(cls, pairs: list[tuple[str, Any]]) -> _Members:
        found = cls()
        for name, value in pairs:
            if found.twice is None and name in found:
                found.twice = name
            found[name] = value
        return found


def _check_surrogates(body: dict[str, Any]) -> None:
    """RequestError when a `\\uD800`-style escape left half a surrogate pair in a string:
    no UTF-8 text holds one (the nginx module's cjson refuses it, and a model server may
    too), so the body would be served by one gateway and refused by the other."""
    try:
        json.dumps(body, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        raise RequestError(
            "the request body is not JSON: a \\u escape names half a surrogate pair (a "
            "character beyond U+FFFF is written as two, \\uD83D\\uDE00, or sent as UTF-8)"
        ) from None


# A model name a request may carry: it becomes a metric label (which the controller reads back,
# and drops past 256 characters or with a control character: signals.decode.valid_label) and a
# key of each gateway's limit cache, so a megabyte of name in every request would fill both.
MODEL_REQUEST_MAX = 256
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
BAD_MODEL = (
    f"`model` must be 1-{MODEL_REQUEST_MAX} characters and hold no control character "
    "(U+0000-U+001F, U+007F-U+009F)"
)


def _check_model(model: Any) -> None:
    if not isinstance(model, str) or not model:
        raise RequestError("the request names no model (`model` must be a string)")
    if len(model) > MODEL_REQUEST_MAX or _CONTROL.search(model):
        raise RequestError(BAD_MODEL)


def read_object(raw: bytes) -> dict[str, Any]:
    """A request body as the gateway reads it: UTF-8 JSON holding one object that names no
    member twice and no half of a surrogate pair; RequestError (a 400) otherwise."""
    try:
        # UTF-8 only (RFC 8259 §8.1), as the nginx module reads it: json.loads(bytes)
        # would also take UTF-16 and UTF-32, which nginx refuses and some model servers too.
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise RequestError(not_utf8(exc.start)) from None
    try:
        body = json.loads(text, object_pairs_hook=_Members.of)
    except RecursionError:
        raise RequestError("the request body is not JSON: it nests too deep") from None
    except ValueError as exc:
        raise RequestError(f"the request body is not JSON: {exc}") from None
    if not isinstance(body, dict):
        raise RequestError("the request body must be a JSON object")
    if isinstance(body, _Members) and body.twice is not None:
        raise RequestError(named_twice(body.twice))
    if "\\u" in text:
        _check_surrogates(body)
    return body


def text_tokens(text: str) -> int:
    return math.ceil(len(text) / CHARS_PER_TOKEN)


@dataclass
class ModelRequest:
    """One parsed OpenAI request body, with what it may spend; rewritten in place."""

    kind: RequestKind
    raw: bytes  # the body as the client sent it
    body: dict[str, Any]
    prompt_tokens: int
    changed: bool = False
    defaulted: bool = False  # max_tokens is the gateway's default, not the client's

    @classmethod
    def parse(cls, kind: RequestKind, raw: bytes, default_max_tokens: int) -> ModelRequest:
        try:
            request = cls._read(kind, raw)
        except RecursionError:
            # Decoding and counting recurse per level: a body nested ~1,000 deep is refused as
            # the nginx module's cjson refuses it, never a 500 with a traceback.
            raise RequestError("the request body is not JSON: it nests too deep") from None
        if kind != "embedding" and request.max_tokens is None:
            request.set_max_tokens(default_max_tokens)
            request.defaulted = True
        return request

    @classmethod
    def _read(cls, kind: RequestKind, raw: bytes) -> ModelRequest:
        body = read_object(raw)
        _check_model(body.get("model"))
        _check_counts(body)
        _check_stream(kind, body)
        _check_previous(kind, body)
        return cls(kind, raw, body, _prompt_tokens(kind, body))

    @property
    def model(self) -> str:
        return str(self.body["model"])

    @property
    def streaming(self) -> bool:
        return self.kind != "embedding" and self.body.get("stream") is True

    @property
    def previous_response_id(self) -> str | None:
        """The earlier response a Responses request continues: the model server reads its
        input and output back from its own store and bills them as this request's input."""
        value = self.body.get("previous_response_id") if self.kind == "response" else None
        return value if isinstance(value, str) else None

    @property
    def conversation_id(self) -> str | None:
        """The Conversations API conversation a Responses request belongs to (`conversation`:
        its id, or an object holding it): the model server prepends its items to the input
        and bills them, as it does an earlier response's."""
        value = self.body.get("conversation") if self.kind == "response" else None
        if isinstance(value, dict):
            value = value.get("id")
        return value if isinstance(value, str) else None

    @property
    def earlier(self) -> list[tuple[EarlierKind, str]]:
        """What the model server reads back from its own store for this request: the earlier
        response and the conversation it names (each admitted only when the gateway holds a
        record of it for the tenant, and reserved)."""
        named: list[tuple[EarlierKind, str | None]] = [
            ("response", self.previous_response_id),
            ("conversation", self.conversation_id),
        ]
        return [(what, found) for what, found in named if found is not None]

    @property
    def background(self) -> bool:
        """Whether the model server runs this Responses request in the background: it answers
        at once (`status: queued`, no usage) and generates after the answer has ended."""
        return self.kind == "response" and self.body.get("background") is True

    @property
    def stored(self) -> bool:
        """Whether the model server keeps this Responses answer for a later request to name
        (`store`, true by default); one it does not keep needs no record."""
        return self.kind == "response" and self.body.get("store") is not False

    def add_earlier(self, tokens: int) -> None:
        """Count the earlier conversation the model server reads back into the prompt, so the
        reservation (and a settle from an estimate) holds it."""
        self.prompt_tokens += tokens

    @property
    def max_tokens(self) -> int | None:
        """The output cap the route's model server reads; with both chat names, the larger:
        servers differ in which one wins, and the reservation is the worst case."""
        values = [
            value
            for value in (self.body.get(name) for name in MAX_TOKENS_NAMES[self.kind])
            if isinstance(value, int) and not isinstance(value, bool) and value > 0
        ]
        return max(values, default=None)

    @property
    def choices(self) -> int:
        """Answers generated, each up to max_tokens: n (or best_of, the larger) per prompt."""
        counts = [self.body.get(name) for name in ("n", "best_of")]
        each = max([1, *(c for c in counts if isinstance(c, int) and not isinstance(c, bool))])
        return each * _prompts(self.kind, self.body)

    @property
    def worst_case_tokens(self) -> int:
        """What this request can cost at most: the reservation."""
        return self.prompt_tokens + (self.max_tokens or 0) * self.choices

    @property
    def least_tokens(self) -> int | None:
        """The smallest reservation it may be lowered to (one token per choice) when the
        gateway chose its max_tokens; None when the client did (its choice is kept)."""
        return self.prompt_tokens + self.choices if self.defaulted else None

    def fit(self, reserved: int) -> bool:
        """Lower a default max_tokens to what `reserved` holds; True when it changed."""
        if not self.defaulted or reserved >= self.worst_case_tokens:
            return False
        self.set_max_tokens(max(1, (reserved - self.prompt_tokens) // self.choices))
        return True

    def set_max_tokens(self, value: int) -> None:
        """Cap the output: every name the route reads that the client sent, else max_tokens
        (one left as it was could be the one the model server honours)."""
        names = [name for name in MAX_TOKENS_NAMES[self.kind] if name in self.body]
        for name in names or [MAX_TOKENS_NAMES[self.kind][-1]]:
            self.body[name] = value
        self.changed = True

    def set_model(self, model: str) -> None:
        self.body["model"] = model
        self.changed = True

    def ask_for_stream_usage(self) -> bool:
        """Streamed chat/completions send usage only when asked: ask, so settling is exact.
        True when the client had not asked: its usage chunk is then the gateway's to strip.
        A Responses stream always ends with `response.completed`, which carries the usage."""
        if self.kind == "response":
            return False
        options = self.body.get("stream_options")
        if not isinstance(options, dict):
            options = {}
        if options.get("include_usage") is True:
            return False
        self.body["stream_options"] = {**options, "include_usage": True}
        self.changed = True
        return True

    def encoded(self) -> bytes:
        """The body to send on: the client's own bytes unless the gateway changed something."""
        return json.dumps(self.body, separators=(",", ":")).encode() if self.changed else self.raw


_COUNTS = ("max_tokens", "max_completion_tokens", "max_output_tokens", "n", "best_of")


def _check_counts(body: Mapping[str, Any]) -> None:
    """A count the client sent must be a positive integer, as OpenAI's API requires: a float
    such as 1e30, NaN or a string is refused (400), never read as absent and replaced by the
    gateway's default (the client's request would then be served changed)."""
    for name in _COUNTS:
        value = body.get(name)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            shown = json.dumps(value)[:40]
            raise RequestError(f"`{name}` must be a positive integer, not {shown}")


def _check_stream(kind: RequestKind, body: Mapping[str, Any]) -> None:
    """`stream` must be a JSON boolean (or null), as OpenAI's API requires. A model server
    reads 1 or "true" as true (pydantic's lax booleans) and streams, while the gateway, which
    streams only for `true`, did not ask for the usage event and read the stream as a broken
    JSON answer: the completion was settled as 0 tokens, whatever it cost."""
    value = body.get("stream")
    if kind != "embedding" and value is not None and not isinstance(value, bool):
        raise RequestError(f"`stream` must be true or false, not {json.dumps(value)[:40]}")


def _check_previous(kind: RequestKind, body: Mapping[str, Any]) -> None:
    """`previous_response_id` must be a string (or null), `conversation` a string or an object
    whose `id` is one (or null): a model server that read another JSON value as an id would
    bill a conversation no reservation counted, or one the gateway never checked was the
    tenant's."""
    if kind != "response":
        return
    value = body.get("previous_response_id")
    if value is not None and not isinstance(value, str):
        shown = json.dumps(value)[:40]
        raise RequestError(f"`previous_response_id` must be a string, not {shown}")
    value = body.get("conversation")
    named = value.get("id") if isinstance(value, dict) else value
    if value is not None and not isinstance(named, str):
        # Not quoted back: JSON encoders order and space an object differently (nginx's too).
        raise RequestError("`conversation` must be a string or an object with a string `id`")


def _prompts(kind: RequestKind, body: Mapping[str, Any]) -> int:
    """Prompts in a completions request: a list of texts (or of token lists) is a batch, and
    the model server answers each in full (OpenAI's legacy API, vLLM); a list of token ids is
    one prompt. Items that are neither count too (the nginx module cannot tell a list from an
    object; a model server refuses them anyway)."""
    prompt = body.get("prompt") if kind == "completion" else None
    if not isinstance(prompt, list):
        return 1
    return max(1, sum(1 for item in prompt if isinstance(item, str | list | dict)))


def _prompt_tokens(kind: RequestKind, body: Mapping[str, Any]) -> int:
    if kind == "chat":
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise RequestError("a chat request needs a non-empty `messages` list")
        tokens = sum(MESSAGE_OVERHEAD_TOKENS + _tokens(m) for m in messages)
        for extra in ("tools", "functions", "response_format"):
            if extra in body:  # tool schemas are read by the model too
                tokens += text_tokens(json.dumps(body[extra]))
        return tokens
    name = "prompt" if kind == "completion" else "input"
    if name not in body:
        raise RequestError(f"a {kind} request needs `{name}`")
    if kind == "response":
        return _response_tokens(body)
    return _tokens(body[name])


def _response_tokens(body: Mapping[str, Any]) -> int:
    """A Responses request's prompt: its `input` (a text, or items counted as chat messages)
    and `instructions`, and the tool and output-format schemas the model reads too. (An
    earlier response it names, `previous_response_id`, is read by the model server from its
    own store: the gateway adds it at admission, `ModelRequest.add_earlier`.)"""
    items = body["input"]
    tokens = _tokens(items) + _tokens(body.get("instructions"))
    if isinstance(items, list):
        tokens += MESSAGE_OVERHEAD_TOKENS * len(items)
    for extra in ("tools", "text"):
        if extra in body:
            tokens += text_tokens(json.dumps(body[extra]))
    return tokens


def _tokens(value: Any) -> int:
    """Tokens of any text-bearing JSON: strings by length, token arrays by count."""
    if isinstance(value, str):
        return text_tokens(value)
    if isinstance(value, bool) or value is None:
        return 0
    if isinstance(value, int | float):
        return 1  # one token id
    if isinstance(value, list):
        return sum(_tokens(v) for v in value)
    if isinstance(value, dict):
        return sum(_tokens(v) for k, v in value.items() if k != "role")
    return 0


def item_tokens(items: list[Any]) -> int:
    """The texts of conversation items as a Responses request's input items are counted (the
    Conversations API's items are those items), without their per-item overhead."""
    return _tokens(items)


# A JSON object begins the bytes (read in place: no copy of a growing buffer per chunk).
_DOCUMENT_START = re.compile(rb"[ \t\r\n]*\{")
# The end of one server-sent event: a blank line (any of the three line endings).
_EVENT_END = re.compile(rb"\r\n\r\n|\n\n|\r\r")


@dataclass
class UsageChunkFilter:
    """Takes the usage-only event (`choices: []`) out of a stream whose client did not ask
    for it: the gateway asked in its place, and `chunk.choices[0]` loops fail on it. Every
    other event passes as soon as it is complete, byte for byte."""

    _pending: bytearray = field(default_factory=bytearray)

    def feed(self, chunk: bytes, last: bool = False) -> bytes:
        """What of the stream so far may go on to the client (all of it when `last`)."""
        self._pending.extend(chunk)
        passed = bytearray()
        start = 0
        for end in _EVENT_END.finditer(self._pending):
            event = bytes(self._pending[start : end.end()])
            if not _usage_only(event):
                passed.extend(event)
            start = end.end()
        del self._pending[:start]
        if last:
            if not _usage_only(bytes(self._pending)):
                passed.extend(self._pending)
            self._pending.clear()
        return bytes(passed)


def _usage_only(event: bytes) -> bool:
    if b'"usage"' not in event:  # most events: not parsed a second time (the meter did)
        return False
    data = b"".join(line[5:].strip() for line in event.splitlines() if line.startswith(b"data:"))
    if not data.startswith(b"{"):
        return False
    try:
        document = json.loads(data)
    except (ValueError, UnicodeDecodeError):
        return False
    return (
        isinstance(document, dict)
        and document.get("choices") == []
        and isinstance(document.get("usage"), dict)
    )


@dataclass(frozen=True, slots=True)
class Usage:
    """Tokens a response used; `estimated` when the upstream did not say."""

    prompt_tokens: int
    completion_tokens: int
    estimated: bool = False

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass
class UsageMeter:
    """Watches response bytes as they pass (never holding them back) and finds the usage:
    the JSON body's `usage`, or for SSE the chunk that carries `usage` (the last one)."""

    streaming: bool
    prompt_estimate: int
    # What an answer too big to read is charged: the reservation (its `usage` is unseen, and
    # the prompt alone let 30k generated tokens with logprobs go for the price of the prompt).
    ceiling: int | None = None
    # A background Responses request: its answer ends before the generation starts, so one
    # without usage is charged the ceiling too (the prompt alone left every token generated
    # later unmetered).
    background: bool = False
    _buffer: bytearray = field(default_factory=bytearray)
    _usage: Usage | None = None
    _completion_chars: int = 0
    _overflow: bool = False
    _unreadable: bool = False  # a whole answer that is no JSON object (cut off, garbled)
    _unreadable_usage: bool = False  # a usage object without a count the gateway can read
    _status: str | None = None  # the response object's `status` (a Responses answer)
    _events: bool = False  # a `data:` line was seen
    # A Responses answer's id (`resp_…`): the response object's, or the one an event holds.
    response_id: str | None = None
    # The conversation the answer belongs to (the response object's `conversation.id`).
    conversation_id: str | None = None

    def feed(self, chunk: bytes) -> None:
        if self._overflow:
            return
        self._buffer.extend(chunk)
        if self.streaming and not self._events and _DOCUMENT_START.match(self._buffer):
            # A stream asked for and one JSON document answered (a model server or proxy that
            # ignores `stream`): read as the document it is, not as events it has none of.
            self.streaming = False
        if self.streaming:
            self._read_events()
        elif len(self._buffer) > _MAX_BUFFERED_RESPONSE:
            self._overflow = True  # too big to parse: estimate from the prompt instead
            self._buffer.clear()

    @property
    def ended(self) -> bool:
        """Whether the answer holds a response object whose `status` says it has generated
        all it will (FINAL_STATUSES): read once `finish` has read the answer."""
        return self._status in FINAL_STATUSES

    def finish(self) -> Usage:
        """The usage the upstream reported, else an estimate (marked so)."""
        if self.streaming:
            self._buffer.extend(b"\n")
            self._read_events()
        elif not self._overflow:
            self._unreadable = not self._read_document(bytes(self._buffer))
        self._buffer.clear()
        # A background answer's usage counts only once the response is finished: one that
        # says it is still queued or running has more to generate, whatever usage it shows.
        unfinished = self.background and not self.ended
        if self._usage is not None and not unfinished:
            return self._usage
        completion = math.ceil(self._completion_chars / CHARS_PER_TOKEN)
        # An answer that could not be read whole (too big, cut off mid-body, garbled) hides
        # what was generated, as one generated after it ends does (background): it is charged
        # its reservation, never the prompt alone.
        hidden = self._overflow or self._unreadable or self._unreadable_usage or self.background
        if hidden and self.ceiling is not None:
            completion = max(completion, self.ceiling - self.prompt_estimate)
        return Usage(self.prompt_estimate, completion, estimated=True)

    def _read_events(self) -> None:
        while True:
            end = self._buffer.find(b"\n")
            if end < 0:
                return
            line = bytes(self._buffer[:end]).strip()
            del self._buffer[: end + 1]
            if line.startswith(b"data:"):
                self._events = True
                data = line[5:].strip()
                if data and data != b"[DONE]":
                    self._read_document(data)

    def _read_document(self, data: bytes) -> bool:
        """Read one JSON document's usage and text; False when it is no JSON object."""
        try:
            document = json.loads(data)
        except (ValueError, UnicodeDecodeError):
            return False
        if not isinstance(document, dict):
            return False
        usage = _usage(document.get("usage"))
        held = document.get("response")  # a Responses event (`response.completed`) holds it
        if usage is None and isinstance(held, dict):
            usage = _usage(held.get("usage"))
        if usage is False:
            self._unreadable_usage = True
        elif usage is not None:
            self._usage = usage
        response = held if isinstance(held, dict) else document
        found = _response_id(response)
        if found is not None:
            self.response_id = found
            status = response.get("status")
            self._status = status if isinstance(status, str) else None
            self.conversation_id = _conversation_id(response) or self.conversation_id
        for choice in document.get("choices") or ():
            if isinstance(choice, dict):
                self._completion_chars += _choice_chars(choice)
        self._completion_chars += _output_chars(document)
        return True


def _response_id(document: Mapping[str, Any]) -> str | None:
    """The id of a response object (`object: response`), else None."""
    found = document.get("id")
    return found if document.get("object") == "response" and isinstance(found, str) else None


def _conversation_id(response: Mapping[str, Any]) -> str | None:
    """The id of the conversation a response object belongs to (`conversation: {id}`)."""
    held = response.get("conversation")
    found = held.get("id") if isinstance(held, dict) else None
    return found if isinstance(found, str) else None


def output_tokens(response: Mapping[str, Any]) -> int:
    """The tokens of a response object's output text, estimated as UsageMeter estimates an
    answer without usage: ⌈characters ÷ CHARS_PER_TOKEN⌉."""
    return math.ceil(_output_chars(response) / CHARS_PER_TOKEN)


def _output_chars(document: Mapping[str, Any]) -> int:
    """Characters of a Responses answer's text: a whole response's `output` items, or one
    `response.output_text.delta` event (never both for one answer: a stream's events carry
    no `object: response`)."""
    if document.get("type") == "response.output_text.delta":
        delta = document.get("delta")
        return len(delta) if isinstance(delta, str) else 0
    if document.get("object") != "response":
        return 0
    parts = [
        part
        for item in document.get("output") or ()
        if isinstance(item, dict)
        for part in item.get("content") or ()
        if isinstance(part, dict)
    ]
    return sum(_choice_chars(part) for part in parts)  # a part's `text`, as a choice's


def _usage(value: Any) -> Usage | Literal[False] | None:
    """Chat and completions' `prompt_tokens`/`completion_tokens`, or the Responses API's
    `input_tokens`/`output_tokens` (`whole_count`s); None when there is no usage object,
    False when there is one without a count the gateway can read (its answer is then charged
    as one it cannot read: its reservation)."""
    if not isinstance(value, dict):
        return None
    prompt = whole_count(value.get("prompt_tokens", value.get("input_tokens")))
    completion = whole_count(value.get("completion_tokens", value.get("output_tokens", 0)))
    total = whole_count(value.get("total_tokens"))
    if prompt is None or completion is None:
        return Usage(0, total, estimated=False) if total is not None else False
    if total is not None and total > prompt + completion:
        completion = total - prompt  # e.g. reasoning tokens counted only in the total
    return Usage(prompt, completion)


def whole_count(value: Any) -> int | None:
    """A token count a model server reports, as both gateways read it: a whole number from 0
    up to 2^53 (the nginx module's doubles hold no larger exact count), a JSON number with a
    zero fraction (`10.0`) counting as one (cjson cannot tell it from `10`); None for
    anything else — `true` (a bool is an int in Python), `-5`, `1.5`, `"10"`, `1e30`."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    if not 0 <= value < _EXACT_COUNT or (isinstance(value, float) and not value.is_integer()):
        return None  # NaN fails the comparison too
    return int(value)


def _choice_chars(choice: Mapping[str, Any]) -> int:
    total = 0
    for holder in (choice.get("delta"), choice.get("message"), choice):
        if isinstance(holder, dict):
            for name in ("content", "text"):
                value = holder.get(name)
                if isinstance(value, str):
                    total += len(value)
    return total
