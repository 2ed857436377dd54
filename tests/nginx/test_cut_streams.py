"""Streams cut short, through both gateways: what reached the client is charged."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from controller.gateway.openai import CHARS_PER_TOKEN, ModelRequest, RequestKind
from tests.gateway.conftest import write_limits
from tests.gateway.fake_upstream import FakeUpstream, ServerThread
from tests.nginx.conftest import PREFIX, Side, chat_body, tenant_state, wait_settled
from tests.nginx.gateway_pair import Pair, PairOptions, gateway_pair

pytestmark = pytest.mark.integration

# Both gateways' upstream read timeout here (the shipped one is 600 s): long enough that a busy
# machine never parts the fake's events before its stall by as much.
TIMEOUT_SECONDS = 2
BUDGET = "u|tokens_per_day"
CHAT = chat_body(max_tokens=300, stream=True)
RESPONSE = {"model": "gpt-3.5-turbo", "input": "hi", "max_output_tokens": 300, "stream": True}
# (route, body, its kind, the fake's knobs, the characters of text it sends before it stops):
# a chat stream held after its first chunk ("alpha "); a Responses stream stopped after its
# sixth event (three output_text deltas: "alpha beta gamma ").
STREAMS: dict[str, tuple[str, dict[str, Any], RequestKind, dict[str, str], int]] = {
    "chat": ("/v1/chat/completions", CHAT, "chat", {"x-fake-hold": "1"}, 6),
    "responses": ("/v1/responses", RESPONSE, "response", {"x-fake-stall": "5"}, 17),
}


@pytest.fixture
def pair(
    tmp_path: Path,
    export_dir: Path,
    upstream: tuple[FakeUpstream, ServerThread],
    policy_dir: Path,
    held: FakeUpstream,
) -> Iterator[Pair]:
    """Both gateways giving up on the model server after TIMEOUT_SECONDS without a byte (the
    fake holds what it was asked to hold until the test ends)."""
    options = PairOptions(
        prepare=lambda db: write_limits(db, PREFIX, policy_dir),
        gateway={"upstream_timeout_seconds": float(TIMEOUT_SECONDS)},
        read_timeout=f"{TIMEOUT_SECONDS}s",
        timeout=30.0,
    )
    with gateway_pair(tmp_path, export_dir, upstream, options) as started:
        yield started


def delivered_chars(lines: list[str]) -> int:
    """Characters of generated text in the SSE lines a client received (the deltas of a chat
    stream's choices, or of a Responses stream's output_text events)."""
    total = 0
    for line in lines:
        if not line.startswith("data:") or line == "data: [DONE]":
            continue
        event: dict[str, Any] = json.loads(line[5:])
        if event.get("type") == "response.output_text.delta":
            total += len(event["delta"])
        for choice in event.get("choices") or ():
            total += len(choice["delta"].get("content") or "")
    return total


def prompt_of(kind: RequestKind, body: dict[str, Any]) -> int:
    return ModelRequest.parse(kind, json.dumps(body).encode(), 1024).prompt_tokens


def streamed(side: Side, key: str, name: str, leave: bool) -> tuple[str, list[str]]:
    """Send stream `name`; read it to its end (or, `leave`, until all the text the fake sends
    before it stops has come, then close the connection). Returns the request id and the
    lines received."""
    path, body, _kind, knobs, sent = STREAMS[name]
    lines: list[str] = []
    headers = {"authorization": f"Bearer {key}", **knobs}
    with side.http.stream("POST", side.url + path, json=body, headers=headers) as answer:
        assert answer.status_code == 200, (side.name, name, answer.status_code)
        request_id = answer.headers["x-governor-request-id"]
        try:
            for line in answer.iter_lines():
                lines.append(line)
                if leave and delivered_chars(lines) == sent:
                    break
        except httpx.RemoteProtocolError:
            pass  # nginx ends a stream its upstream timed out by closing the connection
    return request_id, lines


@pytest.mark.parametrize("name", sorted(STREAMS))
@pytest.mark.parametrize(
    "leave_after_first", [False, True], ids=["upstream stops", "client leaves"]
)
def test_a_stream_cut_short_is_charged_the_prompt_and_what_the_client_received(
    pair: Pair, name: str, leave_after_first: bool
) -> None:
    """A stream the model server stops sending (the gateway's upstream timeout ends it) or
    the client leaves, with no usage event, is settled as an answer without usage: the prompt
    estimate and ⌈characters the client received ÷ 4⌉ — neither released (free GPU time) nor
    charged the whole reservation (300 output tokens here)."""
    _path, body, kind, _knobs, sent = STREAMS[name]
    for side in pair.sides:
        tenant = f"cut-{name}-{int(leave_after_first)}"
        request_id, lines = streamed(side, side.key(tenant, "free"), name, leave_after_first)
        chars = delivered_chars(lines)
        assert chars == sent, (side.name, lines)
        wait_settled(side, tenant, request_id)
        charged = int(tenant_state(side, tenant)[BUDGET])
        expected = prompt_of(kind, body) + math.ceil(chars / CHARS_PER_TOKEN)
        assert charged == expected, (side.name, name, charged, expected)


@pytest.mark.parametrize("stream", [False, True], ids=["fetched whole", "streamed"])
def test_an_upstream_that_times_out_before_answering_releases_the_reservation(
    pair: Pair, stream: bool
) -> None:
    """No byte of an answer came (the model server answers after the gateway's timeout):
    504 #upstream-failed, and the whole reservation is released — nothing reached the client."""
    for side in pair.sides:
        tenant = f"late-{int(stream)}"
        key = side.key(tenant, "free")
        late = {"x-fake-delay": str(TIMEOUT_SECONDS + 2)}
        answer = side.chat(key, chat_body(max_tokens=300, stream=stream), **late)
        assert answer.status_code == 504, (side.name, answer.status_code, answer.text[:300])
        assert answer.json()["type"].endswith("#upstream-failed"), side.name
        wait_settled(side, tenant, answer.headers["x-governor-request-id"])
        assert tenant_state(side, tenant).get(BUDGET, "0") == "0", side.name
        assert tenant_state(side, tenant).get("v|tokens_per_day", "0") == "0", side.name
