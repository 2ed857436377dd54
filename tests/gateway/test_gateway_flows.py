"""The seed's stories through `governor gateway` in front of a fake model server, limits in
a real Redis written by the controller's sink: 429 at the 11th request, 402 at the end of a
token budget or a credit balance, 403 for a model the plan lacks."""

from __future__ import annotations

import datetime as dt
import re

import redis
from prometheus_client import generate_latest
from pydantic import SecretStr

from controller.changes import Change
from controller.contract.catalog import PlanInfo
from controller.contract.keys import KeySchema
from controller.gateway.catalog import PlanCatalog
from controller.gateway.credits import CreditLedger
from controller.gateway.metrics import GatewayMetrics
from controller.gateway.prices import PriceTable
from controller.model import Address
from controller.settings import PricesSettings
from controller.sinks.redis import RedisSink
from tests.gateway.conftest import PROBLEM, Gateway, MakeGateway
from tests.gateway.fake_upstream import FakeUpstream


def test_beginner_flow_ten_requests_a_minute_then_429(gateway: Gateway) -> None:
    key = gateway.key("acme", "free")

    answers = [gateway.chat(key, max_tokens=5) for _ in range(11)]

    assert [a.status_code for a in answers] == [200] * 10 + [429]
    refused = answers[-1]
    assert refused.headers["content-type"] == PROBLEM
    assert int(refused.headers["retry-after"]) >= 1
    problem = refused.json()
    assert problem["status"] == 429
    assert problem["violated-policies"][0].endswith("/requests_per_minute")
    first = answers[0].headers
    assert first["x-ratelimit-limit-requests"] == "10"
    assert first["x-ratelimit-remaining-requests"] == "9"
    assert answers[9].headers["x-ratelimit-remaining-requests"] == "0"
    policy = first["ratelimit-policy"]
    assert re.search(r'"[^"]*requests_per_minute";q=10;w=60', policy), policy
    assert re.search(r'"[^"]*requests_per_minute";r=9;t=\d+', first["ratelimit"])
    assert answers[0].json()["choices"][0]["message"]["content"]


def test_a_free_key_asking_for_gpt4_is_refused_with_the_allowed_models(
    gateway: Gateway, upstream: tuple[FakeUpstream, str]
) -> None:
    key = gateway.key("acme", "free")
    before = len(upstream[0].seen)

    answer = gateway.chat(key, model="gpt-4")

    assert answer.status_code == 403
    assert answer.headers["content-type"] == PROBLEM
    problem = answer.json()
    assert (problem["plan"], problem["model"]) == ("free", "gpt-4")
    assert problem["allowed_models"] == ["gpt-3.5-turbo"]
    assert len(upstream[0].seen) == before  # never reached the model server


def test_intermediate_flow_a_daily_token_budget_ends_in_402(gateway: Gateway) -> None:
    key = gateway.key("acme", "free")

    answers = []
    for _ in range(10):
        answers.append(gateway.chat(key, max_tokens=200, headers={"x-fake-tokens": "150"}))
        if answers[-1].status_code != 200:
            break

    refused = answers[-1]
    assert refused.status_code == 402, [a.status_code for a in answers]
    assert refused.headers["content-type"] == PROBLEM
    problem = refused.json()
    assert problem["budget"].endswith("/tokens_per_day")
    assert problem["kind"] == "tokens"
    assert problem["limit"] == 1000
    assert 0 <= problem["remaining"] < 200 + 4
    tomorrow = dt.datetime.now(dt.UTC).date() + dt.timedelta(days=1)
    assert problem["resets_at"] == f"{tomorrow.isoformat()}T00:00:00+00:00"
    assert len(answers) > 2  # earlier requests settled their real (small) usage
    # The share of the budget left is exported for the "budget nearly exhausted" alert.
    line = next(
        x for x in gateway.metrics().splitlines() if x.startswith("gateway_budget_remaining_ratio{")
    )
    assert 'tenant="acme"' in line
    assert 0.0 <= float(line.rsplit(" ", 1)[1]) < 0.25


