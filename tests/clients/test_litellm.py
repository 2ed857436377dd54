"""LiteLLM as a client (`litellm.completion` with `api_base`) through `governor gateway`:
success, streaming, 429 retried, 402, 429 insufficient_quota, 403 as LiteLLM's exceptions."""

from __future__ import annotations

import os
from typing import Any

import pytest

# LiteLLM fetches its model price map from the internet at import unless told not to.
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
import litellm
from litellm.exceptions import APIError, BadRequestError, RateLimitError

from tests.clients.conftest import World, at_once

# The clients under test leave connections and event loops of their own unclosed (the
# garbage collector's warning about them is theirs, not ours): tests/conftest.py collects
# them after this folder; a collection that happens to run inside one of these tests first
# must not fail it.
pytestmark = [pytest.mark.integration, pytest.mark.filterwarnings("ignore::ResourceWarning")]

MESSAGES = [{"role": "user", "content": "hi"}]


def complete(world: World, key: str, model: str = "gpt-3.5-turbo", **options: Any) -> Any:
    return litellm.completion(
        model=f"openai/{model}",
        api_base=world.base_url,
        api_key=key,
        messages=MESSAGES,
        **options,
    )


def test_completion_and_streaming(world: World) -> None:
    key = world.key("acme")

    answer = complete(world, key)
    stream = complete(world, key, stream=True, max_tokens=10)
    text = "".join(chunk.choices[0].delta.content or "" for chunk in stream)

    assert answer.choices[0].message.content
    assert answer.usage.total_tokens > 0
    assert text


def test_a_429_is_retried_and_without_retries_raised(world: World) -> None:
    key = world.key("acme")
    answers = [complete(world, key, max_tokens=5, max_retries=3) for _ in range(8)]
    assert all(answer.choices[0].message.content for answer in answers)
    assert world.outcomes("acme", "rate_limited") >= 1

    other = world.key("initech")
    with pytest.raises(RateLimitError) as refused:
        at_once(lambda: complete(world, other, max_tokens=5, max_retries=0))
    assert "tenant/initech/requests_per_second is used up" in str(refused.value)


def test_spent_budgets_and_a_model_outside_the_plan(world: World) -> None:
    with pytest.raises(APIError) as spent:
        complete(world, world.spent("acme"), max_retries=0)
    with pytest.raises(RateLimitError) as quota:
        complete(world, world.spent("stark", "metered"), max_retries=2)
    # LiteLLM raises its BadRequestError for an OpenAI-provider 403 before 1.100 (keeping the
    # status), its APIError since: either way the 403 and the gateway's words reach the caller.
    with pytest.raises((BadRequestError, APIError)) as forbidden:
        complete(world, world.key("globex"), model="gpt-4")

    assert spent.value.status_code == 402
    assert "tenant/acme/tokens_per_day has" in str(spent.value)
    assert quota.value.status_code == 429
    assert "tenant/stark/tokens_per_day has" in str(quota.value)
    assert world.outcomes("stark", "budget_exhausted") == 1  # not retried
    assert vars(forbidden.value)["status_code"] == 403  # typed as 400, set to the real one
    assert "plan 'free' may call gpt-3.5-turbo; not 'gpt-4'" in str(forbidden.value)
