"""The module's pieces inside the running nginx against Python's: key names (hash tags, escaped
ids, IPv6 /64s) and request estimates and rewrites (unicode, tools, n, token arrays)."""

from __future__ import annotations

import json
from typing import Any

import pytest

from controller.contract.enforcement import EnforcementKeys, ip_id
from controller.gateway.background import BackgroundCharge, finished, running
from controller.gateway.conversations import ConversationCall, added_tokens, route
from controller.gateway.limits import resolve
from controller.gateway.openai import (
    ModelRequest,
    RequestError,
    RequestKind,
    UsageChunkFilter,
    UsageMeter,
)
from controller.gateway.waits import pauses, tenant_share
from tests.nginx.conftest import Side

pytestmark = pytest.mark.integration

DEFAULT_MAX_TOKENS = 1024


@pytest.mark.parametrize(
    ("tenant", "plan", "user", "ip"),
    [
        ("acme", "free", None, "127.0.0.1"),
        ("a:b", "p:1", "u:2", "2001:db8::1"),
        ("t.1", "p", None, "::ffff:10.1.2.3"),
        ("t", "p", "u", None),
        ("T~x=y", "plan+1", "user-9", "2001:DB8:0:0:1::1"),
    ],
)
def test_key_names_are_pythons(
    nginx: Side, tenant: str, plan: str, user: str | None, ip: str | None
) -> None:
    params = {"prefix": "gov-1", "tenant": tenant, "plan": plan, "user": user or "",
              "ip": ip or ""}  # fmt: skip
    lua = nginx.http.get(f"{nginx.url}/_probe/keys", params=params).json()

    keys = EnforcementKeys.for_prefix("gov-1")
    python_ip = ip_id(ip) if ip else ""
    assert lua["ip"] == python_ip
    assert lua["admit"] == list(keys.admit_keys(tenant, user, python_ip))
    assert lua["settle"] == list(keys.settle_keys(tenant, user, python_ip))
    assert lua["charge"] == list(keys.charge_keys(tenant, user, python_ip, "r1.background"))


@pytest.mark.parametrize(
    "response_id", ["resp_0123abcd", "a:b", "resp/../x", "", "x" * 128, "x" * 129, "résp"]
)
def test_a_responses_record_key_is_pythons(nginx: Side, response_id: str) -> None:
    """The tokens of an earlier response, under the tenant's tag; an id that is no safe id
    makes no key in either gateway (a request naming it reserves the default)."""
    params = {"prefix": "gov-1", "tenant": "a:b", "plan": "p", "response": response_id}

    lua = nginx.http.get(f"{nginx.url}/_probe/keys", params=params).json()

    try:
        python: str | None = EnforcementKeys.for_prefix("gov-1").schema.response("a:b", response_id)
    except ValueError:
        python = None
    assert lua["response"] == python
    if python is not None:
        assert python.startswith("gov-1:{t:a%3Ab}:response:")
        schema = EnforcementKeys.for_prefix("gov-1").schema
        assert lua["conversation"] == schema.conversation("a:b", response_id)
        assert lua["background"] == schema.background("a:b", response_id)
    else:
        assert lua["conversation"] is None
        assert lua["background"] is None


STATUSES: list[Any] = ["incomplete", "failed", "cancelled", "queued", "in_progress", None, 1, []]
FINISHED: dict[str, Any] = {"id": "resp_1", "object": "response", "status": "completed",
            "usage": {"input_tokens": 7, "output_tokens": 5, "total_tokens": 12}}  # fmt: skip
CHARGED = BackgroundCharge("r1", "free", None, None, "gpt-4o", 9, 16, None, 20000)
CANCELLED: dict[str, Any] = {**FINISHED, "status": "cancelled", "usage": None}


def _message(*texts: Any) -> dict[str, Any]:
    parts = [{"type": "output_text", "text": text} for text in texts]
    return {"type": "message", "role": "assistant", "content": parts}


OUTPUTS: list[Any] = [
    [_message("héllo wörld ✓")],  # 13 code points: 4 tokens
    [_message("ab", "cde"), _message("f"), {"type": "reasoning"}],  # 6: 2 tokens
    [_message("x" * 400)],  # 100 tokens, past the 16 reserved: 16
    [],  # vLLM's and SGLang's cancel: the object stored at queue time
    None,
    [_message(7), "text", None],
    [_message("")],
    [{"type": "reasoning"}],
]

# Cancelled without usage: the output it holds, in code points, up to max_output_tokens.
CANCELLED_ANSWERS: list[Any] = [{**CANCELLED, "output": output} for output in OUTPUTS]
CANCELLED_ANSWERS += [
    {key: value for key, value in CANCELLED.items() if key != "usage"},
    {**CANCELLED, "usage": {}},  # a usage without counts: no estimate, the charge stands
    {**CANCELLED, "status": "failed"},  # only a cancel: a failure says nothing of it
]


