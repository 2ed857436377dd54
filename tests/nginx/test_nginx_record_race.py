"""The next turn of a Responses answer, sent the instant its stream is over, in nginx as in
`governor gateway`: the answer's record (which admits the turn in `tenant` scope) may still be
on its way to Redis, and a strict lookup that misses waits for it, briefly and boundedly,
before it refuses 404. Real nginx, real redis-servers, the official `openai` SDK and raw
httpx; the ordering is made by Redis pausing writes (what a failover does) or by a model
server that ends its body a moment after its last event, never by a delay put into a
gateway."""

from __future__ import annotations

import os
import re
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from controller.contract.keys import KeySchema
from tests.gateway.conftest import PROBLEM, start_gateway, write_limits
from tests.gateway.fake_upstream import FakeUpstream, ServerThread
from tests.nginx.conftest import PREFIX, SECRET, Side
from tests.nginx.nginx_server import NginxServer
from tests.nginx.test_parity import shape
from tests.support.prometheus import wait_for
from tests.support.redis import RedisServer

pytestmark = pytest.mark.integration

MODEL = "gpt-3.5-turbo"
WAIT = 0.5  # GatewaySettings().previous_response_wait_seconds: the default both gateways wait
PAUSE_MS = 300  # Redis refusing writes this long, as it does while a failover runs


@pytest.fixture
def held(upstream: tuple[FakeUpstream, ServerThread]) -> Iterator[FakeUpstream]:
    upstream[0].release.clear()
    yield upstream[0]
    upstream[0].release.set()


@dataclass
class Turns:
    """What an agent loop saw: when its stream ended, the next turn's answer or refusal."""

    first_id: str = ""
    ended: float = 0.0
    answered: Any = None
    refused: openai.APIStatusError | None = None
    took: float = 0.0
    errors: list[BaseException] = field(default_factory=list)


def agent_loop(side: Side, key: str, turns: Turns) -> None:
    """The official SDK's agent loop: stream a turn to its end, then at once the next turn
    naming it as `previous_response_id`."""
    sdk = openai.OpenAI(base_url=f"{side.url}/v1", api_key=key, max_retries=0)
    try:
        stream = sdk.responses.create(
            model=MODEL, input="hi", max_output_tokens=16, stream=True,
            extra_headers={"x-fake-hold": "1", "x-fake-tokens": "9"},
        )  # fmt: skip
        with stream:
            for event in stream:
                if event.type == "response.completed":
                    turns.first_id = event.response.id
        turns.ended = time.monotonic()
        try:
            turns.answered = sdk.responses.create(
                model=MODEL, input="and?", max_output_tokens=16,
                previous_response_id=turns.first_id,
            )  # fmt: skip
        except openai.APIStatusError as exc:
            turns.refused = exc
        turns.took = time.monotonic() - turns.ended
    except BaseException as exc:  # surfaced by the test
        turns.errors.append(exc)
    finally:
        sdk.close()  # its keep-alive connection, else a ResourceWarning in a later test


def streamed_through_a_write_pause(side: Side, upstream: FakeUpstream) -> tuple[Turns, float]:
    """An agent loop whose first turn is admitted, then Redis refuses writes for PAUSE_MS
    while the model server answers: the answer's record waits for the pause to end. Returns
    the turns and when the pause began."""
    key = side.key("acme", "paid")
    upstream.release.clear()
    before = len(upstream.seen)
    turns = Turns()
    loop = threading.Thread(target=agent_loop, args=(side, key, turns))
    loop.start()
    wait_for(lambda: len(upstream.seen) > before, f"{side.name}: the first turn reached the model")
    side.db.execute_command("CLIENT", "PAUSE", str(PAUSE_MS), "WRITE")
    paused = time.monotonic()
    upstream.release.set()
    loop.join(timeout=30.0)
    assert not turns.errors, f"{side.name}: {turns.errors!r}"
    return turns, paused


