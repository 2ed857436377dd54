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
def test_shared_a_response_without_a_record_reserves_the_configured_default(
    make_gateway: MakeGateway, db: redis.Redis[str], response_id: str
) -> None:
    """`shared` (the behaviour before tenant scope): expired, made elsewhere, or no id at all
    is forwarded, reserving the default, never nothing. (The fake refuses an id it does not
    hold, as OpenAI does: the reservation is then released.)"""
    gateway = make_gateway(unknown_previous_response_tokens=300, previous_response_scope="shared")
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
    gateway = make_gateway(context_windows={"GPT-3.5-Turbo": 200}, previous_response_scope="shared")
    key = gateway.key("acme", "free")

    answer = respond(gateway, key, previous_response_id="resp_never_made")

    assert answer.status_code == 400  # the model server does not hold it
    assert budget_remaining(answer) == DAY - (200 + 1 + 16)


def test_shared_an_unknown_conversation_can_never_fit_a_small_day_by_default(
    make_gateway: MakeGateway, upstream: tuple[FakeUpstream, str]
) -> None:
    """128,000 tokens by default: above the free plan's whole day, so never served."""
    gateway = make_gateway(previous_response_scope="shared")
    key = gateway.key("acme", "free")
    before = len(upstream[0].seen)

    answer = respond(gateway, key, previous_response_id="resp_made_elsewhere")

    assert answer.status_code == 400
    assert answer.json()["type"].endswith("#request-too-large")
    assert len(upstream[0].seen) == before


def test_shared_another_tenants_response_is_no_record_of_ones_own(
    make_gateway: MakeGateway, db: redis.Redis[str]
) -> None:
    """`shared`: globex naming acme's response reserves the default, not acme's count: the
    lookup reads only globex's own records (the fake model server, which serves every tenant
    under one upstream key, serves it: globex reads acme's conversation, as `shared` says)."""
    gateway = make_gateway(unknown_previous_response_tokens=300, previous_response_scope="shared")
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


def _never_forwarded(upstream: tuple[FakeUpstream, str], before: int, answer: httpx.Response,
                     what: str, named: str) -> None:  # fmt: skip
    """Refused 404 in OpenAI's shape, saying nothing of whether the id exists, and never sent."""
    assert answer.status_code == 404, answer.text
    assert len(upstream[0].seen) == before
    document = answer.json()
    assert document["detail"] == f"no {what} '{named}' for this API key"
    assert (document["status"], document["title"]) == (404, f"Unknown {what}")
    assert document["type"].endswith(f"#unknown-{what}")


def test_another_tenants_response_is_refused_before_the_model_server(
    gateway: Gateway, db: redis.Redis[str], upstream: tuple[FakeUpstream, str]
) -> None:
    """Every tenant reaches the model server with the one upstream key: forwarded, globex
    would read acme's conversation. Refused 404, in the words an unknown id gets."""
    acme, globex = gateway.key("acme", "free"), gateway.key("globex", "free")
    first = respond(gateway, acme, tokens=100, cap=100)
    assert first.status_code == 200
    mine = first.json()["id"]
    before = len(upstream[0].seen)

    theirs = respond(gateway, globex, previous_response_id=mine)
    unknown = respond(gateway, globex, previous_response_id="resp_never_made")

    _never_forwarded(upstream, before, theirs, "response", mine)
    _never_forwarded(upstream, before, unknown, "response", "resp_never_made")
    # Nothing tells the two apart but the id quoted back.
    shown = theirs.json()["detail"].replace(mine, "X")
    assert shown == unknown.json()["detail"].replace("resp_never_made", "X")
    assert used(db, "globex") == 0
    assert respond(gateway, acme, previous_response_id=mine).status_code == 200  # its own
    # What an OpenAI SDK reads: its error envelope, OpenAI's code for an id it does not hold.
    envelope = gateway.http.post(
        f"{gateway.url}/v1/responses",
        json={"model": "gpt-3.5-turbo", "input": "hi", "previous_response_id": mine},
        headers={"authorization": f"Bearer {globex}", "accept": "application/json"},
    )
    assert envelope.status_code == 404
    assert {k: v for k, v in envelope.json()["error"].items() if k != "problem_type"} == {
        "message": f"no response '{mine}' for this API key", "type": "invalid_request_error",
        "code": "previous_response_not_found", "param": "previous_response_id",
        "title": "Unknown response", "status": 404}  # fmt: skip