# Another id or object, a usage without counts or with counts that are none, not a dict.
VARIANTS: list[Any] = [
    {**FINISHED, "id": "resp_2"},
    {**FINISHED, "object": "conversation"},
    {**FINISHED, "usage": None},
    {**FINISHED, "usage": {"input_tokens": 7}},
    {**FINISHED, "usage": {"input_tokens": -7, "output_tokens": 5}},
    {**FINISHED, "usage": {"input_tokens": 7.5, "output_tokens": 5}},
    {**FINISHED, "usage": {"input_tokens": "7", "output_tokens": 5}},
    {**FINISHED, "usage": {"input_tokens": True, "output_tokens": 5}},
    {**FINISHED, "usage": {"input_tokens": 7, "output_tokens": 5, "total_tokens": 30}},
    {**FINISHED, "usage": {"input_tokens": 7, "output_tokens": 5, "total_tokens": 3}},
    {**FINISHED, "usage": {"input_tokens": 2**60, "output_tokens": 5}},
    {**FINISHED, "usage": {"input_tokens": 7.0, "output_tokens": 5.0}},
    [FINISHED],
    "resp_1",
]
ANSWERS: list[Any] = [FINISHED, *({**FINISHED, "status": status} for status in STATUSES)]
ANSWERS += VARIANTS + CANCELLED_ANSWERS


@pytest.mark.parametrize("answer", ANSWERS)
def test_a_finished_responses_usage_is_read_as_python_reads_it(nginx: Side, answer: Any) -> None:
    """What settles a background response: only a finished one gives its slots back, and it
    is charged at its usage only with counts that are counts, or, cancelled without usage,
    at an estimate from its output (within its reservation); only one still running (queued,
    in_progress) renews its slots' lease."""
    lua = nginx.http.post(f"{nginx.url}/_probe/final_usage",
                          params={"id": "resp_1", "record": CHARGED.encoded()},
                          content=json.dumps(answer)).json()  # fmt: skip
    done, python = finished(json.dumps(answer).encode(), "resp_1", CHARGED)
    expected = python and {"prompt": python.prompt, "completion": python.completion}
    assert (lua["finished"], lua["usage"]) == (done, expected)
    still = running(json.dumps(answer).encode(), "resp_1")
    assert lua["running"] is still
    runs = isinstance(answer, dict) and answer.get("status") in ("queued", "in_progress")
    assert still is runs


@pytest.mark.parametrize("output", [[], None, [_message("")], [{"type": "reasoning"}]])
def test_a_cancel_answered_without_output_text_leaves_the_reservation_charged(
    nginx: Side, output: Any
) -> None:
    """vLLM and SGLang answer a cancel with the object stored at queue time (`output: []`,
    `usage: null`) however much was generated: estimated from that, the charge was the
    prompt alone. Both gateways read it finished (its slots come back) with no usage (the
    whole reservation stays charged)."""
    answer = {**CANCELLED, "output": output}
    lua = nginx.http.post(f"{nginx.url}/_probe/final_usage",
                          params={"id": "resp_1", "record": CHARGED.encoded()},
                          content=json.dumps(answer)).json()  # fmt: skip
    assert finished(json.dumps(answer).encode(), "resp_1", CHARGED) == (True, None)
    assert (lua["finished"], lua["usage"]) == (True, None)


@pytest.mark.parametrize(
    "record",
    [
        BackgroundCharge("r1", "free", None, None, "gpt-4o", 7, 900, None, 20000).encoded(),
        BackgroundCharge("r1", "p", "u:1", "10.0.0.1", "M", 0, 1, 1351, 20000).encoded(),
        '{"request_id": "r1"}',
        BackgroundCharge("r1", "p", None, None, "m", -1, 1, None, 2).encoded(),
        BackgroundCharge("r1", "p", 7, None, "m", 1, 1, None, 2).encoded(),  # type: ignore[arg-type]
        "[]",
        "nonsense",
    ],
)
def test_a_background_charge_record_is_read_as_python_reads_it(nginx: Side, record: str) -> None:
    """What a background answer was charged, as either gateway wrote it: read alike, and one
    no gateway writes read by neither (the charge then stands)."""
    lua = nginx.http.post(f"{nginx.url}/_probe/final_usage", params={"id": "x", "record": record},
                          content=b"{}").json()  # fmt: skip
    python = BackgroundCharge.decoded(record)
    if python is None:
        assert lua["charged"] is None
    else:
        assert json.loads(lua["charged"]) == json.loads(python.encoded())