def test_a_credit_balance_running_out_is_402_naming_the_ledger(
    gateway: Gateway, db: redis.Redis[str]
) -> None:
    key = gateway.key("globex", "enterprise")
    # gpt-4 at the default prices: a worst case of ~70 tokens holds ~0.0042 USD.
    CreditLedger(db, "governor").top_up("globex", 0.01, reason="test", actor="pytest")

    codes = []
    charged = 0.0
    prices = PriceTable.from_settings(PricesSettings())
    for _ in range(5):
        answer = gateway.chat(key, model="gpt-4", max_tokens=64, headers={"x-fake-tokens": "60"})
        codes.append(answer.status_code)
        if answer.status_code != 200:
            break
        usage = answer.json()["usage"]
        charged += prices.cost("gpt-4", usage["prompt_tokens"], usage["completion_tokens"])

    assert codes[0] == 200
    assert codes[-1] == 402, codes
    problem = answer.json()
    assert problem["budget"] == "credits/globex"
    assert problem["ledger"] == "credits/globex"
    assert problem["kind"] == "credits"
    assert "credits/globex" in problem["detail"]
    state = CreditLedger(db, "governor").state("globex")
    assert state.reserved_usd == 0  # every hold settled or released
    assert abs(state.balance_usd - (0.01 - charged)) < 2e-6  # charged at the real usage


def test_a_plan_the_controller_shed_is_answered_503(gateway: Gateway, db: redis.Redis[str]) -> None:
    key = gateway.key("acme", "free")
    assert gateway.chat(key).status_code == 200
    shed = Address.parse("plan/free/requests_per_minute")
    RedisSink(db, KeySchema("governor")).apply([Change(shed, 10.0, 0.0)])

    answer = gateway.chat(key)

    assert answer.status_code == 503
    assert answer.headers["content-type"] == PROBLEM
    assert answer.json()["type"].endswith("#temporary-reduced-capacity")
    assert answer.json()["violated-policies"] == ["plan/free/requests_per_minute"]
    assert int(answer.headers["retry-after"]) >= 1


def refusals(gateway: Gateway) -> dict[tuple[str, str], float]:
    found = re.findall(
        r'^gateway_refusals_total\{level="([^"]+)",limit="([^"]+)"\} (\S+)$',
        gateway.metrics(),
        re.M,
    )
    return {(level, limit): float(value) for level, limit, value in found}


def test_a_refusal_is_counted_by_the_level_and_kind_of_the_limit_that_bound(
    gateway: Gateway,
) -> None:
    before = refusals(gateway)
    assert before  # every pair exported at 0 from the start
    assert set(before.values()) == {0.0}
    key = gateway.key("acme", "free")

    answers = [gateway.chat(key, max_tokens=5) for _ in range(12)]

    assert [a.status_code for a in answers[-2:]] == [429, 429]
    level, *_, limit = answers[-1].json()["violated-policies"][0].split("/")
    after = refusals(gateway)
    assert after[(level, limit)] == 2
    assert sum(after.values()) == 2  # nothing else counted, no tenant in the labels


def test_with_a_metrics_token_only_a_scrape_bearing_it_reads_the_series(
    make_gateway: MakeGateway,
) -> None:
    gateway = make_gateway(metrics_token=SecretStr("scrape-me"))
    key = gateway.key("acme", "free")
    assert gateway.chat(key, max_tokens=5).status_code == 200  # serving needs no token
    url = f"{gateway.url}/metrics"

    refused = [
        gateway.http.get(url),
        gateway.http.get(url, headers={"authorization": "Bearer scrape-mE"}),
        gateway.http.get(url, headers={"authorization": f"Bearer {key}"}),  # a tenant's key
        gateway.http.get(url, headers={"authorization": "Basic scrape-me"}),
        # Bytes HTTP does not trim around it (as around a key): not the token.
        gateway.http.get(url, headers={b"authorization": b"Bearer scrape-me\xa0"}),
        gateway.http.get(url, headers={b"authorization": b"Bearer scrape-me\x85"}),
    ]
    scraped = gateway.http.get(url, headers={"authorization": "Bearer  scrape-me"})

    assert [answer.status_code for answer in refused] == [401] * 6
    assert refused[0].headers["www-authenticate"] == 'Bearer realm="metrics"'
    assert "acme" not in "".join(answer.text for answer in refused)
    assert scraped.status_code == 200
    assert 'tenant="acme"' in scraped.text
    assert gateway.http.get(f"{gateway.url}/healthz").status_code == 200  # probes stay open


