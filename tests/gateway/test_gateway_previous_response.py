"""A Responses request naming `previous_response_id` through `governor gateway` (real Redis, the
fake model server, which keeps responses and bills a continued conversation as input): the
earlier conversation is reserved — what was recorded when it settled, else a conservative
default — so concurrent continuations cannot spend past a budget."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest
import redis

from controller.contract.enforcement import EnforcementKeys
from controller.contract.keys import KeySchema
from tests.gateway.conftest import Gateway, MakeGateway, budget_remaining
from tests.gateway.fake_upstream import FakeUpstream

DAY = 1000  # the free plan's tokens_per_day
LONG_INPUT = "x" * 400  # the gateway estimates 100 tokens, the fake bills 47: never beyond


def respond(
    gateway: Gateway, key: str, tokens: int = 5, cap: int = 16, **body: Any
) -> httpx.Response:
    payload = {"model": "gpt-3.5-turbo", "input": "hi", "max_output_tokens": cap, **body}
    headers = {"authorization": f"Bearer {key}", "x-fake-tokens": str(tokens)}
    return gateway.http.post(f"{gateway.url}/v1/responses", json=payload, headers=headers)


def used(db: redis.Redis[str], tenant: str) -> int:
    state = EnforcementKeys.for_prefix("governor").tenant_level(tenant).state
    return int(db.hget(state, "u|tokens_per_day") or 0)


def recorded(db: redis.Redis[str], tenant: str, response_id: str) -> str | None:
    return db.get(KeySchema("governor").response(tenant, response_id))


def test_a_continuation_reserves_the_conversation_it_continues(
    gateway: Gateway, db: redis.Redis[str]
) -> None:
    """Each turn's reservation holds the turns before it, as the model server bills them."""
    key = gateway.key("acme", "free")

    first = respond(gateway, key, tokens=100, cap=100)
    assert first.status_code == 200, first.text
    first_total = first.json()["usage"]["total_tokens"]  # 7 + 100
    assert recorded(db, "acme", first.json()["id"]) == str(first_total)

    second = respond(gateway, key, previous_response_id=first.json()["id"])
    assert second.status_code == 200, second.text
    # What is left counts this request's reservation: the conversation, ⌈2/4⌉ and 16.
    assert budget_remaining(second) == DAY - first_total - (first_total + 1 + 16)
    second_total = second.json()["usage"]["total_tokens"]
    assert second.json()["usage"]["input_tokens"] == 7 + first_total  # billed again
    assert recorded(db, "acme", second.json()["id"]) == str(second_total)

    third = respond(gateway, key, previous_response_id=second.json()["id"])
    assert third.status_code == 200, third.text
    spent = first_total + second_total
    assert budget_remaining(third) == DAY - spent - (second_total + 1 + 16)
    assert used(db, "acme") == spent + third.json()["usage"]["total_tokens"]


def test_a_continuation_the_budget_cannot_hold_is_refused_before_the_model_server(
    gateway: Gateway, db: redis.Redis[str], upstream: tuple[FakeUpstream, str]
) -> None:
    """It used to reserve its own few tokens and be served: 732 tokens on a day with 253 left."""
    key = gateway.key("acme", "free")
    first = respond(gateway, key, tokens=700, cap=700, input=LONG_INPUT)
    assert first.status_code == 200, first.text
    spent = used(db, "acme")
    assert spent == 747
    before = len(upstream[0].seen)

    refused = respond(gateway, key, previous_response_id=first.json()["id"])

    assert refused.status_code == 402, refused.text
    assert refused.json()["budget"] == "tenant/acme/tokens_per_day"
    assert len(upstream[0].seen) == before  # never reached the model server
    assert used(db, "acme") == spent


def test_concurrent_continuations_never_spend_past_the_budget(
    gateway: Gateway, db: redis.Redis[str]
) -> None:
    key = gateway.key("acme", "free")
    first = respond(gateway, key, tokens=250, cap=250, input=LONG_INPUT)
    assert first.status_code == 200, first.text
    conversation = first.json()["id"]

    def continuation(_: int) -> int:
        answer = respond(gateway, key, tokens=50, cap=50, input=LONG_INPUT,
                         previous_response_id=conversation)  # fmt: skip
        return answer.status_code

    with ThreadPoolExecutor(6) as pool:
        statuses = list(pool.map(continuation, range(6)))

    # 703 left; each continuation reserves 297 + 100 + 50 = 447 and is billed 394: one fits.
    assert sorted(statuses) == [200] + [402] * 5
    assert used(db, "acme") == 297 + 394 <= DAY