@pytest.mark.parametrize("ip", ["999.1.1.1", "01.2.3.4", "fe80::1%eth0", "1::2::3", "x"])
def test_an_address_python_refuses_counts_no_ip_level(nginx: Side, ip: str) -> None:
    params = {"prefix": "p", "tenant": "t", "plan": "p", "ip": ip}

    lua = nginx.http.get(f"{nginx.url}/_probe/keys", params=params).json()

    # The Python gateway has no ip level for it either.
    with pytest.raises(ValueError, match=r"IPv4 or IPv6 address|hex digits"):
        ip_id(ip)
    assert lua["ip"] == ""
    assert lua["admit"][3] == lua["admit"][5]  # the ip slot holds the tenant's own state


TOOL = {
    "type": "function",
    "function": {"name": "f", "description": 'ünï "q"', "parameters": {"a": [1, 2.5, True, None]}},
}
BODIES: list[tuple[RequestKind, Any]] = [
    ("chat", {"model": "m", "messages": [{"role": "user", "content": "héllo wörld ✓ 😀"}]}),
    ("chat", {"model": "é" * 255 + "😀", "messages": [{"role": "user", "content": "x"}]}),
    ("chat", {"model": "m", "n": 3, "max_tokens": 7, "messages": [
        {"role": "system", "content": "be brief", "name": "x"},
        {"role": "user", "content": [{"type": "text", "text": "hi there"}]}]}),
    ("chat", {"model": "m", "messages": [{"role": "user", "content": "q"}], "tools": [TOOL],
              "max_completion_tokens": 9, "stop": [], "logit_bias": {}}),
    ("chat", {"model": "m", "messages": [{"role": "user", "content": "s"}], "stream": True,
              "stream_options": {"foo": 1}}),
    ("chat", {"model": "m", "messages": [{"role": "user", "content": "s"}], "stream": True,
              "max_tokens": 3, "big": 12345678901234567}),
    ("completion", {"model": "m", "prompt": [[1, 2, 3], "text"], "best_of": 2, "max_tokens": 4}),
    ("completion", {"model": "m", "prompt": "no max tokens"}),
    # A batch is answered prompt by prompt; token ids are one prompt; odd items count too.
    ("completion", {"model": "m", "prompt": ["a", "bb", "ccc"], "n": 2, "max_tokens": 5}),
    ("completion", {"model": "m", "prompt": [1, 2, 3], "n": 2, "max_tokens": 5}),
    ("completion", {"model": "m", "prompt": ["a", {"b": 1}, 7, None], "max_tokens": 5}),
    ("completion", {"model": "m", "prompt": ["a", "b"]}),
    # Completions have no max_completion_tokens: max_tokens counts, or the default goes in.
    ("completion", {"model": "m", "prompt": "p", "max_completion_tokens": 1, "max_tokens": 90}),
    ("completion", {"model": "m", "prompt": "p", "max_completion_tokens": 1}),
    # Both chat caps: the larger is reserved; no cap but a null one: the default goes there.
    ("chat", {"model": "m", "messages": [{"role": "user", "content": "s"}],
              "max_completion_tokens": 1, "max_tokens": 90}),
    ("chat", {"model": "m", "messages": [{"role": "user", "content": "s"}],
              "max_completion_tokens": None}),
    ("embedding", {"model": "m", "input": ["a", "bb", "ccc"]}),
    # The Responses API: input a text or items (each counted as a chat message), instructions,
    # tools and the output format read too; its cap is max_output_tokens (written in when
    # absent), and its stream carries the usage unasked (stream_options left alone).
    ("response", {"model": "m", "input": "héllo ✓", "max_output_tokens": 12}),
    ("response", {"model": "m", "instructions": "be brief", "input": [
        {"role": "user", "content": [{"type": "input_text", "text": "hi there"}]},
        {"role": "assistant", "content": "earlier"}], "tools": [TOOL],
        "text": {"format": {"type": "json_schema", "name": "x", "schema": {"type": "object"}}}}),
    ("response", {"model": "m", "input": "s", "stream": True, "max_tokens": 50}),
    # An earlier response named (its tokens are added at admission, from Redis), or none.
    ("response", {"model": "m", "input": "go on", "previous_response_id": "resp_1",
                  "store": False}),
    ("response", {"model": "m", "input": "go on", "previous_response_id": None}),
    ("response", {"model": "m", "input": "go on", "previous_response_id": ""}),
    ("chat", {"model": "m", "messages": [{"role": "user", "content": "s"}],
              "previous_response_id": "resp_1"}),
    # A conversation named: by its id, or an object holding it.
    ("response", {"model": "m", "input": "go on", "conversation": "conv_1"}),
    ("response", {"model": "m", "input": "go on", "conversation": {"id": "conv_2"}}),
    ("response", {"model": "m", "input": "go on", "conversation": None}),
]  # fmt: skip
REFUSED: list[tuple[RequestKind, Any]] = [
    ("chat", {"model": "m", "messages": []}),
    ("chat", {"model": 5, "messages": [{"role": "user", "content": "s"}]}),
    ("chat", {"model": "é" * 257, "messages": [{"role": "user", "content": "s"}]}),
    ("chat", {"model": "a\u0000b", "messages": [{"role": "user", "content": "s"}]}),
    ("chat", {"model": "a\nb", "messages": [{"role": "user", "content": "s"}]}),
    ("chat", {"model": "a\u009fb", "messages": [{"role": "user", "content": "s"}]}),
    ("embedding", {"model": "m"}),
    ("completion", {"model": "m"}),
    ("chat", [1, 2]),
    ("response", {"model": "m", "instructions": "no input"}),
    ("response", {"model": "m", "input": "x", "max_output_tokens": 0}),
    ("response", {"model": "m", "input": "x", "previous_response_id": 5}),
    ("response", {"model": "m", "input": "x", "previous_response_id": ["resp_a"]}),
    ("response", {"model": "m", "input": "x", "previous_response_id": True}),
    ("response", {"model": "m", "input": "x", "conversation": 5}),
    ("response", {"model": "m", "input": "x", "conversation": {"id": 5}}),
    ("response", {"model": "m", "input": "x", "conversation": {}}),
]