def test_an_empty_metrics_token_opens_metrics_to_no_scrape(make_gateway: MakeGateway) -> None:
    # GOVERNOR_GATEWAY__METRICS_TOKEN= (a Secret's empty key) is a token all the same: an
    # `Authorization: Bearer` with nothing after it must not match it.
    gateway = make_gateway(metrics_token=SecretStr(""))
    url = f"{gateway.url}/metrics"

    answers = [gateway.http.get(url, headers={"authorization": value}) for value in
               ("Bearer", "bearer")]  # fmt: skip

    assert [answer.status_code for answer in answers] == [401] * 2


def model_labels(gateway: Gateway) -> set[str]:
    """The model label values of gateway_requests_total."""
    return set(re.findall(r'^gateway_requests_total\{[^}]*model="([^"]*)"', gateway.metrics(),
                          re.MULTILINE))  # fmt: skip


def test_made_up_model_names_cannot_push_the_real_models_into_other(
    make_gateway: MakeGateway,
) -> None:
    # Two places for models outside the price table and the plans' lists. Refusals take none;
    # a model the operator named takes none and is always named, in lower case.
    gateway = make_gateway(metrics_max_models=2)
    free, metered = gateway.key("acme", "free"), gateway.key("stark", "metered")
    refused = [gateway.chat(free, model=f"refused-{i}").status_code for i in range(3)]
    served = [gateway.chat(metered, model=f"made-up-{i}", max_tokens=1).status_code
              for i in range(3)]  # fmt: skip
    named = [gateway.chat(metered, model=m, max_tokens=1).status_code for m in ("GPT-4o", "gpt-4")]

    assert refused == [403] * 3
    assert served + named == [200] * 5
    labels = model_labels(gateway)
    assert {"made-up-0", "made-up-1", "gpt-4o", "gpt-4", "_other"} <= labels
    assert not {"made-up-2", "refused-0", "GPT-4o"} & labels


def test_a_model_a_plan_lists_keeps_its_name_past_the_cap() -> None:
    plans = {"open": PlanInfo(()), "vllm": PlanInfo(("Qwen/Qwen2.5-7B-Instruct",))}
    catalog = PlanCatalog.fixed(None, "governor", plans)  # type: ignore[arg-type]
    metrics = GatewayMetrics(10, 1, known_model=catalog.names)
    metrics.request("acme", "open", "first", "allow")  # takes the one place

    metrics.request("acme", "vllm", "QWEN/qwen2.5-7b-instruct", "allow")
    metrics.request("acme", "open", "second", "allow")

    labels = set(re.findall(r'model="([^"]*)"', generate_latest(metrics.registry).decode()))
    assert labels == {"first", "qwen/qwen2.5-7b-instruct", "_other"}


def test_tenants_named_other_and_none_are_never_counted_with_the_capped_or_the_unknown(
    make_gateway: MakeGateway,
) -> None:
    # A tenant called `other` was counted with every tenant past the cap (and `none` with
    # every 401): per-tenant policies reading these series cut it for all of them.
    gateway = make_gateway(metrics_max_tenants=2)
    for tenant in ("other", "none", "t1", "t2"):
        assert gateway.chat(gateway.key(tenant, "metered"), max_tokens=1).status_code == 200
    assert gateway.chat("gov_0123456789abcdef_" + "x" * 43).status_code == 401
    text = gateway.metrics()

    def served(tenant: str, outcome: str = "allow") -> list[str]:
        pattern = rf'^gateway_requests_total\{{[^}}]*outcome="{outcome}"[^}}]*tenant="{tenant}"'
        return re.findall(pattern + r"\} (\S+)$", text, re.MULTILINE)

    assert served("other") == ["1.0"]
    assert served("none") == ["1.0"]
    assert served("_other") == ["2.0"]  # t1 and t2, past the cap of 2
    assert served("_none", "unauthenticated") == ["1.0"]
    assert served("none", "unauthenticated") == []
