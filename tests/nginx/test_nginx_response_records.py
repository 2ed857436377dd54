"""The record of a Responses answer's tokens through a Redis blip, in nginx as in `governor
gateway`: a write that fails is tried again with the same tries and backoff, so the tenant's
next turn is served; given up, both refuse that turn 404, in the same words, and say so once
naming the tenant and the id (real nginx, real redis-servers paused with CLIENT PAUSE WRITE
while the answer settles)."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path

import httpx
import pytest
import redis

from controller.contract.keys import KeySchema
from controller.settings import RedisSettings
from tests.gateway.conftest import (
    budget_remaining,
    write_limits,
)
from tests.gateway.fake_upstream import FakeUpstream, ServerThread
from tests.nginx.conftest import PREFIX, SECRET, Side
from tests.nginx.gateway_pair import Pair, PairOptions, gateway_pair
from tests.nginx.nginx_server import NginxServer
from tests.nginx.test_parity import shape
from tests.support.prometheus import wait_for
from tests.support.redis import RedisServer

pytestmark = pytest.mark.integration

TIMEOUT = "0.5"  # both gateways' socket timeout here
BODY = {"model": "gpt-3.5-turbo", "input": "hi", "max_output_tokens": 16}


@contextmanager
def impatient_pair(
    root: Path, export_dir: Path, upstream: tuple[FakeUpstream, ServerThread],
    policy_dir: Path, retries: int,
) -> Iterator[Pair]:  # fmt: skip
    """Both gateways giving up on Redis after 0.5 s, trying a failed record `retries` more
    times (the backoff's default), nginx repeating held settles every 0.3 s."""
    options = PairOptions(
        prepare=lambda db: write_limits(db, PREFIX, policy_dir),
        nginx_env={"GOVERNOR_REDIS__SOCKET_TIMEOUT_SECONDS": TIMEOUT,
                   "GOVERNOR_REDIS__RETRIES": str(retries)},
        init_options="held_retry_seconds = 0.3",
        redis_options={"socket_timeout_seconds": float(TIMEOUT), "retries": retries},
        timeout=30.0,
    )  # fmt: skip
    with gateway_pair(root, export_dir, upstream, options) as pair:
        yield pair


def answered_through_a_pause(side: Side, key: str, upstream: FakeUpstream,
                             pause_ms: int) -> httpx.Response:  # fmt: skip
    """A Responses call admitted, Redis paused for writes while the model server generates,
    then its answer, which settles (and is recorded) while the pause lasts."""
    upstream.release.clear()
    before = len(upstream.seen)
    answers: list[httpx.Response] = []
    headers = {"authorization": f"Bearer {key}", "x-fake-tokens": "9", "x-fake-hold": "1"}
    url = f"{side.url}/v1/responses"
    call = threading.Thread(
        target=lambda: answers.append(side.http.post(url, json=BODY, headers=headers))
    )
    call.start()
    wait_for(lambda: len(upstream.seen) > before, f"{side.name}: the call reached the model")
    side.db.execute_command("CLIENT", "PAUSE", str(pause_ms), "WRITE")
    paused_at = time.monotonic()
    upstream.release.set()
    call.join(timeout=30.0)
    assert answers, f"{side.name}: no answer"
    time.sleep(max(0.0, pause_ms / 1000 - (time.monotonic() - paused_at)) + 0.1)  # over
    return answers[0]


def continued(side: Side, key: str, response_id: str) -> httpx.Response:
    body = {**BODY, "input": "and?", "previous_response_id": response_id}
    headers = {"authorization": f"Bearer {key}", "accept": "application/json"}
    return side.http.post(f"{side.url}/v1/responses", json=body, headers=headers)


def recorded(side: Side, tenant: str, response_id: str) -> str | None:
    return side.db.get(KeySchema(PREFIX).response(tenant, response_id))


def settled(db: redis.Redis[str], tenant: str) -> bool:
    return not any(f.startswith("x|") for f in db.hkeys(f"{PREFIX}:{{t:{tenant}}}:enforce"))


def first_turn(side: Side, held: FakeUpstream, pause_ms: int) -> tuple[str, httpx.Response, str]:
    """acme's key, its first turn answered through a pause of Redis' writes, and its id."""
    key = side.key("acme", "free")
    first = answered_through_a_pause(side, key, held, pause_ms)
    assert first.status_code == 200, f"{side.name}: {first.text}"
    return key, first, first.json()["id"]


def test_both_gateways_write_a_record_through_a_pause_by_retrying(
    tmp_path: Path, export_dir: Path, upstream: tuple[FakeUpstream, ServerThread],
    policy_dir: Path, held: FakeUpstream,
) -> None:  # fmt: skip
    """1.2 s without writes: the tries at 0 and 0.6 s time out (their connections closed, so
    the SETs never run later), the one at 1.3 s lands; the next turn is served, the same."""
    with impatient_pair(tmp_path, export_dir, upstream, policy_dir, retries=3) as pair:
        answers = {}
        for side in pair.sides:
            key, first, mine = first_turn(side, held, 1200)
            total = first.json()["usage"]["total_tokens"]
            assert recorded(side, "acme", mine) == str(total), side.name
            wait_for(partial(settled, side.db, "acme"), f"{side.name}: settled")
            answers[side.name] = continued(side, key, mine)
            assert answers[side.name].status_code == 200, answers[side.name].text
        # The same answer, the conversation reserved as recorded (the sides ran 2 s apart:
        # the windows' resets differ).
        assert shape(answers["nginx"])[0] == shape(answers["python"])[0]
        assert budget_remaining(answers["nginx"]) == budget_remaining(answers["python"])
        assert "cannot record" not in pair.server.log_tail(20000)


def test_both_gateways_refuse_the_next_turn_of_a_record_they_gave_up(
    tmp_path: Path, export_dir: Path, upstream: tuple[FakeUpstream, ServerThread],
    policy_dir: Path, held: FakeUpstream,
) -> None:  # fmt: skip
    """2 s without writes and one retry: both tries time out, the record is lost; the answer
    is served and charged (the settle held until Redis writes again). The next turn gets what
    an id without a record of the tenant's gets: 404 before the model server, in the same
    words; each gateway said it once, naming the tenant and the id."""
    with impatient_pair(tmp_path, export_dir, upstream, policy_dir, retries=1) as pair:
        answers = {}
        for side in pair.sides:
            key, _, mine = first_turn(side, held, 2000)
            assert recorded(side, "acme", mine) is None, side.name
            before = len(upstream[0].seen)
            answers[side.name] = continued(side, key, mine)
            assert answers[side.name].status_code == 404, answers[side.name].text
            assert len(upstream[0].seen) == before  # never forwarded
            wait_for(partial(settled, side.db, "acme"), f"{side.name}: settled")
        assert shape(answers["nginx"])[0] == shape(answers["python"])[0]
        said = [line for line in pair.server.log_tail(20000).splitlines()
                if "cannot record a response's tokens" in line]  # fmt: skip
        assert len(said) == 1, said
        assert "Redis failed all 2 tries" in said[0]
        assert f"tenant acme, response {mine}" in said[0]
        metrics = pair.gateway.metrics()
        assert 'gateway_response_records_lost_total{kind="response"} 1.0' in metrics
        assert 'gateway_limit_store_errors_total{operation="record"} 2.0' in metrics
        # nginx counts the same loss, for the same alert (GovernorResponseRecordsLost).
        lua = httpx.get(f"{pair.server.url}/metrics", timeout=10.0).text
        assert 'gateway_response_records_lost_total{kind="response"} 1' in lua
        assert 'gateway_response_records_lost_total{kind="conversation"} 0' in lua


def test_a_records_tries_are_pythons_by_default(nginx: Side, export_dir: Path) -> None:
    """The module reads the same variables as `governor gateway`, with the same defaults."""
    lua = nginx.http.get(f"{nginx.url}/_probe/config", params={"export_dir": str(export_dir)})

    python = RedisSettings()
    assert lua.json() == {
        "retries": python.retries,
        "retry_backoff_seconds": python.retry_backoff_seconds,
        "timeout_ms": round(python.socket_timeout_seconds * 1000),
    }


@pytest.mark.parametrize(
    ("name", "value"),
    [("GOVERNOR_REDIS__RETRIES", "-1"), ("GOVERNOR_REDIS__RETRIES", "two"),
     ("GOVERNOR_REDIS__RETRY_BACKOFF_SECONDS", "0")],
)  # fmt: skip
def test_a_retry_setting_python_refuses_stops_nginx(
    tmp_path: Path, export_dir: Path, upstream: tuple[FakeUpstream, ServerThread],
    redis_nginx: RedisServer, name: str, value: str,
) -> None:  # fmt: skip
    env = {"PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"),
           "GOVERNOR_REDIS__URL": redis_nginx.url, "GOVERNOR_GATEWAY__API_KEY_SECRET": SECRET,
           name: value}  # fmt: skip
    server = NginxServer(tmp_path / "nginx", export_dir, upstream[1].port, env)
    with pytest.raises(RuntimeError, match=f"{name} must be"):
        server.start()
    server.stop()
