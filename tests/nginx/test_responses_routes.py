"""A stored response's own routes (/v1/responses/{id}…) through both gateways and the SDK."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from controller.contract.enforcement import EnforcementKeys
from controller.contract.keys import KeySchema
from controller.gateway.background import MAX_READ_ANSWER
from tests.gateway.conftest import write_limits
from tests.gateway.fake_upstream import FakeUpstream, ServerThread, padded
from tests.nginx.conftest import PREFIX, Side, chat_body, set_limit, tenant_state
from tests.nginx.gateway_pair import PairOptions, gateway_pair
from tests.nginx.nginx_server import NginxServer
from tests.nginx.test_conversations import _close_clients as _close_clients  # the fixture
from tests.nginx.test_conversations import day_left, refused_as_written, sdk, sides
from tests.nginx.test_conversations import shared_sides as shared_sides  # the fixture

pytestmark = pytest.mark.integration

MODEL = "gpt-3.5-turbo"


def record(side: Side, tenant: str, response: str) -> str | None:
    return side.db.get(KeySchema(PREFIX).response(tenant, response))


def made(side: Side, key: str, text: str) -> str:
    """The id of a response the tenant of `key` makes (kept by the model server)."""
    answer = sdk(side, key).responses.create(model=MODEL, input=f"{text} {side.name}",
                                             max_output_tokens=16)  # fmt: skip
    return answer.id


def test_the_tenants_own_response_is_read_listed_and_deleted_through_the_sdk(
    python_gateway: Side, nginx: Side, upstream: tuple[FakeUpstream, ServerThread]
) -> None:
    """nginx (a real one) and `governor gateway`, each on its own real Redis, in front of the
    fake model server: no call is admitted, and a delete forgets the tenant's record."""
    fake = upstream[0]
    for side in sides(python_gateway, nginx):
        key = side.key("acme", "free")
        client = sdk(side, key)
        mine = made(side, key, "remember")
        assert record(side, "acme", mine) is not None, side.name
        state = side.db.hgetall(f"{PREFIX}:{{t:acme}}:enforce")

        assert client.responses.retrieve(mine).id == mine
        assert fake.seen[-1].path == f"/v1/responses/{mine}"
        listed = client.responses.input_items.list(mine).data
        assert [item.type for item in listed] == ["message"], side.name
        head = side.http.head(f"{side.url}/v1/responses/{mine}",
                              headers={"authorization": f"Bearer {key}"})  # fmt: skip
        assert head.status_code == 200, side.name
        # No model work: nothing admitted, reserved or charged.
        assert side.db.hgetall(f"{PREFIX}:{{t:acme}}:enforce") == state, side.name

        client.responses.delete(mine)
        assert fake.seen[-1].path == f"/v1/responses/{mine}"
        assert record(side, "acme", mine) is None, side.name
        before = len(fake.seen)
        with pytest.raises(openai.NotFoundError) as refused:
            client.responses.retrieve(mine)
        assert refused.value.code == "response_not_found"
        with pytest.raises(openai.NotFoundError) as continued:
            client.responses.create(model=MODEL, input="and?", max_output_tokens=16,
                                    previous_response_id=mine)  # fmt: skip
        assert continued.value.code == "previous_response_not_found"
        assert len(fake.seen) == before, f"{side.name} forwarded a deleted response's call"


def test_a_background_response_is_charged_its_reservation_polled_and_cancelled(
    python_gateway: Side, nginx: Side, upstream: tuple[FakeUpstream, ServerThread]
) -> None:
    """The model server answers a background request at once (`queued`, no usage) and
    generates afterwards: settled from the answer, it would be charged the prompt's estimate
    alone and the generation would go unmetered. It is charged its reservation (the prompt
    and max_output_tokens), and recorded so for a turn that continues it; polled finished, it
    is settled at its usage (the rest given back, its record its true total), once."""
    for side in sides(python_gateway, nginx):
        key = side.key("acme", "free")
        client = sdk(side, key)
        raw = client.responses.with_raw_response.create(
            model=MODEL, input=f"later {side.name}", max_output_tokens=16, background=True
        )
        reserved = 1000 - day_left(raw.headers)  # the free plan's day: 1000 tokens
        queued = raw.parse()
        assert (queued.status, queued.usage) == ("queued", None), side.name
        assert record(side, "acme", queued.id) == str(reserved), side.name
        # The next admission finds the whole reservation charged (a fresh tenant's same
        # chat says what the chat itself holds).
        fresh = side.chat(side.key(f"fresh-{side.name}", "free"), chat_body(max_tokens=1))
        after = side.chat(key, chat_body(max_tokens=1))
        assert day_left(after.headers) == day_left(fresh.headers) - reserved, side.name

        charged = int(tenant_state(side, "acme")["u|tokens_per_day"])
        polled = client.responses.retrieve(queued.id)
        assert (polled.status, polled.id) == ("completed", queued.id), side.name
        assert polled.usage is not None
        real = polled.usage.input_tokens + polled.usage.output_tokens
        assert record(side, "acme", queued.id) == str(real), side.name
        settled = int(tenant_state(side, "acme")["u|tokens_per_day"])
        assert settled == charged - reserved + real, side.name
        assert client.responses.cancel(queued.id).status == "cancelled"
        assert upstream[0].seen[-1].path == f"/v1/responses/{queued.id}/cancel"
        client.responses.retrieve(queued.id)
        assert int(tenant_state(side, "acme")["u|tokens_per_day"]) == settled, side.name