def test_a_streamed_answer_is_recorded_from_its_events(
    gateway: Gateway, db: redis.Redis[str]
) -> None:
    key = gateway.key("acme", "free")

    with gateway.http.stream(
        "POST",
        f"{gateway.url}/v1/responses",
        json={"model": "gpt-3.5-turbo", "input": "hi", "max_output_tokens": 40, "stream": True},
        headers={"authorization": f"Bearer {key}", "x-fake-tokens": "30"},
    ) as stream:
        assert stream.status_code == 200
        text = "".join(stream.iter_text())
    assert "response.completed" in text
    (response_id,) = _stored_ids(db, "acme")
    assert recorded(db, "acme", response_id) == "37"  # 7 in, 30 out

    second = respond(gateway, key, previous_response_id=response_id)
    assert second.status_code == 200, second.text
    assert budget_remaining(second) == DAY - 37 - (37 + 1 + 16)


def _stored_ids(db: redis.Redis[str], tenant: str) -> list[str]:
    prefix = KeySchema("governor").response(tenant, "x")[:-1]
    return [key[len(prefix) :] for key in db.scan_iter(match=prefix + "*")]


def test_a_record_lives_as_long_as_the_setting_says(
    make_gateway: MakeGateway, db: redis.Redis[str]
) -> None:
    gateway = make_gateway(previous_response_ttl_seconds=120.0)
    key = gateway.key("acme", "free")

    answer = respond(gateway, key)

    ttl = db.pttl(KeySchema("governor").response("acme", answer.json()["id"]))
    assert 110_000 < ttl <= 120_000


def test_an_answer_the_model_server_does_not_keep_is_not_recorded(
    gateway: Gateway, db: redis.Redis[str]
) -> None:
    key = gateway.key("acme", "free")

    answer = respond(gateway, key, store=False)

    assert answer.status_code == 200
    assert _stored_ids(db, "acme") == []


@pytest.mark.parametrize(
    "response_id",
    ["resp_never_made", "resp/../odd", "x" * 200, ""],
    ids=["unknown", "unsafe", "long", "empty"],
)
def test_a_response_without_a_record_reserves_the_configured_default(
    make_gateway: MakeGateway, db: redis.Redis[str], response_id: str
) -> None:
    """Expired, made elsewhere, or no id at all: never nothing. (The fake refuses an id it does
    not hold, as OpenAI does: the reservation is then released.)"""
    gateway = make_gateway(unknown_previous_response_tokens=300)
    key = gateway.key("acme", "free")

    answer = respond(gateway, key, previous_response_id=response_id)

    assert answer.status_code == 400  # the model server's refusal, after admission
    assert answer.json()["error"]["param"] == "previous_response_id"
    assert used(db, "acme") == 0  # released
    assert budget_remaining(answer) == DAY - (300 + 1 + 16)  # as it was admitted
    assert not list(db.scan_iter("governor:*:response:*"))


def test_the_default_is_the_models_context_window_when_the_settings_name_it(
    make_gateway: MakeGateway,
) -> None:
    gateway = make_gateway(context_windows={"GPT-3.5-Turbo": 200})
    key = gateway.key("acme", "free")

    answer = respond(gateway, key, previous_response_id="resp_never_made")

    assert answer.status_code == 400  # the model server does not hold it
    assert budget_remaining(answer) == DAY - (200 + 1 + 16)


def test_by_default_an_unknown_conversation_can_never_fit_a_small_day(
    gateway: Gateway, upstream: tuple[FakeUpstream, str]
) -> None:
    """128,000 tokens by default: above the free plan's whole day, so never served."""
    key = gateway.key("acme", "free")
    before = len(upstream[0].seen)

    answer = respond(gateway, key, previous_response_id="resp_made_elsewhere")

    assert answer.status_code == 400
    assert answer.json()["type"].endswith("#request-too-large")
    assert len(upstream[0].seen) == before


def test_another_tenants_response_is_no_record_of_ones_own(
    make_gateway: MakeGateway, db: redis.Redis[str]
) -> None:
    """Globex naming acme's response reserves the default, not acme's count: the lookup reads
    only globex's own records, so nothing of acme's shows (the fake model server, which
    serves every tenant under one upstream key, still serves it)."""
    gateway = make_gateway(unknown_previous_response_tokens=300)
    acme, globex = gateway.key("acme", "free"), gateway.key("globex", "free")
    first = respond(gateway, acme, tokens=100, cap=100)
    assert first.status_code == 200

    answer = respond(gateway, globex, previous_response_id=first.json()["id"])

    assert answer.status_code == 200
    assert budget_remaining(answer) == DAY - (300 + 1 + 16)
    assert recorded(db, "globex", first.json()["id"]) is None


def test_a_previous_response_id_that_is_no_string_is_a_bad_request(gateway: Gateway) -> None:
    key = gateway.key("acme", "free")

    answer = respond(gateway, key, previous_response_id=["resp_a"])

    assert answer.status_code == 400
    assert answer.json()["detail"] == '`previous_response_id` must be a string, not ["resp_a"]'
