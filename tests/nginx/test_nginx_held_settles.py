"""nginx holds a settle that meets a Redis outage and repeats it when Redis answers: the
budget afterwards is what it would have been without the outage (real nginx, real Redis
paused with CLIENT PAUSE while a streamed answer ends)."""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis

from controller.contract.keys import KeySchema
from controller.gateway.keys import KeyStore
from tests.gateway.conftest import write_limits
from tests.gateway.fake_upstream import FakeUpstream, ServerThread
from tests.nginx.conftest import PREFIX, SECRET
from tests.nginx.nginx_server import NginxServer
from tests.support.prometheus import wait_for
from tests.support.redis import RedisServer

PAUSE_MS = 2000  # longer than the socket timeout these nginx get (0.5 s)
BUDGET_FIELD = "u|tokens_per_day"


@pytest.fixture
def redis_own(tmp_path: Path, policy_dir: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path / "redis").start()
    with server.client() as db:
        write_limits(db, PREFIX, policy_dir)
    yield server
    server.stop()


def impatient_nginx(
    tmp_path: Path, export_dir: Path, upstream_port: int, redis_url: str, workers: int | None = None
) -> NginxServer:
    """nginx on `redis_url` giving up on Redis after 0.5 s and retrying held calls every 0.3 s
    (`workers`: one queue of held calls for every request, when 1)."""
    env = {
        "PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"),
        "GOVERNOR_REDIS__URL": redis_url,
        "GOVERNOR_REDIS__SOCKET_TIMEOUT_SECONDS": "0.5",
        "GOVERNOR_GATEWAY__API_KEY_SECRET": SECRET,
    }
    options = "held_retry_seconds = 0.3"
    return NginxServer(tmp_path / "nginx", export_dir, upstream_port, env,
                       init_options=options, workers=workers).start()  # fmt: skip


def test_a_settle_that_meets_an_outage_is_repeated_when_redis_answers(
    tmp_path: Path,
    export_dir: Path,
    upstream: tuple[FakeUpstream, ServerThread],
    held: FakeUpstream,
    redis_own: RedisServer,
) -> None:
    nginx = impatient_nginx(tmp_path, export_dir, upstream[1].port, redis_own.url)
    db: redis.Redis[str]
    with redis_own.client() as db, httpx.Client(timeout=30.0) as http:
        try:
            key = KeyStore(db, KeySchema(PREFIX), SECRET).create("acme", "free")[0]
            body = {"model": "gpt-3.5-turbo", "messages": [{"role": "user", "content": "hi"}],
                    "max_tokens": 40, "stream": True,
                    "stream_options": {"include_usage": True}}  # fmt: skip
            headers = {"authorization": f"Bearer {key}", "x-fake-hold": "1", "x-fake-tokens": "6"}
            with http.stream("POST", f"{nginx.url}/v1/chat/completions", json=body,
                             headers=headers) as answer:  # fmt: skip
                lines = (line for line in answer.iter_lines() if line.startswith("data:"))
                next(lines)  # admitted: the reservation is in Redis, the answer streams
                db.execute_command("CLIENT", "PAUSE", str(PAUSE_MS), "ALL")
                paused_at = time.monotonic()
                held.release.set()  # the stream ends while Redis does not answer
                rest = list(lines)
            used = json.loads(rest[-2][5:])["usage"]["total_tokens"]
            state = f"{PREFIX}:{{t:acme}}:enforce"
            time.sleep(max(0.0, PAUSE_MS / 1000 - (time.monotonic() - paused_at)) + 0.1)
            wait_for(
                lambda: (
                    db.hget(state, BUDGET_FIELD) == str(used)
                    and not any(f.startswith("x|") for f in db.hkeys(state))
                ),
                "the held settle charged the usage and closed the reservation",
            )
            assert "held, repeated when it answers" in nginx.log_tail(20000)
            assert nginx.problems() == []
        finally:
            nginx.stop()


