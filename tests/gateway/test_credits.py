"""The credit ledger: holds at admission, charges at settle, 402 at the floor, and the CLI."""

from __future__ import annotations

import asyncio
import json
import random
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path

import pytest
import redis
from typer.testing import CliRunner, Result

from controller.cli import app
from controller.contract.catalog import Credits, PlanInfo
from controller.gateway.admission import Admission, AdmissionRequest, AdmissionResult
from controller.gateway.credits import CreditLedger
from controller.gateway.prices import PriceTable, to_micro
from controller.settings import ModelPrice, PricesSettings, Settings
from tests.gateway.conftest import Gate, server_ms, write_limits
from tests.support.redis import RedisServer

runner = CliRunner()


def request(tokens: int, model: str = "gpt-4") -> AdmissionRequest:
    return AdmissionRequest("acme", "paid", None, None, model, tokens, uuid.uuid4().hex)


@pytest.fixture
def ledger(db: redis.Redis[str]) -> CreditLedger:
    return CreditLedger(db, "governor")


@pytest.fixture
def paid(gate: Gate, set_limits: Callable[[Mapping[str, float]], None]) -> Gate:
    gate.plans = {"paid": PlanInfo(credits=Credits(min_balance_usd=0.10))}
    # The controller has written its limits (none of them acme's): credits alone decide.
    set_limits({"tenant/someone-else/requests_per_minute": 5})
    return gate


def test_prices_are_per_1k_tokens_and_unknown_models_are_never_free() -> None:
    table = PriceTable.from_settings(PricesSettings())
    assert table.cost("gpt-4", 1000, 1000) == pytest.approx(0.09)
    assert table.worst_case("gpt-3.5-turbo", 2000) == pytest.approx(0.003)
    assert table.price("some-new-model") == table.price("gpt-4")  # the dearest
    custom = PricesSettings(
        models={"a": ModelPrice(prompt_per_1k=1, completion_per_1k=2)},
        default=ModelPrice(prompt_per_1k=0.5, completion_per_1k=0.5),
    )
    assert PriceTable.from_settings(custom).cost("b", 1000, 0) == 0.5
    assert to_micro(0.1 + 0.2) == 300_000  # float noise never adds a micro-dollar


def test_the_price_table_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(
        "GOVERNOR_PRICES__MODELS", '{"llama-3": {"prompt_per_1k": 0.2, "completion_per_1k": 0.4}}'
    )
    table = PriceTable.from_settings(Settings().prices)
    assert table.cost("llama-3", 1000, 500) == pytest.approx(0.4)
    assert table.price("gpt-4") == table.price("llama-3")  # only llama-3 is priced now


def test_credits_run_out_with_a_402_naming_the_ledger(paid: Gate, ledger: CreditLedger) -> None:
    ledger.top_up("acme", 1.0, "trial", "test")
    # gpt-4 worst case: 1000 tokens at 0.06 USD/1k = 0.06 USD held per request.

    async def body(admission: Admission) -> list[AdmissionResult]:
        results = []
        for _ in range(20):
            result = await admission.admit(request(1000))
            results.append(result)
            if result.reservation is not None:
                await admission.settle(
                    result.reservation, "acme", 1000, "gpt-4",
                    prompt_tokens=500, completion_tokens=500,
                )  # fmt: skip
        return results

    results = paid.run(body)
    allowed = [r for r in results if r.outcome == "allow"]
    # Each charge is 0.045 USD; admission needs 0.06 free above the 0.10 floor: after 19
    # charges 0.145 is left, and holding 0.06 more would go below 0.10.
    assert len(allowed) == 19
    refused = results[len(allowed)]
    assert refused.outcome == "budget_exhausted"
    assert refused.denied_by == "credits/acme"
    assert refused.budget is not None
    assert refused.budget.kind == "credits"
    assert refused.budget.remaining == pytest.approx(1.0 - 19 * 0.045)
    assert refused.retry_after is None
    assert refused.budget.limit is None
    state = ledger.state("acme")
    assert state.balance_usd == pytest.approx(0.145)
    assert state.reserved_usd == 0
    history = ledger.history("acme", 100)
    assert [e.kind for e in history] == ["charge"] * 19 + ["top-up"]
    assert history[0].amount_usd == pytest.approx(-0.045)
    assert history[0].tokens == 1000
    assert history[0].balance_usd == pytest.approx(0.145)