def probe(nginx: Side, kind: RequestKind, raw: bytes) -> Any:
    """openai.parse in the running nginx: the estimate and the body it would send on."""
    params = {"kind": kind, "default": str(DEFAULT_MAX_TOKENS)}
    return nginx.http.post(f"{nginx.url}/_probe/request", params=params, content=raw).json()


@pytest.mark.parametrize(("kind", "body"), BODIES)
def test_estimates_and_rewrites_are_pythons(nginx: Side, kind: RequestKind, body: Any) -> None:
    raw = json.dumps(body, ensure_ascii=False).encode()

    lua = probe(nginx, kind, raw)

    request = ModelRequest.parse(kind, raw, DEFAULT_MAX_TOKENS)
    if request.streaming:
        request.ask_for_stream_usage()
    assert lua["tokens"] == request.worst_case_tokens
    assert lua["prompt"] == request.prompt_tokens
    assert (lua["previous"], lua["stored"]) == (request.previous_response_id, request.stored)
    assert lua["conversation"] == request.conversation_id
    # The rewritten body says what Python's says; what was not rewritten keeps its bytes.
    assert json.loads(lua["body"]) == json.loads(request.encoded())
    if not request.changed:
        assert lua["body"].encode() == raw


@pytest.mark.parametrize(("kind", "body"), REFUSED)
def test_refusals_say_what_python_says(nginx: Side, kind: RequestKind, body: Any) -> None:
    raw = json.dumps(body).encode()

    lua = probe(nginx, kind, raw)

    with pytest.raises(RequestError) as refused:
        ModelRequest.parse(kind, raw, DEFAULT_MAX_TOKENS)
    assert lua == {"error": str(refused.value)}


PREFIX_BYTES = b'{"model":"m","prompt":"'
# Bytes that are no UTF-8 (after 23 + 9 bytes that are): latin-1, a lone continuation byte,
# overlong forms, a surrogate, past U+10FFFF, no lead byte at all, a sequence cut short.
NOT_UTF8 = [b"\xe9", b"\x80", b"\xc0\xaf", b"\xe0\x80\xaf", b"\xed\xa0\x80",
            b"\xf4\x90\x80\x80", b"\xf5", b"\xe2\x82"]  # fmt: skip


@pytest.mark.parametrize("bad", NOT_UTF8, ids=lambda bad: bad.hex())
def test_a_body_that_is_no_utf8_is_refused_at_the_byte_python_names(
    nginx: Side, bad: bytes
) -> None:
    """lua-cjson takes any byte inside a string: nginx forwarded a latin-1 body, which the
    Python gateway refuses."""
    raw = PREFIX_BYTES + "é✓😀".encode() + bad + b'","max_tokens":5}'

    lua = probe(nginx, "completion", raw)

    with pytest.raises(RequestError) as refused:
        ModelRequest.parse("completion", raw, DEFAULT_MAX_TOKENS)
    assert lua == {"error": str(refused.value)}
    assert "(byte 32 is not)" in lua["error"]