def test_only_the_tenant_that_made_a_response_reaches_it(
    python_gateway: Side, nginx: Side, upstream: tuple[FakeUpstream, ServerThread]
) -> None:
    """Every tenant reaches the model server with the one upstream key: forwarded, globex
    would read, list, cancel or delete acme's response. 404 on every route, in the words an
    id never made gets, and nothing reaches the model server."""
    fake = upstream[0]
    for side in sides(python_gateway, nginx):
        mine = made(side, side.key("acme", "free"), "private")
        kept = record(side, "acme", mine)
        globex = {"authorization": f"Bearer {side.key('globex', 'free')}"}
        before = len(fake.seen)
        calls = [("GET", f"/v1/responses/{mine}"), ("DELETE", f"/v1/responses/{mine}"),
                 ("GET", f"/v1/responses/{mine}/input_items"),
                 ("POST", f"/v1/responses/{mine}/cancel"),
                 ("GET", "/v1/responses/resp_never_made"),
                 ("GET", "/v1/responses/resp.never:made+at=all~")]  # fmt: skip
        for method, path in calls:
            answer = side.http.request(method, side.url + path, headers=globex)
            assert answer.status_code == 404, (side.name, method, path, answer.text)
            named = path.split("/")[3]
            assert answer.json()["detail"] == f"no response '{named}' for this API key"
            assert answer.json()["type"].endswith("#unknown-response"), side.name
        envelope = side.http.get(f"{side.url}/v1/responses/{mine}",
                                 headers={**globex, "accept": "*/*"})  # fmt: skip
        error = envelope.json()["error"]
        assert (error["code"], error["param"]) == ("response_not_found", None)
        odd = side.http.get(f"{side.url}/v1/responses/resp%20x", headers=globex)
        assert odd.status_code == 404
        assert odd.json()["detail"] == "no response with that id for this API key"
        assert len(fake.seen) == before, f"{side.name} forwarded another tenant's call"
        assert record(side, "acme", mine) == kept  # not deleted
        assert mine in fake.responses


# Under the routes of a response, and none of them: refused wherever the id is the caller's.
UNSERVED = (
    ("GET", "/v1/responses"),  # every response of the upstream key: every tenant's
    ("POST", "/v1/responses/{mine}"), ("PUT", "/v1/responses/{mine}"),
    ("DELETE", "/v1/responses/{mine}/input_items"), ("GET", "/v1/responses/{mine}/cancel"),
    ("GET", "/v1/responses/{mine}/other"), ("GET", "/v1/responses/{mine}/input_items/msg_1"),
    ("GET", "/v1/responses/{mine}//input_items"), ("GET", "/v1/responses/"),
)  # fmt: skip


def test_what_is_no_call_on_a_response_is_refused_not_forwarded(
    python_gateway: Side, nginx: Side, upstream: tuple[FakeUpstream, ServerThread]
) -> None:
    """The tenant's own response is served on its routes, and on no other path or method."""
    for side in sides(python_gateway, nginx):
        key = side.key("acme", "free")
        mine = made(side, key, "routes")
        auth = {"authorization": f"Bearer {key}"}
        assert side.http.get(f"{side.url}/v1/responses/{mine}", headers=auth).status_code == 200
        before = len(upstream[0].seen)
        for method, path in UNSERVED:
            answer = side.http.request(method, side.url + path.format(mine=mine), headers=auth)
            assert answer.status_code == 404, (side.name, method, path, answer.text)
            assert answer.json()["type"].endswith("#unmetered-route"), (side.name, path)
        assert len(upstream[0].seen) == before, f"{side.name} forwarded a call on no route"


def test_a_response_path_written_around_the_check_is_refused(
    python_gateway: Side, nginx: Side, upstream: tuple[FakeUpstream, ServerThread]
) -> None:
    """nginx resolves `resp_other/../resp_mine` to the response it checks, and sends the
    target as written: refused, as `governor gateway` refuses a dot segment."""
    fake = upstream[0]
    for side in sides(python_gateway, nginx):
        key = side.key("acme", "free")
        mine = made(side, key, "around")
        refused_as_written(side, fake, key, f"/v1/responses/{mine}",
                           (f"/v1/responses/resp_other/../{mine}",
                            f"/v1/responses/{mine}/./input_items",
                            f"/v1/responses//{mine}",
                            f"/v1/responses/resp_other%2F..%2F{mine}"))  # fmt: skip