@pytest.mark.parametrize("response_id", ["resp_never_made", "resp/../odd", "x" * 200, ""])
def test_a_response_without_a_record_is_refused(
    gateway: Gateway, upstream: tuple[FakeUpstream, str], response_id: str
) -> None:
    key = gateway.key("acme", "free")
    before = len(upstream[0].seen)

    answer = respond(gateway, key, previous_response_id=response_id)

    assert answer.status_code == 404, answer.text
    assert len(upstream[0].seen) == before
    if response_id != "resp_never_made":  # no safe id: not quoted back
        assert answer.json()["detail"] == "no response with that id for this API key"


def test_an_expired_record_is_refused(
    gateway: Gateway, db: redis.Redis[str], upstream: tuple[FakeUpstream, str]
) -> None:
    key = gateway.key("acme", "free")
    first = respond(gateway, key)
    assert first.status_code == 200
    mine = first.json()["id"]
    db.pexpire(KeySchema("governor").response("acme", mine), 1)  # its TTL ran out
    while recorded(db, "acme", mine) is not None:
        pass
    before = len(upstream[0].seen)

    answer = respond(gateway, key, previous_response_id=mine)

    _never_forwarded(upstream, before, answer, "response", mine)


@pytest.mark.parametrize("shape", ["text", "object"])
def test_a_conversation_is_served_only_once_recorded_for_the_tenant(
    make_gateway: MakeGateway,
    db: redis.Redis[str],
    upstream: tuple[FakeUpstream, str],
    shape: str,
) -> None:
    """A conversation made past the gateway (with the upstream key, not through its
    Conversations API) no record names for the tenant is refused; `shared` forwards it with
    the default reserved, and records it from the answer's `conversation`, so it is then the
    tenant's, and only the tenant's, in `tenant` scope too."""
    upstream[0].conversations["conv_0123abcd"] = 50
    named: Any = "conv_0123abcd" if shape == "text" else {"id": "conv_0123abcd"}
    strict = make_gateway()
    acme, globex = strict.key("acme", "free"), strict.key("globex", "free")
    before = len(upstream[0].seen)

    refused = respond(strict, acme, conversation=named)

    _never_forwarded(upstream, before, refused, "conversation", "conv_0123abcd")
    shared = make_gateway(unknown_previous_response_tokens=300, previous_response_scope="shared")
    served = respond(shared, acme, conversation=named)
    assert served.status_code == 200, served.text
    assert budget_remaining(served) == DAY - (300 + 1 + 16)
    total = served.json()["usage"]["total_tokens"]
    assert db.get(KeySchema("governor").conversation("acme", "conv_0123abcd")) == str(total)

    again = respond(strict, acme, conversation=named)
    assert again.status_code == 200, again.text
    assert budget_remaining(again) == DAY - total - (total + 1 + 16)  # as recorded
    before = len(upstream[0].seen)
    _never_forwarded(upstream, before, respond(strict, globex, conversation=named),
                     "conversation", "conv_0123abcd")  # fmt: skip


@pytest.mark.parametrize("value", [5, {"id": 5}, {}, ["conv_a"]])
def test_a_conversation_that_names_no_id_is_a_bad_request(gateway: Gateway, value: Any) -> None:
    answer = respond(gateway, gateway.key("acme", "free"), conversation=value)

    assert answer.status_code == 400
    assert answer.json()["detail"] == (
        "`conversation` must be a string or an object with a string `id`"
    )