TWICE = {
    "model": b'{"model":"gpt-4","prompt":"p","model":"gpt-3.5-turbo"}',
    "max_tokens": b'{"model":"m","max_tokens":1,"prompt":"p","max_tokens":9000}',
    "escaped": b'{"model":"m","prompt":"p","\\u006dodel":"n"}',
    "first of two": b'{"n":1,"model":"m","prompt":"p","stream":false,"stream":true,"n":2}',
}


@pytest.mark.parametrize("case", list(TWICE))
def test_a_member_named_twice_is_refused_by_both_gateways(nginx: Side, case: str) -> None:
    """Both gateways checked the last `model` or `max_tokens` of a body naming one twice; a
    model server reading the first would run a model the plan forbids or an uncapped answer."""
    raw = TWICE[case]

    lua = probe(nginx, "completion", raw)

    with pytest.raises(RequestError) as refused:
        ModelRequest.parse("completion", raw, DEFAULT_MAX_TOKENS)
    assert lua == {"error": str(refused.value)}
    named = {"model": "model", "max_tokens": "max_tokens", "escaped": "model",
             "first of two": "stream"}[case]  # fmt: skip
    assert f"names `{named}` twice: send each member once" in lua["error"]


@pytest.mark.parametrize("escape", [rb"\ud800", rb"\udc00x", rb"\ud83d\u0041"])
def test_half_a_surrogate_pair_is_refused_by_both_gateways(nginx: Side, escape: bytes) -> None:
    """Python's json read `\\ud800` into a string no UTF-8 can hold and served it; the nginx
    module's cjson refuses it: one body, two answers."""
    raw = b'{"model":"m","max_tokens":5,"prompt":"a' + escape + b'"}'

    assert "error" in probe(nginx, "completion", raw)
    with pytest.raises(RequestError) as refused:
        ModelRequest.parse("completion", raw, DEFAULT_MAX_TOKENS)
    assert "half a surrogate pair" in str(refused.value)
    whole = b'{"model":"m","max_tokens":5,"prompt":"a\\ud83d\\ude00 \\\\ud800"}'
    assert "error" not in probe(nginx, "completion", whole)  # a pair, and an escaped backslash
    ModelRequest.parse("completion", whole, DEFAULT_MAX_TOKENS)


def test_a_name_repeated_only_inside_a_message_is_no_refusal(nginx: Side) -> None:
    raw = b'{"model":"m","messages":[{"role":"user","content":"a","content":"b"}]}'
    assert "error" not in probe(nginx, "chat", raw)
    ModelRequest.parse("chat", raw, DEFAULT_MAX_TOKENS)


def test_utf16_or_a_byte_order_mark_is_no_json_for_either_gateway(nginx: Side) -> None:
    """Python's json.loads(bytes) read UTF-16 and UTF-32 (and a UTF-8 BOM), which nginx
    refuses: the same body was served by one gateway and refused by the other."""
    document = {"model": "m", "prompt": "p", "max_tokens": 5}
    for raw in (json.dumps(document).encode("utf-16"), json.dumps(document).encode("utf-32"),
                b"\xef\xbb\xbf" + json.dumps(document).encode()):  # fmt: skip
        with pytest.raises(RequestError):
            ModelRequest.parse("completion", raw, DEFAULT_MAX_TOKENS)
        assert "error" in probe(nginx, "completion", raw)


STREAM = (
    b'data: {"choices":[{"delta":{"content":"h\\u00e9"}}]}\r\n\r\n'
    b'data: {"choices":[],"usage":{"prompt_tokens":7,"completion_tokens":2}}\n\n'
    b'data: {"choices":[],"note":"no usage: kept"}\n\n'
    b": a comment\n\ndata: [DONE]\n\n"
)


@pytest.mark.parametrize("size", [1, 5, 64, len(STREAM)])
def test_the_usage_chunk_is_stripped_as_python_strips_it(nginx: Side, size: int) -> None:
    lua = nginx.http.post(f"{nginx.url}/_probe/strip", params={"size": size}, content=STREAM)

    strip = UsageChunkFilter()
    pieces = [STREAM[i : i + size] for i in range(0, len(STREAM), size)]
    python = b"".join(strip.feed(p, last=i == len(pieces) - 1) for i, p in enumerate(pieces))
    assert lua.content == python
    assert b'"usage"' not in python
    assert b"no usage: kept" in python


SHARED = {"concurrent_requests": "40", "concurrent_headroom": "0.05"}