def test_an_unknown_plan_and_no_key_are_refused_before_the_lookup(
    python_gateway: Side, nginx: Side, upstream: tuple[FakeUpstream, ServerThread]
) -> None:
    fake = upstream[0]
    for side in sides(python_gateway, nginx):
        mine = made(side, side.key("acme", "free"), "auth")
        path = f"{side.url}/v1/responses/{mine}"
        own = {"authorization": f"Bearer {side.key('acme', 'free')}"}
        assert side.http.get(path, headers=own).status_code == 200, side.name
        before = len(fake.seen)
        assert side.http.get(path).status_code == 401
        stranger = {"authorization": f"Bearer {side.key('acme', 'no-such-plan')}"}
        refused = side.http.get(path, headers=stranger)
        assert refused.status_code == 403, (side.name, refused.text)
        assert refused.json()["type"].endswith("#unknown-plan")
        assert len(fake.seen) == before, side.name


def test_shared_scope_forwards_another_tenants_response_and_deletes_no_record_of_it(
    shared_sides: tuple[Side, Side], upstream: tuple[FakeUpstream, ServerThread]
) -> None:
    """`shared` (documented: tenants can then read each other's responses): any tenant's call
    is forwarded; only the caller's own record is ever deleted."""
    for side in shared_sides:
        mine = made(side, side.key("acme", "free"), "shared")
        kept = record(side, "acme", mine)
        assert kept is not None
        globex = sdk(side, side.key("globex", "free"))
        assert globex.responses.retrieve(mine).id == mine  # forwarded: shared
        globex.responses.delete(mine)
        assert record(side, "acme", mine) == kept, side.name
        assert mine not in upstream[0].responses


def test_a_response_call_fails_closed_while_redis_does_not_answer(
    tmp_path: Path, export_dir: Path, upstream: tuple[FakeUpstream, ServerThread],
    policy_dir: Path,
) -> None:  # fmt: skip
    """Whose response it is cannot be checked: 503 whatever the plan's fail mode (free fails
    closed, enterprise open), and nothing reaches the model server."""
    options = PairOptions(
        prepare=lambda db: write_limits(db, PREFIX, policy_dir),
        nginx_env={"GOVERNOR_REDIS__SOCKET_TIMEOUT_SECONDS": "0.5",
                   "GOVERNOR_REDIS__RETRIES": "0"},
        redis_options={"socket_timeout_seconds": 0.5, "retries": 0},
        timeout=30.0,
    )  # fmt: skip
    fake = upstream[0]
    with gateway_pair(tmp_path, export_dir, upstream, options) as pair:
        for side in pair.sides:
            auth = [{"authorization": f"Bearer {side.key('acme', plan)}"}
                    for plan in ("free", "enterprise")]  # fmt: skip
            body = {"model": MODEL, "input": f"outage {side.name}", "max_output_tokens": 5}
            mine = side.http.post(f"{side.url}/v1/responses", json=body, headers=auth[0])
            assert mine.status_code == 200, (side.name, mine.text)
            path = f"{side.url}/v1/responses/{mine.json()['id']}"
            for headers in auth:  # both keys verified, and cached, while Redis answers
                assert side.http.get(path, headers=headers).status_code == 200
            before = len(fake.seen)
            side.db.execute_command("CLIENT", "PAUSE", "6000", "ALL")
            for headers in auth:
                for method, suffix in (("GET", ""), ("DELETE", ""), ("GET", "/input_items"),
                                       ("POST", "/cancel")):  # fmt: skip
                    answer = side.http.request(method, path + suffix, headers=headers)
                    assert answer.status_code == 503, (side.name, method, suffix, answer.text)
                    assert answer.json()["type"].endswith("#enforcement-unavailable")
            assert len(fake.seen) == before, side.name


def test_a_background_response_is_settled_by_its_cancel_and_never_by_an_answer_without_usage(
    python_gateway: Side, nginx: Side, upstream: tuple[FakeUpstream, ServerThread]
) -> None:
    """Both gateways: a read whose answer does not say what was used (usage null, counts that
    are no counts, still in progress) leaves the reservation charged; a cancel answered with
    the usage settles it (its body reaches the model server)."""
    fake = upstream[0]
    for side in sides(python_gateway, nginx):
        key = side.key("acme", "free")
        client = sdk(side, key)
        queued = client.responses.create(model=MODEL, input=f"cancel me {side.name}",
                                         max_output_tokens=16, background=True)  # fmt: skip
        charged = tenant_state(side, "acme")["u|tokens_per_day"]
        held = next(k for k in fake.responses if k.endswith(queued.id))
        answer = fake.responses[held]
        unusable = (None, {"input_tokens": -5, "output_tokens": 1},
                    {"input_tokens": 1.5, "output_tokens": 2}, {"input_tokens": "2"})  # fmt: skip
        for usage in unusable:
            fake.responses[held] = {**answer, "usage": usage}
            client.responses.retrieve(queued.id)
            assert tenant_state(side, "acme")["u|tokens_per_day"] == charged, (side.name, usage)
        fake.responses[held] = {**answer, "status": "in_progress"}
        client.responses.retrieve(queued.id)
        assert tenant_state(side, "acme")["u|tokens_per_day"] == charged, side.name
        fake.responses[held] = answer
        cancelled = client.responses.cancel(queued.id)
        assert cancelled.status == "cancelled"
        assert cancelled.usage is not None
        real = cancelled.usage.input_tokens + cancelled.usage.output_tokens
        assert tenant_state(side, "acme")["u|tokens_per_day"] == str(real), side.name
        assert record(side, "acme", queued.id) == str(real), side.name