def test_an_admission_redis_ran_after_the_timeout_is_released_when_redis_answers(
    tmp_path: Path,
    export_dir: Path,
    upstream: tuple[FakeUpstream, ServerThread],
    policy_dir: Path,
) -> None:
    """A Redis stalled past the socket timeout (DEBUG SLEEP) runs the admit it had read once
    it wakes: the slot and tokens it took come back when Redis answers, not with the lease."""
    server = RedisServer(tmp_path / "redis", debug_command=True).start()
    nginx = impatient_nginx(tmp_path, export_dir, upstream[1].port, server.url)
    db: redis.Redis[str]
    with server.client() as db, httpx.Client(timeout=30.0) as http:
        try:
            write_limits(db, PREFIX, policy_dir)
            key = KeyStore(db, KeySchema(PREFIX), SECRET).create("acme", "paid")[0]
            body = {"model": "gpt-3.5-turbo", "messages": [{"role": "user", "content": "hi"}],
                    "max_tokens": 5}  # fmt: skip
            headers = {"authorization": f"Bearer {key}"}
            url = f"{nginx.url}/v1/chat/completions"
            assert http.post(url, json=body, headers=headers).status_code == 200

            def sleep() -> None:
                with server.client() as client:
                    client.execute_command("DEBUG", "SLEEP", "2")

            sleeper = threading.Thread(target=sleep)
            sleeper.start()
            time.sleep(0.3)
            assert http.post(url, json=body, headers=headers).status_code == 503
            sleeper.join()
            state = f"{PREFIX}:{{t:acme}}:enforce"
            wait_for(
                lambda: not any(f.startswith("x|") for f in db.hkeys(state)),
                "the held release closed the reservation",
            )
            assert db.hget(state, "v|tokens_per_day") == "0"
            assert db.zcard(f"{state}:leases") == 0
            assert "admission unanswered; its release is held" in nginx.log_tail(20000)
        finally:
            nginx.stop()
            server.stop()


def test_a_held_call_redis_refuses_alone_does_not_hold_back_the_others(
    tmp_path: Path,
    export_dir: Path,
    upstream: tuple[FakeUpstream, ServerThread],
    held: FakeUpstream,
    policy_dir: Path,
) -> None:
    """acme's settle meets a key replaced by hand (WRONGTYPE: Redis refuses that call alone)
    and is held; globex's settle then meets an outage and is held behind it. Each pass
    stopped at acme's, so globex's usage waited for acme's call to expire (the record grace,
    an hour) while its reservation held its tokens; the Python gateway moves such a call to
    the back (controller/gateway/pending.py), and so does nginx now."""
    server = RedisServer(tmp_path / "redis").start()
    nginx = impatient_nginx(tmp_path, export_dir, upstream[1].port, server.url, workers=1)
    db: redis.Redis[str]
    with server.client() as db, httpx.Client(timeout=30.0) as http:
        try:
            write_limits(db, PREFIX, policy_dir)
            keys = KeyStore(db, KeySchema(PREFIX), SECRET)
            acme, globex = keys.create("acme", "free")[0], keys.create("globex", "paid")[0]
            url = f"{nginx.url}/v1/chat/completions"
            body = {"model": "gpt-3.5-turbo", "messages": [{"role": "user", "content": "hi"}],
                    "max_tokens": 5}  # fmt: skip
            broken = f"{PREFIX}:{{t:acme}}:enforce"
            headers = {"authorization": f"Bearer {acme}", "x-fake-hold": "1"}
            with http.stream("POST", url, json={**body, "stream": True},
                             headers=headers) as answer:  # fmt: skip
                lines = (line for line in answer.iter_lines() if line.startswith("data:"))
                next(lines)  # admitted: its reservation is in acme's state
                db.delete(broken)
                db.set(broken, "hand-made")  # its settle is refused: WRONGTYPE
                held.release.set()
                list(lines)
            wait_for(lambda: "WRONGTYPE" in nginx.log_tail(20000), "acme's settle is refused")

            # globex's answer ends while Redis is paused: its settle is held behind acme's.
            globex_headers = {"authorization": f"Bearer {globex}", "x-fake-delay": "0.6"}
            answered: list[int] = []
            asking = threading.Thread(
                target=lambda: answered.append(
                    http.post(url, json=body, headers=globex_headers).status_code
                )
            )
            asking.start()
            time.sleep(0.3)  # admitted by now, the model server still answering
            db.execute_command("CLIENT", "PAUSE", str(PAUSE_MS), "ALL")
            asking.join()
            assert answered == [200]
            state = f"{PREFIX}:{{t:globex}}:enforce"
            wait_for(
                lambda: not any(f.startswith("x|") for f in db.hkeys(state)),
                "globex's held settle went through past acme's refused one",
                timeout=PAUSE_MS / 1000 + 3,
            )
            assert db.zcard(f"{state}:leases") == 0
            assert "a held store call was refused" in nginx.log_tail(20000)
        finally:
            nginx.stop()
            server.stop()
