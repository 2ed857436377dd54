"""Answer rendering: IETF and OpenAI rate-limit headers, jittered Retry-After, 402 bodies."""

from __future__ import annotations

import dataclasses
import json
import random
import re
from typing import Any

import pytest

from controller.gateway.admission import AdmissionResult, Budget, Quota
from controller.gateway.openai import ModelRequest, UsageChunkFilter, UsageMeter
from controller.gateway.responses import Answers, openai_duration, rate_limit_headers

REQUESTS = Quota("tenant/acme/requests_per_minute", 10, 3.6, 38.2, 60)
TOKENS = Quota("plan/paid/tokens_per_minute", 20000, 12345.9, 0.25, 60)
DAILY = Budget("tenant/acme/tokens_per_day", "tokens", 1000, 120, 1_900_000_000.0)
CREDITS = Budget("credits/acme", "credits", None, 0.0042, None)
# RFC 9651 shapes: a quoted string item, then ;key=integer or ;key="string" parameters.
ITEM = r'"[a-z0-9/_.@-]+"(;[a-z]+=(\d+|"[a-z-]+"))+'


ALLOWED = AdmissionResult(
    outcome="allow", denied_by=None, retry_after=None, requests=REQUESTS, tokens=TOKENS,
    budget=DAILY, reservation="r1//", degrade=None,
)  # fmt: skip


def result(**fields: Any) -> AdmissionResult:
    return dataclasses.replace(ALLOWED, **fields)


def test_ietf_headers_follow_the_draft_syntax() -> None:
    headers = rate_limit_headers(result())

    policies = headers["RateLimit-Policy"].split(", ")
    states = headers["RateLimit"].split(", ")
    assert all(re.fullmatch(ITEM, item) for item in policies + states), headers
    assert policies == [
        '"tenant/acme/requests_per_minute";q=10;w=60',
        '"plan/paid/tokens_per_minute";q=20000;qu="tokens";w=60',
        '"tenant/acme/tokens_per_day";q=1000;qu="tokens";w=86400',
    ]
    assert states[:2] == [
        '"tenant/acme/requests_per_minute";r=3;t=39',
        '"plan/paid/tokens_per_minute";r=12345;t=1',
    ]


def test_openai_headers_name_limit_remaining_and_reset() -> None:
    headers = rate_limit_headers(result())

    assert headers["x-ratelimit-limit-requests"] == "10"
    assert headers["x-ratelimit-remaining-requests"] == "3"
    assert headers["x-ratelimit-reset-requests"] == "39s"
    assert headers["x-ratelimit-remaining-tokens"] == "12345"
    assert headers["x-ratelimit-reset-tokens"] == "250ms"
    assert [openai_duration(s) for s in (0.02, 1, 360, 3723.2)] == ["20ms", "1s", "6m0s", "1h2m4s"]


def test_retry_after_is_jittered_upwards_only() -> None:
    answers = Answers("https://docs.example/gateway.md", 0.5, random.Random(7))

    waits = {int(answers.retry_after(10.0)) for _ in range(200)}

    assert min(waits) >= 10
    assert max(waits) <= 15
    assert len(waits) > 3  # clients refused together do not come back together
    assert answers.retry_after(0.01) == "1"


def test_a_429_names_the_limit_and_waits_for_it() -> None:
    answers = Answers("https://docs.example/gateway.md", 0.0)
    refused = answers.refused(
        result(outcome="rate_limited", denied_by=REQUESTS.address, retry_after=6.5)
    )

    body = json.loads(bytes(refused.body))
    assert refused.status_code == 429
    assert refused.headers["retry-after"] == "7"
    assert body["violated-policies"] == ["tenant/acme/requests_per_minute"]
    assert body["type"] == "https://iana.org/assignments/http-problem-types#quota-exceeded"


def test_a_402_for_tokens_says_what_remains_and_when_it_resets() -> None:
    answers = Answers("https://docs.example/gateway.md", 0.0)
    refused = answers.refused(
        result(outcome="budget_exhausted", denied_by=DAILY.address, retry_after=3600.0)
    )

    body = json.loads(bytes(refused.body))
    assert refused.status_code == 402
    assert refused.media_type == "application/problem+json"
    assert body["type"] == "https://docs.example/gateway.md#budget-exhausted"
    assert (body["budget"], body["remaining"], body["limit"]) == (DAILY.address, 120, 1000)
    assert body["resets_at"] == "2030-03-17T17:46:40+00:00"
    assert refused.headers["retry-after"] == "3600"


