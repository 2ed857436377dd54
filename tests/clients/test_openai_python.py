"""The official `openai` Python SDK, sync and async, through `governor gateway`: success
(without max_tokens, on a 1,000-token free plan), streaming with the usual `choices[0]` loop,
429 retried on retry-after-ms, 402 and 429 insufficient_quota, 403."""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import openai
import pytest

from controller.contract.enforcement import EnforcementKeys
from tests.clients.conftest import World, at_once
from tests.gateway.fake_upstream import FakeUpstream
from tests.support.process import wait_for

# The clients under test leave connections and event loops of their own unclosed (the
# garbage collector's warning about them is theirs, not ours): tests/conftest.py collects
# them after this folder; a collection that happens to run inside one of these tests first
# must not fail it.
pytestmark = [pytest.mark.integration, pytest.mark.filterwarnings("ignore::ResourceWarning")]

MESSAGES: list[openai.types.chat.ChatCompletionMessageParam] = [{"role": "user", "content": "hi"}]


_MADE: list[openai.OpenAI] = []


@pytest.fixture(autouse=True)
def _close_clients() -> Iterator[None]:
    """Each test's SDK clients closed when it ends: a keep-alive socket collected later
    raises its ResourceWarning inside whichever test then runs on this worker."""
    yield
    while _MADE:
        _MADE.pop().close()


def sdk(world: World, key: str, retries: int = 2) -> openai.OpenAI:
    made = openai.OpenAI(api_key=key, base_url=world.base_url, max_retries=retries)
    _MADE.append(made)
    return made


def test_success_without_max_tokens_on_the_free_plan(world: World) -> None:
    client = sdk(world, world.key("acme"))

    answer = client.chat.completions.create(model="gpt-3.5-turbo", messages=MESSAGES)

    assert answer.choices[0].message.content
    assert answer.usage is not None
    assert answer.usage.total_tokens > 0


def test_streaming_without_asking_for_usage_never_yields_an_empty_choices_chunk(
    world: World,
) -> None:
    client = sdk(world, world.key("acme"))

    stream = client.chat.completions.create(
        model="gpt-3.5-turbo", messages=MESSAGES, max_tokens=20, stream=True
    )
    text = "".join(chunk.choices[0].delta.content or "" for chunk in stream)

    assert text


def test_streaming_with_usage_asked_for_gets_it(world: World) -> None:
    client = sdk(world, world.key("acme"))

    chunks = list(
        client.chat.completions.create(
            model="gpt-3.5-turbo",
            messages=MESSAGES,
            max_tokens=20,
            stream=True,
            stream_options={"include_usage": True},
        )
    )

    assert chunks[-1].choices == []
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens > 0


def test_a_429_is_retried_after_the_milliseconds_the_gateway_says(
    world: World, caplog: pytest.LogCaptureFixture
) -> None:
    client = sdk(world, world.key("acme"), retries=3)
    caplog.set_level(logging.INFO, logger="openai")

    answers = [
        client.chat.completions.create(model="gpt-3.5-turbo", messages=MESSAGES, max_tokens=5)
        for _ in range(8)
    ]

    assert all(answer.choices[0].message.content for answer in answers)
    assert world.outcomes("acme", "rate_limited") >= 1  # refused, then retried and served
    # openai 1.x and 2.x log "Retrying request to /chat/completions in 0.52 seconds", 3.x
    # "Retrying request in 0.520000 seconds (retry 1 of 3)".
    waits = [float(w) for w in re.findall(r"Retrying request (?:to \S+ )?in ([\d.]+) seconds",
                                          caplog.text)]  # fmt: skip
    assert waits
    assert all(wait < 1.0 for wait in waits), waits  # retry-after-ms, not a whole second


def test_a_429_without_retries_names_the_limit(world: World) -> None:
    client = sdk(world, world.key("acme"), retries=0)

    def burst() -> None:
        at_once(
            lambda: client.chat.completions.create(
                model="gpt-3.5-turbo", messages=MESSAGES, max_tokens=5
            )
        )

    with pytest.raises(openai.RateLimitError) as refused:
        burst()

    error = refused.value
    assert (error.code, error.type) == ("rate_limit_exceeded", "requests")
    assert "tenant/acme/requests_per_second" in error.message
    assert 0 < float(error.response.headers["retry-after-ms"]) < 1000  # 250 ms, jittered


def test_a_spent_budget_is_402_with_its_code(world: World) -> None:
    client = sdk(world, world.spent("acme"))

    with pytest.raises(openai.APIStatusError) as refused:
        client.chat.completions.create(model="gpt-3.5-turbo", messages=MESSAGES)

    assert refused.value.status_code == 402
    assert refused.value.code == "budget_exhausted"
    assert "tenant/acme/tokens_per_day" in refused.value.message


