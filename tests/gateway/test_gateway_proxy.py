"""The reverse proxy: routes, pass-through, refunds on upstream failure, degradation, headers
that must (traceparent) and must not (the client's key) reach the model server, metrics."""

from __future__ import annotations

import re

from tests.gateway.conftest import PROBLEM, Gateway, MakeGateway, budget_remaining
from tests.gateway.fake_upstream import FakeUpstream
from tests.support.redis import free_port


def test_an_upstream_error_is_passed_on_and_its_reservation_released(gateway: Gateway) -> None:
    key = gateway.key("acme", "free")

    failed = gateway.chat(key, max_tokens=300, headers={"x-fake-status": "500"})
    after = gateway.chat(key, max_tokens=300)

    assert failed.status_code == 500
    assert failed.json() == {"error": {"message": "fake failure"}}
    assert budget_remaining(failed) == budget_remaining(after)  # nothing was charged
    assert 'outcome="upstream_error"' in gateway.metrics()


def test_an_unreachable_upstream_is_502_and_refunded(make_gateway: MakeGateway) -> None:
    gateway = make_gateway(f"http://127.0.0.1:{free_port()}")
    key = gateway.key("acme", "free")

    first = gateway.chat(key, max_tokens=300)
    second = gateway.chat(key, max_tokens=300)

    assert first.status_code == 502
    assert first.headers["content-type"] == PROBLEM
    assert "could not be reached" in first.json()["detail"]
    assert budget_remaining(second) == 1000 - (300 + 5)  # only the second one's hold


def test_other_routes_pass_through_authenticated_and_uncounted(
    gateway: Gateway, upstream: tuple[FakeUpstream, str]
) -> None:
    key = gateway.key("acme", "free")

    listed = gateway.http.get(
        f"{gateway.url}/v1/models", headers={"authorization": f"Bearer {key}"}
    )
    anonymous = gateway.http.get(f"{gateway.url}/v1/models")

    assert listed.status_code == 200
    assert listed.json()["data"][0]["id"] == "gpt-3.5-turbo"
    assert "x-ratelimit-limit-requests" not in listed.headers
    assert anonymous.status_code == 401
    assert anonymous.headers["content-type"] == PROBLEM
    assert anonymous.headers["www-authenticate"].startswith('Bearer error="invalid_token"')


def test_the_client_key_stays_here_and_trace_context_goes_on(
    make_gateway: MakeGateway, upstream: tuple[FakeUpstream, str]
) -> None:
    gateway = make_gateway(upstream_api_key="sk-upstream")
    traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    key = gateway.key("acme", "free")

    answer = gateway.chat(
        key, headers={"traceparent": traceparent, "tracestate": "vendor=1", "x-custom": "y"}
    )

    seen = upstream[0].last().headers
    assert answer.status_code == 200
    assert seen["authorization"] == "Bearer sk-upstream"
    assert key not in str(seen)
    assert (seen["traceparent"], seen["tracestate"]) == (traceparent, "vendor=1")
    assert seen["x-custom"] == "y"


def test_near_the_end_of_a_budget_the_plan_degrades_the_request(
    gateway: Gateway, upstream: tuple[FakeUpstream, str]
) -> None:
    key = gateway.key("initech", "paid")  # degrades at 50 % of 1,000 tokens/day
    spend = gateway.chat(key, model="gpt-4", max_tokens=450, headers={"x-fake-tokens": "450"})
    assert spend.status_code == 200
    assert "x-governor-degraded" not in spend.headers

    degraded = gateway.chat(key, model="gpt-4", max_tokens=100)

    assert degraded.status_code == 200
    assert degraded.headers["x-governor-degraded"] == "model=gpt-3.5-turbo;max_tokens=8"
    assert "tokens_per_day" in degraded.headers["x-governor-degraded-reason"]
    sent = upstream[0].last().body
    assert sent is not None
    assert (sent["model"], sent["max_tokens"]) == ("gpt-3.5-turbo", 8)
    assert 'outcome="degraded"' in gateway.metrics()