@pytest.mark.parametrize(
    ("global_", "tenant", "plan", "model"),
    [
        (SHARED, {}, {"concurrent_weight": "4"}, ""),  # the plan's weight
        (SHARED, {"concurrent_weight": " 2.5 "}, {"concurrent_weight": "4"}, "gpt-4"),  # its own
        (SHARED, {"requests_per_minute": "60"}, {}, ""),  # no weight written: 1
        ({"concurrent_headroom": "0.1"}, {}, {"concurrent_weight": "3"}, ""),  # nothing to share
        ({"concurrent_requests@gpt-4": "9", "concurrent_headroom": "0.1"}, {}, {}, "gpt-4"),
        ({**SHARED, "requests_per_second": "5"}, {"concurrent_requests": "3"}, {}, ""),
        (SHARED, {"concurrent_weight": "0"}, {}, ""),  # a 0 sheds, like any value
        ({"concurrent_headroom": "x", "concurrent_requests": "4"}, {}, {}, ""),
        # Out of range, out of place or for one model: no share anyone meant, it sheds.
        ({"concurrent_requests": "9", "concurrent_headroom": "5"}, {}, {}, ""),
        (SHARED, {}, {"concurrent_weight": "2e6"}, ""),
        (SHARED, {"concurrent_weight": "0.0001"}, {}, ""),
        ({**SHARED, "concurrent_weight": "2"}, {}, {}, ""),
        (SHARED, {}, {"concurrent_headroom": "0.1"}, ""),
        (SHARED, {"concurrent_weight@gpt-4": "8", "concurrent_weight": "2"}, {}, "gpt-4"),
        ({**SHARED, "concurrent_headroom@gpt-4": "0.5"}, {}, {}, "gpt-4"),
        (SHARED, {"concurrent_weight@gpt-4": "8"}, {}, ""),  # another model's: not read
    ],
)
def test_the_limits_resolve_as_pythons(
    nginx: Side, global_: dict[str, str], tenant: dict[str, str], plan: dict[str, str],
    model: str,
) -> None:  # fmt: skip
    levels: list[tuple[str, list[dict[str, str]]]] = [
        ("global/", [global_]), ("", []), ("tenant/acme/", [tenant, plan]), ("", []),
    ]  # fmt: skip
    asked = {"version": "7", "levels": levels, "plan_owner": "plan/free/", "model": model}

    lua = nginx.http.post(f"{nginx.url}/_probe/limits", content=json.dumps(asked)).json()
    lua["limits"] = lua["limits"] or []  # cjson writes an empty array as {}

    hashes: list[tuple[str, list[dict[str, str] | None]]] = [
        (owner, [*found] or [None]) for owner, found in levels
    ]
    python = resolve("7", hashes, "plan/free/", model)
    assert lua == {"letters": python.letters, "limits": list(python.limits[1:]),
                   "shed": python.shed}  # fmt: skip


RESPONSE_ANSWERS = {
    "whole": (False, b'{"id":"resp_1","object":"response","output":[{"content":[{"text":"hi '
                     b'there"}]}],"usage":{"input_tokens":7,"output_tokens":3}}'),
    "stream": (True, b'event: response.created\ndata: {"type":"response.created","response":'
                     b'{"id":"resp_2","object":"response","usage":null}}\n\n'
                     b'event: response.output_text.delta\ndata: {"type":"response.output_text'
                     b'.delta","delta":"hello"}\n\nevent: response.completed\ndata: {"type":'
                     b'"response.completed","response":{"id":"resp_2","object":"response",'
                     b'"usage":{"input_tokens":40,"output_tokens":2,"total_tokens":45}}}\n\n'),
    "no usage": (True, b'data: {"type":"response.created","response":{"id":"resp_3","object":'
                       b'"response"}}\n\ndata: {"type":"response.output_text.delta","delta":'
                       b'"12345"}\n\n'),
    "in a conversation": (False, b'{"id":"resp_4","object":"response","conversation":{"id":'
                                 b'"conv_9"},"usage":{"input_tokens":7,"output_tokens":3}}'),
    "a chat answer": (False, b'{"id":"cmpl-1","object":"chat.completion","choices":[],'
                             b'"usage":{"prompt_tokens":1,"completion_tokens":1}}'),
}  # fmt: skip


@pytest.mark.parametrize("case", list(RESPONSE_ANSWERS))
@pytest.mark.parametrize("size", [3, 4096])
def test_the_meter_finds_a_responses_id_as_python_does(nginx: Side, case: str, size: int) -> None:
    """The id a later `previous_response_id` names, recorded with the answer's tokens."""
    streaming, answer = RESPONSE_ANSWERS[case]
    params = {"size": size, "streaming": "1" if streaming else "0"}

    lua = nginx.http.post(f"{nginx.url}/_probe/meter", params=params, content=answer).json()

    meter = UsageMeter(streaming, 99)
    for i in range(0, len(answer), size):
        meter.feed(answer[i : i + size])
    usage = meter.finish()
    assert lua == {"prompt": usage.prompt_tokens, "completion": usage.completion_tokens,
                   "response_id": meter.response_id,
                   "conversation_id": meter.conversation_id}  # fmt: skip
    assert meter.response_id == {"whole": "resp_1", "stream": "resp_2", "no usage": "resp_3",
                                 "in a conversation": "resp_4",
                                 "a chat answer": None}[case]  # fmt: skip
    assert meter.conversation_id == ("conv_9" if case == "in a conversation" else None)