def test_a_spent_metered_budget_is_insufficient_quota_and_not_retried(world: World) -> None:
    client = sdk(world, world.spent("stark", "metered"), retries=2)

    with pytest.raises(openai.RateLimitError) as refused:
        client.chat.completions.create(model="gpt-3.5-turbo", messages=MESSAGES)

    assert (refused.value.code, refused.value.type) == ("insufficient_quota", "insufficient_quota")
    # Retry-After points at midnight: the SDK does not retry what a wait will not cure soon.
    assert world.outcomes("stark", "budget_exhausted") == 1


def test_a_model_outside_the_plan_is_403(world: World) -> None:
    client = sdk(world, world.key("acme"))

    with pytest.raises(openai.PermissionDeniedError) as refused:
        client.chat.completions.create(model="gpt-4", messages=MESSAGES)

    assert (refused.value.code, refused.value.param) == ("model_not_allowed", "model")


def test_async_client_success_streaming_and_refusals(world: World) -> None:
    async def main() -> None:
        # 12 at once on 4 a second: each refused one comes back after its retry-after-ms;
        # enough retries for the last of them to find a slot (one frees each 250 ms).
        async with openai.AsyncOpenAI(
            api_key=world.key("acme"), base_url=world.base_url, max_retries=12
        ) as client:
            answer = await client.chat.completions.create(model="gpt-3.5-turbo", messages=MESSAGES)
            assert answer.choices[0].message.content
            stream = await client.chat.completions.create(
                model="gpt-3.5-turbo", messages=MESSAGES, max_tokens=10, stream=True
            )
            text = [chunk.choices[0].delta.content or "" async for chunk in stream]
            assert "".join(text)
            with pytest.raises(openai.PermissionDeniedError):
                await client.chat.completions.create(model="gpt-4", messages=MESSAGES)
            burst = await asyncio.gather(*(
                client.chat.completions.create(model="gpt-3.5-turbo", messages=MESSAGES,
                                               max_tokens=5)
                for _ in range(12)
            ))  # fmt: skip
            assert all(answer.choices[0].message.content for answer in burst)
        async with openai.AsyncOpenAI(
            api_key=world.spent("globex"), base_url=world.base_url
        ) as spent:
            with pytest.raises(openai.APIStatusError) as refused:
                await spent.chat.completions.create(model="gpt-3.5-turbo", messages=MESSAGES)
            assert refused.value.status_code == 402

    asyncio.run(main())
    assert world.outcomes("acme", "rate_limited") >= 1


def test_a_bad_key_is_an_authentication_error(world: World) -> None:
    client = sdk(world, "gov_0123456789abcdef_" + "x" * 43)

    with pytest.raises(openai.AuthenticationError) as refused:
        client.chat.completions.create(model="gpt-3.5-turbo", messages=MESSAGES)

    assert refused.value.code == "invalid_api_key"
    body = refused.value.body  # the SDK's parse of {"error": {...}}
    assert isinstance(body, dict)
    assert body["message"] == "unknown or revoked API key"


def charged(world: World, state: str, tokens: int) -> None:
    """Wait until the tenant's day holds `tokens` used (settling runs as the answer ends)."""
    wait_for(
        lambda: world.db.hget(state, "u|tokens_per_day") == str(tokens),
        lambda: f"used {world.db.hget(state, 'u|tokens_per_day')}, not {tokens}",
        timeout=10,
    )


def test_the_responses_api_is_served_and_charged_what_it_used(world: World) -> None:
    """`client.responses.create` (the SDK's recommended API; vLLM serves it) was refused as an
    unmetered route. It is metered now: its usage is read (a stream's from its
    `response.completed` event) and charged exactly, on the day's budget."""
    client = sdk(world, world.key("respond"))
    state = EnforcementKeys.for_prefix("governor").tenant_level("respond").state

    answer = client.responses.create(model="gpt-3.5-turbo", input="hi", max_output_tokens=16)
    assert answer.output_text
    assert answer.usage is not None
    first = answer.usage.total_tokens
    charged(world, state, first)

    with client.responses.stream(model="gpt-3.5-turbo", input=[{"role": "user", "content": "hi"}],
                                 max_output_tokens=16) as stream:  # fmt: skip
        text = "".join(e.delta for e in stream if e.type == "response.output_text.delta")
        final = stream.get_final_response()
    assert text == final.output_text
    assert final.usage is not None
    total = first + final.usage.total_tokens
    charged(world, state, total)


