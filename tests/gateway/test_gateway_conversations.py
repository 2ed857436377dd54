"""The Conversations API and a stored response's routes through `governor gateway` while Redis
is away (killed under it): whose conversation or response it is cannot be checked, so every
call naming one is refused 503 whatever the plan's fail mode, and nothing reaches the model
server. (Their behaviour through both gateways is tests/nginx/test_conversations.py and
test_responses_routes.py; the `openai` SDK's, tests/clients.)"""

from __future__ import annotations

from pathlib import Path

import httpx

from controller.contract.keys import KeySchema
from tests.gateway.conftest import gateway_on_own_redis
from tests.gateway.fake_upstream import FakeUpstream


def test_a_conversation_or_response_call_fails_closed_while_redis_is_away(
    tmp_path: Path, upstream: tuple[FakeUpstream, str], policy_dir: Path
) -> None:
    with gateway_on_own_redis(tmp_path / "redis", upstream[1], policy_dir) as (server, gateway):
        with server.client() as client:
            keys = {plan: gateway.key("acme", plan) for plan in ("free", "enterprise")}
            auth = {plan: {"authorization": f"Bearer {key}"} for plan, key in keys.items()}
            made = gateway.http.post(f"{gateway.url}/v1/conversations",
                                     json={"metadata": {"outage": "yes"}},
                                     headers=auth["free"])  # fmt: skip
            assert made.status_code == 200, made.text
            conversation = made.json()["id"]
            assert client.get(KeySchema("governor").conversation("acme", conversation)) == "0"
            answered = gateway.http.post(f"{gateway.url}/v1/responses", headers=auth["free"],
                                         json={"model": "gpt-3.5-turbo", "input": "outage",
                                               "max_output_tokens": 5})  # fmt: skip
            assert answered.status_code == 200, answered.text
            response = answered.json()["id"]
            assert client.get(KeySchema("governor").response("acme", response)) is not None
            for plan in keys:  # both keys verified, and cached, while Redis is up
                read = gateway.http.get(f"{gateway.url}/v1/conversations/{conversation}",
                                        headers=auth[plan])  # fmt: skip
                assert read.status_code == 200, read.text
        before = len(upstream[0].seen)

        server.stop()
        calls = [("GET", f"/v1/conversations/{conversation}"),
                 ("DELETE", f"/v1/conversations/{conversation}"),
                 ("GET", f"/v1/responses/{response}"), ("DELETE", f"/v1/responses/{response}"),
                 ("GET", f"/v1/responses/{response}/input_items"),
                 ("POST", f"/v1/responses/{response}/cancel")]  # fmt: skip
        answers: list[httpx.Response] = [
            gateway.http.request(method, gateway.url + path, headers=auth[plan])
            for plan in keys
            for method, path in calls
        ]
        metrics = gateway.metrics()

    for answer in answers:  # an open fail mode cannot vouch for whose conversation it is
        assert answer.status_code == 503, answer.text
        assert answer.json()["type"].endswith("#enforcement-unavailable")
    assert len(upstream[0].seen) == before
    assert 'gateway_limit_store_errors_total{operation="lookup"} 12.0' in metrics