def test_embeddings_and_completions_are_admitted_and_settled(gateway: Gateway) -> None:
    key = gateway.key("acme", "free")
    auth = {"authorization": f"Bearer {key}"}

    embedded = gateway.http.post(
        f"{gateway.url}/v1/embeddings",
        json={"model": "gpt-3.5-turbo", "input": ["some text"]},
        headers=auth,
    )
    completed = gateway.http.post(
        f"{gateway.url}/v1/completions",
        json={"model": "gpt-3.5-turbo", "prompt": "once upon", "max_tokens": 9},
        headers=auth,
    )

    assert embedded.status_code == 200
    assert embedded.headers["x-ratelimit-remaining-requests"] == "9"
    assert completed.status_code == 200
    assert completed.headers["x-ratelimit-remaining-requests"] == "8"
    spent = embedded.json()["usage"]["total_tokens"]
    hold = 3 + 9  # ⌈len("once upon") / 4⌉ + max_tokens
    assert budget_remaining(completed) == 1000 - spent - hold


def test_bodies_the_gateway_cannot_account_for_are_400_and_413(gateway: Gateway) -> None:
    key = gateway.key("acme", "free")
    auth = {"authorization": f"Bearer {key}", "content-type": "application/json"}
    url = f"{gateway.url}/v1/chat/completions"

    not_json = gateway.http.post(url, content=b"{nope", headers=auth)
    no_model = gateway.http.post(url, json={"messages": [{"role": "user"}]}, headers=auth)
    huge = gateway.http.post(url, content=b"x" * (9 * 1024 * 1024), headers=auth)

    assert (not_json.status_code, no_model.status_code, huge.status_code) == (400, 400, 413)
    assert "not JSON" in not_json.json()["detail"]
    assert "no model" in no_model.json()["detail"]


def test_metrics_count_outcomes_and_cap_tenant_labels(make_gateway: MakeGateway) -> None:
    gateway = make_gateway(metrics_max_tenants=2)
    for tenant in ("t1", "t2", "t3", "t4"):
        assert gateway.chat(gateway.key(tenant, "free")).status_code == 200
    gateway.chat(gateway.key("t1", "free"), model="gpt-4")

    text = gateway.metrics()

    def requests(tenant: str, outcome: str) -> str:
        line = (
            f'gateway_requests_total{{model="gpt-3.5-turbo",outcome="{outcome}",plan="free",'
            f'tenant="{tenant}"}}'
        )
        found = re.search(re.escape(line) + r" (\S+)", text)
        return found.group(1) if found else "absent"

    assert [requests(t, "allow") for t in ("t1", "t2", "_other")] == ["1.0", "1.0", "2.0"]
    assert requests("t3", "allow") == "absent"
    assert 'outcome="model_not_allowed",plan="free",tenant="t1"' in text
    assert re.search(
        r'gateway_cost_usd_total\{model="gpt-3.5-turbo",plan="free",tenant="t1"\}', text
    )
    assert re.search(r'gateway_tokens_total\{kind="completion",.*tenant="_other"\} 10\.0', text)


def test_a_request_without_max_tokens_gets_the_default_written_in(
    make_gateway: MakeGateway, upstream: tuple[FakeUpstream, str]
) -> None:
    gateway = make_gateway(default_max_tokens=50)
    key = gateway.key("acme", "free")

    answer = gateway.http.post(
        f"{gateway.url}/v1/chat/completions",
        json={"model": "gpt-3.5-turbo", "messages": [{"role": "user", "content": "hi"}]},
        headers={"authorization": f"Bearer {key}"},
    )

    assert answer.status_code == 200
    sent = upstream[0].last().body
    assert sent is not None
    assert sent["max_tokens"] == 50
    assert budget_remaining(answer) == 1000 - (4 + 1 + 50)  # the worst case was reserved