def test_a_read_that_streams_a_background_response_passes_as_it_is(
    python_gateway: Side, nginx: Side, upstream: tuple[FakeUpstream, ServerThread]
) -> None:
    """`GET /v1/responses/{id}?stream=true` follows a background response's events as it
    generates: fetched whole to be settled, nginx would hold them all until it is done. Both
    gateways pass it on as it is (it settles nothing); a plain read settles it."""
    for side in sides(python_gateway, nginx):
        key = side.key("acme", "free")
        queued = sdk(side, key).responses.create(model=MODEL, input=f"follow {side.name}",
                                                 max_output_tokens=16, background=True)  # fmt: skip
        charged = tenant_state(side, "acme")["u|tokens_per_day"]
        sent = {"authorization": f"Bearer {key}"}
        path = f"{side.url}/v1/responses/{queued.id}"
        followed = side.http.get(path, params={"stream": "true", "starting_after": "0"},
                                 headers=sent)  # fmt: skip
        assert followed.status_code == 200, (side.name, followed.text)
        assert tenant_state(side, "acme")["u|tokens_per_day"] == charged, side.name
        assert side.http.get(path, headers=sent).json()["status"] == "completed"
        assert tenant_state(side, "acme")["u|tokens_per_day"] != charged, side.name


def test_a_settling_read_past_32_mib_passes_on_whole_and_settles_nothing(
    python_gateway: Side, nginx: Side, upstream: tuple[FakeUpstream, ServerThread]
) -> None:
    """A read of a background response still charged its reservation is read for its usage
    up to 32 MiB (MAX_READ_ANSWER) by the Python gateway; nginx and Kong decoded whatever
    came, however large. Both now: an answer of exactly 32 MiB settles, one byte more
    reaches the client whole and settles nothing (the reservation stays charged, its record
    kept for a later read)."""
    fake = upstream[0]
    for side in sides(python_gateway, nginx):
        key = side.key("acme", "free")
        client = sdk(side, key)
        sent = {"authorization": f"Bearer {key}"}
        for size, settles in ((MAX_READ_ANSWER + 1, False), (MAX_READ_ANSWER, True)):
            queued = client.responses.create(model=MODEL, input=f"big {size} {side.name}",
                                             max_output_tokens=16, background=True)  # fmt: skip
            charged = tenant_state(side, "acme")["u|tokens_per_day"]
            held = next(k for k in fake.responses if k.endswith(queued.id))
            fake.responses[held] = padded(fake.responses[held], size)
            answer = side.http.get(f"{side.url}/v1/responses/{queued.id}", headers=sent)
            assert (answer.status_code, len(answer.content)) == (200, size), side.name
            settled = tenant_state(side, "acme")["u|tokens_per_day"] != charged
            assert settled is settles, (side.name, size)
            kept = side.db.get(KeySchema(PREFIX).background("acme", queued.id))
            assert (kept is None) is settles, (side.name, size)


@pytest.mark.parametrize(
    ("text", "generated"),
    [("alpha beta", 3), ("x" * 400, 16)],  # ⌈10 ÷ 4⌉; past max_output_tokens
)
def test_a_response_cancelled_without_usage_is_charged_what_it_generated(
    python_gateway: Side,
    nginx: Side,
    upstream: tuple[FakeUpstream, ServerThread],
    text: str,
    generated: int,
) -> None:
    """A cancel the model server answers `cancelled` with no usage left the whole reservation
    charged: a long generation cancelled near its end cost the same as one cancelled at once
    only by luck, and one cancelled at once paid for tokens never made. Both gateways now
    settle it as they estimate an answer without usage: the prompt charged at admission and
    ⌈characters of the output the answer holds ÷ 4⌉, never more than the reservation, never
    less than the prompt. Its concurrency slot, held while it generated, comes back with
    that settle."""
    fake = upstream[0]
    for side in sides(python_gateway, nginx):
        tenant = f"cancel{len(text)}"
        set_limit(side, f"tenant/{tenant}/concurrent_requests", 1)
        key = side.key(tenant, "free")
        queued = sdk(side, key).responses.create(model=MODEL, input=f"stop {side.name}",
                                                 max_output_tokens=16, background=True)  # fmt: skip
        assert tenant_state(side, tenant)["c|concurrent_requests"] == "1", side.name
        before = int(tenant_state(side, tenant)["u|tokens_per_day"])
        charged = json.loads(side.db.get(KeySchema(PREFIX).background(tenant, queued.id)) or "")
        held = next(k for k in fake.responses if k.endswith(queued.id))
        part = {"type": "output_text", "text": text, "annotations": []}
        message = {**fake.responses[held]["output"][0], "content": [part]}
        fake.responses[held] = {**fake.responses[held], "usage": None, "output": [message]}
        cancelled = sdk(side, key).responses.cancel(queued.id)
        assert (cancelled.status, cancelled.usage) == ("cancelled", None), side.name
        settled = int(tenant_state(side, tenant)["u|tokens_per_day"])
        assert before == charged["prompt"] + 16, side.name  # the whole reservation, at first
        assert settled == charged["prompt"] + generated, (side.name, before, settled)
        assert record(side, tenant, queued.id) == str(settled), side.name
        # Settled once: its charge record is gone, so a later read changes nothing.
        assert side.db.get(KeySchema(PREFIX).background(tenant, queued.id)) is None, side.name
        assert tenant_state(side, tenant)["c|concurrent_requests"] == "0", side.name