# A model server's usage as it may come, and what both gateways settle (prompt, completion;
# the prompt estimate is 99, the reservation 500).
USAGES = [
    ({"prompt_tokens": 10, "completion_tokens": 20}, (10, 20)),
    ({"prompt_tokens": 10.0, "completion_tokens": 20.0, "total_tokens": 30.0}, (10, 20)),
    ({"input_tokens": 7, "output_tokens": 3, "total_tokens": 12}, (7, 5)),
    ({"prompt_tokens": 8, "total_tokens": 8}, (8, 0)),  # an embedding
    ({"total_tokens": 40}, (0, 40)),
    ({"prompt_tokens": -1000, "completion_tokens": 20, "total_tokens": 10}, (0, 10)),
    # No count the gateway can read: charged the reservation, never an estimate from a few
    # characters (nor 1e30, nor a negative, nor `true` read as 1).
    ({"prompt_tokens": -1000, "completion_tokens": 20}, (99, 401)),
    ({"prompt_tokens": 1e30, "completion_tokens": 20}, (99, 401)),
    ({"prompt_tokens": 10**20, "completion_tokens": 20}, (99, 401)),
    ({"prompt_tokens": True, "completion_tokens": 20}, (99, 401)),
    ({"prompt_tokens": 1.5, "completion_tokens": 20}, (99, 401)),
    ({"prompt_tokens": "10", "completion_tokens": "20"}, (99, 401)),
    ({}, (99, 401)),
]


@pytest.mark.parametrize(("usage", "settled"), USAGES)
@pytest.mark.parametrize("streaming", [False, True])
def test_usage_is_read_as_python_reads_it_and_none_readable_costs_the_reservation(
    nginx: Side, usage: dict[str, Any], settled: tuple[int, int], streaming: bool
) -> None:
    """The Python gateway read `true` as 1 token and `10.0` as no count (an estimate from the
    text), nginx `10.0` as 10 and `1e30` as a count; a usage with no readable count was
    settled as the prompt estimate and a few characters. Both now read whole counts below
    2^53 (a JSON number with a zero fraction is one), and charge an answer whose usage they
    cannot read its reservation, as an answer cut off is."""
    document = {"choices": [{"message": {"content": "hello there"}}], "usage": usage}
    answer = json.dumps(document).encode()
    if streaming:
        answer = b"data: " + answer + b"\n\ndata: [DONE]\n\n"
    params = {"size": 4096, "streaming": "1" if streaming else "0", "ceiling": 500}
    lua = nginx.http.post(f"{nginx.url}/_probe/meter", params=params, content=answer).json()
    meter = UsageMeter(streaming, 99, 500)
    meter.feed(answer)
    found = meter.finish()
    assert (found.prompt_tokens, found.completion_tokens) == settled
    assert (lua["prompt"], lua["completion"]) == settled


BACKGROUND_ANSWERS = [
    ("queued", {"input_tokens": 0, "output_tokens": 0, "total_tokens": 0}, (99, 401)),
    ("in_progress", {"input_tokens": 7, "output_tokens": 2}, (99, 401)),
    ("queued", None, (99, 401)),
    (None, {"input_tokens": 7, "output_tokens": 2}, (99, 401)),
    ("completed", {"input_tokens": 7, "output_tokens": 2}, (7, 2)),
    ("cancelled", {"input_tokens": 7, "output_tokens": 0}, (7, 0)),
]