def test_a_continued_conversation_is_reserved_whole(world: World) -> None:
    """`previous_response_id`: the model server reads the earlier turns back and bills them as
    input, so the gateway reserves them too (what it recorded when they settled). A turn the
    day cannot hold any more is refused 402 before the model server, where it used to reserve
    its own few tokens and spend far past the budget."""
    client = sdk(world, world.key("chatty"))
    state = EnforcementKeys.for_prefix("governor").tenant_level("chatty").state

    first = client.responses.create(model="gpt-3.5-turbo", input="x" * 400,
                                    max_output_tokens=300,
                                    extra_headers={"x-fake-tokens": "300"})  # fmt: skip
    assert first.usage is not None
    second = client.responses.create(model="gpt-3.5-turbo", input="and?", max_output_tokens=16,
                                     previous_response_id=first.id)  # fmt: skip
    assert second.usage is not None
    assert second.usage.input_tokens > first.usage.total_tokens  # billed again
    spent = first.usage.total_tokens + second.usage.total_tokens
    charged(world, state, spent)

    with pytest.raises(openai.APIStatusError) as refused:
        client.responses.create(model="gpt-3.5-turbo", input="and?", max_output_tokens=16,
                                previous_response_id=second.id)  # fmt: skip

    assert refused.value.status_code == 402
    assert refused.value.code == "budget_exhausted"
    charged(world, state, spent)  # nothing more


def test_another_tenants_response_id_is_not_found(
    world: World, model_server: tuple[FakeUpstream, str]
) -> None:
    """Every tenant reaches the model server with the gateway's one upstream key: tenant B
    naming tenant A's response would read A's conversation. The SDK gets OpenAI's 404 with
    the words an id that was never made gets, and the model server never sees the request."""
    mine = sdk(world, world.key("chatty")).responses.create(
        model="gpt-3.5-turbo", input="a secret", max_output_tokens=16
    )
    client = sdk(world, world.key("nosy"))
    before = len(model_server[0].seen)

    errors = []
    for named in (mine.id, "resp_never_made"):
        with pytest.raises(openai.NotFoundError) as refused:
            client.responses.create(model="gpt-3.5-turbo", input="and?", max_output_tokens=16,
                                    previous_response_id=named)  # fmt: skip
        assert refused.value.code == "previous_response_not_found"
        assert refused.value.param == "previous_response_id"
        assert isinstance(refused.value.body, dict)
        errors.append(str(refused.value.body["message"]).replace(named, "X"))

    assert errors[0] == errors[1] == "no response 'X' for this API key"
    assert len(model_server[0].seen) == before


def day_left(headers: Mapping[str, str]) -> int:
    """What the day's token budget holds after an admission (its IETF RateLimit `r`)."""
    found = re.search(r'tokens_per_day";r=(\d+)', headers["ratelimit"])
    assert found, headers["ratelimit"]
    return int(found.group(1))


ITEM: Any = {"type": "message", "role": "user", "content": "x" * 400}
# The gateway's estimate of ITEM, as of any Responses input item: ⌈characters ÷ 4⌉ of its
# texts but the role ("message": 2, the content: 100) and 4 for the item.
ITEM_TOKENS = 2 + 100 + 4


def test_a_conversation_made_with_the_sdk_is_continued_and_its_items_reserved(
    world: World, model_server: tuple[FakeUpstream, str]
) -> None:
    """`client.conversations.create(items=…)` then `client.responses.create(conversation=…)`:
    the create goes through the gateway, which records the conversation for the tenant, so
    the turn in it is served (it was 404, the create an unmetered route or the turn an unknown
    conversation), and its reservation holds the items the model server reads back."""
    client = sdk(world, world.key("talker"))

    conversation = client.conversations.create(items=[ITEM], metadata={"topic": "sdk"})
    assert conversation.object == "conversation"
    assert conversation.id.startswith("conv_")
    raw = client.responses.with_raw_response.create(
        model="gpt-3.5-turbo", input="and?", max_output_tokens=16, conversation=conversation.id
    )

    answer = raw.parse()
    assert answer.usage is not None
    assert answer.usage.input_tokens > model_server[0].conversations[conversation.id] // 2
    # The day's 1,000 less this turn's reservation: the items, ⌈4/4⌉ of input and the cap.
    assert day_left(raw.headers) == 1000 - (ITEM_TOKENS + 1 + 16)
    # Served again: the conversation's own calls, for its owner.
    assert client.conversations.retrieve(conversation.id).metadata == {"topic": "sdk"}
    listed = client.conversations.items.list(conversation.id)
    assert [item.type for item in listed.data] == ["message"]


