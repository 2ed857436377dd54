"""What OpenAI-compatible clients read from `governor gateway`: the error envelope by default
(problem+json when asked), 402 or 429 insufficient_quota per plan, retry-after-ms beside
Retry-After, and x-ratelimit-* per minute (limits in a real Redis, a fake model server)."""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping

from tests.gateway.conftest import PROBLEM, Gateway

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
    assert "x-should-retry" not in metered.headers


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
