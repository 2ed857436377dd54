"""Streamed answers pass chunk by chunk and are settled from their usage chunk (or from an
estimate, said so in the metrics, when the upstream sends none)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import AbstractContextManager

import httpx

from controller.gateway.openai import CHARS_PER_TOKEN, ModelRequest
from tests.gateway.conftest import Gateway, budget_remaining
from tests.gateway.fake_upstream import WORDS, FakeUpstream

MESSAGES = [{"role": "user", "content": "tell me a story"}]


def parsed(max_tokens: int) -> ModelRequest:
    body = {"model": "gpt-3.5-turbo", "messages": MESSAGES, "max_tokens": max_tokens}
    return ModelRequest.parse("chat", json.dumps(body).encode(), 1024)


def worst_case(max_tokens: int) -> int:
    return parsed(max_tokens).worst_case_tokens


def estimate(text: str) -> int:
    """The gateway's documented estimate: the prompt's, plus ⌈characters / 4⌉ of the answer."""
    return parsed(1).prompt_tokens + -(-len(text) // CHARS_PER_TOKEN)


def data_lines(lines: Iterator[str]) -> Iterator[str]:
    return (line for line in lines if line.startswith("data:"))


def stream(gateway: Gateway, key: str, **knobs: str) -> AbstractContextManager[httpx.Response]:
    """A streamed chat request (max_tokens 40) with the fake's knobs as headers."""
    body = {"model": "gpt-3.5-turbo", "messages": MESSAGES, "max_tokens": 40, "stream": True}
    headers = {"authorization": f"Bearer {key}"} | {
        f"x-fake-{name}": value for name, value in knobs.items()
    }
    return gateway.http.stream(
        "POST", f"{gateway.url}/v1/chat/completions", json=body, headers=headers
    )


def test_chunks_reach_the_client_while_the_upstream_is_still_streaming(
    gateway: Gateway, held: FakeUpstream
) -> None:
    key = gateway.key("acme", "free")

    with stream(gateway, key, hold="1", tokens="6") as answer:
        assert answer.status_code == 200
        assert answer.headers["x-ratelimit-remaining-requests"] == "9"
        events = data_lines(answer.iter_lines())
        first = json.loads(next(events)[5:])
        # The upstream holds everything after its first chunk until released: this chunk
        # came through the gateway on its own.
        assert not held.release.is_set()
        assert first["choices"][0]["delta"]["content"] == WORDS[0]
        held.release.set()
        rest = list(events)

    assert rest[-1] == "data: [DONE]"
    # The gateway asked for the usage chunk on the client's behalf...
    sent = held.last().body
    assert sent is not None
    assert sent["stream_options"] == {"include_usage": True}
    # ...took it out of the stream (the client did not ask: `choices[0]` must always work)...
    chunks = [json.loads(line[5:]) for line in rest[:-1]]
    assert len(chunks) == 5
    assert all(chunk["choices"] for chunk in chunks)
    # ...and settled from it: the next admission sees exactly that usage spent.
    prompt = 7 + len(json.dumps(MESSAGES)) // 10  # the fake's own count
    after = gateway.chat(key, messages=MESSAGES, max_tokens=40)
    assert budget_remaining(after) == 1000 - (prompt + 6) - worst_case(40)


def test_a_client_that_asks_for_usage_gets_its_chunk(gateway: Gateway) -> None:
    key = gateway.key("acme", "free")
    body = {"model": "gpt-3.5-turbo", "messages": MESSAGES, "max_tokens": 40, "stream": True,
            "stream_options": {"include_usage": True}}  # fmt: skip

    with gateway.http.stream(
        "POST",
        f"{gateway.url}/v1/chat/completions",
        json=body,
        headers={"authorization": f"Bearer {key}", "x-fake-tokens": "3"},
    ) as answer:
        lines = list(data_lines(answer.iter_lines()))

    assert lines[-1] == "data: [DONE]"
    last = json.loads(lines[-2][5:])
    assert last["choices"] == []
    assert last["usage"]["completion_tokens"] == 3
    after = gateway.chat(key, messages=MESSAGES, max_tokens=40)
    assert budget_remaining(after) == 1000 - last["usage"]["total_tokens"] - worst_case(40)


def test_a_stream_without_usage_is_settled_from_an_estimate(
    gateway: Gateway, upstream: tuple[FakeUpstream, str]
) -> None:
    key = gateway.key("acme", "free")

    with stream(gateway, key, usage="none", tokens="8") as answer:
        text = "".join(
            json.loads(line[5:])["choices"][0]["delta"]["content"]
            for line in data_lines(answer.iter_lines())
            if line != "data: [DONE]"
        )

    assert len(text) > 0
    after = gateway.chat(key, messages=MESSAGES, max_tokens=40)
    assert budget_remaining(after) == 1000 - estimate(text) - worst_case(40)
    assert 'gateway_usage_estimated_total{plan="free"} 1.0' in gateway.metrics()


def test_a_non_streamed_answer_without_usage_is_estimated_too(gateway: Gateway) -> None:
    key = gateway.key("acme", "free")

    first = gateway.chat(key, messages=MESSAGES, max_tokens=40, headers={"x-fake-usage": "none"})
    text = first.json()["choices"][0]["message"]["content"]

    after = gateway.chat(key, messages=MESSAGES, max_tokens=40)
    assert budget_remaining(after) == 1000 - estimate(text) - worst_case(40)