@pytest.mark.parametrize(("status", "usage", "settled"), BACKGROUND_ANSWERS)
def test_a_background_answer_is_charged_its_usage_only_once_finished(
    nginx: Side, status: str | None, usage: dict[str, int] | None, settled: tuple[int, int]
) -> None:
    """A background answer is the response queued: a model server that showed a usage there
    (zeros, or what it had so far) was charged that, and the rest it generated went
    unmetered. Both gateways count its usage only once its `status` says it is finished."""
    document: dict[str, Any] = {"id": "resp_1", "object": "response", "status": status,
                                "output": [], "usage": usage}  # fmt: skip
    answer = json.dumps(document).encode()
    params: dict[str, str | int] = {"size": 4096, "streaming": "0", "ceiling": 500,
                                    "background": "1"}  # fmt: skip
    lua = nginx.http.post(f"{nginx.url}/_probe/meter", params=params, content=answer).json()
    meter = UsageMeter(False, 99, 500, background=True)
    meter.feed(answer)
    found = meter.finish()
    assert (found.prompt_tokens, found.completion_tokens) == settled
    assert (lua["prompt"], lua["completion"]) == settled


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("POST", "/v1/conversations"), ("GET", "/v1/conversations"),
        ("GET", "/v1/conversations/conv_1"), ("POST", "/v1/conversations/conv_1"),
        ("DELETE", "/v1/conversations/conv_1"), ("PUT", "/v1/conversations/conv_1"),
        ("HEAD", "/v1/conversations/conv_1/items"), ("POST", "/v1/conversations/conv_1/items"),
        ("DELETE", "/v1/conversations/conv_1/items"), ("GET", "/v1/conversations/c/items/m:1"),
        ("DELETE", "/v1/conversations/c/items/m_1"), ("POST", "/v1/conversations/c/items/m_1"),
        ("GET", "/v1/conversations/c/items/m 1"), ("GET", "/v1/conversations/c/other"),
        ("GET", "/v1/conversations/c/items/m/x"), ("GET", "/v1/conversations/"),
        ("GET", "/v1/conversations//items"), ("GET", "/v1/conversations/./items"),
        ("GET", "/v1/conversations/résumé"), ("GET", "/v1/conversations/" + "c" * 129),
        ("GET", "/v1/conversationsX"), ("POST", "/v1/responses"),
        # A stored response's own routes, and what is none of them ("METHOD path").
        *(tuple(case.split(" ")) for case in (
            "GET /v1/responses", "GET /v1/responses/resp_1", "HEAD /v1/responses/resp_1",
            "DELETE /v1/responses/resp_1", "POST /v1/responses/resp_1",
            "GET /v1/responses/resp_1/input_items", "POST /v1/responses/resp_1/cancel",
            "GET /v1/responses/resp_1/cancel", "GET /v1/responses/resp_1/input_items/m_1",
            "GET /v1/responses/r/items", "GET /v1/responses/résumé", "GET /v1/responses/",
            "GET /v1/responses//input_items", "GET /v1/responses/../models",
            "GET /v1/responsesX",
        )),
    ],
)  # fmt: skip
def test_a_conversations_api_route_is_pythons(nginx: Side, method: str, path: str) -> None:
    params = {"method": method, "path": path}

    lua = nginx.http.post(f"{nginx.url}/_probe/conversation", params=params, content=b"{}")

    python = route(method, path)
    expected: Any = python
    if isinstance(python, ConversationCall):
        expected = {k: v for k, v in vars(python).items() if v is not None}
    assert lua.json()["route"] == expected


@pytest.mark.parametrize(
    "body",
    [
        {"items": [{"type": "message", "role": "user", "content": "héllo wörld 😀"}]},
        {"items": [{"type": "message", "role": "user",
                    "content": [{"type": "input_text", "text": "a" * 37}]},
                   {"type": "message", "role": "assistant", "content": "b"}]},
        {"items": [{"type": "input_image", "image_url": "data:image/png;base64,AAAA"}]},
        {"items": [[1, 2, 3], "text", 7, None, True]},
        {"items": []}, {"items": None}, {"metadata": {"k": "v"}}, {},
        {"items": {"type": "message"}}, {"items": "x"}, {"items": 3},
    ],
)  # fmt: skip
def test_a_conversations_items_estimate_is_pythons(nginx: Side, body: Any) -> None:
    raw = json.dumps(body, ensure_ascii=False).encode()

    lua = nginx.http.post(f"{nginx.url}/_probe/conversation",
                          params={"method": "POST", "path": "/v1/conversations"},
                          content=raw).json()  # fmt: skip

    python: dict[str, Any] = {"tokens": None, "problem": None}
    try:
        python["tokens"] = added_tokens("create", raw)
    except RequestError as exc:
        python["problem"] = str(exc)
    assert {"tokens": lua["tokens"], "problem": lua["problem"]} == python


@pytest.mark.parametrize(
    ("seconds", "waiters"), [(0.5, 64), (0, 0), (0.01, 1), (0.3, 3), (2, 10_000), (0.025, 7)]
)
def test_a_lookup_waits_for_a_record_as_python_does(
    nginx: Side, seconds: float, waiters: int
) -> None:
    """The pauses between lookups of a record not there yet, and a tenant's share of the
    waits, computed by the running module as by controller/gateway/waits.py."""
    params = {"seconds": str(seconds), "waiters": str(waiters)}

    lua = nginx.http.get(f"{nginx.url}/_probe/waits", params=params).json()

    assert lua.get("pauses", []) == pytest.approx(pauses(seconds), abs=1e-12)
    assert lua["share"] == tenant_share(waiters)