def test_a_402_for_credits_names_the_ledger_and_no_reset() -> None:
    answers = Answers("https://docs.example/gateway.md", 0.0)
    refused = answers.refused(
        result(outcome="budget_exhausted", denied_by=CREDITS.address, budget=CREDITS)
    )

    body = json.loads(bytes(refused.body))
    assert body["ledger"] == "credits/acme"
    assert "resets_at" not in body
    assert "retry-after" not in refused.headers
    assert "governor credits top-up" in body["detail"]


def test_worst_case_counts_prompt_max_tokens_and_choices() -> None:
    body = {
        "model": "m",
        "messages": [{"role": "user", "content": "x" * 40}, {"role": "system", "content": "y"}],
        "max_tokens": 100,
        "n": 3,
    }
    request = ModelRequest.parse("chat", json.dumps(body).encode(), 1024)

    assert request.prompt_tokens == (4 + 10) + (4 + 1)
    assert request.worst_case_tokens == 19 + 300
    assert request.changed is False


def test_the_meter_finds_usage_split_across_chunks() -> None:
    meter = UsageMeter(streaming=True, prompt_estimate=99)
    stream = (
        b'data: {"choices":[{"delta":{"content":"hello"}}]}\r\n\r\n'
        b'data: {"choices":[],"usage":{"prompt_tokens":7,"completion_tokens":2,'
        b'"total_tokens":9}}\n\ndata: [DONE]\n\n'
    )

    for i in range(0, len(stream), 7):
        meter.feed(stream[i : i + 7])
    usage = meter.finish()

    assert (usage.prompt_tokens, usage.completion_tokens, usage.estimated) == (7, 2, False)


RESPONSE_STREAM = (
    b'event: response.created\ndata: {"type":"response.created","response":{"usage":null}}\n\n'
    b'event: response.output_text.delta\ndata: {"type":"response.output_text.delta",'
    b'"delta":"hello world!"}\n\n'
    b'event: response.completed\ndata: {"type":"response.completed","response":{'
    b'"object":"response","output":[{"content":[{"text":"hello world!"}]}],'
    b'"usage":{"input_tokens":7,"output_tokens":3,"total_tokens":10}}}\n\n'
)


@pytest.mark.parametrize("chunk", [5, 1000])
def test_the_meter_reads_a_responses_stream_from_its_completed_event(chunk: int) -> None:
    meter = UsageMeter(streaming=True, prompt_estimate=99)
    for i in range(0, len(RESPONSE_STREAM), chunk):
        meter.feed(RESPONSE_STREAM[i : i + chunk])
    usage = meter.finish()
    assert (usage.prompt_tokens, usage.completion_tokens, usage.estimated) == (7, 3, False)


def test_a_responses_answer_without_usage_is_estimated_from_its_text_once() -> None:
    """The deltas are counted, the completed response's whole text not a second time."""
    stream = RESPONSE_STREAM.replace(
        b',"usage":{"input_tokens":7,"output_tokens":3,"total_tokens":10}', b""
    )
    meter = UsageMeter(streaming=True, prompt_estimate=99)
    meter.feed(stream)
    assert (meter.finish().completion_tokens, meter.finish().estimated) == (3, True)
    whole = UsageMeter(streaming=False, prompt_estimate=5)
    whole.feed(b'{"object":"response","output":[{"content":[{"text":"12345678"}]}]}')
    assert (whole.finish().prompt_tokens, whole.finish().completion_tokens) == (5, 2)


def test_a_sub_second_wait_is_said_in_milliseconds_too() -> None:
    answers = Answers("https://docs.example/gateway.md", 0.0)

    assert answers.retry_headers(0.03) == {"Retry-After": "1", "retry-after-ms": "30"}
    assert answers.retry_headers(6.5) == {"Retry-After": "7", "retry-after-ms": "6500"}


def test_the_usage_only_event_is_taken_out_wherever_the_chunks_split() -> None:
    stream = (
        b'data: {"choices":[{"delta":{"content":"hi"}}]}\r\n\r\n'
        b'data: {"choices":[],"usage":{"prompt_tokens":7,"completion_tokens":2}}\n\n'
        b": a comment\n\ndata: [DONE]\n\n"
    )
    expected = stream.replace(
        b'data: {"choices":[],"usage":{"prompt_tokens":7,"completion_tokens":2}}\n\n', b""
    )

    for size in (1, 7, len(stream)):
        strip = UsageChunkFilter()
        pieces = [stream[i : i + size] for i in range(0, len(stream), size)]
        passed = b"".join(strip.feed(p, last=i == len(pieces) - 1) for i, p in enumerate(pieces))
        assert passed == expected, size