def test_items_added_through_the_sdk_count_and_a_deleted_conversation_is_gone(
    world: World, model_server: tuple[FakeUpstream, str]
) -> None:
    client = sdk(world, world.key("talker"))
    conversation = client.conversations.create(metadata={"topic": "empty"})
    client.conversations.items.create(conversation.id, items=[ITEM, ITEM])

    raw = client.responses.with_raw_response.create(
        model="gpt-3.5-turbo", input="and?", max_output_tokens=16, conversation=conversation.id
    )
    assert day_left(raw.headers) == 1000 - (2 * ITEM_TOKENS + 1 + 16)

    deleted = client.conversations.delete(conversation.id)
    assert deleted.deleted is True
    before = len(model_server[0].seen)
    with pytest.raises(openai.NotFoundError) as refused:
        client.responses.create(model="gpt-3.5-turbo", input="and?", max_output_tokens=16,
                                conversation=conversation.id)  # fmt: skip
    assert refused.value.code == "conversation_not_found"
    with pytest.raises(openai.NotFoundError):
        client.conversations.retrieve(conversation.id)
    assert len(model_server[0].seen) == before  # the gateway answered both


def test_another_tenants_conversation_is_not_found_on_any_of_its_routes(
    world: World, model_server: tuple[FakeUpstream, str]
) -> None:
    """Every tenant reaches the model server with the one upstream key: a conversation is
    read, continued, changed and deleted only by the tenant that made it."""
    owner = sdk(world, world.key("chatty"))
    conversation = owner.conversations.create(items=[ITEM], metadata={"topic": "secret"})
    item = owner.conversations.items.list(conversation.id).data[0].id
    assert item is not None
    nosy, named = sdk(world, world.key("nosy")), conversation.id
    before = len(model_server[0].seen)

    calls: dict[str, Callable[[], object]] = {
        "retrieve": lambda: nosy.conversations.retrieve(conversation.id),
        "update": lambda: nosy.conversations.update(conversation.id, metadata={"x": "y"}),
        "delete": lambda: nosy.conversations.delete(conversation.id),
        "list items": lambda: nosy.conversations.items.list(conversation.id),
        "add items": lambda: nosy.conversations.items.create(conversation.id, items=[ITEM]),
        "an item": lambda: nosy.conversations.items.retrieve(item, conversation_id=named),
        "delete an item": lambda: nosy.conversations.items.delete(item, conversation_id=named),
        "a turn": lambda: nosy.responses.create(model="gpt-3.5-turbo", input="and?",
                                                max_output_tokens=16, conversation=conversation.id),
    }  # fmt: skip
    for name, call in calls.items():
        with pytest.raises(openai.NotFoundError) as refused:
            call()
        assert refused.value.code == "conversation_not_found", name

    assert len(model_server[0].seen) == before  # none reached the model server
    assert owner.conversations.retrieve(conversation.id).metadata == {"topic": "secret"}
    assert len(owner.conversations.items.list(conversation.id).data) == 1


def test_a_background_response_is_polled_and_only_its_tenant_reaches_it(
    world: World, model_server: tuple[FakeUpstream, str]
) -> None:
    """`responses.create(background=True)`, then `responses.retrieve` until done: served to
    the tenant that made it; another tenant's retrieve, input list, cancel and delete are
    OpenAI's 404 and never reach the model server; the owner's delete makes it 404."""
    owner = sdk(world, world.key("chatty"))
    queued = owner.responses.create(model="gpt-3.5-turbo", input="later", max_output_tokens=16,
                                    background=True)  # fmt: skip
    assert queued.status == "queued"
    assert owner.responses.retrieve(queued.id).status == "completed"
    assert len(owner.responses.input_items.list(queued.id).data) == 1
    nosy = sdk(world, world.key("nosy"))
    before = len(model_server[0].seen)

    calls: dict[str, Callable[[], object]] = {
        "retrieve": lambda: nosy.responses.retrieve(queued.id),
        "input items": lambda: nosy.responses.input_items.list(queued.id),
        "cancel": lambda: nosy.responses.cancel(queued.id),
        "delete": lambda: nosy.responses.delete(queued.id),
    }
    for name, call in calls.items():
        with pytest.raises(openai.NotFoundError) as refused:
            call()
        assert refused.value.code == "response_not_found", name
    assert len(model_server[0].seen) == before  # none reached the model server

    owner.responses.delete(queued.id)
    with pytest.raises(openai.NotFoundError):
        owner.responses.retrieve(queued.id)
    assert len(model_server[0].seen) == before + 1  # the delete alone
