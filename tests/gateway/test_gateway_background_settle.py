"""A background Responses request is charged its reservation when it is answered (`queued`,
no usage yet), and settled at what it really used, exactly once, when the tenant reads or
cancels it through the gateway and the model server's answer carries its usage (real
redis-server, the fake model server, the `openai` SDK)."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest
import redis

from controller.contract.keys import KeySchema
from controller.gateway.credits import CreditLedger
from controller.gateway.prices import MICRO, PriceTable, to_micro
from controller.settings import PricesSettings
from tests.gateway.conftest import Gateway, MakeGateway, write_limits
from tests.gateway.fake_upstream import FakeUpstream
from tests.support.prometheus import wait_for

pytestmark = pytest.mark.integration

MODEL = "gpt-3.5-turbo"
STATE = "governor:{t:acme}:enforce"
PLANS = """\
apiVersion: governor/v1
kind: Plan
metadata: {name: metered}
spec:
  limits: {requests_per_minute: 600, tokens_per_day: 10000}
  credits: {min_balance_usd: 0}
---
apiVersion: governor/v1
kind: Limits
metadata: {name: global}
spec: {default_plan: metered}
"""


@pytest.fixture
def metered(tmp_path: Path, db: redis.Redis[str]) -> Path:
    """A plan with a daily token budget and credits, written to the test's Redis."""
    (tmp_path / "policies").mkdir()
    (tmp_path / "policies" / "plans.yaml").write_text(PLANS)
    write_limits(db, "governor", tmp_path / "policies")
    return tmp_path / "policies"


def settled(db: redis.Redis[str]) -> int:
    """Tokens the tenant's daily budget holds as settled today."""
    return int(db.hget(STATE, "u|tokens_per_day") or 0)


def balance_micro(db: redis.Redis[str]) -> int:
    return int(db.hget("governor:{t:acme}:credits", "balance") or 0)


def test_a_background_response_is_settled_at_its_usage_once_read(
    make_gateway: MakeGateway,
    metered: Path,
    db: redis.Redis[str],
    upstream: tuple[FakeUpstream, str],
) -> None:
    """Charged its whole reservation when queued; the first read that sees it completed with
    usage refunds the difference (tokens and credits), and records its true total for a turn
    continuing it; a second read, and a cancel after it, change nothing."""
    gateway = make_gateway()
    CreditLedger(db, "governor").top_up("acme", 5.0, reason="test", actor="pytest")
    client = sdk(gateway.url, gateway.key("acme", "metered"))
    queued = client.responses.create(model=MODEL, input="later", max_output_tokens=900,
                                     background=True)  # fmt: skip
    assert (queued.status, queued.usage) == ("queued", None)
    reserved = settled(db)
    assert reserved > 900  # the prompt's estimate and every output token it may generate
    full = balance_micro(db)

    done = client.responses.retrieve(queued.id)
    assert done.status == "completed"
    assert done.usage is not None
    real = done.usage.input_tokens + done.usage.output_tokens
    assert real < 100
    assert settled(db) == real, "not settled at its usage"
    prices = PriceTable.from_settings(PricesSettings())
    cost = prices.cost(MODEL, done.usage.input_tokens, done.usage.output_tokens)
    assert balance_micro(db) == round(5.0 * MICRO) - to_micro(cost), "credits not refunded"
    assert balance_micro(db) > full
    assert db.get(KeySchema("governor").response("acme", queued.id)) == str(real)
    kinds = [entry.kind for entry in CreditLedger(db, "governor").history("acme")]
    assert kinds[0] == "refund", kinds

    # Exactly once: reading it again, or cancelling it, refunds nothing more.
    client.responses.retrieve(queued.id)
    client.responses.cancel(queued.id)
    assert settled(db) == real
    assert balance_micro(db) == round(5.0 * MICRO) - to_micro(cost)


def test_a_cancelled_background_response_is_settled_at_its_usage(
    make_gateway: MakeGateway,
    metered: Path,
    db: redis.Redis[str],
) -> None:
    """A cancel answered with the response's usage settles it, as a read does."""
    gateway = make_gateway()
    client = sdk(gateway.url, gateway.key("acme", "metered"))
    CreditLedger(db, "governor").top_up("acme", 5.0, reason="test", actor="pytest")
    queued = client.responses.create(model=MODEL, input="later", max_output_tokens=900,
                                      background=True)  # fmt: skip
    cancelled = client.responses.cancel(queued.id)
    assert cancelled.status == "cancelled"
    assert cancelled.usage is not None
    real = cancelled.usage.input_tokens + cancelled.usage.output_tokens
    assert settled(db) == real