@pytest.mark.parametrize("output", ["none", "empty text"])
def test_a_cancel_answered_as_queued_keeps_the_whole_reservation_charged(
    python_gateway: Side, nginx: Side, upstream: tuple[FakeUpstream, ServerThread], output: str
) -> None:
    """vLLM and SGLang answer a cancel with the object stored when the request was queued
    (`cancelled`, `output: []`, `usage: null`) however much was generated: estimated from
    its output, a 400-token generation was charged its prompt alone. Both gateways keep the
    whole reservation charged (a read with usage can still settle it: its charge record
    stays) and give its slot back."""
    fake = upstream[0]
    for side in sides(python_gateway, nginx):
        tenant = f"queuedcancel{len(output)}"
        set_limit(side, f"tenant/{tenant}/concurrent_requests", 1)
        key = side.key(tenant, "free")
        client = sdk(side, key)
        queued = client.responses.create(model=MODEL, input=f"long {side.name}",
                                         max_output_tokens=400, background=True,
                                         extra_headers={"x-fake-tokens": "400"})  # fmt: skip
        reserved = int(tenant_state(side, tenant)["u|tokens_per_day"])
        generated = in_progress(fake, queued.id)  # generating: the queued object is kept
        assert generated["usage"]["output_tokens"] == 400, side.name  # what the cancel hides
        if output == "empty text":
            held = next(k for k in fake.responses if k.endswith(queued.id))
            part = {"type": "output_text", "text": "", "annotations": []}
            message = {**generated["output"][0], "content": [part]}
            fake.responses[held] = {**fake.responses[held], "output": [message]}
        cancelled = client.responses.cancel(queued.id)
        assert (cancelled.status, cancelled.usage) == ("cancelled", None), side.name
        state = tenant_state(side, tenant)
        assert int(state["u|tokens_per_day"]) == reserved, side.name
        assert state["c|concurrent_requests"] == "0", side.name
        assert side.db.exists(KeySchema(PREFIX).background(tenant, queued.id)) == 1, side.name


def in_progress(fake: FakeUpstream, response: str) -> dict[str, Any]:
    """The model server says `response` is still generating (no usage yet); its finished
    answer, to put back once the test lets it finish."""
    held = next(k for k in fake.responses if k.endswith(response))
    finished = fake.responses[held]
    fake.responses[held] = {**finished, "status": "in_progress", "output": [], "usage": None}
    return finished


def finish(fake: FakeUpstream, response: str, answer: dict[str, Any]) -> None:
    held = next(k for k in fake.responses if k.endswith(response))
    fake.responses[held] = answer


@dataclass(frozen=True)
class Running:
    """A background response answered `queued`, still generating on the model server."""

    key: str  # the tenant's API key
    client: openai.OpenAI  # the SDK on it
    queued: Any  # the `queued` answer (openai's Response)
    request_id: str  # the gateway's x-governor-request-id: its reservation
    answer: dict[str, Any]  # its finished answer, to `finish` it with


def running(side: Side, fake: FakeUpstream, tenant: str, text: str, limit: int = 1) -> Running:
    """`tenant`, held to `limit` requests in flight, creates a background response that the
    model server goes on generating (no usage yet)."""
    set_limit(side, f"tenant/{tenant}/concurrent_requests", limit)
    key = side.key(tenant, "free")
    client = sdk(side, key)
    raw = client.responses.with_raw_response.create(
        model=MODEL, input=text, max_output_tokens=16, background=True
    )
    queued = raw.parse()
    answer = in_progress(fake, queued.id)
    return Running(key, client, queued, raw.headers["x-governor-request-id"], answer)


def refused_for_its_slot(side: Side, key: str, client: openai.OpenAI) -> None:
    """Another request of the tenant is refused by its concurrency limit (429), through the
    SDK and in the problem document's words."""
    with pytest.raises(openai.RateLimitError):
        client.responses.create(model=MODEL, input="meanwhile", max_output_tokens=16)
    refused = side.chat(key, chat_body(max_tokens=1))
    assert refused.status_code == 429, (side.name, refused.text)
    assert refused.json()["violated-policies"] == ["tenant/acme/concurrent_requests"], side.name


