"""What OpenAI-compatible clients read from `governor gateway`: the error envelope by default
(problem+json when asked), 402 or 429 insufficient_quota per plan, retry-after-ms beside
Retry-After, and x-ratelimit-* per minute (limits in a real Redis, a fake model server)."""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping

import httpx

from controller.gateway.openai import ModelRequest
from tests.gateway.conftest import PROBLEM, Gateway, budget_remaining
from tests.gateway.fake_upstream import FakeUpstream

SetLimits = Callable[[Mapping[str, float]], None]

OPENAI = {"accept": "application/json"}  # what the OpenAI SDKs send


def test_errors_are_openai_envelopes_unless_problem_json_is_asked_for(gateway: Gateway) -> None:
    key = gateway.key("acme", "free")

    envelope = gateway.chat(key, model="gpt-4", headers=OPENAI)
    problem = gateway.chat(key, model="gpt-4", headers={"accept": PROBLEM})

    assert envelope.status_code == problem.status_code == 403
    assert envelope.headers["content-type"] == "application/json"
    error = envelope.json()["error"]
    assert (error["type"], error["code"], error["param"]) == (
        "invalid_request_error",
        "model_not_allowed",
        "model",
    )
    assert error["message"] == problem.json()["detail"]
    assert error["problem_type"] == problem.json()["type"]
    assert error["allowed_models"] == ["gpt-3.5-turbo"]  # the problem's fields, inside
    assert problem.headers["content-type"] == PROBLEM


def test_a_bad_key_is_invalid_api_key(gateway: Gateway) -> None:
    answer = gateway.chat("gov_nope", headers=OPENAI)

    assert answer.status_code == 401
    assert answer.json()["error"]["code"] == "invalid_api_key"
    assert answer.headers["www-authenticate"].startswith("Bearer ")


def test_a_429_says_rate_limit_exceeded_and_the_wait_in_milliseconds(gateway: Gateway) -> None:
    key = gateway.key("acme", "free")
    for _ in range(10):
        assert gateway.chat(key, headers=OPENAI).status_code == 200

    refused = gateway.chat(key, headers=OPENAI)

    assert refused.status_code == 429
    error = refused.json()["error"]
    assert (error["type"], error["code"]) == ("requests", "rate_limit_exceeded")
    assert error["violated-policies"] == ["tenant/acme/requests_per_minute"]
    seconds, millis = int(refused.headers["retry-after"]), int(refused.headers["retry-after-ms"])
    assert 0 < millis <= seconds * 1000  # the precise wait; Retry-After rounds it up
    assert seconds - 1 < millis / 1000


def test_a_spent_budget_is_402_or_insufficient_quota_as_the_plan_says(
    gateway: Gateway, set_limits: SetLimits
) -> None:
    set_limits({"tenant/acme/tokens_per_day": 12, "tenant/stark/tokens_per_day": 12})
    payment = gateway.key("acme", "free")
    quota = gateway.key("stark", "metered")
    spend = {**OPENAI, "x-fake-tokens": "5"}  # leaves less than the next request's 10
    assert gateway.chat(payment, headers=spend).status_code == 200
    assert gateway.chat(quota, headers=spend).status_code == 200

    paid = gateway.chat(payment, headers=OPENAI)
    metered = gateway.chat(quota, headers=OPENAI)

    assert paid.status_code == 402
    assert paid.json()["error"]["code"] == "budget_exhausted"
    assert metered.status_code == 429
    error = metered.json()["error"]
    assert (error["type"], error["code"]) == ("insufficient_quota", "insufficient_quota")
    assert error["budget"] == "tenant/stark/tokens_per_day"
    # A daily budget refills at midnight: the wait is said, and it is the true one.
    assert int(metered.headers["retry-after"]) > 0
    assert metered.headers["x-should-retry"] == "false"  # not for an automatic retry


def test_openai_headers_are_per_minute_and_ietf_fields_keep_their_windows(
    gateway: Gateway, set_limits: SetLimits
) -> None:
    set_limits(
        {
            "tenant/acme/requests_per_second": 2,
            "tenant/acme/requests_per_minute": 500,
            "plan/free/tokens_per_day": 1000,
        }
    )
    key = gateway.key("acme", "free")

    answer = gateway.chat(key, headers=OPENAI)

    assert answer.status_code == 200
    # The tightest request quota is 2/s: OpenAI clients read it as 120 a minute.
    assert answer.headers["x-ratelimit-limit-requests"] == "120"
    assert answer.headers["x-ratelimit-remaining-requests"] == "1"
    assert re.fullmatch(r"\d+ms", answer.headers["x-ratelimit-reset-requests"])
    policy = answer.headers["ratelimit-policy"]
    assert '"tenant/acme/requests_per_second";q=2;w=1' in policy
    assert re.search(r'tokens_per_day";q=1000;qu="tokens";w=86400', policy)


def chat_without_max_tokens(gateway: Gateway, key: str, **headers: str) -> httpx.Response:
    body = {"model": "gpt-3.5-turbo", "messages": [{"role": "user", "content": "hi"}]}
    sent = {"authorization": f"Bearer {key}", **OPENAI, **headers}
    return gateway.http.post(f"{gateway.url}/v1/chat/completions", json=body, headers=sent)


def test_no_max_tokens_on_the_free_plan_reserves_what_is_left(
    gateway: Gateway, upstream: tuple[FakeUpstream, str]
) -> None:
    key = gateway.key("acme", "free")  # 1,000 tokens a day; the default max_tokens is 1024
    prompt = ModelRequest.parse("chat", b'{"model":"m","messages":[{"content":"hi"}]}', 1)

    first = chat_without_max_tokens(gateway, key, **{"x-fake-tokens": "600"})
    sent = upstream[0].last().body

    assert first.status_code == 200
    assert sent is not None
    assert sent["max_tokens"] == 1000 - prompt.prompt_tokens  # the day's budget, not 1024
    assert first.headers["x-governor-max-tokens"] == str(sent["max_tokens"])
    used = first.json()["usage"]["total_tokens"]  # settled from the actual usage
    second = chat_without_max_tokens(gateway, key)
    assert second.status_code == 200
    again = upstream[0].last().body
    assert again is not None
    assert again["max_tokens"] == 1000 - used - prompt.prompt_tokens
    assert budget_remaining(second) < 1000 - used


def test_a_request_that_can_never_fit_is_400_without_retry_after(gateway: Gateway) -> None:
    key = gateway.key("acme", "free")

    answer = gateway.chat(key, headers=OPENAI, max_tokens=5000)

    assert answer.status_code == 400
    error = answer.json()["error"]
    assert (error["code"], error["param"]) == ("request_too_large", "max_tokens")
    assert error["violated-policies"] == ["tenant/acme/tokens_per_day"]  # the plan's value
    assert "retry-after" not in answer.headers


def test_a_spent_day_without_max_tokens_is_402_until_midnight(
    gateway: Gateway, set_limits: SetLimits
) -> None:
    set_limits({"tenant/acme/tokens_per_day": 40})
    key = gateway.key("acme", "free")
    assert chat_without_max_tokens(gateway, key, **{"x-fake-tokens": "40"}).status_code == 200

    refused = chat_without_max_tokens(gateway, key)

    assert refused.status_code == 402  # nothing is left for even one token: tomorrow it fits
    seconds = int(refused.headers["retry-after"])
    assert 0 < seconds <= 86400
    assert refused.json()["error"]["remaining"] < 10