def test_the_sdks_next_turn_is_served_while_its_record_waits_for_redis(
    nginx: Side, python_gateway: Side, held: FakeUpstream
) -> None:
    """Redis pauses writes as the answer ends. `governor gateway` writes the record before
    the last byte, so its stream ends after the pause; nginx writes it from a timer after the
    last byte, so its stream ends during the pause and the SDK's next turn reaches the gateway
    before the record does. Both serve it: the lookup waits for the record."""
    for side in (python_gateway, nginx):
        turns, paused = streamed_through_a_write_pause(side, held)
        if side is nginx:  # the race this test is about: the stream is over, no record yet
            assert turns.ended - paused < PAUSE_MS / 1000, "nginx's stream outlasted the pause"
        refused = turns.refused
        assert refused is None, f"{side.name}: {refused.status_code} {refused.response.text}"
        assert held.last().body["previous_response_id"] == turns.first_id  # type: ignore[index]
        recorded = side.db.get(KeySchema(PREFIX).response("acme", turns.first_id))
        assert recorded is not None, side.name
        assert turns.took < PAUSE_MS / 1000 + WAIT, side.name


def continued_at_the_final_event(
    side: Side, key: str, linger: float
) -> tuple[httpx.Response, float, str]:
    """A stream read event by event with raw httpx; the next turn is sent the instant
    `response.completed` arrives (the model server ends the body `linger` s later). Returns
    the next turn's answer, how long it took, and the first answer's id."""
    headers = {"authorization": f"Bearer {key}", "x-fake-tokens": "9",
               "x-fake-linger": str(linger)}  # fmt: skip
    body = {"model": MODEL, "input": "hi", "max_output_tokens": 16, "stream": True}
    with (
        httpx.Client(timeout=30.0) as streaming,
        httpx.Client(timeout=30.0, headers={"accept": PROBLEM}) as http,
        streaming.stream("POST", f"{side.url}/v1/responses", json=body, headers=headers) as sse,
    ):
        assert sse.status_code == 200, sse.read()
        lines = sse.iter_lines()
        for line in lines:
            found = re.match(r'data: \{"type": "response\.completed".*?"id": "(resp_\w+)"', line)
            if found is not None:
                break
        assert found is not None, f"{side.name}: no response.completed"
        started = time.monotonic()
        then = {"model": MODEL, "input": "and?", "max_output_tokens": 16,
                "previous_response_id": found.group(1)}  # fmt: skip
        answer = http.post(f"{side.url}/v1/responses", json=then,
                           headers={"authorization": f"Bearer {key}"})  # fmt: skip
        took = time.monotonic() - started
        for _rest in lines:  # the rest of the stream: it settles
            pass
    return answer, took, found.group(1)


def test_a_turn_sent_at_response_completed_is_served_by_both(
    nginx: Side, python_gateway: Side
) -> None:
    """A model server ends its body 0.2 s after `response.completed`: neither gateway has
    seen the stream end (nor written the record) when a client acting on that event sends
    the next turn. Both wait for the record and serve it, as one answer."""
    answers = {}
    for side in (python_gateway, nginx):
        key = side.key("acme", "paid")
        answer, took, first = continued_at_the_final_event(side, key, linger=0.2)
        assert answer.status_code == 200, f"{side.name}: {answer.text}"
        assert 0.15 < took < 0.2 + WAIT, f"{side.name}: {took:.3f} s"  # it waited, boundedly
        assert side.db.get(KeySchema(PREFIX).response("acme", first)) is not None
        answers[side.name] = answer
    assert shape(answers["nginx"])[0] == shape(answers["python"])[0]
    metrics = python_gateway.http.get(f"{python_gateway.url}/metrics").text
    assert 'gateway_record_waits_total{outcome="found"} 1.0' in metrics


def bogus_turn(side: Side, key: str, named: str) -> tuple[httpx.Response, float]:
    body = {"model": MODEL, "input": "and?", "max_output_tokens": 16,
            "previous_response_id": named}  # fmt: skip
    started = time.monotonic()
    answer = side.http.post(f"{side.url}/v1/responses", json=body,
                            headers={"authorization": f"Bearer {key}"})  # fmt: skip
    return answer, time.monotonic() - started