@pytest.mark.parametrize("ending", ["read", "cancel"])
def test_a_background_response_holds_its_concurrency_slot_until_it_is_finished(
    python_gateway: Side, nginx: Side, upstream: tuple[FakeUpstream, ServerThread], ending: str
) -> None:
    """One request in flight for the tenant: answered `queued` at once, a background response
    goes on generating on the model server, so it keeps its slot — another request of the
    tenant is refused while it runs, polled unfinished or not — until the gateway reads it
    finished (completed, or cancelled), and the next one is admitted then; the charge is
    settled at its usage as before."""
    fake = upstream[0]
    for side in sides(python_gateway, nginx):
        job = running(side, fake, "acme", f"busy {side.name}")
        key, client, queued, answer = job.key, job.client, job.queued, job.answer
        assert queued.status == "queued", side.name
        refused_for_its_slot(side, key, client)
        assert client.responses.retrieve(queued.id).status == "in_progress", side.name
        refused_for_its_slot(side, key, client)

        finish(fake, queued.id, answer)
        if ending == "read":
            done = client.responses.retrieve(queued.id)
        else:
            done = client.responses.cancel(queued.id)
        assert done.status == ("completed" if ending == "read" else "cancelled"), side.name
        assert done.usage is not None
        real = done.usage.input_tokens + done.usage.output_tokens
        assert tenant_state(side, "acme")["u|tokens_per_day"] == str(real), side.name
        assert tenant_state(side, "acme")["c|concurrent_requests"] == "0", side.name
        admitted = side.chat(key, chat_body(max_tokens=1))
        assert admitted.status_code == 200, (side.name, admitted.text)


def test_a_background_response_read_failed_without_usage_gives_its_slot_back_charged(
    python_gateway: Side, nginx: Side, upstream: tuple[FakeUpstream, ServerThread]
) -> None:
    """Read `failed` with no usage: its generation has ended, so its slot comes back (the
    next request admitted), but nothing says what it used, so its reservation stays charged
    until a read that says so."""
    fake = upstream[0]
    for side in sides(python_gateway, nginx):
        job = running(side, fake, "acme", f"doomed {side.name}")
        key, client, queued, answer = job.key, job.client, job.queued, job.answer
        charged = tenant_state(side, "acme")["u|tokens_per_day"]
        refused_for_its_slot(side, key, client)
        finish(fake, queued.id, {**answer, "status": "failed", "usage": None})
        assert client.responses.retrieve(queued.id).status == "failed", side.name
        assert tenant_state(side, "acme")["u|tokens_per_day"] == charged, side.name
        admitted = side.chat(key, chat_body(max_tokens=1))
        assert admitted.status_code == 200, (side.name, admitted.text)
        kept = KeySchema(PREFIX).background("acme", queued.id)
        assert side.db.exists(kept) == 1, side.name  # for a later read with usage to settle


@pytest.mark.parametrize("status", ["failed", "cancelled", "incomplete", "completed"])
def test_a_background_answer_already_ended_without_usage_gives_its_slot_back_at_once(
    python_gateway: Side, nginx: Side, upstream: tuple[FakeUpstream, ServerThread], status: str
) -> None:
    """A background create the model server answers already ended (a `status` of the four
    final ones) with `usage: null`: nothing generates after it, yet the gateways read "no
    usage" alone as "still generating" and kept its slot for the whole 600 s lease — the
    tenant's next request was refused 429. Its slot (and the in-flight gauge) now comes
    back with the answer's settle; unsure of what it used, it stays charged its
    reservation."""
    for side in sides(python_gateway, nginx):
        tenant = f"ended{status}"  # its own: the session's nginx keeps earlier gauge series
        set_limit(side, f"tenant/{tenant}/concurrent_requests", 1)
        key = side.key(tenant, "free")
        ended = {"x-fake-bg-status": status}
        raw = sdk(side, key).responses.with_raw_response.create(
            model=MODEL, input=f"ended {side.name}", max_output_tokens=16, background=True,
            extra_headers=ended,
        )  # fmt: skip
        answer = raw.parse()
        assert (answer.status, answer.usage) == (status, None), side.name
        state = tenant_state(side, tenant)
        assert state["c|concurrent_requests"] == "0", side.name
        assert int(state["u|tokens_per_day"]) == 1000 - day_left(raw.headers), side.name
        assert in_flight(side, tenant) == 0, side.name
        admitted = side.chat(key, chat_body(max_tokens=1))
        assert admitted.status_code == 200, (side.name, admitted.text)


def test_a_cancel_before_a_streamed_background_create_settles_gives_its_slot_back(
    python_gateway: Side, nginx: Side, held: FakeUpstream
) -> None:
    """A streamed background create's client has the id from its first event and can cancel
    before the create's settle has kept its charge: the cancel found no charge record and
    gave nothing back, and the create, its stream left unfinished, then settled as still
    generating and held its slot for the whole lease (the tenant refused 429). The cancel
    now leaves its record `ended`; the create's settle finds it as it keeps its charge and
    gives the slot back (charged its reservation, kept for a read with usage)."""
    for side in sides(python_gateway, nginx):
        tenant = f"racing{side.name}"
        set_limit(side, f"tenant/{tenant}/concurrent_requests", 1)
        key = side.key(tenant, "free")
        body = {"model": MODEL, "input": f"race {side.name}", "max_output_tokens": 16,
                "background": True, "stream": True}  # fmt: skip
        sent = {"authorization": f"Bearer {key}", "x-fake-stall": "0"}  # held after `created`
        with side.http.stream("POST", f"{side.url}/v1/responses", json=body,
                              headers=sent) as stream:  # fmt: skip
            lines = stream.iter_lines()  # kept open: a closed one would end the stream here
            first = next(line for line in lines if line.startswith("data:"))
            named = json.loads(first[5:])["response"]["id"]
            # The create's settle writes the response's record, then settles, then keeps its
            # charge: a cancel landing between the first and the last is the race, held
            # open here (the record in place, the stream not ended).
            side.db.set(KeySchema(PREFIX).response(tenant, named), "19")
            assert sdk(side, key).responses.cancel(named).status == "cancelled", side.name
        kept = KeySchema(PREFIX).background(tenant, named)
        deadline = time.monotonic() + 10
        while (side.db.get(kept) or "ended") == "ended":  # the create settled, its charge kept
            assert time.monotonic() < deadline, side.name
            time.sleep(0.02)
        state = tenant_state(side, tenant)
        assert state["c|concurrent_requests"] == "0", side.name
        assert in_flight(side, tenant) == 0, side.name
        charged = json.loads(side.db.get(kept) or "")
        assert int(state["u|tokens_per_day"]) == charged["prompt"] + 16, side.name
        admitted = side.chat(key, chat_body(max_tokens=1))
        assert admitted.status_code == 200, (side.name, admitted.text)


