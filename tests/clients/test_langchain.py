"""LangChain's `ChatOpenAI` (langchain-openai) through `governor gateway`: success, streaming,
429 retried, 402, 429 insufficient_quota, 403 — as the OpenAI SDK it is built on raises them."""

from __future__ import annotations

import openai
import pytest
from langchain_openai import ChatOpenAI
from pydantic import SecretStr

from tests.clients.conftest import World, at_once

# The clients under test leave connections and event loops of their own unclosed (the
# garbage collector's warning about them is theirs, not ours): tests/conftest.py collects
# them after this folder; a collection that happens to run inside one of these tests first
# must not fail it.
pytestmark = [pytest.mark.integration, pytest.mark.filterwarnings("ignore::ResourceWarning")]


def chat(world: World, key: str, retries: int = 2, model: str = "gpt-3.5-turbo") -> ChatOpenAI:
    return ChatOpenAI(
        model=model, api_key=SecretStr(key), base_url=world.base_url, max_retries=retries
    )


def test_invoke_and_stream(world: World) -> None:
    llm = chat(world, world.key("acme"))

    answer = llm.invoke("hi")
    streamed = "".join(str(chunk.content) for chunk in llm.stream("hi"))

    assert answer.content
    assert answer.usage_metadata is not None
    assert answer.usage_metadata["total_tokens"] > 0
    assert streamed


def test_a_429_is_retried_and_without_retries_raised(world: World) -> None:
    patient = chat(world, world.key("acme"), retries=3)
    answers = [patient.invoke("hi", max_tokens=5) for _ in range(8)]
    assert all(answer.content for answer in answers)
    assert world.outcomes("acme", "rate_limited") >= 1

    hasty = chat(world, world.key("initech"), retries=0)
    with pytest.raises(openai.RateLimitError) as refused:
        at_once(lambda: hasty.invoke("hi", max_tokens=5))
    assert refused.value.code == "rate_limit_exceeded"


def test_spent_budgets_and_a_model_outside_the_plan(world: World) -> None:
    with pytest.raises(openai.APIStatusError) as spent:
        chat(world, world.spent("acme")).invoke("hi")
    with pytest.raises(openai.RateLimitError) as quota:
        chat(world, world.spent("stark", "metered")).invoke("hi")
    with pytest.raises(openai.PermissionDeniedError) as forbidden:
        chat(world, world.key("globex"), model="gpt-4").invoke("hi")

    assert (spent.value.status_code, spent.value.code) == (402, "budget_exhausted")
    assert quota.value.code == "insufficient_quota"
    assert world.outcomes("stark", "budget_exhausted") == 1  # not retried
    assert forbidden.value.code == "model_not_allowed"
