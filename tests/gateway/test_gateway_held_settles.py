"""A settle that meets a Redis outage is held and charged once Redis answers: the tenant's
budget ends exactly where it would have without the outage (real Redis, paused with
CLIENT PAUSE while a streamed answer finishes)."""

from __future__ import annotations

import json
import re
import time

import redis

from tests.gateway.conftest import Gateway, budget_remaining
from tests.gateway.fake_upstream import FakeUpstream
from tests.gateway.test_gateway_streaming import MESSAGES, data_lines, stream, worst_case
from tests.support.prometheus import wait_for

PAUSE_MS = 2500  # longer than the gateway's socket timeout (1 s in these tests)


def held_calls(gateway: Gateway) -> float:
    found = re.search(r"^gateway_held_store_calls (\S+)$", gateway.metrics(), re.M)
    assert found
    return float(found.group(1))


def test_a_settle_held_through_an_outage_is_charged_when_redis_answers(
    gateway: Gateway, held: FakeUpstream, db: redis.Redis[str]
) -> None:
    key = gateway.key("acme", "free")
    with stream(gateway, key, hold="1", tokens="6") as answer:
        events = data_lines(answer.iter_lines())
        next(events)  # admitted: the reservation is in Redis, the answer is streaming
        paused_at = time.monotonic()
        db.execute_command("CLIENT", "PAUSE", str(PAUSE_MS), "ALL")
        held.release.set()  # the stream ends while Redis does not answer: the settle fails
        rest = list(events)
    assert rest[-1] == "data: [DONE]"
    first = 7 + len(json.dumps(MESSAGES)) // 10 + 6  # the fake's usage (its chunk is stripped)
    assert held_calls(gateway) == 1
    assert 'gateway_limit_store_errors_total{operation="settle"} 1.0' in gateway.metrics()

    time.sleep(max(0.0, PAUSE_MS / 1000 - (time.monotonic() - paused_at)) + 0.1)
    second = gateway.chat(key, messages=MESSAGES, max_tokens=40)  # Redis answers again
    assert second.status_code == 200
    wait_for(lambda: held_calls(gateway) == 0, "the held settle went through")

    third = gateway.chat(key, messages=MESSAGES, max_tokens=40)
    used = first + second.json()["usage"]["total_tokens"]
    assert budget_remaining(third) == 1000 - used - worst_case(40)
    # Exported at 0 from the start (closed label set); none was given up.
    lost = re.findall(r"^gateway_store_calls_lost_total\{.*\} (\S+)$", gateway.metrics(), re.M)
    assert lost
    assert {float(value) for value in lost} == {0.0}