def test_a_background_response_nobody_reads_gives_its_slot_back_when_its_lease_ends(
    python_gateway: Side, nginx: Side, upstream: tuple[FakeUpstream, ServerThread]
) -> None:
    """Never read, a background response holds its slot as long as its admission's lease
    (600 s: not a moment less, not forever); once that has passed (the lease moved into the
    past here), the next admission's sweep gives it back. A read afterwards settles its
    usage and gives back nothing more (the slot count never goes below what is held)."""
    fake = upstream[0]
    for side in sides(python_gateway, nginx):
        job = running(side, fake, "acme", f"forgotten {side.name}")
        key, client, queued, answer, rid = (
            job.key,
            job.client,
            job.queued,
            job.answer,
            job.request_id,
        )
        level = EnforcementKeys(KeySchema(PREFIX)).tenant_level("acme")
        slot = f"h|{rid}|0|c=concurrent_requests"
        now_ms = side.db.time()[0] * 1000
        expires = side.db.zscore(level.leases, slot)
        assert expires is not None, (side.name, side.db.zrange(level.leases, 0, -1))
        assert now_ms + 590_000 < expires <= now_ms + 601_000, side.name
        refused_for_its_slot(side, key, client)

        # 600 s later: the lease has ended, and the level's care is due.
        side.db.zadd(level.leases, {slot: now_ms - 1})
        side.db.hset(level.state, "n", str(now_ms - 1))
        admitted = side.chat(key, chat_body(max_tokens=1))
        assert admitted.status_code == 200, (side.name, admitted.text)
        assert side.db.zscore(level.leases, slot) is None, side.name

        finish(fake, queued.id, answer)
        reserved = int(record(side, "acme", queued.id) or 0)
        charged = int(tenant_state(side, "acme")["u|tokens_per_day"])
        done = client.responses.retrieve(queued.id)
        assert done.usage is not None
        real = done.usage.input_tokens + done.usage.output_tokens
        state = tenant_state(side, "acme")
        assert state["c|concurrent_requests"] == "0", side.name
        assert int(state["u|tokens_per_day"]) == charged - reserved + real, side.name
        assert f"x|{rid}" not in state, side.name


def test_a_polled_background_response_keeps_its_slot_past_its_admissions_lease(
    python_gateway: Side, nginx: Side, upstream: tuple[FakeUpstream, ServerThread]
) -> None:
    """A background job runs longer than its admission's lease (600 s; moved to 1.5 s from
    now here): a read answered `in_progress` renews its slot's lease (and its settle
    record's) by a lease from then, so once the original lease has ended the tenant's next
    request is still refused (concurrent_requests 1 holds for long jobs: the lease alone
    let a tenant run a new job every 600 s); the read that finds it `completed` gives the
    slot back."""
    fake = upstream[0]
    for side in sides(python_gateway, nginx):
        job = running(side, fake, "acme", f"long {side.name}")
        key, client, queued, answer, rid = (
            job.key,
            job.client,
            job.queued,
            job.answer,
            job.request_id,
        )
        level = EnforcementKeys(KeySchema(PREFIX)).tenant_level("acme")
        slot = f"h|{rid}|0|c=concurrent_requests"
        now_ms = side.db.time()[0] * 1000
        ends = now_ms + 1500  # the admission's lease, near its end
        side.db.zadd(level.leases, {slot: ends})

        assert client.responses.retrieve(queued.id).status == "in_progress", side.name
        renewed = side.db.zscore(level.leases, slot) or 0
        assert renewed >= now_ms + 599_000, (side.name, renewed)
        assert (side.db.zscore(level.leases, f"x|{rid}") or 0) > renewed, side.name
        while side.db.time()[0] * 1000 <= ends + 1000:  # past the original end
            time.sleep(0.1)
        side.db.hset(level.state, "n", str(ends))  # the level's care is due
        refused_for_its_slot(side, key, client)
        assert side.db.zscore(level.leases, slot) == renewed, side.name

        finish(fake, queued.id, answer)
        assert client.responses.retrieve(queued.id).status == "completed", side.name
        assert side.db.zscore(level.leases, slot) is None, side.name
        assert tenant_state(side, "acme")["c|concurrent_requests"] == "0", side.name
        admitted = side.chat(key, chat_body(max_tokens=1))
        assert admitted.status_code == 200, (side.name, admitted.text)