def test_concurrent_spenders_never_go_below_the_floor(paid: Gate, ledger: CreditLedger) -> None:
    ledger.top_up("acme", 5.0, "trial", "test")

    async def spender(admission: Admission, seed: int) -> int:
        rng, charged = random.Random(seed), 0
        for _ in range(10):
            tokens = rng.randint(100, 2000)
            result = await admission.admit(request(tokens))
            if result.reservation is not None:
                used = rng.randint(tokens // 2, tokens * 2)  # refunds and extra charges
                await admission.settle(result.reservation, "acme", min(used, tokens), "gpt-4")
                charged += to_micro(min(used, tokens) * 0.06 / 1000)
        return charged

    async def body(admission: Admission) -> list[int]:
        return await asyncio.gather(*(spender(admission, seed) for seed in range(64)))

    charged = sum(paid.run(body))
    state = ledger.state("acme")
    assert state.reserved_usd == 0
    assert state.balance_usd == pytest.approx(5.0 - charged / 1e6)
    assert state.balance_usd >= 0.10  # never below the plan's floor
    assert state.balance_usd < 0.10 + 0.12  # and the balance was really spent down


def test_a_crashed_gateways_credit_hold_ends_with_its_lease(
    paid: Gate, ledger: CreditLedger, db: redis.Redis[str]
) -> None:
    ledger.top_up("acme", 1.0, "trial", "test")
    paid.lease_seconds = 0.3

    async def admit(admission: Admission) -> AdmissionResult:
        return await admission.admit(request(10_000))  # holds 0.60 USD, never settled

    assert paid.run(admit).outcome == "allow"
    assert ledger.state("acme").reserved_usd == pytest.approx(0.6)
    assert paid.run(admit).outcome == "budget_exhausted"  # 0.40 free, 0.10 floor
    held_at = server_ms(db)
    while server_ms(db) < held_at + 300:  # let the lease run out (server clock)
        pass
    assert paid.run(admit).outcome == "allow"  # the dead hold was released first
    assert ledger.state("acme").reserved_usd == pytest.approx(0.6)
    assert ledger.state("acme").balance_usd == 1.0  # a released hold charges nothing


@pytest.mark.parametrize(("credits", "charged"), [(True, 0.06), (False, 0.0)])
def test_usage_beyond_the_hold_is_charged_on_credit_plans_only(
    paid: Gate, ledger: CreditLedger, credits: bool, charged: float
) -> None:
    gate = paid
    gate.plans = {"paid": PlanInfo(credits=Credits() if credits else None)}
    ledger.top_up("acme", 1.0, "trial", "test")

    async def body(admission: Admission) -> str:
        result = await admission.admit(request(100))  # holds 0.006 USD on a credit plan
        assert result.reservation is not None
        await admission.settle(result.reservation, "acme", 1000, "gpt-4")
        return result.outcome

    assert gate.run(body) == "allow"
    assert ledger.state("acme").balance_usd == pytest.approx(1.0 - charged)
    assert ledger.state("acme").reserved_usd == 0
    kinds = [e.kind for e in ledger.history("acme")]
    assert kinds == (["charge", "top-up"] if credits else ["top-up"])


def cli(url: str, *args: str) -> Result:
    return runner.invoke(app, ["credits", *args], env={"GOVERNOR_REDIS__URL": url})


def test_cli_top_up_show_and_history(redis_server: RedisServer, db: redis.Redis[str]) -> None:
    url = redis_server.url
    added = cli(url, "top-up", "acme", "12.5", "--reason", "invoice 42", "--actor", "ops", "--json")
    assert added.exit_code == 0, added.output
    assert json.loads(added.stdout)["balance_usd"] == 12.5
    assert cli(url, "top-up", "acme", "0.25", "--reason", "goodwill").exit_code == 0
    shown = json.loads(cli(url, "show", "acme", "--json").stdout)
    assert shown == {
        "tenant": "acme",
        "balance_usd": 12.75,
        "reserved_usd": 0.0,
        "available_usd": 12.75,
    }
    entries = json.loads(cli(url, "history", "acme", "-n", "1", "--json").stdout)
    assert len(entries) == 1
    assert entries[0]["amount_usd"] == 0.25
    assert entries[0]["reason"] == "goodwill"
    assert entries[0]["balance_usd"] == 12.75
    table = cli(url, "history", "acme").stdout
    assert "invoice 42 (ops)" in table
    assert "+12.500000" in table
    assert "12.750000" in cli(url, "show", "acme").stdout


def test_cli_adjust_charges_or_credits_by_hand(
    redis_server: RedisServer, db: redis.Redis[str]
) -> None:
    url = redis_server.url
    assert cli(url, "top-up", "acme", "10", "--reason", "invoice 7").exit_code == 0
    charged = cli(url, "adjust", "acme", "--charge", "1.25", "--reason", "INC-42", "--json")
    assert charged.exit_code == 0, charged.output
    assert json.loads(charged.stdout)["balance_usd"] == 8.75
    given = cli(url, "adjust", "acme", "--credit", "0.5", "--reason", "refund", "--actor", "ops")
    assert "+0.50 USD, balance 9.250000 USD" in given.stdout
    entries = json.loads(cli(url, "history", "acme", "--json").stdout)
    assert [(e["kind"], e["amount_usd"], e["reason"]) for e in entries] == [  # newest first
        ("adjustment", 0.5, "refund"),
        ("adjustment", -1.25, "INC-42"),
        ("top-up", 10.0, "invoice 7"),
    ]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("adjust", "acme", "--reason", "x"), "exactly one of --charge USD or --credit USD"),
        (("adjust", "acme", "--charge", "1", "--credit", "1", "--reason", "x"), "exactly one"),
        (("adjust", "acme", "--charge", "0", "--reason", "x"), "a positive number of USD"),
        (("adjust", "acme", "--credit", "nan", "--reason", "x"), "a positive number of USD"),
        (("top-up", "acme", "--reason", "x", "--", "-5"), "must be a number above 0"),
        (("top-up", "acme", "0", "--reason", "x"), "must be a number above 0"),
        (("top-up", "acme", "nan", "--reason", "x"), "must be a number above 0"),
        (("top-up", "ac/me", "5", "--reason", "x"), "tenant 'ac/me'"),
        (("top-up", "acme", "5", "--reason", " "), "say why"),
    ],
)
def test_cli_refuses_bad_input(
    redis_server: RedisServer, db: redis.Redis[str], args: tuple[str, ...], message: str
) -> None:
    result = cli(redis_server.url, *args)
    assert result.exit_code == 2
    assert message in result.output
    assert db.keys("*credits*") == []


def test_cli_show_says_when_the_tenants_plan_charges_no_credits(
    redis_server: RedisServer, db: redis.Redis[str], policy_dir: Path
) -> None:
    """A balance of 0 on a plan without credits read as "spent" to on-call (a runbook sent
    them there for a 402 that came from a token budget)."""
    url = redis_server.url
    write_limits(db, "governor", policy_dir)
    ok = runner.invoke(app, ["tenants", "set", "acme", "free"], env={"GOVERNOR_REDIS__URL": url})
    assert ok.exit_code == 0, ok.output
    assert runner.invoke(app, ["tenants", "set", "umbrella", "enterprise"],
                         env={"GOVERNOR_REDIS__URL": url}).exit_code == 0  # fmt: skip

    free = cli(url, "show", "acme")
    enterprise = cli(url, "show", "umbrella")

    assert free.exit_code == enterprise.exit_code == 0, free.output + enterprise.output
    assert "plan 'free' of tenant 'acme' charges no credits" in " ".join(free.stdout.split())
    assert "charges no credits" not in enterprise.stdout  # enterprise charges credits
    assert json.loads(cli(url, "show", "acme", "--json").stdout)["balance_usd"] == 0.0
