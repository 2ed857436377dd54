"""The record of a Responses answer's tokens, written when it settles, outlives a Redis blip:
a write that fails is tried again, so the tenant's next turn continuing it is served (real
redis-server paused with CLIENT PAUSE WRITE, or stopped and started again on its port, while
the answer settles). Given up, it is counted, logged once, and a continuation gets what any id
without a record of the tenant's gets: 404 (`tenant` scope), the default (`shared`)."""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
import redis
from structlog.testing import capture_logs

from controller.contract.keys import KeySchema
from tests.gateway.conftest import Gateway, budget_remaining, start_gateway, write_limits
from tests.gateway.fake_upstream import FakeUpstream
from tests.gateway.test_gateway_previous_response import DAY, respond
from tests.support.prometheus import wait_for
from tests.support.redis import RedisServer

PAUSE_MS = 1500  # past the gateway's socket timeout (1 s in these tests): the first try fails


@pytest.fixture
def restartable(tmp_path: Path, policy_dir: Path) -> Iterator[RedisServer]:
    """A Redis of the test's own that keeps its data when stopped and started again (AOF)."""
    server = RedisServer(tmp_path / "redis", persistent=True).start()
    with server.client() as client:
        write_limits(client, "governor", policy_dir)
    yield server
    server.stop()


def answered_while(gateway: Gateway, key: str, upstream: FakeUpstream,
                   blip: Callable[[], None]) -> httpx.Response:  # fmt: skip
    """A Responses call admitted, then `blip` (Redis goes away) while the model server
    generates, then its answer, which settles (and is recorded) meanwhile."""
    before = len(upstream.seen)
    answers: list[httpx.Response] = []
    payload = {"model": "gpt-3.5-turbo", "input": "hi", "max_output_tokens": 16}
    headers = {"authorization": f"Bearer {key}", "x-fake-tokens": "9", "x-fake-hold": "1"}
    url = f"{gateway.url}/v1/responses"
    call = threading.Thread(
        target=lambda: answers.append(gateway.http.post(url, json=payload, headers=headers))
    )
    call.start()
    wait_for(lambda: len(upstream.seen) > before, "the call reached the model server")
    blip()
    upstream.release.set()
    call.join(timeout=30.0)
    assert answers, "no answer"
    return answers[0]


def recorded(client: redis.Redis[str], tenant: str, response_id: str) -> str | None:
    return client.get(KeySchema("governor").response(tenant, response_id))


def counter(gateway: Gateway, name: str, label: str, value: str) -> float:
    found = re.search(rf'^{name}\{{{label}="{value}"\}} (\S+)$', gateway.metrics(), re.M)
    assert found, name
    return float(found.group(1))


def records_lost(gateway: Gateway) -> float:
    return counter(gateway, "gateway_response_records_lost_total", "kind", "response")


def record_errors(gateway: Gateway) -> float:
    return counter(gateway, "gateway_limit_store_errors_total", "operation", "record")


def test_a_record_that_meets_a_paused_redis_is_written_by_a_retry(
    gateway: Gateway, held: FakeUpstream, db: redis.Redis[str]
) -> None:
    """CLIENT PAUSE WRITE past the socket timeout: the first SET times out (and, its
    connection dropped, never runs), a later try lands once the pause ends."""
    key = gateway.key("acme", "free")

    def pause() -> None:
        db.execute_command("CLIENT", "PAUSE", str(PAUSE_MS), "WRITE")

    first = answered_while(gateway, key, held, pause)

    assert first.status_code == 200, first.text
    total = first.json()["usage"]["total_tokens"]
    assert recorded(db, "acme", first.json()["id"]) == str(total)
    assert record_errors(gateway) >= 1  # the try that timed out
    assert records_lost(gateway) == 0
    second = respond(gateway, key, previous_response_id=first.json()["id"])
    assert second.status_code == 200, second.text
    assert budget_remaining(second) == DAY - total - (total + 1 + 16)  # as recorded


def test_a_record_that_meets_a_restarting_redis_is_written_by_a_retry(
    restartable: RedisServer, upstream: tuple[FakeUpstream, str], held: FakeUpstream
) -> None:
    """Redis stopped as the answer settles and started again on its port 0.3 s later: the
    tries it refused are followed by one that lands (backoff 0.5, 1, 2, 2, 2 s here)."""
    patient = {"retries": 5, "retry_backoff_seconds": 0.25}
    gateway = start_gateway(restartable.url, upstream[1], redis_options=patient)
    try:
        key = gateway.key("acme", "free")

        def restart_soon() -> None:
            time.sleep(0.3)  # the answer settles meanwhile: its first tries are refused
            restartable.start()

        restarter = threading.Thread(target=restart_soon, daemon=True)

        def stop() -> None:
            restartable.stop()
            restarter.start()

        first = answered_while(gateway, key, held, stop)
        restarter.join()

        assert first.status_code == 200, first.text
        assert record_errors(gateway) >= 1  # refused while Redis was down
        with restartable.client() as client:
            total = first.json()["usage"]["total_tokens"]
            assert recorded(client, "acme", first.json()["id"]) == str(total)
        assert records_lost(gateway) == 0
        second = respond(gateway, key, previous_response_id=first.json()["id"])
        assert second.status_code == 200, second.text
        assert budget_remaining(second) == DAY - total - (total + 1 + 16)
    finally:
        gateway.stop()


@pytest.mark.parametrize("scope", ["tenant", "shared"])
def test_a_record_given_up_is_counted_and_its_continuation_gets_what_an_unknown_id_gets(
    restartable: RedisServer, upstream: tuple[FakeUpstream, str], held: FakeUpstream,
    scope: str,
) -> None:  # fmt: skip
    """Redis down through every try (0.1 + 0.2 + 0.4 s of backoff): the answer is served,
    its settle held and charged once Redis is back; the record is lost, counted, logged once
    naming the tenant and the id (never the key). A continuation is refused 404 before the
    model server (`tenant`: no gateway can tell it from another tenant's id), or reserves
    the default (`shared`)."""
    gateway = start_gateway(restartable.url, upstream[1], heartbeat_seconds=0.1,
                            previous_response_scope=scope,
                            unknown_previous_response_tokens=300)  # fmt: skip
    try:
        key = gateway.key("acme", "free")
        with capture_logs() as logs:
            first = answered_while(gateway, key, held, restartable.stop)
        assert first.status_code == 200, first.text
        mine = first.json()["id"]
        assert records_lost(gateway) == 1
        assert record_errors(gateway) == 4  # the first try and 3 retries
        assert counter(gateway, "gateway_response_records_lost_total", "kind",
                       "conversation") == 0  # fmt: skip
        said = [line for line in logs if "cannot record a response's tokens" in line["event"]]
        assert len(said) == 1, logs
        assert (said[0]["tenant"], said[0]["response_id"]) == ("acme", mine)
        assert key not in repr(logs)
        restartable.start()
        with restartable.client() as client:
            wait_for(lambda: not any(f.startswith("x|") for f in
                                     client.hkeys("governor:{t:acme}:enforce")),
                     "the held settle went through")  # fmt: skip
            assert recorded(client, "acme", mine) is None
        spent = first.json()["usage"]["total_tokens"]
        before = len(upstream[0].seen)

        second = respond(gateway, key, previous_response_id=mine)

        if scope == "tenant":
            assert second.status_code == 404, second.text
            assert second.json()["detail"] == f"no response '{mine}' for this API key"
            assert len(upstream[0].seen) == before
        else:
            assert second.status_code == 200, second.text
            assert budget_remaining(second) == DAY - spent - (300 + 1 + 16)
    finally:
        gateway.stop()
