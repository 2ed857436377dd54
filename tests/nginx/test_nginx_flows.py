"""deploy/nginx/ in a real nginx against a real Redis and the fake model server: the seed's
flows (10/minute → 429, spent budget → 402), streaming, upstream failures, script loading."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from controller.clients.scripts import ADMIT, SETTLE
from controller.contract.keys import KeySchema
from controller.gateway.keys import KeyStore
from tests.gateway.conftest import write_limits
from tests.gateway.fake_upstream import FakeUpstream, ServerThread
from tests.nginx.conftest import (
    SECRET,
    UNKNOWN_KEY,
    Side,
    chat_body,
    set_limit,
    tenant_state,
    wait_settled,
)
from tests.nginx.nginx_server import NginxServer
from tests.support.redis import RedisServer, free_port

pytestmark = pytest.mark.integration

PROBLEM = "application/problem+json"
BUDGET = "tenant/acme/tokens_per_day"


def test_the_eleventh_request_in_a_minute_is_refused_with_retry_after(nginx: Side) -> None:
    key = nginx.key("acme", "free")

    answers = [nginx.chat(key) for _ in range(11)]

    assert [a.status_code for a in answers] == [200] * 10 + [429]
    refused = answers[-1]
    assert refused.headers["content-type"] == PROBLEM
    # GCRA at 10/minute: the next request fits in 6 s (less what the burst took).
    assert 1 <= int(refused.headers["retry-after"]) <= 6
    problem = refused.json()
    assert problem["status"] == 429
    assert problem["violated-policies"] == ["tenant/acme/requests_per_minute"]
    assert refused.headers["x-ratelimit-remaining-requests"] == "0"
    assert answers[0].headers["x-ratelimit-remaining-requests"] == "9"
    assert answers[0].json()["usage"]["total_tokens"] == 15  # the model server's answer


def test_a_spent_budget_is_refused_with_a_problem_document(nginx: Side) -> None:
    set_limit(nginx, BUDGET, 30)
    key = nginx.key("acme", "free")

    # Each call reserves 10 (5 prompt + max_tokens 5) and is settled at 15 (its usage).
    codes = [nginx.chat(key).status_code for _ in range(2)]
    refused = nginx.chat(key)

    assert codes == [200, 200]
    assert refused.status_code == 402
    assert refused.headers["content-type"] == PROBLEM
    problem = refused.json()
    assert problem["type"].endswith("#budget-exhausted")
    assert problem["budget"] == BUDGET
    assert problem["kind"] == "tokens"
    assert problem["remaining"] == 0
    assert problem["limit"] == 30
    assert problem["resets_at"].endswith("T00:00:00+00:00")
    assert problem["detail"].startswith(f"{BUDGET} has 0 tokens left; it resets at ")
    assert int(refused.headers["retry-after"]) >= 1
    assert tenant_state(nginx, "acme")["u|tokens_per_day"] == "30"


def test_the_plan_limits_models_and_bad_credentials_are_refused(nginx: Side) -> None:
    key = nginx.key("acme", "free")

    forbidden = nginx.chat(key, chat_body(model="gpt-4"))
    unknown = nginx.chat(UNKNOWN_KEY)
    anonymous = nginx.chat(None)

    assert forbidden.status_code == 403
    assert forbidden.json()["allowed_models"] == ["gpt-3.5-turbo"]
    assert unknown.status_code == 401
    assert unknown.json()["detail"] == "unknown or revoked API key"
    assert anonymous.status_code == 401
    assert anonymous.headers["www-authenticate"].startswith('Bearer error="invalid_token"')


def test_nginx_loads_the_very_scripts_python_runs(nginx: Side) -> None:
    nginx.db.script_flush()
    key = nginx.key("acme", "free")

    answer = nginx.chat(key)

    assert answer.status_code == 200
    # NOSCRIPT made nginx load its files; Redis knows them by Python's SHA1s.
    assert nginx.db.execute_command("SCRIPT EXISTS", ADMIT.sha, SETTLE.sha) == [1, 1]


def test_a_streamed_answer_is_settled_from_its_usage_event(
    nginx: Side, upstream: tuple[FakeUpstream, ServerThread]
) -> None:
    key = nginx.key("acme", "free")

    answer = nginx.chat(key, chat_body(stream=True), **{"x-fake-tokens": "3"})

    assert answer.status_code == 200
    assert answer.headers["x-ratelimit-remaining-requests"] == "9"
    assert answer.text.rstrip().endswith("data: [DONE]")
    # The module asked for the usage event the upstream only sends when asked.
    sent = upstream[0].last().body
    assert sent is not None
    assert sent["stream_options"] == {"include_usage": True}
    wait_settled(nginx, "acme", answer.headers["x-governor-request-id"])
    state = tenant_state(nginx, "acme")
    assert state["u|tokens_per_day"] == "13"  # 10 prompt + 3 completion, as reported
    assert state["v|tokens_per_day"] == "0"


def test_an_upstream_error_releases_the_reservation(nginx: Side) -> None:
    key = nginx.key("acme", "free")

    failed = nginx.chat(key, **{"x-fake-status": "500"})

    assert failed.status_code == 500
    state = tenant_state(nginx, "acme")
    assert state["v|tokens_per_day"] == "0"
    assert state.get("u|tokens_per_day", "0") == "0"


@pytest.mark.parametrize("stream", [False, True])
def test_an_unreachable_model_server_is_a_502_problem_and_charges_nothing(
    tmp_path: Path,
    redis_nginx: RedisServer,
    export_dir: Path,
    nginx: Side,
    stream: bool,
) -> None:
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "GOVERNOR_REDIS__URL":
           redis_nginx.url, "GOVERNOR_GATEWAY__API_KEY_SECRET": SECRET}  # fmt: skip
    dead = NginxServer(tmp_path, export_dir, free_port(), env).start()  # nothing listens there
    try:
        key = nginx.key("acme", "free")
        with httpx.Client(timeout=30.0, headers={"accept": PROBLEM}) as http:
            side = Side("dead", dead.url, nginx.db, http)
            answer = side.chat(key, chat_body(stream=stream))
            request_id = answer.headers.get("x-governor-request-id")
        assert dead.problems() == []
    finally:
        dead.stop()

    assert answer.status_code == 502
    assert answer.headers["content-type"] == PROBLEM
    assert answer.json()["type"].endswith("#upstream-failed")
    assert request_id is not None
    wait_settled(nginx, "acme", request_id)
    state = tenant_state(nginx, "acme")
    assert state["v|tokens_per_day"] == "0"
    assert state.get("u|tokens_per_day", "0") == "0"


def test_a_body_that_is_not_an_object_is_a_bad_request(nginx: Side) -> None:
    key = nginx.key("acme", "free")

    answer = nginx.chat(key, b"[1, 2]")

    assert answer.status_code == 400
    assert answer.json()["detail"] == "the request body must be a JSON object"
    assert json.loads(answer.text)["type"].endswith("#bad-request")


@contextmanager
def nginx_on_own_redis(
    directory: Path,
    export_dir: Path,
    upstream: ServerThread,
    policies: Path,
    init_options: str = "",
) -> Iterator[tuple[RedisServer, NginxServer, Side]]:
    """nginx on a Redis of its own holding the plans' limits, for a test that stops that
    Redis; one keep-alive client (one worker, whose key cache is the one that counts)."""
    store = RedisServer(directory / "redis").start()
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "GOVERNOR_REDIS__URL": store.url,
           "GOVERNOR_GATEWAY__API_KEY_SECRET": SECRET}  # fmt: skip
    server = NginxServer(directory / "nginx", export_dir, upstream.port, env,
                         init_options=init_options).start()  # fmt: skip
    try:
        with store.client() as db, httpx.Client(timeout=30.0, headers={"accept": PROBLEM}) as http:
            write_limits(db, "governor", policies)
            yield store, server, Side("nginx", server.url, db, http)
        assert server.problems() == []
    finally:
        server.stop()
        store.stop()


def test_without_redis_every_plan_fails_closed(
    tmp_path: Path,
    export_dir: Path,
    upstream: tuple[FakeUpstream, ServerThread],
    policy_dir: Path,
) -> None:
    with nginx_on_own_redis(tmp_path, export_dir, upstream[1], policy_dir) as (store, _, side):
        # enterprise declares fail_mode: open; this module has no local limiter.
        keys = [side.key("acme", "enterprise") for _ in range(2)]
        seen = side.chat(keys[0])  # verified once: cached by the worker that served it
        store.stop()
        answers = [side.chat(key) for key in keys for _ in range(2)]

    assert seen.status_code == 402  # no credits: Redis answered
    assert {a.status_code for a in answers} == {503}
    details = {a.json()["detail"] for a in answers}
    # A key never verified cannot be checked; a cached one (one keep-alive connection: one
    # worker) reaches admission, which fails closed although the plan says open.
    assert details == {
        "the limit store is unreachable and this API key was not seen before; retry",
        "the limit store is unreachable and plan 'enterprise' fails closed; retry later",
    }
    assert all(a.headers["content-type"] == PROBLEM for a in answers)
    assert all(int(a.headers["retry-after"]) >= 5 for a in answers)


def test_a_key_seen_revoked_is_refused_401_during_an_outage(
    tmp_path: Path,
    export_dir: Path,
    upstream: tuple[FakeUpstream, ServerThread],
    policy_dir: Path,
) -> None:
    # A worker kept a key in its cache after Redis said it was revoked: an outage later
    # brought it back (503 "retry later", and a fail-open plan would have served it).
    with nginx_on_own_redis(tmp_path, export_dir, upstream[1], policy_dir,
                            "key_cache_seconds = 0") as (store, _, side):  # fmt: skip
        key = side.key("acme", "free")
        used = side.chat(key)
        (key_id,) = side.db.hkeys("governor:apikeys")
        assert KeyStore(side.db, KeySchema("governor"), SECRET).revoke(key_id)
        revoked = side.chat(key)
        store.stop()
        during_outage = side.chat(key)

    assert (used.status_code, revoked.status_code) == (200, 401)
    assert during_outage.status_code == 401, during_outage.text
    assert during_outage.json()["detail"] == "unknown or revoked API key"


def test_the_edges_in_flight_limit_holds_every_tenant_until_a_request_ends(
    nginx: Side, upstream: tuple[FakeUpstream, ServerThread]
) -> None:
    # The cascade's inner loop in nginx: one request in flight for the whole gateway; a
    # second tenant is refused while the first one's answer streams, admitted once it ends.
    set_limit(nginx, "global/concurrent_requests", 1)
    first, second = nginx.key("acme", "free"), nginx.key("globex", "free")
    fake = upstream[0]
    fake.release.clear()
    body = chat_body(stream=True)
    headers = {"authorization": f"Bearer {first}", "x-fake-hold": "1", "x-fake-tokens": "3"}
    try:
        with nginx.http.stream("POST", f"{nginx.url}/v1/chat/completions", json=body,
                               headers=headers) as held:  # fmt: skip
            lines = (line for line in held.iter_lines() if line.startswith("data:"))
            next(lines)  # admitted and streaming: its lease is taken
            refused = nginx.chat(second)
            assert refused.status_code == 429
            assert refused.json()["violated-policies"] == ["global/concurrent_requests"]
            fake.release.set()
            list(lines)
        wait_settled(nginx, "acme", held.headers["x-governor-request-id"])
        assert nginx.chat(second).status_code == 200
    finally:
        fake.release.set()