def test_a_background_response_read_without_usage_keeps_its_charge(
    make_gateway: MakeGateway,
    metered: Path,
    db: redis.Redis[str],
    upstream: tuple[FakeUpstream, str],
) -> None:
    """Fail closed: an answer that does not say what was used (still queued, usage null,
    usage that is no count) leaves the whole reservation charged, and a later read that does
    say settles it."""
    gateway = make_gateway()
    CreditLedger(db, "governor").top_up("acme", 5.0, reason="test", actor="pytest")
    client = sdk(gateway.url, gateway.key("acme", "metered"))
    queued = client.responses.create(model=MODEL, input="later", max_output_tokens=900,
                                     background=True)  # fmt: skip
    reserved = settled(db)
    fake = upstream[0]
    held = next(k for k in fake.responses if k.endswith(queued.id))
    answer = fake.responses[held]
    for usage in (None, {"input_tokens": -500, "output_tokens": 1, "total_tokens": -499},
                  {"input_tokens": 1.5, "output_tokens": "2"}):  # fmt: skip
        fake.responses[held] = {**answer, "usage": usage}
        client.responses.retrieve(queued.id)
        assert settled(db) == reserved, usage
    fake.responses[held] = {**answer, "status": "in_progress"}
    client.responses.retrieve(queued.id)
    assert settled(db) == reserved
    fake.responses[held] = answer
    client.responses.retrieve(queued.id)
    assert settled(db) == answer["usage"]["total_tokens"]


@pytest.fixture(autouse=True)
def _close_clients() -> Iterator[None]:
    yield
    while OPENED:
        OPENED.pop().close()


OPENED: list[openai.OpenAI] = []


def sdk(url: str, key: str) -> openai.OpenAI:
    """The `openai` SDK on the gateway (closed after the test), no retries."""
    OPENED.append(openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0))
    return OPENED[-1]


def test_reads_at_once_settle_it_once_and_a_day_gone_keeps_the_tokens(
    make_gateway: MakeGateway,
    metered: Path,
    db: redis.Redis[str],
) -> None:
    """Eight reads at once settle it once. Tokens are given back only to the day they were
    charged on (a budget reset since holds none of them: given back there, they would be
    spent twice); the credits, money, are refunded whatever the day."""
    gateway = make_gateway()
    CreditLedger(db, "governor").top_up("acme", 5.0, reason="test", actor="pytest")
    client = sdk(gateway.url, gateway.key("acme", "metered"))
    first = client.responses.create(model=MODEL, input="one", max_output_tokens=900,
                                    background=True)  # fmt: skip
    charged = settled(db)
    with ThreadPoolExecutor(8) as pool:
        reads = list(pool.map(lambda _: client.responses.retrieve(first.id), range(8)))
    real = {(r.usage.input_tokens + r.usage.output_tokens) for r in reads if r.usage}
    assert len(real) == 1
    assert settled(db) == real.pop()
    refunds = [e for e in CreditLedger(db, "governor").history("acme") if e.kind == "refund"]
    assert len(refunds) == 1, refunds

    second = client.responses.create(model=MODEL, input="two", max_output_tokens=900,
                                     background=True)  # fmt: skip
    before = settled(db)
    assert before > charged
    key = KeySchema("governor").background("acme", second.id)
    kept = json.loads(db.get(key) or "{}")
    db.set(key, json.dumps({**kept, "day": kept["day"] - 1}), keepttl=True)  # charged yesterday
    balance = balance_micro(db)
    client.responses.retrieve(second.id)
    assert settled(db) == before, "tokens given back to a day they were not charged on"
    assert balance_micro(db) > balance, "credits not refunded"
    assert db.get(key) is None


def held_background(
    gateway: Gateway, key: str, db: redis.Redis[str], held: FakeUpstream,
    meanwhile: Callable[[], None],
) -> httpx.Response:  # fmt: skip
    """A background request (acme, $5 of credits) the model server holds until `meanwhile`
    has run; its queued answer."""
    CreditLedger(db, "governor").top_up("acme", 5.0, reason="test", actor="pytest")
    body = {"model": MODEL, "input": "later", "max_output_tokens": 900, "background": True}
    sent = {"authorization": f"Bearer {key}", "x-fake-hold": "1"}
    seen = len(held.seen)
    with ThreadPoolExecutor(1) as pool:
        answer = pool.submit(gateway.http.post, f"{gateway.url}/v1/responses", json=body,
                             headers=sent)  # fmt: skip
        wait_for(lambda: len(held.seen) > seen, "the model server has the request")
        meanwhile()
        held.release.set()
        return answer.result()


