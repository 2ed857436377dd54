"""`governor usage TENANT` after real traffic through `governor gateway` (a real Redis, the
controller's limits): each limit's used and remaining figures match what the gateway said."""

from __future__ import annotations

import json
import re
from typing import Any

import redis
from typer.testing import CliRunner, Result

from controller.cli import app
from controller.contract.enforcement import EnforcementKeys
from controller.gateway.credits import CreditLedger
from controller.gateway.openai import ModelRequest
from tests.gateway.conftest import Gateway, budget_remaining

HI = b'{"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}'


def governor(gateway: Gateway, *args: str) -> Result:
    env = {"GOVERNOR_REDIS__URL": gateway.redis_url, "GOVERNOR_GATEWAY__API_KEY_SECRET": "x"}
    return CliRunner().invoke(app, ["usage", *args], env=env)


def limits_of(result: Result) -> dict[str, dict[str, Any]]:
    assert result.exit_code == 0, result.output
    return {item["address"]: item for item in json.loads(result.stdout)["limits"]}


def test_usage_shows_each_limit_used_remaining_and_reset(gateway: Gateway) -> None:
    key = gateway.key("acme", "free")  # 10 requests a minute, 1,000 tokens a day
    answers = [gateway.chat(key, max_tokens=5) for _ in range(3)]
    assert [a.status_code for a in answers] == [200] * 3
    spent = sum(a.json()["usage"]["total_tokens"] for a in answers)

    result = governor(gateway, "acme", "--json")

    found = limits_of(result)
    document = json.loads(result.stdout)
    assert (document["tenant"], document["plan"]) == ("acme", "free")  # from its API key
    rate = found["tenant/acme/requests_per_minute"]
    assert (rate["limit"], rate["used"], rate["remaining"]) == (10, 3, 7)
    assert rate["remaining"] == int(answers[-1].headers["x-ratelimit-remaining-requests"])
    assert 0 < rate["resets_in_seconds"] <= 18
    day = found["tenant/acme/tokens_per_day"]
    assert (day["used"], day["held"], day["remaining"]) == (spent, 0, 1000 - spent)
    after = gateway.chat(key, max_tokens=5)  # the gateway's own figure agrees
    hold = ModelRequest.parse("chat", HI, 1024).worst_case_tokens  # held for this request
    assert budget_remaining(after) == day["remaining"] - hold
    assert 0 < day["resets_in_seconds"] <= 86400
    assert document["credits"] is None


def test_usage_as_a_table_with_credits_and_a_model(gateway: Gateway, db: redis.Redis[str]) -> None:
    key = gateway.key("umbrella", "enterprise")  # 6 a minute, charged in credits
    CreditLedger(db, "governor").top_up("umbrella", 2.0, "test", "test")
    assert gateway.chat(key, model="gpt-4", max_tokens=5).status_code == 200

    table = governor(gateway, "umbrella", "--model", "gpt-4")
    document = json.loads(governor(gateway, "umbrella", "--model", "gpt-4", "--json").stdout)

    assert table.exit_code == 0, table.output
    row = r"tenant/umbrella/requests_per_minute\s*│\s*minute\s*│\s*6\s*│\s*1\s*│\s*5\s*│"
    assert re.search(row, table.stdout), table.stdout
    assert "credits: " in table.stdout
    assert 0 < document["credits"]["balance_usd"] < 2.0  # the call was charged


def test_a_tenant_with_no_plan_is_refused_with_the_fix(gateway: Gateway) -> None:
    result = governor(gateway, "nobody")

    assert result.exit_code == 2
    assert "not registered and has no API key; give its plan with --plan" in result.stderr


def test_a_damaged_counter_is_named_beside_the_figures_that_read_it_as_zero(
    gateway: Gateway, db: redis.Redis[str]
) -> None:
    key = gateway.key("acme", "free")  # 10 requests a minute, 1,000 tokens a day
    assert gateway.chat(key, max_tokens=5).status_code == 200
    state = EnforcementKeys.for_prefix("governor").tenant_level("acme").state
    db.hset(state, "u|tokens_per_day", "-500")  # a hand edit: 500 tokens of free headroom
    db.hset(state, "g|requests_per_minute", "abc")
    assert gateway.chat(key, max_tokens=5).status_code == 503  # what usage must explain

    table = governor(gateway, "acme")
    damaged = json.loads(governor(gateway, "acme", "--json").stdout)["damaged"]

    assert table.exit_code == 0, table.output
    shown = " ".join(table.stdout.split())
    assert f"damaged: {state} field u|tokens_per_day holds '-500'" in shown
    assert f"damaged: {state} field g|requests_per_minute holds 'abc'" in shown
    assert "503 #corrupt-state" in shown
    assert [text.split(" holds ")[0] for text in damaged] == [
        f"{state} field g|requests_per_minute",
        f"{state} field u|tokens_per_day",
    ]

    db.hdel(state, "u|tokens_per_day", "d|tokens_per_day", "g|requests_per_minute")  # repaired
    assert json.loads(governor(gateway, "acme", "--json").stdout)["damaged"] == []