def in_flight(side: Side, tenant: str) -> float:
    """The tenant's `gateway_requests_in_flight`, every series of it (0: none)."""
    text = side.http.get(f"{side.url}/metrics").text
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        if family.name == "gateway_requests_in_flight"
        for sample in family.samples
        if sample.labels.get("tenant") == tenant
    )


@pytest.mark.parametrize("ending", ["read", "cancel"])
def test_a_background_response_is_in_flight_while_it_holds_its_slot(
    python_gateway: Side, nginx: Side, upstream: tuple[FakeUpstream, ServerThread], ending: str
) -> None:
    """The in-flight gauge follows the slots: a background response answered `queued` is
    still in flight (it was counted finished with its answer, so dashboards and a FairShare's
    demand missed every generation holding a slot), polled unfinished too, until the read or
    cancel that gives its slots back; a second read gives nothing back twice, never below 0."""
    fake = upstream[0]
    tenant = f"gauge{ending}"  # its own: the session's nginx keeps earlier tests' series
    for side in sides(python_gateway, nginx):
        job = running(side, fake, tenant, f"gauge {ending} {side.name}", limit=2)
        key, client, queued, answer = job.key, job.client, job.queued, job.answer
        assert tenant_state(side, tenant)["c|concurrent_requests"] == "1", side.name
        assert in_flight(side, tenant) == 1, side.name
        assert client.responses.retrieve(queued.id).status == "in_progress", side.name
        assert side.chat(key, chat_body(max_tokens=1)).status_code == 200, side.name
        assert in_flight(side, tenant) == 1, side.name  # the chat came and went

        finish(fake, queued.id, answer)
        if ending == "read":
            assert client.responses.retrieve(queued.id).status == "completed", side.name
        else:
            assert client.responses.cancel(queued.id).status == "cancelled", side.name
        assert tenant_state(side, tenant)["c|concurrent_requests"] == "0", side.name
        assert in_flight(side, tenant) == 0, side.name
        assert client.responses.retrieve(queued.id).status in ("completed", "cancelled")
        assert in_flight(side, tenant) == 0, side.name


def test_a_background_response_nobody_reads_leaves_the_gauge_when_its_lease_ends(
    tmp_path: Path, nginx: Side, nginx_session: NginxServer,
    upstream: tuple[FakeUpstream, ServerThread],
) -> None:  # fmt: skip
    """nginx with a lease of 2 s: a background response never read is in flight while its
    lease lasts (the slot is held in Redis as long) and leaves the gauge when it ends, as
    Redis frees the slot then (the Python gateway's lease is not a setting: its expiry is
    tested with a moved clock, tests/gateway/test_gateway_in_flight.py)."""
    fake = upstream[0]
    server = NginxServer(tmp_path, nginx_session.export_dir, upstream[1].port, nginx_session.env,
                         init_options="lease_seconds = 2").start()  # fmt: skip
    side = Side("short", server.url, nginx.db, nginx.http)
    try:
        key = running(side, fake, "acme", "forgotten, briefly").key
        assert in_flight(side, "acme") == 1
        assert side.chat(key, chat_body(max_tokens=1)).status_code == 429  # its slot, held
        time.sleep(2.2)
        assert in_flight(side, "acme") == 0
        assert side.chat(key, chat_body(max_tokens=1)).status_code == 200  # the sweep freed it
        assert in_flight(side, "acme") == 0
        assert server.problems() == []
    finally:
        server.stop()


def test_a_polled_background_response_stays_in_flight_past_its_first_lease(
    tmp_path: Path, nginx: Side, nginx_session: NginxServer,
    upstream: tuple[FakeUpstream, ServerThread],
) -> None:  # fmt: skip
    """nginx with a lease of 2 s, nothing moved by hand: a read answered `in_progress` at
    1.2 s renews the slot's lease and the gauge's `held` key with it, so at 2.6 s the job is
    still in flight and its slot still held (429); read completed, both are given back."""
    fake = upstream[0]
    server = NginxServer(tmp_path, nginx_session.export_dir, upstream[1].port, nginx_session.env,
                         init_options="lease_seconds = 2").start()  # fmt: skip
    side = Side("short", server.url, nginx.db, nginx.http)
    try:
        job = running(side, fake, "polled", "polled, briefly")
        key, client, queued, answer = job.key, job.client, job.queued, job.answer
        started = time.monotonic()
        time.sleep(1.2)
        assert client.responses.retrieve(queued.id).status == "in_progress"
        time.sleep(max(0.0, started + 2.6 - time.monotonic()))
        assert in_flight(side, "polled") == 1
        assert side.chat(key, chat_body(max_tokens=1)).status_code == 429  # still held
        finish(fake, queued.id, answer)
        assert client.responses.retrieve(queued.id).status == "completed"
        assert in_flight(side, "polled") == 0
        assert side.chat(key, chat_body(max_tokens=1)).status_code == 200
        assert server.problems() == []
    finally:
        server.stop()