def test_a_settle_held_through_an_outage_is_settled_at_its_usage_once_it_lands(
    make_gateway: MakeGateway,
    metered: Path,
    db: redis.Redis[str],
    held: FakeUpstream,
) -> None:
    """The queued answer's settle meets Redis paused: held, and what it was charged is kept
    when the held settle lands (not before: a settle that never landed must refund nothing),
    so a read after the outage still settles it at its usage."""
    gateway = make_gateway()
    key = gateway.key("acme", "metered")

    def pause() -> None:  # answered while Redis does not answer: the settle is held
        db.execute_command("CLIENT", "PAUSE", "2500", "ALL")

    queued = held_background(gateway, key, db, held, pause)
    assert queued.status_code == 200, queued.text
    time.sleep(2.6)
    chat = gateway.chat(key)  # Redis answers: the held settle goes through
    assert chat.status_code == 200, chat.text
    named = queued.json()["id"]
    wait_for(lambda: db.get(KeySchema("governor").background("acme", named)) is not None,
             "what it was charged is kept")  # fmt: skip
    done = sdk(gateway.url, key).responses.retrieve(named)
    assert done.usage is not None
    real = done.usage.input_tokens + done.usage.output_tokens
    assert settled(db) == real + chat.json()["usage"]["total_tokens"]


def test_an_answer_whose_settle_found_no_reservation_refunds_nothing(
    make_gateway: MakeGateway,
    metered: Path,
    db: redis.Redis[str],
    held: FakeUpstream,
) -> None:
    """A reservation released before its answer settles (its lease swept: here, its settle
    record taken away while the model server holds the answer) is charged nothing by the
    settle; what was never charged must never be refunded by a read."""
    gateway = make_gateway()
    key = gateway.key("acme", "metered")

    def sweep() -> None:  # as a sweep of its lease leaves it
        records = [field for field in db.hkeys(STATE) if field.startswith("x|")]
        assert len(records) == 1, records
        db.hdel(STATE, *records)

    queued = held_background(gateway, key, db, held, sweep)
    assert queued.status_code == 200, queued.text
    named = queued.json()["id"]
    assert db.get(KeySchema("governor").background("acme", named)) is None
    sdk(gateway.url, key).responses.retrieve(named)
    assert balance_micro(db) == round(5.0 * MICRO), "refunded credits never charged"


SOLO = """\
apiVersion: governor/v1
kind: Plan
metadata: {name: solo}
spec:
  limits: {requests_per_minute: 600, concurrent_requests: 1}
---
apiVersion: governor/v1
kind: Limits
metadata: {name: global}
spec: {default_plan: solo}
"""


def test_a_renewal_that_fails_is_counted_and_the_lease_ends_as_before(
    make_gateway: MakeGateway, tmp_path: Path, db: redis.Redis[str], held: FakeUpstream
) -> None:
    """A read answered `in_progress` while Redis does not answer (paused between the charge
    lookup and the answer): the client still gets its answer, the failure is counted
    (gateway_limit_store_errors_total{operation="renew"}), nothing is held to repeat it, and
    the slot's lease ends when it did: the tenant's next request is then admitted."""
    (tmp_path / "solo").mkdir()
    (tmp_path / "solo" / "plans.yaml").write_text(SOLO)
    write_limits(db, "governor", tmp_path / "solo")
    gateway = make_gateway(redis_options={"socket_timeout_seconds": 0.3, "retries": 0})
    key = gateway.key("acme", "solo")
    held.release.set()
    raw = sdk(gateway.url, key).responses.with_raw_response.create(
        model=MODEL, input="long", max_output_tokens=16, background=True
    )
    named, rid = raw.parse().id, raw.headers["x-governor-request-id"]
    stored = next(k for k in held.responses if k.endswith(named))
    held.responses[stored] = {**held.responses[stored], "status": "in_progress", "usage": None}
    leases, slot = f"{STATE}:leases", f"h|{rid}|0|c=concurrent_requests"
    ends = db.time()[0] * 1000 + 1500  # its admission's lease, near its end
    db.zadd(leases, {slot: ends})

    held.release.clear()
    seen = len(held.seen)
    read = sdk(gateway.url, key).with_options(default_headers={"x-fake-hold": "1"})
    with ThreadPoolExecutor(1) as pool:
        answer = pool.submit(read.responses.retrieve, named)
        wait_for(lambda: len(held.seen) > seen, "the model server has the read")
        db.execute_command("CLIENT", "PAUSE", "1000", "ALL")
        held.release.set()
        assert answer.result().status == "in_progress"
    assert db.zscore(leases, slot) == ends  # not renewed
    assert renew_errors(gateway) == 1
    while db.time()[0] * 1000 <= ends + 1000:  # past its end
        time.sleep(0.1)
    db.hset(STATE, "n", str(ends))  # the level's care is due
    admitted = gateway.chat(key)
    assert admitted.status_code == 200, admitted.text
    assert db.zscore(leases, slot) is None


def renew_errors(gateway: Gateway) -> float:
    """gateway_limit_store_errors_total{operation="renew"}."""
    series = 'gateway_limit_store_errors_total{operation="renew"}'
    text = gateway.http.get(f"{gateway.url}/metrics").text
    line = next(line for line in text.splitlines() if line.startswith(series))
    return float(line.rpartition(" ")[2])