def test_an_id_without_a_record_is_still_refused_after_the_bounded_wait(
    nginx: Side, python_gateway: Side, upstream: tuple[FakeUpstream, ServerThread]
) -> None:
    """Another tenant's id and an id no one made: 404 in the same words from both, never
    forwarded, after the wait and not much longer."""
    answers: dict[str, list[httpx.Response]] = {}
    for side in (python_gateway, nginx):
        theirs, took = bogus_turn(side, side.key("globex", "paid"), "resp_" + "0" * 32)
        assert theirs.status_code == 404, theirs.text
        # globex's own answer, named by acme
        globex = {"authorization": f"Bearer {side.key('globex', 'paid')}"}
        hello = {"model": MODEL, "input": "hi", "max_output_tokens": 16}
        first = side.http.post(f"{side.url}/v1/responses", headers=globex, json=hello)
        assert first.status_code == 200, first.text
        before = len(upstream[0].seen)
        answers[side.name] = []
        for named in (first.json()["id"], "resp_" + "f" * 32):
            answer, took = bogus_turn(side, side.key("acme", "paid"), named)
            assert answer.status_code == 404, f"{side.name}: {answer.text}"
            assert WAIT - 0.05 < took < WAIT + 0.4, f"{side.name}: {took:.3f} s"
            answers[side.name].append(answer)
        assert len(upstream[0].seen) == before, f"{side.name}: forwarded"
    for ours, theirs in zip(answers["nginx"], answers["python"], strict=True):
        assert shape(ours)[0] == shape(theirs)[0]


@contextmanager
def few_waiters(root: Path, export_dir: Path, upstream: tuple[FakeUpstream, ServerThread],
                policy_dir: Path) -> Iterator[tuple[Side, Side, int]]:  # fmt: skip
    """Both gateways letting 4 lookups wait at once per process (one per tenant); nginx's
    worker count with them."""
    stores = [RedisServer(root / name).start() for name in ("redis-nginx", "redis-python")]
    server: NginxServer | None = None
    try:
        for store in stores:
            with store.client() as db:
                write_limits(db, PREFIX, policy_dir)
        env = {"PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"),
               "GOVERNOR_REDIS__URL": stores[0].url,
               "GOVERNOR_GATEWAY__API_KEY_SECRET": SECRET}  # fmt: skip
        server = NginxServer(root / "nginx", export_dir, upstream[1].port, env,
                             init_options="previous_response_waiters = 4").start()  # fmt: skip
        python = start_gateway(stores[1].url, upstream[1].url, retry_after_jitter=0.0,
                               previous_response_waiters=4)  # fmt: skip
        wait_for(lambda: "workers)" in server.log_tail(), "nginx said its worker count")
        found = re.search(r"\((\d+) workers\)", server.log_tail())
        assert found is not None
        with (
            stores[0].client() as ndb,
            stores[1].client() as pdb,
            httpx.Client(timeout=30.0, headers={"accept": PROBLEM}, limits=httpx.Limits(
                max_connections=200, max_keepalive_connections=0)) as http,
        ):  # fmt: skip
            try:
                yield (Side("python", python.url, pdb, python.http),
                       Side("nginx", server.url, ndb, http), int(found.group(1)))  # fmt: skip
            finally:
                python.stop()
        assert server.problems() == []
    finally:
        if server is not None:
            server.stop()
        for store in stores:
            store.stop()


def test_one_tenant_cannot_hold_more_than_its_share_of_waits(
    tmp_path: Path, export_dir: Path, upstream: tuple[FakeUpstream, ServerThread],
    policy_dir: Path,
) -> None:  # fmt: skip
    """A tenant flooding the gateway with ids that have no record: at most a quarter of
    `previous_response_waiters` of its lookups wait at once in a process (one here); the rest
    are refused at once. Another tenant's lookup still waits meanwhile."""
    with few_waiters(tmp_path, export_dir, upstream, policy_dir) as (python, nginx, workers):
        for side, processes in ((python, 1), (nginx, workers)):
            flood = 6 * processes
            key, other = side.key("acme", "paid"), side.key("globex", "paid")
            ids = [f"resp_{n:032x}" for n in range(flood)]
            with ThreadPoolExecutor(flood + 1) as pool:
                floods = [f.result() for f in [pool.submit(bogus_turn, side, key, n) for n in ids]]
            slow = [took for answer, took in floods if took > WAIT - 0.05]
            others = [answer.text for answer, _ in floods if answer.status_code != 404]
            assert others == [], side.name
            assert 1 <= len(slow) <= processes, f"{side.name}: {sorted(t for _, t in floods)}"
            # globex, while acme floods: its own share of waits is untouched
            with ThreadPoolExecutor(flood + 1) as pool:
                flooding = [pool.submit(bogus_turn, side, key, named) for named in ids]
                time.sleep(0.05)
                answer, took = bogus_turn(side, other, "resp_" + "e" * 32)
                for each in flooding:
                    each.result()
            assert answer.status_code == 404
            assert took > WAIT - 0.05, f"{side.name}: globex did not wait ({took:.3f} s)"
